"""Training throughput: Ray Train + DeepSpeed (2 CPU workers) vs a plain single-process loop.

    .venv/bin/python benchmarks/train.py [--identities 100 --views 16 --epochs 3 --variant jam-je --cache auto]

Same model (ir_tiny / pointnet2_tiny at 64x64), batch size, data and number of epochs. Prints
samples/s of both, their ratio (target >= 0.8), the share of each epoch the workers spent waiting
for data (target < 5 %), and checkpoint save / load times. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def plain_loop(cfg, meta, epochs: int) -> float:
    """Single process, torch only: the same model, optimizer, batch size, decoded data and the
    same augmentation (applied inline, per batch)."""
    import pyarrow.parquet as pq

    from posefr_dist.data import shards as S
    from posefr_dist.data.pipeline import augment_batch
    from posefr_dist.model import build_model
    from posefr_dist.train.reference import make_optimizer, train_step

    torch.set_num_threads(2)
    rows = pq.read_table(S.shard_uris(cfg.data.uri, "train")).to_pylist()
    img = np.stack([S.decode_image(r["image"]).transpose(2, 0, 1) for r in rows])  # uint8
    pts = np.stack([np.asarray(r["points"], np.float32).reshape(-1, 3) for r in rows])
    yaw = np.array([r["yaw_deg"] for r in rows], np.float32)
    lab = torch.tensor([r["label"] for r in rows])
    model = build_model(cfg.model, cfg.loss, meta["num_classes"], meta["image_size"], meta["num_points"])
    opt = make_optimizer(model, cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay, cfg.train.momentum)
    bs = cfg.data.batch_size
    n = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(len(lab), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(perm) - bs + 1, bs):
            j = perm[i:i + bs].numpy()
            aug = augment_batch({"image": img[j], "yaw_deg": yaw[j], "points": pts[j]},
                                np.random.default_rng([epoch, i]), cfg.data.augment)
            train_step(model, opt, {"image": torch.from_numpy(aug["image"]), "points": torch.from_numpy(aug["points"]),
                                    "yaw_deg": torch.from_numpy(aug["yaw_deg"]), "label": lab[j],
                                    "has_points": torch.ones(bs, dtype=torch.bool)}, grad_clip=cfg.train.grad_clip)
            n += bs
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--identities", type=int, default=100)
    ap.add_argument("--views", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--variant", default="jam-je")
    ap.add_argument("--cache", default="auto", choices=("auto", "memory", "off"),
                    help="data.cache of the distributed run (off: every epoch streams and decodes)")
    args = ap.parse_args()
    from posefr_dist.config import load_config
    from posefr_dist.data.synth import synthesize
    from posefr_dist.raysupport import ensure_ray
    from posefr_dist.train import checkpoint as ckpt
    from posefr_dist.train.trainer import check_config, train

    work = Path(tempfile.mkdtemp(prefix="posefr-bench-train-"))
    try:
        shards = str(work / "shards")
        base = load_config(REPO / "jobs" / "configs" / "demo-cpu.yaml",
                           [f"synth.identities={args.identities}", f"synth.views_per_identity={args.views}"])
        synthesize(base.synth, shards, use_ray=False)
        cfg = load_config(REPO / "jobs" / "configs" / "demo-cpu.yaml", [
            f"data.uri={shards}", f"train.storage_path={work / 'runs'}", "train.run_name=bench",
            f"train.epochs={args.epochs}", f"model.variant={args.variant}", "train.log_every_steps=1000",
            f"data.cache={args.cache}",
            # from scratch: the same model in both loops (the demo fine-tunes a pretrained encoder)
            "model.pretrained_2d=", "train.pretrained_lr_mult=1.0", "train.freeze_pretrained_epochs=0"])
        meta = check_config(cfg)
        print(f"# training benchmark: {os.cpu_count()} cores, {args.variant} ir_tiny/pointnet2_tiny 64x64, "
              f"batch {cfg.data.batch_size}, {meta['train_rows']} train rows, {args.epochs} epochs")
        plain = plain_loop(cfg, meta, args.epochs)
        print(f"plain PyTorch loop, 1 process (2 threads): {plain:8.1f} samples/s")
        ensure_ray(num_cpus=2)
        t0 = time.perf_counter()
        out = train(cfg)
        wall = time.perf_counter() - t0
        epochs = [h for h in out.history if h.get("end_of_epoch")]
        later = epochs[1:] or epochs  # epoch 1 includes the workers' first-step start-up
        rate = float(np.mean([h["train/samples_per_s"] for h in later]))
        wait = float(np.mean([h["data_wait_fraction"] for h in later]))
        wait_first = float(epochs[0]["data_wait_fraction"])
        print(f"Ray Train + DeepSpeed, 2 CPU workers:     {rate:8.1f} samples/s (in-epoch, epochs 2..), "
              f"run wall time {wall:.0f}s incl. start-up, data cache ({cfg.data.cache}) and validation")
        print(f"ratio distributed / plain:                {rate / plain:8.2f}x (target >= 0.8)")
        print(f"data wait, epochs 2..:                    {100 * wait:8.1f} % (target < 5 %); epoch 1 "
              f"{100 * wait_first:.1f} %")
        # checkpoint save / load of the same engine type, timed outside the trainer
        from posefr_dist.model import build_model

        model = build_model(cfg.model, cfg.loss, meta["num_classes"], meta["image_size"], meta["num_points"])
        t0 = time.perf_counter()
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / "w.safetensors"))
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ckpt.load_weights(str(out.best_checkpoint))
        load_s = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in Path(out.best_checkpoint).rglob("*") if p.is_file())
        print(f"checkpoint: {size / 2**20:.1f} MiB on disk; consolidated weights save {1000 * save_s:.0f} ms, "
              f"load {1000 * load_s:.0f} ms")
        print(json.dumps({"plain_samples_per_s": plain, "ray_samples_per_s": rate, "ratio": rate / plain,
                          "data_wait_fraction": wait, "data_wait_fraction_epoch1": wait_first}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
