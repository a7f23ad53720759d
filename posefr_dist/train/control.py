"""Run control of the per-worker loop: the optimizer and its schedule (with the pretrained groups'
freeze), lambda_JE's warm-up, buffer sync across ranks, the position of a resumed run on another
world size, preemption notices and the chaos hook of the tests."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import torch

log = logging.getLogger("posefr.train")


def sync_buffers(module: torch.nn.Module, world: int) -> None:
    """Give every rank rank 0's buffers (batch-norm statistics, AdaFace's norm EMA).

    Buffers are not gradients, so data parallelism leaves them to drift apart per rank; like
    DDP's ``broadcast_buffers`` we broadcast rank 0's after every optimizer step. That also makes
    rank 0's checkpoint the whole state of every rank, so a resumed run continues exactly.
    """
    if world < 2:
        return
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    bufs = [b for b in module.buffers() if b.is_floating_point() or b.dtype in (torch.int64, torch.int32)]
    if not bufs:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for b in bufs:
        by_dtype.setdefault(b.dtype, []).append(b)
    for group in by_dtype.values():
        flat = _flatten_dense_tensors([b.data for b in group])
        dist.broadcast(flat, src=0)
        for b, v in zip(group, _unflatten_dense_tensors(flat, [b.data for b in group])):
            b.data.copy_(v)


class Chaos:
    """``train.chaos_kill_at = EPOCH:STEP:RANK``: that worker dies (SIGKILL) once per run."""

    def __init__(self, spec: str, marker: str):
        self.at = tuple(int(x) for x in spec.split(":")) if spec else None
        self.marker = marker

    def maybe_die(self, epoch: int, step_in_epoch: int, rank: int) -> None:
        if self.at is None or (epoch, step_in_epoch, rank) != self.at or os.path.exists(self.marker):
            return
        os.makedirs(os.path.dirname(self.marker), exist_ok=True)
        with open(self.marker, "w") as f:
            f.write(f"killed rank {rank} at epoch {epoch} step {step_in_epoch}\n")
        log.warning("chaos: killing worker rank %d at epoch %d step %d", rank, epoch, step_in_epoch)
        os.kill(os.getpid(), signal.SIGKILL)


def set_report_log_level(level: str) -> None:
    """Apply ``train.ray_log_level`` to Ray Train's per-report log line in this worker.

    Ray Train 2.60 logs every report (its whole metrics dict, per rank) at INFO from a logger named
    after the file path of its ``execution/context.py``, outside ``ray.train``, so RunConfig's
    ``logging_config`` does not reach it.
    """
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(level)


class PretrainedFreeze:
    """``train.freeze_pretrained_epochs``: the epoch the loop is in, which the learning-rate lambdas
    of the pretrained groups read (factor 0 while frozen), and the pretrained batch norms that stay
    in eval mode meanwhile.

    Freezing by learning rate, not ``requires_grad``, is what DeepSpeed ZeRO 0-2 allows after
    ``deepspeed.initialize`` (its flat partitions are built once); SGD's and AdamW's weight decay
    are scaled by the learning rate, so a zero rate leaves the weights exactly as they are.
    """

    def __init__(self, epochs: int, batchnorms: Any = ()) -> None:
        self.epochs = int(epochs)
        self.epoch = 0
        self.batchnorms = list(batchnorms)

    @property
    def active(self) -> bool:
        return self.epoch < self.epochs

    def set_epoch(self, epoch: int, scheduler: Any = None) -> None:
        """Enter ``epoch``: recompute every group's learning rate for it, and apply :meth:`apply_eval`."""
        self.epoch = int(epoch)
        if scheduler is not None:
            refresh_lr(scheduler)
        self.apply_eval()

    def apply_eval(self) -> None:
        """While frozen, the pretrained batch norms go (back) to eval mode; call after ``train()``."""
        if self.active:
            for m in self.batchnorms:
                m.eval()


def refresh_lr(scheduler: Any) -> None:
    """Set each group's learning rate from a ``LambdaLR``'s lambdas at its current step (the lambdas
    may depend on state that changed since the scheduler's last step, e.g. the epoch)."""
    groups = scheduler.optimizer.param_groups
    for g, f, base in zip(groups, scheduler.lr_lambdas, scheduler.base_lrs):
        g["lr"] = base * f(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in groups]


