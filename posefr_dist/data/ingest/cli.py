"""``posefr ingest facescape …`` and ``posefr ingest arl-vtf …``.

:func:`add_ingest_parser` registers the ``ingest`` subcommand on the ``posefr`` parser; each
sub-subcommand sets ``func`` to a function of the parsed arguments that returns the exit code:
0 when shards were written (problems, if any, are listed and recorded in ingest_report.json),
1 when nothing could be written, the options are invalid, or ``--strict`` met a problem.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

EXIT_OK, EXIT_ERROR = 0, 1
#: problems printed on the terminal; all of them are in ingest_report.json
SHOW_PROBLEMS = 20


def _csv(text: str | None) -> tuple[str, ...]:
    return tuple(t.strip() for t in (text or "").split(",") if t.strip())


def _common_options(p: argparse.ArgumentParser, margin: float) -> None:
    p.add_argument("--out", required=True, metavar="URI", help="shard root: a folder or s3://bucket/prefix")
    p.add_argument("--image-size", type=int, default=112, help="side of the square face crops (default 112)")
    p.add_argument("--points", type=int, default=1024, help="3D points per row (default 1024)")
    p.add_argument("--margin", type=float, default=margin, help=f"crop side / face extent (default {margin})")
    p.add_argument("--image-format", choices=("png", "jpeg"), default="png", help="encoding of the crops (default png)")
    p.add_argument("--rows-per-shard", type=int, default=1000, help="rows per Parquet file (default 1000)")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray tasks (one per subject) in flight at once (default: as many as the cluster runs)")
    p.add_argument("--no-ray", action="store_true", help="process the subjects in this process, one after another")
    p.add_argument("--strict", action="store_true", help="stop at the first missing or malformed input")


#: the FaceScape identity split by default (posefr_dist.data.ingest.facescape.DEFAULT_SPLITS)
DEFAULT_FACESCAPE_SPLITS = "train=1-300,test=301-359"


def add_ingest_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``ingest`` with the sub-subcommands ``facescape`` and ``arl-vtf``."""
    p = subparsers.add_parser("ingest", help="turn a FaceScape or ARL-VTF release into shards",
                              description="Turn a licensed release into shards (see docs/ingest.md).")
    sub = p.add_subparsers(dest="ingest_dataset", required=True, metavar="DATASET")

    f = sub.add_parser("facescape", help="FaceScape multi-view images, cameras, meshes and TU models",
                       description="FaceScape multi-view release: <images>/<id>/<k>_<expr>/{N.jpg, params.json}, "
                                   "<meshes>/<id>/<k>_<expr>.ply, <tu-models>/<id>/models_reg/<k>_<expr>.obj.")
    f.add_argument("--images", required=True, metavar="ROOT", help="multi-view images root (<id>/<k>_<expr>/)")
    f.add_argument("--meshes", metavar="ROOT", help="multi-view meshes root (<id>/<k>_<expr>.ply; default: --images)")
    f.add_argument("--tu-models", metavar="ROOT",
                   help="TU models root (<id>/models_reg/<k>_<expr>.obj; default: --images)")
    f.add_argument("--align", metavar="JSON",
                   help="Rt_scale_dict.json mapping each tuple to the TU frame; without it the TU model is "
                        "registered to the multi-view mesh")
    f.add_argument("--splits", default=DEFAULT_FACESCAPE_SPLITS,
                   help="identity split by FaceScape id (default %(default)s; add val=... to choose val)")
    f.add_argument("--val-fraction", type=float, default=0.1,
                   help="without val= in --splits, the last fraction of the train ids becomes val (default 0.1)")
    f.add_argument("--expressions", metavar="LIST", help="expressions to include, by name or number, e.g. neutral,2")
    f.add_argument("--subjects", metavar="IDS", help="only these ids, e.g. 1-20,42")
    f.add_argument("--max-yaw", type=float, default=None, help="skip views with |yaw| above this (degrees)")
    _common_options(f, margin=1.1)
    f.set_defaults(func=cmd_ingest_facescape)

    a = sub.add_parser("arl-vtf", help="ARL-VTF visible/thermal frames with face boxes and protocol files",
                       description="ARL-VTF release: <root>/Odin3/metadata.csv, frames under <root>/Odin3/, "
                                   "<root>/splits/dev/{train,val}*.txt, <root>/splits/test/{gallery,probes}_*.txt.")
    a.add_argument("--root", required=True, metavar="ROOT", help="release root (holds Odin3/ and splits/)")
    a.add_argument("--modality", choices=("visible", "thermal", "both"), default="visible",
                   help="BAS_RGB2 (visible), FLIR_USB (thermal) or both (default visible)")
    a.add_argument("--pose-csv", metavar="CSV", help="per-frame pose: columns filepath, yaw[, pitch]")
    a.add_argument("--points-dir", metavar="DIR", help="per-subject point clouds or meshes <subid>.ply")
    a.add_argument("--splits-dir", metavar="DIR", help="split files (default <root>/splits)")
    a.add_argument("--gallery-glob", default="gallery_*.txt",
                   help="gallery files in splits/test (default gallery_*.txt)")
    a.add_argument("--probe-glob", default="probes_*.txt", help="probe files in splits/test (default probes_*.txt)")
    _common_options(a, margin=1.0)
    a.set_defaults(func=cmd_ingest_arl_vtf)
    return p


