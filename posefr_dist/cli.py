"""The ``posefr`` command. Each subcommand is a thin call into the library.

    posefr synth OUT_URI --identities N --views-per-identity V --seed S [--pose-mix web] [--no-points]
    posefr pretrain --out URI [--config FILE] [key=value ...]
    posefr shards validate URI
    posefr shards inspect URI [--sheet PNG]
    posefr shards pack SRC DST [--on-bad-row error|skip]
    posefr demo [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

# shared with the subcommands that also run alone (eval.nightly, tune.cli); still importable from here
from posefr_dist.cliutil import EXIT_ERROR, EXIT_OK, EXIT_USAGE, base_parser, comma_floats, run  # noqa: F401

log = logging.getLogger("posefr")


# --------------------------------------------------------------------------------------------
# synth / shards
# --------------------------------------------------------------------------------------------


def cmd_synth(args: argparse.Namespace) -> int:
    from posefr_dist.config import SynthConfig
    from posefr_dist.data.synth import synthesize

    cfg = SynthConfig(
        identities=args.identities, views_per_identity=args.views_per_identity, seed=args.seed,
        image_size=args.image_size, points=args.points, val_fraction=args.val_fraction,
        test_fraction=args.test_fraction, rows_per_shard=args.rows_per_shard,
        **({"identity_strength": args.identity_strength} if args.identity_strength is not None else {}),
        **({"noise": args.noise} if args.noise is not None else {}),
        pose_mix=args.pose_mix, with_points=not args.no_points,
    )
    man = synthesize(cfg, args.out_uri, use_ray=not args.no_ray)
    rows = {s: v["rows"] for s, v in man["splits"].items()}
    total = sum(rows.values())
    print(f"wrote {total} samples ({', '.join(f'{s} {n}' for s, n in rows.items())}) of "
          f"{cfg.identities} identities to {args.out_uri} in {man['_elapsed_s']:.1f}s "
          f"({total / max(man['_elapsed_s'], 1e-9):.0f} samples/s)")
    return EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from posefr_dist.data.shards import validate

    problems, summary = validate(args.uri, check_images=not args.no_images)
    for split, s in summary.get("splits", {}).items():
        print(f"{split}: {s['rows']} rows, {s['identities']} identities, {s['shards']} shards")
    if problems:
        print(f"{len(problems)} problem(s):", file=sys.stderr)
        print("file\trow\tfield\treason", file=sys.stderr)
        for p in problems:
            print(str(p), file=sys.stderr)
        return EXIT_ERROR
    print(f"{args.uri}: OK")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from posefr_dist import storage
    from posefr_dist.data.shards import inspect

    sheet = args.sheet or storage.join(args.uri, "contact_sheet.png")
    summary = inspect(args.uri, sheet)
    for split, s in summary["splits"].items():
        bins = ", ".join(f"{k} {v}" for k, v in s["yaw_bins"].items())
        print(f"{split}: {s['rows']} rows, {s['identities']} identities; |yaw| bins: {bins}")
    print(f"contact sheet (rows: |yaw| bins {', '.join(summary['contact_sheet_rows'])}): {sheet}")
    return EXIT_OK


def cmd_pack(args: argparse.Namespace) -> int:
    from posefr_dist.data.pack import pack

    s = pack(args.src, args.dst, on_bad_row=args.on_bad_row, rows_per_shard=args.rows_per_shard)
    for r in s["skipped_rows"][:20]:
        print(f"skipped: {r['file']}\trow {r['row']}\t{r['field']}\t{r['reason']}", file=sys.stderr)
    rows = ", ".join(f"{k} {v['rows']}" for k, v in s["splits"].items())
    print(f"packed {s['rows']} rows ({rows}), skipped {s['skipped']}, {s['bytes_before'] / 1e6:.1f} MB -> "
          f"{s['bytes_after'] / 1e6:.1f} MB ({s['image_format']}) to {args.dst} in {s['seconds']:.1f}s")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# train / export
# --------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from posefr_dist.config import load_config
    from posefr_dist.train.trainer import train

    overrides = list(args.overrides)
    if args.resume_from:
        overrides.append(f"train.resume_from={args.resume_from}")
    cfg = load_config(args.config, overrides)
    out = train(cfg)  # checks the config and the data before Ray starts
    metric = cfg.train.checkpoint_metric
    print(f"run: {out.run_uri}")
    print(f"best checkpoint: {out.best_checkpoint} ({metric} = {out.best_metrics.get(metric)})")
    return EXIT_OK


def cmd_pretrain(args: argparse.Namespace) -> int:
    from pathlib import Path

    from posefr_dist.config import load_config
    from posefr_dist.train.pretrain import pretrain

    config = args.config or str(Path(__file__).resolve().parents[1] / "jobs" / "configs" / "pretrain-cpu.yaml")
    out = pretrain(load_config(config, args.overrides), args.out)
    if out.reused:
        print(f"reused: {', '.join(out.reused)}")
    if out.best_checkpoint:
        print(f"best checkpoint: {out.best_checkpoint}")
    print(f"pretrained 2D encoder: {out.encoder_uri}")
    print(f"fine-tune from it with: model.pretrained_2d={out.encoder_uri}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from posefr_dist.train.checkpoint import export_checkpoint

    conf = export_checkpoint(args.checkpoint, args.out)
    print(f"exported the 2D model ({conf.get('encoder_2d')}, {conf.get('embedding_dim')}-d) to {args.out}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# embed / verify / evaluate
# --------------------------------------------------------------------------------------------


def _print_table(report: dict) -> None:
    from posefr_dist.eval import render_markdown

    print(render_markdown(report))


def cmd_embed(args: argparse.Namespace) -> int:
    from posefr_dist.eval.embed import embed

    s = embed(args.model, args.data, args.split, args.out, batch_size=args.batch_size, actors=args.actors,
              gpus_per_actor=args.gpus_per_actor, enroll_max_yaw=args.enroll_max_yaw)
    print(f"embedded {s['rows']} rows ({s['gallery_rows']} gallery) in {s['seconds']:.1f}s "
          f"({s['rows_per_s']:.0f} rows/s) -> {args.out}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from posefr_dist.eval import run_verify
    from posefr_dist.raysupport import ensure_ray

    if not args.no_ray:
        ensure_ray()
    report = run_verify(args.emb_uri, args.out, fars=tuple(args.far), yaw_edges=tuple(args.yaw_edges),
                        use_ray=not args.no_ray)
    _print_table(report)
    print(f"report: {args.out}/report.json, report.md, roc.png, tar_vs_yaw.png")
    return EXIT_OK


def cmd_evaluate(args: argparse.Namespace) -> int:
    from posefr_dist.eval.embed import evaluate

    report = evaluate(args.model, args.data, args.out, split=args.split, fars=args.far, yaw_edges=args.yaw_edges,
                      batch_size=args.batch_size, actors=args.actors, gpus_per_actor=args.gpus_per_actor,
                      enroll_max_yaw=args.enroll_max_yaw)
    _print_table(report)
    print(f"report: {args.out}")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """Pretrain the 2D encoder -> synthetic paired data -> validate -> fine-tune 2d-only and jam-je (2 workers
    each) from it -> evaluate -> table."""
    from pathlib import Path

    from posefr_dist import storage
    from posefr_dist.config import load_config
    from posefr_dist.data.shards import validate
    from posefr_dist.data.synth import synthesize
    from posefr_dist.experiment import pretrained_encoder, run_variant, side_by_side, tar, variant_config, write_json
    from posefr_dist.raysupport import ensure_ray

    t_start = time.perf_counter()
    out = args.out
    configs = Path(__file__).resolve().parents[1] / "jobs" / "configs"
    config = args.config or str(configs / "demo-cpu.yaml")
    base = load_config(config, args.overrides)
    shards_uri = storage.join(out, "shards")
    ensure_ray()
    pre_cfg = args.pretrain_config or str(configs / "pretrain-demo-cpu.yaml")
    if args.from_scratch:
        print("[0/4] pretrain: skipped (--from-scratch: every variant starts from random weights)")
    elif args.pretrained:
        print(f"[0/4] pretrain: skipped, every variant starts from {args.pretrained}")
    else:
        p = load_config(pre_cfg, args.pretrain_set).synth
        print(f"[0/4] pretrain the 2D encoder once ({pre_cfg}): 2d-only on {p.identities} other identities x "
              f"{p.views_per_identity} views ({p.pose_mix} poses, no 3D) -> {storage.join(out, 'pretrain')}")
    t0 = time.perf_counter()
    start, record = pretrained_encoder(pre_cfg, args.pretrained, out, args.from_scratch, args.pretrain_set)
    if record.get("encoder"):
        tars = ", ".join(f"{k.rsplit('/', 1)[-1]} {100 * v:.1f}%" for k, v in sorted(record.get("metrics", {}).items())
                         if isinstance(v, (int, float)) and v == v)  # NaN: a bin without pairs
        print(f"      encoder {record['encoder']} in {time.perf_counter() - t0:.0f}s"
              + (f"; its val TAR@1%FAR: {tars}" if tars else "") + (" (reused)" if record.get("reused") else ""))
    overrides = [*start, *args.overrides]
    s = base.synth
    print(f"[1/4] synth: {s.identities} identities x {s.views_per_identity} views, {s.image_size}x{s.image_size} "
          f"images, {s.points} points, seed {s.seed} -> {shards_uri}")
    man = synthesize(s, shards_uri)
    total = sum(v["rows"] for v in man["splits"].values())
    print(f"      {total} samples in {man['_elapsed_s']:.1f}s ({total / max(man['_elapsed_s'], 1e-9):.0f} samples/s); "
          + ", ".join(f"{k}: {v['rows']} rows / {v['identities']} ids" for k, v in man["splits"].items()))
    print("[2/4] validate")
    problems, _ = validate(shards_uri)
    if problems:
        for p in problems[:20]:
            print("      " + str(p))
        print(f"      {len(problems)} problem(s)")
        return EXIT_ERROR
    print("      OK: manifest, checksums, schema, every image and point array")
    reports = {}
    variants = args.variants.split(",")
    for k, variant in enumerate(variants):
        cfg = variant_config(config, variant, base.train.seed, shards_uri, storage.join(out, "runs"), overrides)
        print(f"[3/4] train {variant} ({k + 1}/{len(variants)}): {cfg.model.encoder_2d}"
              + ("" if variant == "2d-only" else f" + {cfg.model.encoder_3d}")
              + f", {cfg.train.epochs} epochs, {cfg.train.num_workers} Ray Train workers under DeepSpeed; "
              "then export + evaluate on the test split")
        run = run_variant(cfg, out)
        reports[variant] = run.report
        print(f"      trained in {run.train_seconds:.0f}s; best checkpoint {run.checkpoint}")
        print("      TAR@1%FAR: " + ", ".join(f"{b} {100 * (tar(run.report, b, 0.01) or float('nan')):.1f}%"
                                           for b in ("0-30", "30-60", "60-90", "90+", "all")))
    print("[4/4] compare (exact pose-binned verification, test split, gallery |yaw| <= 15)")
    table = side_by_side(reports, far=0.01)
    print(table)
    if "2d-only" in reports and "jam-je" in reports:
        a, b = tar(reports["2d-only"], "90+", 0.01), tar(reports["jam-je"], "90+", 0.01)
        if a is not None and b is not None:
            print(f"profile (90+) TAR@1%FAR: jam-je {100 * b:.1f}% vs 2d-only {100 * a:.1f}% "
                  f"({100 * (b - a):+.1f} points)")
        else:  # too few impostor pairs in the bin for a 1% FAR (see report.json far_below_resolution)
            print("profile (90+) TAR@1%FAR: n/a (the 90+ bin has too few pairs for a 1% FAR)")
    storage.write_text(storage.join(out, "comparison.md"), table + "\n")
    write_json(storage.join(out, "comparison.json"), {v: r["bins"] for v, r in reports.items()})
    print(f"outputs (shards, runs, models, reports and plots per variant, comparison.md): {out}")
    print(f"demo finished in {time.perf_counter() - t_start:.0f}s")
    return EXIT_OK


# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p, sub = base_parser("Pose-robust 2D-3D face recognition on Ray.")

    s = sub.add_parser("synth", help="generate the synthetic 3D face data set as shards")
    s.add_argument("out_uri", help="output folder or s3:// URI")
    s.add_argument("--identities", type=int, default=200)
    s.add_argument("--views-per-identity", type=int, default=20)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=112)
    s.add_argument("--points", type=int, default=1024)
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--test-fraction", type=float, default=0.2)
    s.add_argument("--rows-per-shard", type=int, default=256)
    s.add_argument("--identity-strength", type=float, default=None, help="0..2: how much identities differ")
    s.add_argument("--noise", type=float, default=None, help="per-pixel noise (0..255 scale)")
    s.add_argument("--pose-mix", choices=("stratified", "web"), default="stratified",
                   help="probe poses: equal counts per |yaw| bin (default) or web-photo-like, mostly below 45")
    s.add_argument("--no-points", action="store_true", help="a 2D-only set: null points, no point sampling")
    s.add_argument("--no-ray", action="store_true", help="generate in this process (debugging)")
    s.set_defaults(func=cmd_synth)

    sh = sub.add_parser("shards", help="check, look at or pack a shard root").add_subparsers(dest="shards_cmd", required=True)
    v = sh.add_parser("validate", help="check manifest, checksums, schema and every row")
    v.add_argument("uri")
    v.add_argument("--no-images", action="store_true", help="skip decoding images (faster)")
    v.set_defaults(func=cmd_validate)
    i = sh.add_parser("inspect", help="counts per split and a contact sheet across yaw bins")
    i.add_argument("uri")
    i.add_argument("--sheet", help="where to write the contact sheet PNG (default URI/contact_sheet.png)")
    i.set_defaults(func=cmd_inspect)
    pk = sh.add_parser("pack", help="write the raw form (decoded CHW uint8 images, rows checked once) for "
                                    "GPU nodes short of CPU")
    pk.add_argument("src", help="source shard root (folder or s3://), encoded images")
    pk.add_argument("dst", help="destination root (folder or s3://)")
    pk.add_argument("--on-bad-row", choices=("error", "skip"), default="error",
                    help="a bad row stops the pack (default) or is dropped and counted")
    pk.add_argument("--rows-per-shard", type=int, default=None,
                    help="re-cut each split into files of this many rows (default: keep the source's files)")
    pk.set_defaults(func=cmd_pack)

    t = sub.add_parser("train", help="distributed training (Ray Train + DeepSpeed)")
    t.add_argument("--config", help="YAML config (see jobs/configs/)")
    t.add_argument("--resume-from", help="checkpoint URI to resume from (any number of workers)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.epochs=3")
    t.set_defaults(func=cmd_train)

    pt = sub.add_parser("pretrain", help="pretrain the 2D encoder (synth -> train 2d-only -> export), resumably; "
                                         "the result is what model.pretrained_2d takes")
    pt.add_argument("--config", help="YAML config (default jobs/configs/pretrain-cpu.yaml)")
    pt.add_argument("--out", required=True, help="output folder or s3:// URI (shards/, runs/, encoder/)")
    pt.add_argument("overrides", nargs="*", help="key=value overrides, e.g. synth.identities=500 train.epochs=4")
    pt.set_defaults(func=cmd_pretrain)

    x = sub.add_parser("export", help="export the 2D path of a checkpoint for inference")
    x.add_argument("--checkpoint", required=True, help="checkpoint URI (folder or s3://)")
    x.add_argument("--out", required=True, help="output folder or s3:// URI")
    x.set_defaults(func=cmd_export)

    def embed_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="exported 2D model (folder or s3://)")
        p.add_argument("--data", required=True, help="shard root (folder or s3://)")
        p.add_argument("--split", default="test")
        p.add_argument("--batch-size", type=int, default=256)
        p.add_argument("--actors", type=int, default=1, help="embedding actors (model replicas)")
        p.add_argument("--gpus-per-actor", type=float, default=0.0)
        p.add_argument("--enroll-max-yaw", type=float, default=15.0, help="gallery = |yaw| <= this")

    e = sub.add_parser("embed", help="embed a split with the exported 2D model (Ray Data actor pool)")
    embed_args(e)
    e.add_argument("--out", required=True, help="embeddings folder or s3:// URI")
    e.set_defaults(func=cmd_embed)

    fars_default, edges_default = "0.1,0.01,0.001,0.0001", "0,30,60,90"
    v = sub.add_parser("verify", help="exact pose-binned verification of an embeddings table")
    v.add_argument("emb_uri", help="embeddings: one Parquet file or a folder of them (local or s3://)")
    v.add_argument("--out", required=True, help="report folder")
    v.add_argument("--far", type=comma_floats, default=comma_floats(fars_default), help=f"default {fars_default}")
    v.add_argument("--yaw-edges", type=comma_floats, default=comma_floats(edges_default), help=f"default {edges_default}")
    v.add_argument("--no-ray", action="store_true", help="score in this process")
    v.set_defaults(func=cmd_verify)

    ev = sub.add_parser("evaluate", help="embed + verify")
    embed_args(ev)
    ev.add_argument("--out", required=True, help="output folder or s3:// URI (report + embeddings/)")
    ev.add_argument("--far", type=comma_floats, default=comma_floats(fars_default))
    ev.add_argument("--yaw-edges", type=comma_floats, default=comma_floats(edges_default))
    ev.set_defaults(func=cmd_evaluate)

    from posefr_dist.data.ingest.cli import add_ingest_parser
    from posefr_dist.eval.nightly import add_nightly_parser
    from posefr_dist.tune.cli import add_tune_parser

    add_ingest_parser(sub)
    add_nightly_parser(sub)
    add_tune_parser(sub)

    d = sub.add_parser("demo", help="the main job on the embedded default: local Ray, local folder, synthetic data")
    d.add_argument("--out", default="out/demo")
    d.add_argument("--config", help="preset (default jobs/configs/demo-cpu.yaml)")
    d.add_argument("--variants", default="2d-only,jam-je", help="comma-separated variants to train and compare")
    d.add_argument("--pretrain-config", help="pretraining preset (default jobs/configs/pretrain-demo-cpu.yaml)")
    d.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override of the pretraining preset (repeatable), e.g. synth.identities=200")
    d.add_argument("--pretrained", help="start every variant from this 2D encoder instead of pretraining one")
    d.add_argument("--from-scratch", action="store_true", help="no pretrained 2D encoder (the old protocol)")
    d.add_argument("overrides", nargs="*", help="key=value overrides, e.g. synth.identities=100 train.epochs=2")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
