"""Ray Tune search over config values (by default the joint-entropy loss weights).

``posefr_dist.tune.space`` (no Ray) checks and converts the search space; ``search`` runs the
experiment (``run_tune``); ``results`` writes the trial table, best config and plot; ``common``
(no Ray) holds the experiment layout and ``TuneOutcome`` both of those use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["run_tune", "TuneOutcome", "check_tune", "experiment_uri", "check_space", "apply_params"]


def __getattr__(name: str) -> Any:  # keep `import posefr_dist.tune` free of Ray
    if name in ("run_tune", "check_tune"):
        from posefr_dist.tune import search

        return getattr(search, name)
    if name in ("TuneOutcome", "experiment_uri"):
        from posefr_dist.tune import common

        return getattr(common, name)
    if name in ("check_space", "apply_params"):
        from posefr_dist.tune import space

        return getattr(space, name)
    raise AttributeError(name)