def _run(name: str, make: Callable[[], Any], ingest: Callable[[Any], Any]) -> int:
    from posefr_dist.data.ingest.common import REPORT_NAME, IngestError

    try:
        opts = make()
    except ValueError as e:
        print(f"posefr ingest {name}: {e}", file=sys.stderr)
        return EXIT_ERROR
    try:
        res = ingest(opts)
    except IngestError as e:
        print(f"posefr ingest {name}: {e.message}", file=sys.stderr)
        for p in e.problems[:SHOW_PROBLEMS]:
            print(f"  {p}", file=sys.stderr)
        return EXIT_ERROR
    rows = res.rows
    ids = {s: v["identities"] for s, v in res.manifest["splits"].items()}
    print(f"wrote {sum(rows.values())} rows ({', '.join(f'{s} {n} / {ids[s]} ids' for s, n in rows.items())}) "
          f"to {res.out} in {res.elapsed_s:.1f}s")
    skipped = {k[len('skipped_'):]: v for k, v in res.counts.items() if k.startswith("skipped_") and v}
    if skipped:
        print("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    if res.warnings:
        print(f"{len(res.warnings)} warning(s), listed in {REPORT_NAME}")
    if res.problems:
        print(f"{len(res.problems)} problem(s) (all in {REPORT_NAME}):", file=sys.stderr)
        for p in res.problems[:SHOW_PROBLEMS]:
            print(f"  {p}", file=sys.stderr)
        if len(res.problems) > SHOW_PROBLEMS:
            print(f"  ... and {len(res.problems) - SHOW_PROBLEMS} more", file=sys.stderr)
    return EXIT_OK


def cmd_ingest_facescape(args: argparse.Namespace) -> int:
    from posefr_dist.data.ingest.facescape import FaceScapeOptions, ingest_facescape, parse_ids

    def make() -> FaceScapeOptions:
        return FaceScapeOptions(
            images=args.images, out=args.out, meshes=args.meshes, tu_models=args.tu_models, align=args.align,
            splits=args.splits, val_fraction=args.val_fraction, expressions=_csv(args.expressions),
            subjects=tuple(sorted(parse_ids(args.subjects))) if args.subjects else (), max_yaw=args.max_yaw,
            image_size=args.image_size, points=args.points, margin=args.margin, image_format=args.image_format,
            rows_per_shard=args.rows_per_shard, workers=args.workers, use_ray=not args.no_ray, strict=args.strict,
        )

    return _run("facescape", make, ingest_facescape)


def cmd_ingest_arl_vtf(args: argparse.Namespace) -> int:
    from posefr_dist.data.ingest.arl_vtf import ArlVtfOptions, ingest_arl_vtf

    def make() -> ArlVtfOptions:
        return ArlVtfOptions(
            root=args.root, out=args.out, modality=args.modality, pose_csv=args.pose_csv, points_dir=args.points_dir,
            splits_dir=args.splits_dir, gallery_glob=args.gallery_glob, probe_glob=args.probe_glob,
            image_size=args.image_size, points=args.points, margin=args.margin, image_format=args.image_format,
            rows_per_shard=args.rows_per_shard, workers=args.workers, use_ray=not args.no_ray, strict=args.strict,
        )

    return _run("arl-vtf", make, ingest_arl_vtf)


def build_parser() -> argparse.ArgumentParser:
    """A parser with only ``ingest`` (``python -m posefr_dist.data.ingest.cli ingest …``)."""
    p = argparse.ArgumentParser(prog="posefr")
    add_ingest_parser(p.add_subparsers(dest="command", required=True))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
