"""The ablation of the paper's claim: 2d-only vs jam (lambda_je = 0) vs jam-je, over seeds.

    .venv/bin/python benchmarks/reproduce.py --preset cpu [--seeds 0,1,2] [--out out/reproduce]
    # paper preset (GPUs, IR-18 at 112x112, 1024 points): submit to a cluster instead, e.g.
    ray job submit --working-dir . -- python benchmarks/reproduce.py --preset paper \
        --data s3://.../shards --pretrained s3://.../adaface_ir18.ckpt

The paper's protocol: every variant fine-tunes from the same pretrained 2D encoder. The cpu
preset makes its own once (``posefr pretrain`` with jobs/configs/pretrain-cpu.yaml: a 2D-only
synthetic set of other identities, web-like poses) into ``OUT/pretrain``; ``--pretrained URI``
uses a given one; ``--from-scratch`` runs the old protocol. Extra variants (``--variants
2d-only,jam,jam-je,jam-je-dn,jam-je-mi,jam-je-shared,jam-je-frontal``) are ``jam-je`` with one option each
(posefr_dist.experiment.EXTRA_VARIANTS).

Each (variant, seed) is a real run of the system: Ray Train workers under DeepSpeed, export of
the best checkpoint (chosen on the val split), exact pose-binned verification on the test split.
The data set is generated once (its own seed, never one of the reported training seeds), and
nothing is tuned on the test split. Output: ``results.json``, ``table.md`` (TAR@{1e-2,1e-3}FAR per
yaw bin, mean ± std over seeds, and the diagnostics of :mod:`posefr_dist.eval.diagnose`: the 3D
branch's own TAR, the 2D-3D embedding agreement and the attention statistics per variant) and
``tar_vs_yaw.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from posefr_dist import storage  # noqa: E402
from posefr_dist.config import load_config  # noqa: E402
from posefr_dist.eval.diagnose import diagnose, diagnostics_table  # noqa: E402
from posefr_dist.experiment import (VARIANTS, pretrained_encoder, run_variant, tar, variant_config,  # noqa: E402
                                   write_json)

PRESETS = {
    "cpu": REPO / "jobs" / "configs" / "reproduce-cpu.yaml",
    "paper": REPO / "jobs" / "configs" / "paper-gpu.yaml",
}
#: the pretraining each preset runs once before the variants (the paper preset starts from a
#: pretrained AdaFace IR-18 given with --pretrained)
PRETRAIN = {"cpu": REPO / "jobs" / "configs" / "pretrain-cpu.yaml"}
FARS = (0.01, 0.001)


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(results: dict[str, dict[int, dict]], bins: list[str]) -> str:
    lines = []
    for far in FARS:
        lines.append(f"TAR@{far:g}FAR (%), mean ± std over seeds {sorted(next(iter(results.values())))}")
        lines.append("")
        lines.append("| variant | " + " | ".join(bins) + " |")
        lines.append("|---|" + "---|" * len(bins))
        for v, by_seed in results.items():
            cells = []
            for b in bins:
                vals = [100 * x for x in (tar(r, b, far) for r in by_seed.values()) if x is not None]
                m, s = mean_std(vals)
                cells.append(f"{m:.1f} ± {s:.1f}" if vals else "n/a")
            lines.append(f"| {v} | " + " | ".join(cells) + " |")
        if "2d-only" in results:
            for v in results:
                if v == "2d-only":
                    continue
                cells = []
                for b in bins:
                    diffs = [100 * (tar(results[v][s], b, far) - tar(results["2d-only"][s], b, far))
                             for s in results[v] if s in results["2d-only"]
                             and tar(results[v][s], b, far) is not None and tar(results["2d-only"][s], b, far) is not None]
                    m, sd = mean_std(diffs)
                    cells.append(f"{m:+.1f} ± {sd:.1f}" if diffs else "n/a")
                lines.append(f"| {v} − 2d-only (paired by seed) | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: dict[str, dict[int, dict]], bins: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(FARS), figsize=(5 * len(FARS), 3.6))
    for ax, far in zip(axes, FARS):
        for v, by_seed in results.items():
            ms = [mean_std([100 * x for x in (tar(r, b, far) for r in by_seed.values()) if x is not None]) for b in bins]
            ax.errorbar(range(len(bins)), [m for m, _ in ms], yerr=[s for _, s in ms], marker="o", capsize=3, label=v)
        ax.set_xticks(range(len(bins)), bins)
        ax.set_xlabel("probe |yaw| (degrees)")
        ax.set_ylabel(f"TAR@{far:g}FAR (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="out/reproduce")
    ap.add_argument("--data", help="existing shard root (default: generate the preset's synthetic set)")
    ap.add_argument("--diagnose-rows", type=int, default=4000,
                    help="test rows the diagnostics read into memory (in shard order, so mostly whole identities)")
    ap.add_argument("--pretrain-config", help="pretraining preset (default: the preset's own, e.g. "
                    "jobs/configs/pretrain-cpu.yaml); it runs once, into OUT/pretrain")
    ap.add_argument("--pretrained", help="start every variant from this 2D encoder instead of pretraining "
                    "(a posefr export folder or an AdaFace checkpoint; path or s3://)")
    ap.add_argument("--from-scratch", action="store_true", help="no pretrained encoder (the old protocol)")
    ap.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override of the pretraining preset (repeatable), e.g. synth.identities=200")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from posefr_dist.data.synth import synthesize
    from posefr_dist.raysupport import ensure_ray

    ensure_ray()
    preset = str(PRESETS[args.preset])
    base = load_config(preset, args.overrides)
    out = args.out
    data = args.data
    if data is None:
        data = storage.join(out, "shards")
        if not storage.exists(storage.join(data, "manifest.json")):
            man = synthesize(base.synth, data)
            print(f"synthetic set: {sum(v['rows'] for v in man['splits'].values())} samples in {man['_elapsed_s']:.0f}s")
    pre_cfg = args.pretrain_config or (str(PRETRAIN[args.preset]) if args.preset in PRETRAIN else None)
    if not (args.pretrained or args.from_scratch or pre_cfg):
        ap.error(f"preset {args.preset!r} has no pretraining of its own: give --pretrained URI "
                 "(e.g. an AdaFace IR-18 checkpoint) or --from-scratch")
    start, pretrain_record = pretrained_encoder(pre_cfg, args.pretrained, out, args.from_scratch, args.pretrain_set)
    print(f"2D start: {pretrain_record}", flush=True)
    overrides = [*start, *args.overrides]
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variants.split(",")
    results: dict[str, dict[int, dict]] = {v: {} for v in variants}
    diags: dict[str, dict[int, dict]] = {v: {} for v in variants}
    done_path = storage.join(out, "results.json")
    prev: dict = {}
    if storage.exists(done_path):  # resume an interrupted ablation
        prev = json.loads(storage.read_text(done_path))
        for v in variants:
            for s, rep in prev.get("reports", {}).get(v, {}).items():
                results[v][int(s)] = rep
            for s, d in prev.get("diagnostics", {}).get(v, {}).items():
                diags[v][int(s)] = d
    t0 = time.perf_counter()
    timings = dict(prev.get("train_seconds", {}))
    for seed in seeds:
        for v in variants:
            if seed in results[v]:
                continue
            cfg = variant_config(preset, v, seed, data, storage.join(out, "runs"), overrides)
            run = run_variant(cfg, out, fars=FARS)
            results[v][seed] = {"bins": run.report["bins"]}
            diags[v][seed] = diagnose(run.checkpoint, data, "test", fars=FARS, yaw_edges=base.eval.yaw_edges,
                                      enroll_max_yaw=base.eval.enroll_max_yaw, max_rows=args.diagnose_rows)
            timings[f"{v}/seed{seed}"] = run.train_seconds
            p90 = tar(run.report, "90+", 0.01)
            print(f"{v} seed {seed}: trained in {run.train_seconds:.0f}s; TAR@1%FAR 90+ = "
                  f"{'n/a' if p90 is None else f'{100 * p90:.1f}%'}", flush=True)
            write_json(done_path, {"preset": args.preset, "config": preset, "overrides": overrides,
                                   "pretrain": pretrain_record,
                                   "seeds": seeds, "reports": results, "diagnostics": diags,
                                   "train_seconds": timings})
    bins = [b for b in next(iter(next(iter(results.values())).values()))["bins"] if b != "unknown-pose"]
    md = table(results, bins)
    if any(diags.values()):
        md += ("\nDiagnostics on the test split (means over seeds; TAR@1%FAR in %; cosines of normalised "
               "embeddings; entropies in nats, a uniform attention row has log(HW))\n\n"
               + diagnostics_table({v: [diags[v][s] for s in sorted(diags[v])] for v in variants if diags[v]})
               + "\n")
    storage.write_text(storage.join(out, "table.md"), md + "\n")
    local = storage.local_path(out)
    if local:
        plot(results, bins, os.path.join(local, "tar_vs_yaw.png"))
    print(md)
    print(f"ablation wall time {time.perf_counter() - t0:.0f}s; outputs in {out}")


if __name__ == "__main__":
    main()
