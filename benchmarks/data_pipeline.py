"""Data-plane throughput: synthetic generation, Ray Data from a folder and from S3, vs DataLoader.

    .venv/bin/python benchmarks/data_pipeline.py [--identities 100 --views 20 --cpus 2]

Prints samples/s and peak memory (process tree RSS, Ray workers included) for:
  1. synthetic generation in one process (samples/s per core, PNG encoding and open3d included)
     and as Ray tasks over --cpus CPUs;
  2. the Ray Data pipeline (decode, no augmentation) over the train split from a local folder and
     from a local S3 server (moto on 127.0.0.1);
  3. a plain PyTorch DataLoader with --cpus worker processes reading the same shards and doing the
     same decode, and the ratio Ray Data / DataLoader measured in the same run.
Figures, not assertions: the numbers depend on the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
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
from posefr_dist.data import pipeline as P  # noqa: E402
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


def bench_dataloader(root: str, cpus: int, batch: int) -> tuple[float, float]:
    import torch

    ds = ShardTorchDataset(root, "train")
    # contiguous order within shards (a sampler over shards), as the Ray pipeline reads files
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=cpus, shuffle=False,
                                         persistent_workers=False)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        n = sum(len(b["label"]) for b in loader)
        dt = time.perf_counter() - t0
    return n / dt, mem.peak_gib


def bench_ray(root: str, batch: int) -> tuple[float, float]:
    sd = P.build_dataset(root, "train", DataConfig(), training=False)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        n = sum(len(b["label"]) for b in P.iter_epoch(sd.dataset, batch))
        dt = time.perf_counter() - t0
    return n / dt, mem.peak_gib


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--identities", type=int, default=100)
    ap.add_argument("--views", type=int, default=20)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--points", type=int, default=1024)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--gen-samples", type=int, default=400)
    args = ap.parse_args()
    cfg = SynthConfig(identities=args.identities, views_per_identity=args.views, image_size=args.image_size,
                      points=args.points, rows_per_shard=256)
    work = Path(tempfile.mkdtemp(prefix="posefr-bench-"))
    print(f"# data pipeline benchmark: {os.cpu_count()} cores, {args.image_size}x{args.image_size}, "
          f"{args.points} points, {args.identities}x{args.views} samples")
    try:
        rate = bench_generation(cfg, args.gen_samples)
        print(f"synthetic generation, 1 process:        {rate:8.1f} samples/s per core (target >= 200)")

        import ray

        from posefr_dist.raysupport import ensure_ray

        # S3 server first, so Ray workers inherit its variables
        from tests.conftest import free_port, wait_for_port

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
        print(f"synthetic generation, Ray tasks ({args.cpus} CPUs): {total / man['_elapsed_s']:8.1f} samples/s "
              f"({total / man['_elapsed_s'] / args.cpus:.1f} per core), peak RSS {mem.peak_gib:.2f} GiB")
        n_train = man["splits"]["train"]["rows"]
        s3_root = "s3://bench/shards"
        storage.upload_dir(root, s3_root)
        bench_ray(root, args.batch)  # warm-up: worker start, imports
        ray_local, mem_local = bench_ray(root, args.batch)
        ray_s3, mem_s3 = bench_ray(s3_root, args.batch)
        dl, mem_dl = bench_dataloader(root, args.cpus, args.batch)
        print(f"Ray Data pipeline, local folder:        {ray_local:8.1f} samples/s ({n_train} rows), "
              f"peak RSS {mem_local:.2f} GiB")
        print(f"Ray Data pipeline, local S3 server:     {ray_s3:8.1f} samples/s, peak RSS {mem_s3:.2f} GiB")
        print(f"PyTorch DataLoader ({args.cpus} workers), folder:  {dl:8.1f} samples/s, peak RSS {mem_dl:.2f} GiB")
        print(f"ratio Ray Data / DataLoader (folder):   {ray_local / dl:8.2f}x (target >= 1.0)")
        ray.shutdown()
        moto.terminate()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
