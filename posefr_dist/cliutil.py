"""What every ``posefr`` command line shares: the top-level parser, running a parsed command with
its errors turned into one line and an exit code, and argument types.

``posefr_dist.cli`` (all subcommands) and the modules that register a subcommand and can also run
it alone (``posefr_dist.eval.nightly``, ``posefr_dist.tune.cli``) use these; nothing here imports
a subcommand, so no module below ``cli.py`` needs to import it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Callable

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def comma_floats(text: str) -> list[float]:
    """argparse type: ``"0.01,0.001"`` -> ``[0.01, 0.001]``."""
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def base_parser(description: str | None = None) -> tuple[argparse.ArgumentParser, Any]:
    """The ``posefr`` parser with its global options, and its sub-command group."""
    p = argparse.ArgumentParser(prog="posefr", description=description)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p, p.add_subparsers(dest="command", required=True)


def run(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse ``argv``, set up logging and run the chosen command. Known errors (bad config, shard,
    storage, missing file, runtime and value errors) become one line on stderr and exit 1."""
    from posefr_dist.config import ConfigError
    from posefr_dist.data.shards import ShardError
    from posefr_dist.storage import StorageError

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, ShardError, StorageError, FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"posefr {args.command}: error: {e}", file=sys.stderr)
        return EXIT_ERROR
