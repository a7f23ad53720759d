"""Training: the single-process reference loop (the distributed trainer reuses its step)."""

from .reference import LOSS_TERMS, forward_losses, make_optimizer, move_batch, train_reference, train_step

__all__ = ["LOSS_TERMS", "forward_losses", "make_optimizer", "move_batch", "train_reference", "train_step"]
