"""Model benchmark: parameters, FLOPs and CPU training throughput per variant. Prints figures only.

    .venv/bin/python benchmarks/model.py                # all tables
    .venv/bin/python benchmarks/model.py --steps 9      # more timed steps per row

FLOPs come from torch.utils.flop_counter.FlopCounterMode (matmuls and convolutions; the point
sampling and grouping of PointNet++ and the elementwise work are not counted) and are given per
sample, forward only, in GFLOP (1 multiply-add = 2 FLOPs). Throughput is forward + backward +
optimizer step on this machine's CPU, in samples/s, from the median step time after two untimed
warm-up steps (the median resists other processes sharing the CPU). The joint-
entropy loss's share is measured twice: as the step-time difference between ``jam-je`` and ``jam``,
and by timing the loss alone (forward + backward) on attention maps of the model's shape.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from posefr_dist.config import LossConfig  # noqa: E402
from posefr_dist.model import create_model, joint_entropy_loss  # noqa: E402
from posefr_dist.model.export import _from_joint  # noqa: E402
from posefr_dist.train import make_optimizer, train_step  # noqa: E402

NUM_CLASSES = 1000

#: (label, 2D encoder, 3D encoder, image size, points, batch size for timing)
SETUPS = [
    ("tiny", "ir_tiny", "pointnet2_tiny", 64, 256, 32),
    ("ir18", "ir18", "pointnet2_ssg", 112, 1024, 8),
]
VARIANTS = ["2d-only", "jam", "jam-je"]


def _name(variant: str, e2: str, e3: str) -> str:
    return f"{variant}/{e2}" if variant == "2d-only" else f"{variant}/{e2}/{e3}"


def _batch(b: int, size: int, n: int) -> dict:
    pts = torch.randn(b, n, 3)
    return {"image": torch.rand(b, 3, size, size) * 2 - 1,
            "points": pts / pts.norm(dim=-1).amax(dim=1)[:, None, None],
            "has_points": torch.ones(b, dtype=torch.bool),
            "label": torch.randint(0, NUM_CLASSES, (b,))}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _gflops(fn) -> float:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops() / 1e9


def table_params_flops() -> None:
    print(f"## Parameters (M) and forward GFLOP per sample ({NUM_CLASSES} classes)\n")
    print("| model | image | points | params total | of which heads | exported 2D params | "
          "train fwd GFLOP | 2D inference GFLOP |")
    print("|---|---|---|---|---|---|---|---|")
    rows = [(v, e2, e3, s, n) for (_, e2, e3, s, n, _) in SETUPS for v in VARIANTS]
    rows.append(("2d-only", "ir50", "pointnet2_ssg", 112, 1024))
    for variant, e2, e3, size, n in rows:
        torch.manual_seed(0)
        name = _name(variant, e2, e3)
        model = create_model(name, NUM_CLASSES, image_size=size, num_points=n).eval()
        heads = _count(model.head_2d) + (_count(model.head_3d) if model.head_3d is not None else 0)
        exported = _from_joint(model)
        b = 2
        batch = _batch(b, size, n)
        with torch.no_grad():
            train_f = _gflops(lambda: model(batch)) / b
            infer_f = _gflops(lambda: exported(batch["image"])) / b
        print(f"| {name} | {size} | {n if variant != '2d-only' else '-'} | {_count(model) / 1e6:.2f} | "
              f"{heads / 1e6:.2f} | {_count(exported) / 1e6:.2f} | {train_f:.3f} | {infer_f:.3f} |")
    print()


def _median_time(fn, steps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _time_steps(model, batch, steps: int) -> float:
    opt = make_optimizer(model, "sgd", lr=1e-3)
    return _median_time(lambda: train_step(model, opt, batch, grad_clip=5.0), steps)


def _time_je(b: int, hw: int, steps: int, loss_cfg: LossConfig) -> float:
    a2 = torch.softmax(torch.randn(b, hw, hw), -1).requires_grad_(True)
    a3 = torch.softmax(torch.randn(b, hw, hw), -1).requires_grad_(True)

    def once():
        joint_entropy_loss(a2, a3, bins=loss_cfg.je_bins, bandwidth=loss_cfg.je_bandwidth,
                           norm=loss_cfg.je_norm).backward()

    return _median_time(once, max(steps, 5))


def table_throughput(steps: int) -> None:
    loss_cfg = LossConfig()
    print(f"## Training step on the CPU ({torch.get_num_threads()} threads, {os.cpu_count()} cores; "
          f"median of {steps} steps after 2 warm-up steps)\n")
    print("| model | batch | image | s/step | samples/s | JE share of step |")
    print("|---|---|---|---|---|---|")
    for label, e2, e3, size, n, b in SETUPS:
        times = {}
        for variant in VARIANTS:
            torch.manual_seed(0)
            name = _name(variant, e2, e3)
            model = create_model(name, NUM_CLASSES, image_size=size, num_points=n)
            times[variant] = _time_steps(model, _batch(b, size, n), steps)
            share = ""
            if variant == "jam-je":
                hw = (size // 16) ** 2
                je = _time_je(b, hw, steps, loss_cfg)
                diff = times["jam-je"] - times["jam"]
                share = (f"{100 * je / times[variant]:.1f} % alone ({je * 1e3:.1f} ms, {loss_cfg.je_bins} bins); "
                         f"step diff vs jam {diff * 1e3:+.0f} ms")
            print(f"| {name} | {b} | {size} | {times[variant]:.3f} | {b / times[variant]:.1f} | {share} |")
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per row")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores\n")
    table_params_flops()
    table_throughput(args.steps)


if __name__ == "__main__":
    main()
