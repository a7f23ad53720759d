"""Data-plane throughput: the training reader (streamed, cached, raw shards, S3) vs a DataLoader.

    .venv/bin/python benchmarks/data_pipeline.py [--identities 100 --views 20 --cpus 2 --epochs 3]

On one synthetic train split it prints, per reader, the first-batch latency and samples/s of an
epoch of decoded float batches (what the training step consumes; no augmentation):
  1. synthetic generation (1 process, and as Ray tasks);
  2. Ray streaming, cold: every epoch decodes its windows (``data.cache=off``; one stream over all
     epochs, as training reads it; samples/s over all epochs, first batch of the first), folder and S3;
  3. Ray cached: the split decoded once into the object store (fill time printed), then epochs
     2.. index it (``data.cache=memory``);
  4. Ray raw shards: the split packed (``posefr shards pack``), streamed with no image codec;
  5. a PyTorch DataLoader with --cpus workers over the same files and the same decode, with and
     without persistent workers (persistent: epochs 2..);
and the ratios to the DataLoader (targets: cold >= 1.0x, cached and raw >= 2x). Figures, not
assertions: the numbers depend on the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402

from benchmarks.common import PeakRSS  # noqa: E402
from posefr_dist import storage  # noqa: E402
from posefr_dist.config import DataConfig, SynthConfig  # noqa: E402
from posefr_dist.data import shards as S  # noqa: E402
from posefr_dist.data.synth import _shard_plan, generate_rows, split_identities, synthesize  # noqa: E402


def bench_generation(cfg: SynthConfig, n: int) -> float:
    plan = _shard_plan(cfg, split_identities(cfg))
    rows = [r for p in plan for r in p["rows"]][:n]
    generate_rows(cfg, rows[: cfg.views_per_identity])  # warm-up: imports, open3d
    t0 = time.perf_counter()
    generate_rows(cfg, rows)
    return len(rows) / (time.perf_counter() - t0)


class ShardTorchDataset:
    """A map-style torch dataset over the same shards, with the same decode as the pipeline."""

    def __init__(self, root: str, split: str):
        import pyarrow.parquet as pq

        self.uris = S.shard_uris(root, split)
        self.index = []
        for f, uri in enumerate(self.uris):
            fs, path = storage.filesystem(uri)
            n = pq.read_metadata(path, filesystem=fs).num_rows
            self.index += [(f, i) for i in range(n)]
        man = S.read_manifest(root)
        self.num_points, self.size = man["num_points"], man["image_size"]
        self._cache: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int):
        import torch

        f, i = self.index[k]
        if f not in self._cache:  # one shard in memory per worker at a time
            self._cache = {f: S.read_shard_bytes(self.uris[f])}
        t = self._cache[f]
        img = S.decode_image(t.column("image")[i].as_py()).transpose(2, 0, 1).astype(np.float32) * (2 / 255) - 1
        pts = t.column("points")[i].values.to_numpy().reshape(self.num_points, 3)
        return {"image": torch.from_numpy(img), "points": torch.from_numpy(pts.copy()),
                "label": int(t.column("label")[i].as_py())}


def _epoch(batches) -> tuple[float, float, int]:
    """(first-batch latency s, samples/s, rows) of iterating ``batches``."""
    t0 = time.perf_counter()
    first, n = None, 0
    for b in batches:
        if first is None:
            first = time.perf_counter() - t0
        n += len(b["label"])
    dt = time.perf_counter() - t0
    return first or dt, n / dt, n


def bench_dataloader(root: str, cpus: int, batch: int, epochs: int) -> dict[str, tuple[float, float]]:
    import torch

    ds = ShardTorchDataset(root, "train")
    out = {}
    # contiguous order within shards (a sampler over shards), as the Ray reader reads files
    fresh = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=cpus, shuffle=False,
                                        persistent_workers=False)
    first, rate, _ = _epoch(fresh)
    out["DataLoader, new workers per epoch"] = (first, rate)
    pers = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=cpus, shuffle=False,
                                       persistent_workers=True)
    _epoch(pers)  # epoch 1 starts the workers
    figs = [_epoch(pers) for _ in range(max(1, epochs - 1))]
    out["DataLoader, persistent workers (epochs 2..)"] = (float(np.mean([f[0] for f in figs])),
                                                         float(np.mean([f[1] for f in figs])))
    return out


def bench_reader(uri: str, cfg: DataConfig, batch: int, epochs: int, label: str) -> dict[str, tuple[float, float]]:
    """Epochs of rank 0 of 1 (the whole split) through the training reader, as the training loop
    reads them (a streamed split: one stream for all epochs)."""
    from posefr_dist.data import loader as L

    t0 = time.perf_counter()
    handle = L.prepare(uri, cfg, splits=("train",))["train"]
    prep = time.perf_counter() - t0
    stream = None if handle.is_cached else L.RankStream(handle, cfg, seed=0, rank=0, world=1,
                                                         epochs=list(range(epochs)), batch_size=batch)
    figs = [_epoch(L.RankBatches(handle, cfg, seed=0, epoch=e, rank=0, world=1, batch_size=batch, stream=stream))
            for e in range(epochs)]
    rows = sum(f[2] for f in figs)
    secs = sum(f[2] / f[1] for f in figs)
    if handle.is_cached:
        later = figs[1:] or figs
        return {f"{label}: decode into the cache": (prep, figs[0][2] / prep),
                f"{label}: epochs 2.. from the cache": (float(np.mean([f[0] for f in later])),
                                                        sum(f[2] for f in later) / sum(f[2] / f[1] for f in later))}
    return {label: (figs[0][0], rows / secs)}

def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--identities", type=int, default=100)
    ap.add_argument("--views", type=int, default=20)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--points", type=int, default=1024)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--gen-samples", type=int, default=400)
    args = ap.parse_args()
    cfg = SynthConfig(identities=args.identities, views_per_identity=args.views, image_size=args.image_size,
                      points=args.points, rows_per_shard=256)
    work = Path(tempfile.mkdtemp(prefix="posefr-bench-"))
    print(f"# data pipeline benchmark: {os.cpu_count()} cores, {args.image_size}x{args.image_size}, "
          f"{args.points} points, {args.identities}x{args.views} samples, batch {args.batch}")
    moto = None
    try:
        rate = bench_generation(cfg, args.gen_samples)
        print(f"synthetic generation, 1 process: {rate:8.1f} samples/s per core")

        import ray

        from posefr_dist.data.pack import pack
        from posefr_dist.raysupport import ensure_ray
        from tests.conftest import free_port, wait_for_port

        # S3 server first, so Ray workers inherit its variables
        port = free_port()
        moto = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p",
                                 str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port)
        os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
        import boto3

        boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket="bench")
        ensure_ray(num_cpus=args.cpus)
        root = str(work / "shards")
        with PeakRSS() as mem:
            man = synthesize(cfg, root)
        total = sum(s["rows"] for s in man["splits"].values())
        print(f"synthetic generation, Ray tasks ({args.cpus} CPUs): {total / man['_elapsed_s']:8.1f} samples/s, "
              f"peak RSS {mem.peak_gib:.2f} GiB")
        n_train = man["splits"]["train"]["rows"]
        s3_root = "s3://bench/shards"
        storage.upload_dir(root, s3_root)
        t0 = time.perf_counter()
        pack(root, str(work / "raw"))
        pack_s = time.perf_counter() - t0
        base = DataConfig(uri=root, decode_batch_size=256)
        figures: dict[str, tuple[float, float]] = {}
        bench_reader(root, dataclasses.replace(base, cache="off"), args.batch, 1, "warm-up")  # worker start
        with PeakRSS() as mem:
            figures.update(bench_reader(root, dataclasses.replace(base, cache="off"), args.batch, args.epochs,
                                        "Ray streaming, cold (every epoch decodes)"))
        peak = {"stream": mem.peak_gib}
        figures.update(bench_reader(s3_root, dataclasses.replace(base, cache="off"), args.batch, 1,
                                    "Ray streaming from the local S3 server"))
        with PeakRSS() as mem:
            figures.update(bench_reader(root, dataclasses.replace(base, cache="memory"), args.batch, args.epochs,
                                        "Ray cached"))
        peak["cached"] = mem.peak_gib
        figures.update(bench_reader(str(work / "raw"), dataclasses.replace(base, cache="off"), args.batch,
                                    args.epochs, "Ray raw shards, streaming (no image codec)"))
        ray.shutdown()
        with PeakRSS() as mem:
            figures.update(bench_dataloader(root, args.cpus, args.batch, args.epochs))
        peak["dataloader"] = mem.peak_gib
        print(f"train split: {n_train} rows; packing to raw shards took {pack_s:.1f}s; peak RSS: streaming "
              f"{peak['stream']:.2f} GiB, cached {peak['cached']:.2f} GiB, DataLoader {peak['dataloader']:.2f} GiB")
        print(f"{'reader':58s} {'first batch':>12s} {'samples/s':>10s}")
        for name, (first, rate) in figures.items():
            if name == "warm-up":
                continue
            print(f"{name:58s} {first:10.2f} s {rate:10.1f}")
        dl = figures["DataLoader, persistent workers (epochs 2..)"][1]
        dl_fresh = figures["DataLoader, new workers per epoch"][1]
        for name, target in (("Ray streaming, cold (every epoch decodes)", 1.0),
                             ("Ray cached: epochs 2.. from the cache", 2.0),
                             ("Ray raw shards, streaming (no image codec)", 2.0)):
            r = figures[name][1]
            print(f"ratio {name} / DataLoader: {r / dl:6.2f}x persistent, {r / dl_fresh:6.2f}x new workers "
                  f"(target >= {target:.1f}x)")
    finally:
        if moto is not None:
            moto.terminate()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
