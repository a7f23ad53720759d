"""Single-process reference training loop, in plain PyTorch.

It trains any model variant on an iterable of batches, for debugging and for comparison with the
distributed path, which reuses :func:`forward_losses` (and :func:`train_step` where it owns the
optimizer step).

One machine, synthetic tensors::

    model = build_model(ModelConfig(encoder_2d="ir_tiny", encoder_3d="pointnet2_tiny"), LossConfig(),
                        num_classes=10, image_size=64, num_points=256)
    history = train_reference(model, lambda epoch: make_batches(epoch), epochs=5, lr=0.05)
    print(history[-1]["loss"])

A batch is the dict of tensors ``PoseFRModel.forward`` takes (``image``, ``label``, ``points``,
``has_points``, ...); non-tensor entries (ids) are passed through untouched.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

__all__ = ["LOSS_TERMS", "forward_losses", "train_step", "train_reference", "make_optimizer",
           "pretrained_batchnorms", "move_batch"]

#: the scalar terms every step reports
LOSS_TERMS = ("loss", "loss_2d", "loss_3d", "loss_je")


def move_batch(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """Tensors to ``device`` (non-blocking); anything else unchanged."""
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def forward_losses(model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
    """One forward pass: the loss to back-propagate and the per-term floats to log.

    Returns:
        ``(loss, metrics)`` with metrics ``loss``, ``loss_2d``, ``loss_3d``, ``loss_je``, ``n_3d``
        (rows that fed the 3D branch) and ``batch_size``.

    Raises:
        FloatingPointError: the loss is not finite (the message lists the terms).
    """
    out = model(batch)
    loss = out["loss"]
    metrics = {k: float(out[k].detach()) for k in LOSS_TERMS}
    metrics["n_3d"] = float(out.get("n_3d", 0))
    metrics["batch_size"] = float(batch["image"].shape[0])
    if not math.isfinite(metrics["loss"]):
        terms = ", ".join(f"{k}={metrics[k]}" for k in LOSS_TERMS)
        raise FloatingPointError(f"non-finite loss: {terms}")
    return loss, metrics


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: Mapping[str, Any], *,
               grad_clip: float | None = None, eval_modules: Iterable[nn.Module] = ()) -> dict[str, float]:
    """Forward, backward, (clip), step on one batch; returns the step's metrics (floats).

    The model is put in training mode, except ``eval_modules`` (e.g. the batch norms of a frozen
    pretrained trunk). With ``grad_clip`` the global gradient norm is clipped and reported as
    ``grad_norm`` (before clipping).
    """
    model.train()
    for m in eval_modules:
        m.eval()
    optimizer.zero_grad(set_to_none=True)
    loss, metrics = forward_losses(model, batch)
    loss.backward()
    if grad_clip is not None:
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    optimizer.step()
    return metrics


def make_optimizer(model: nn.Module, name: str = "sgd", lr: float = 0.1, weight_decay: float = 5e-4,
                   momentum: float = 0.9, *, pretrained: Iterable[str] = (),
                   pretrained_lr_mult: float = 1.0) -> torch.optim.Optimizer:
    """SGD with momentum (AdaFace's choice) or AdamW; no weight decay on 1-d parameters.

    Biases, batch-norm and PReLU weights and the attention's gamma are not decayed; conv/linear
    weights and class centres are.

    Args:
        pretrained: names (``model.named_parameters()``) of the parameters loaded from a pretrained
            model (``load_pretrained_2d(...)["params"]``). When given, the groups are: new decay,
            new no-decay (at ``lr``), pretrained decay, pretrained no-decay (at
            ``lr * pretrained_lr_mult``, marked ``"pretrained": True``); empty groups are left out.
            Without, exactly two groups (decay, no-decay).
        pretrained_lr_mult: the learning-rate factor of the pretrained groups.
    """
    pre = set(pretrained)
    if not pre:
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    else:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        unknown = pre - {n for n, _ in named}
        if unknown:
            raise ValueError(f"pretrained: {len(unknown)} name(s) are not trainable parameters of the model, "
                             f"e.g. {sorted(unknown)[:3]}")
        groups = []
        for is_pre in (False, True):
            for decayed in (True, False):
                params = [p for n, p in named if (n in pre) == is_pre and (p.dim() >= 2) == decayed]
                if params:
                    groups.append({"params": params, "weight_decay": weight_decay if decayed else 0.0,
                                   "lr": lr * pretrained_lr_mult if is_pre else lr, "pretrained": is_pre})
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def pretrained_batchnorms(model: nn.Module, loaded: Iterable[str]) -> list[nn.Module]:
    """The batch-norm modules of ``model`` whose statistics were loaded from a pretrained model
    (``loaded``: state-dict keys, ``load_pretrained_2d(...)["loaded"]``): the ones a freeze keeps
    in eval mode, so their running statistics stay the pretrained ones."""
    keys = set(loaded)
    return [m for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and f"{n}.running_mean" in keys]


def train_reference(model: nn.Module, batches: Callable[[int], Iterable[Mapping[str, Any]]], epochs: int,
                    lr: float, *, optimizer: str | torch.optim.Optimizer = "sgd", weight_decay: float = 5e-4,
                    momentum: float = 0.9, grad_clip: float | None = None, device: str | torch.device = "cpu",
                    warmup_steps: int = 0, log: Callable[[dict[str, float]], None] | None = None,
                    pretrained: Mapping[str, Any] | None = None, pretrained_lr_mult: float = 1.0,
                    freeze_pretrained_epochs: int = 0) -> list[dict[str, float]]:
    """Train for ``epochs`` epochs; return one dict of per-epoch mean metrics per epoch.

    Args:
        model: e.g. a ``PoseFRModel``; moved to ``device``.
        batches: ``batches(epoch)`` yields that epoch's batches (so each epoch may reshuffle).
        epochs: number of passes.
        lr: peak learning rate; epoch e runs at ``lr * (1 + cos(pi * e / epochs)) / 2``, after a
            linear warm-up over the first ``warmup_steps`` steps.
        optimizer: ``"sgd"`` / ``"adamw"`` or a ready optimizer (whose groups' ``lr`` the schedule
            overwrites).
        weight_decay, momentum: for the built optimizer.
        grad_clip: clip the global gradient norm to this value.
        device: where to train.
        warmup_steps: linear learning-rate warm-up, in steps.
        log: called with each epoch's summary as soon as it is complete.
        pretrained: what ``load_pretrained_2d`` returned for this model: its ``params`` train at
            ``lr * pretrained_lr_mult`` and, for the first ``freeze_pretrained_epochs`` epochs, not at
            all (learning rate 0, and the batch norms it loaded in eval mode).

    Returns:
        ``[{"epoch", "steps", "samples", "seconds", "lr", "loss", "loss_2d", "loss_3d", "loss_je",
        "n_3d"}, ...]``: means over the epoch's batches, weighted by batch size.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    model.to(device)
    pre_params = list((pretrained or {}).get("params", ()))
    if freeze_pretrained_epochs and not pre_params:
        raise ValueError("freeze_pretrained_epochs needs the pretrained parameters (pretrained=...)")
    opt = (make_optimizer(model, optimizer, lr, weight_decay, momentum, pretrained=pre_params,
                          pretrained_lr_mult=pretrained_lr_mult) if isinstance(optimizer, str) else optimizer)
    frozen_bn = pretrained_batchnorms(model, (pretrained or {}).get("loaded", ()))
    history: list[dict[str, float]] = []
    step = 0
    for epoch in range(epochs):
        # 1) cosine decay by epoch (epoch 0 at the peak), 2) linear warm-up over the first steps
        epoch_lr = lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
        sums: dict[str, float] = {}
        samples, steps = 0.0, 0
        t0 = time.perf_counter()
        frozen = epoch < freeze_pretrained_epochs
        for batch in batches(epoch):
            warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
            for g in opt.param_groups:
                mult = (0.0 if frozen else pretrained_lr_mult) if g.get("pretrained") else 1.0
                g["lr"] = epoch_lr * warm * mult
            m = train_step(model, opt, move_batch(batch, device), grad_clip=grad_clip,
                           eval_modules=frozen_bn if frozen else ())
            n = m.pop("batch_size")
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v * n
            samples += n
            steps += 1
            step += 1
        if steps == 0:
            raise ValueError(f"batches({epoch}) yielded no batch")
        summary = {"epoch": float(epoch), "steps": float(steps), "samples": samples,
                   "seconds": time.perf_counter() - t0, "lr": opt.param_groups[0]["lr"]}
        summary.update({k: v / samples for k, v in sums.items()})
        history.append(summary)
        if log is not None:
            log(summary)
    return history
