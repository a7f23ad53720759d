"""DeepSpeed configuration built from ours, and DeepSpeed import on the CPU.

On a CPU machine DeepSpeed runs on its CPU accelerator with the gloo backend (the process group
Ray Train sets up); on GPUs, CUDA with NCCL and bf16. Which one is selected by ``train.use_gpu``
and ``train.precision``.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from posefr_dist.config import TrainConfig


def resolve_precision(tc: TrainConfig) -> str:
    """``fp32`` or ``bf16``: ``auto`` means bf16 on GPU, fp32 on the CPU."""
    if tc.precision == "auto":
        return "bf16" if tc.use_gpu else "fp32"
    return tc.precision


def deepspeed_config(tc: TrainConfig, micro_batch: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON config for ``tc`` (optimizer and scheduler are passed as objects)."""
    precision = resolve_precision(tc)
    zero: dict[str, Any] = {"stage": tc.zero_stage}
    if tc.zero_stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=tc.use_gpu, reduce_bucket_size=5e7,
                    allgather_bucket_size=5e7)
    if tc.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": micro_batch * tc.grad_accum * world_size,
        "gradient_clipping": tc.grad_clip if tc.grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        # our optimizers (SGD with momentum, AdamW) are torch's own: no fused op to compile
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "dump_state": False,
    }


def lr_lambda(tc: TrainConfig, total_steps: int):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` (a factor of the peak lr)."""

    def f(step: int) -> float:
        if tc.warmup_steps > 0 and step < tc.warmup_steps:
            return (step + 1) / tc.warmup_steps
        span = max(1, total_steps - tc.warmup_steps)
        t = min(1.0, (step - tc.warmup_steps) / span)
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))

    return f


def import_deepspeed(use_gpu: bool):
    """Import DeepSpeed for the chosen accelerator.

    On the CPU, DeepSpeed JIT-compiles a shared-memory collective op at every initialize (35-45 s
    the first time). Our CPU path communicates through gloo, so that build is skipped.
    """
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # noqa: F401

    if not use_gpu:
        comm_torch = sys.modules.get("deepspeed.comm.torch")
        if comm_torch is not None:
            comm_torch.build_shm_op = lambda: None
    return deepspeed
