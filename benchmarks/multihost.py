"""Multi-host figures on the namespace testbed (cluster/testbed.sh; needs root and iproute2).

    .venv/bin/python benchmarks/multihost.py [--identities 48 --views 10 --epochs 3] [--part train,kill,preempt,verify]

Prints, figures only:
- training samples/s (epochs after the first, from the run's history) of 1 host x 2 workers vs
  2 hosts x 1 worker, the same data (S3 on the head) and the same total logical CPUs;
- the time from a host kill (SIGKILL of every process of the host of rank 1, mid-epoch) to the
  first training step of the restarted group, split into detection (kill -> the new group's
  workers start) and restart (worker start -> first step);
- steps lost on a preemption (SIGTERM, grace period): steps trained after the notice's checkpoint,
  which the restarted group trains again; and the notice-to-checkpoint time;
- verification pairs/s of `posefr verify` (10^4 gallery x 10^5 probes = 10^9 pairs, 32-d) with its
  Ray tasks on 1 worker host vs 2 worker hosts.

All hosts share this machine's cores: 2 hosts are not 2 machines' worth of compute here, so the
figures show the cost of the network split and of recovery, not scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))

import pyarrow.parquet as pq  # noqa: E402

from posefr_dist.config import SynthConfig  # noqa: E402
from posefr_dist.data.synth import synthesize  # noqa: E402
from tests import multihost as mh  # noqa: E402
from tests.testbed import Testbed, testbed_unavailable  # noqa: E402


def bed(name: str, workers: int, cpus: int, slots: int) -> Testbed:
    return Testbed(name, workers=workers, worker_cpus=cpus, grace=15, worker_resources={"train_slot": slots},
                   extra_env={"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1"})


def shards(tb: Testbed, tmp: Path, args) -> str:
    root = tmp / "shards"
    if not root.exists():
        synthesize(SynthConfig(identities=args.identities, views_per_identity=args.views, image_size=64,
                               points=128, rows_per_shard=64, val_fraction=0.15, test_fraction=0.15),
                   str(root), use_ray=False)
    return mh.upload(tb, root, "bench/shards")


def run(tb: Testbed, tmp: Path, uri: str, name: str, args, **train):
    config, trace = mh.config(tmp, uri, name, **{"epochs": args.epochs, "val_every_steps": 0, **train})
    proc = mh.train(tb, config, timeout=1800)
    return config, trace, proc


def rates(tb: Testbed, name: str) -> list[float]:
    return [h["train/samples_per_s"] for h in mh.history(tb, name) if h.get("end_of_epoch")]


def part_train(tmp: Path, args) -> None:
    out = {}
    for label, workers, cpus, slots in (("1 host x 2 workers", 1, 4, 2), ("2 hosts x 1 worker", 2, 2, 1)):
        tb = bed("pfrbt", workers, cpus, slots)
        try:
            tb.up()
            uri = shards(tb, tmp, args)
            _, _, proc = run(tb, tmp, uri, "throughput", args)
            mh.finish(proc, timeout=1800)
            r = rates(tb, "throughput")
            out[label] = sum(r[1:]) / max(1, len(r) - 1)
            print(f"train  {label}: {out[label]:.1f} samples/s (epochs 2+; per epoch {[round(x, 1) for x in r]})",
                  flush=True)
        finally:
            tb.down()
    a, b = out.values()
    print(f"train  ratio 2 hosts / 1 host: {b / a:.2f}", flush=True)


def part_kill(tmp: Path, args) -> None:
    tb = bed("pfrbk", 3, 2, 1)
    try:
        tb.up()
        uri = shards(tb, tmp, args)
        _, trace, proc = run(tb, tmp, uri, "kill", args, val_every_steps=4)
        victim, t_kill = mh.strike(tb, trace, proc, "kill", 1, 2, timeout=900)
        mh.wait(lambda: [s for s in mh.steps(trace) if s["time"] > t_kill], proc, 600, "a step after the restart")
        start = min(s["time"] for s in mh.starts(trace) if s["time"] > t_kill)
        first = min(s["time"] for s in mh.steps(trace) if s["time"] > t_kill)
        print(f"kill   host {victim} killed at epoch 1: training again after {first - t_kill:.1f} s "
              f"(new group's workers started after {start - t_kill:.1f} s, first step {first - start:.1f} s later)",
              flush=True)
        mh.finish(proc, timeout=1800)
    finally:
        tb.down()


def part_preempt(tmp: Path, args) -> None:
    tb = bed("pfrbp", 3, 2, 1)
    try:
        tb.up()
        uri = shards(tb, tmp, args)
        _, trace, proc = run(tb, tmp, uri, "preempt", args, preemption_check_steps=1)
        victim, t_notice = mh.strike(tb, trace, proc, "preempt", 1, 2, timeout=900)
        mh.finish(proc, timeout=1800)
        jit = [h for h in mh.history(tb, "preempt") if h.get("preemption_checkpoint")]
        after = sorted((s for s in mh.starts(trace) if s["time"] > t_notice), key=lambda s: s["time"])
        resumed = after[0]["time"]
        before = [s for s in mh.steps(trace) if s["time"] < resumed]
        lost = len(before) - after[0]["global_step"]
        if jit:
            print(f"preempt host {victim}, drain deadline {tb.grace} s: notice checkpoint {jit[0]['time'] - t_notice:.1f} s "
                  f"after SIGTERM at step {jit[0]['step']}; {len(before) - jit[0]['step']} step(s) trained after it "
                  f"before the node went; the restart resumed at step {after[0]['global_step']}: {lost} step(s) lost "
                  f"(without the notice, from the last epoch end: {before[-1]['batch'] + 1 if before else 0}); "
                  f"training again {resumed - t_notice:.1f} s after SIGTERM", flush=True)
        else:
            print(f"preempt host {victim}: NO notice checkpoint was saved; {lost} step(s) lost", flush=True)
    finally:
        tb.down()


def part_verify(tmp: Path, args) -> None:
    table = mh.embeddings(10_000, 100_000, 32)
    local = tmp / "emb" / "embeddings.parquet"
    local.parent.mkdir(exist_ok=True)
    pq.write_table(table, local)
    for label, workers, cpus in (("1 host", 1, 2), ("2 hosts", 2, 1)):
        tb = Testbed("pfrbv", workers=workers, worker_cpus=cpus)
        try:
            tb.up()
            uri = mh.upload(tb, local.parent, "bench/emb")
            t0 = time.perf_counter()
            tb.run("head", [mh.POSEFR, "verify", uri, "--out", f"s3://{mh.BUCKET}/bench/verify"], timeout=1800)
            dt = time.perf_counter() - t0
            print(f"verify {label}: 10^9 pairs in {dt:.1f} s = {1e9 / dt / 1e6:.1f} M pairs/s "
                  f"(whole command, process start included)", flush=True)
        finally:
            tb.down()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=48)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--part", default="train,kill,preempt,verify")
    args = ap.parse_args()
    why = testbed_unavailable()
    if why:
        sys.exit(f"multihost benchmark: {why}")
    with tempfile.TemporaryDirectory(prefix="posefr-mhbench-") as d:
        tmp = Path(d)
        for part in args.part.split(","):
            {"train": part_train, "kill": part_kill, "preempt": part_preempt, "verify": part_verify}[part](tmp, args)
            print(json.dumps({"done": part}), flush=True)


if __name__ == "__main__":
    main()
