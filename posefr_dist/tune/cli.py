"""``posefr tune``: the command-line entry of a tune experiment.

    posefr tune --config jobs/configs/tune-tiny-cpu.yaml --num-samples 8 [--max-concurrent 2] \
        [--resume] [key=value ...]

``add_tune_parser(subparsers)`` registers the subcommand on the ``posefr`` parser; :func:`main`
runs it alone (``jobs/tune.py``).
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_ERROR = 0, 1


def cmd_tune(args: argparse.Namespace) -> int:
    from posefr_dist.config import load_config
    from posefr_dist.tune.search import run_tune

    overrides = list(args.overrides)
    if args.num_samples is not None:
        overrides.append(f"tune.num_samples={args.num_samples}")
    if args.max_concurrent is not None:
        overrides.append(f"tune.max_concurrent={args.max_concurrent}")
    cfg = load_config(args.config, overrides)
    out = run_tune(cfg, resume=args.resume)
    print(f"experiment: {out.experiment_uri} ({len(out.rows)} trials, {out.wall_s:.0f}s)")
    for name, uri in out.outputs.items():
        print(f"{name}: {uri}")
    if out.best:
        b = out.best
        values = ", ".join(f"{k}={b[k]:.4g}" if isinstance(b[k], float) else f"{k}={b[k]}" for k in cfg.tune.space)
        print(f"best trial {b['trial_id']}: {cfg.tune.metric} = {b['objective']:.4f} ({values})")
        if "best_config" in out.outputs:
            print(f"train it: posefr train --config {out.outputs['best_config']}")
    if out.interrupted:
        print(f"posefr tune: experiment interrupted before all trials finished; continue it with "
              f"posefr tune --config {args.config or '...'} --resume", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def add_tune_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``tune`` on the ``posefr`` subcommand parsers; its ``func`` returns 0 or 1."""
    t = subparsers.add_parser("tune", help="Ray Tune search of the entropy-loss weights (trials run Ray Train)")
    t.add_argument("--config", help="YAML config with a tune section (see jobs/configs/tune-*.yaml)")
    t.add_argument("--num-samples", type=int, default=None, help="trials to run (tune.num_samples)")
    t.add_argument("--max-concurrent", type=int, default=None,
                   help="trials at once (tune.max_concurrent; 0 = as many as the cluster holds)")
    t.add_argument("--resume", action="store_true",
                   help="continue the interrupted experiment tune.storage_path/tune.name (finished trials kept)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. tune.name=lambda-sweep train.epochs=4")
    t.set_defaults(func=cmd_tune)
    return t


def main(argv: list[str] | None = None) -> int:
    """``posefr tune`` on its own (what ``jobs/tune.py`` runs); same errors and exit codes as the
    ``posefr`` command."""
    from posefr_dist.cliutil import base_parser, run

    parser, sub = base_parser()
    add_tune_parser(sub)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
