"""The experiment's layout and outcome, shared by ``search`` (which runs it) and ``results`` (which
writes its outputs); no Ray.

``<tune.storage_path>/<tune.name>/`` holds Tune's state, ``base_config.yaml``, the per-trial runs
under ``runs/<trial id>/`` and the results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posefr_dist import storage
from posefr_dist.config import Config

BASE_CONFIG = "base_config.yaml"


@dataclass
class TuneOutcome:
    """What an experiment (or one session of it) leaves behind."""

    experiment_uri: str
    #: one row per trial, best first (see posefr_dist.tune.results.trial_rows)
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    #: output name (``table_csv``, ``table_md``, ``best_config``, ``plot``, ``summary``) -> URI
    outputs: dict[str, str] = field(default_factory=dict)
    #: True when the session ended before every trial had finished (resume with ``resume=True``)
    interrupted: bool = False
    wall_s: float = 0.0


def experiment_uri(cfg: Config) -> str:
    return storage.join(cfg.tune.storage_path, cfg.tune.name)


def runs_uri(exp_uri: str) -> str:
    return storage.join(exp_uri, "runs")