def build_optimizer(model: torch.nn.Module, tc: Any, total_steps: int, pretrained: dict[str, Any] | None = None
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, PretrainedFreeze]:
    """The optimizer, its schedule and the freeze control of a run.

    Every group follows the warm-up + cosine schedule (:func:`lr_lambda`) times its base rate.
    With ``pretrained`` (what ``load_pretrained_2d`` returned) and ``train.pretrained_lr_mult`` != 1
    or ``train.freeze_pretrained_epochs`` > 0, the loaded parameters get their own groups at
    ``lr * pretrained_lr_mult`` (see :func:`make_optimizer`), whose factor is 0 for epochs below
    ``freeze_pretrained_epochs`` (call ``freeze.set_epoch(epoch, scheduler)`` at every epoch start).
    Otherwise the groups are the plain decay/no-decay pair.
    """
    from posefr_dist.train.deepspeed import lr_lambda
    from posefr_dist.train.reference import make_optimizer, pretrained_batchnorms

    split = bool(pretrained) and (tc.pretrained_lr_mult != 1.0 or tc.freeze_pretrained_epochs > 0)
    params = list(pretrained["params"]) if split and pretrained else []
    optimizer = make_optimizer(model, tc.optimizer, tc.lr, tc.weight_decay, tc.momentum, pretrained=params,
                               pretrained_lr_mult=tc.pretrained_lr_mult)
    freeze = PretrainedFreeze(tc.freeze_pretrained_epochs if split else 0,
                              pretrained_batchnorms(model, pretrained["loaded"]) if split and pretrained else ())
    base = lr_lambda(tc, total_steps)

    def frozen_or_base(step: int) -> float:
        return 0.0 if freeze.active else base(step)

    lambdas = [frozen_or_base if g.get("pretrained") else base for g in optimizer.param_groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
    return optimizer, scheduler, freeze


def je_weight(base: float, epoch: int, warmup_epochs: int) -> float:
    """``loss.je_warmup_epochs``: lambda_JE of ``epoch``, rising linearly to ``base``."""
    if warmup_epochs <= 0:
        return base
    return base * min(1.0, (epoch + 1) / (warmup_epochs + 1))


def position_for_world(epoch: int, batches: int, saved_world: int, world: int, batch_size: int, grad_accum: int,
                       steps_per_epoch: int) -> tuple[int, int, int]:
    """(epoch, batches, global step) in a ``world``-worker run of a checkpoint saved by ``saved_world``
    workers ``batches`` micro-batches into ``epoch``.

    The epoch continues at the share of its rows already consumed (rounded down to whole optimizer
    steps), in the new world's plan: the rest of that epoch reads the new plan's rows, so a few of
    its rows may be seen twice or not at all; later epochs follow the plan exactly. The step count is
    the new world's, so the learning-rate schedule stays at the same point of the run.
    """
    rows = batches * batch_size * saved_world
    steps = min(rows // (batch_size * world) // grad_accum, steps_per_epoch)
    if steps >= steps_per_epoch:
        epoch, steps = epoch + 1, 0
    return epoch, steps * grad_accum, epoch * steps_per_epoch + steps


class PreemptionCheck:
    """``train.preemption_check_steps``: asks Ray Train every N optimizer steps whether a node of the
    group is being preempted (a barrier: every rank asks at the same steps, so all agree), and says
    so once per worker group."""

    def __init__(self, every: int) -> None:
        self.every = int(every)
        self.seen = False
        self.info: Any = None

    def notice(self, global_step: int) -> bool:
        if self.seen or not self.every or global_step % self.every:
            return False
        import ray.train

        get = getattr(ray.train, "get_preemption_info", None)
        if get is None:  # a Ray without preemption notices
            self.every = 0
            return False
        self.info = get()
        if self.info is None:
            return False
        self.seen = True
        log.warning("node preemption notice: nodes %s (ranks %s), deadline %s", self.info.preempted_node_ids,
                    self.info.preempted_ranks, self.info.deadline_ms)
        return True
