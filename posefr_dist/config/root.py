"""The tune section and the root :class:`Config`.

:class:`TuneConfig` checks its search space against the whole config (every key must name a field of
:class:`Config`), so the two live together; the checks themselves are in ``posefr_dist.config.space``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from posefr_dist.config.core import _check, _one_of
from posefr_dist.config.sections import (DataConfig, EvalConfig, LossConfig, ModelConfig, SynthConfig,
                                         TrainConfig)
from posefr_dist.config.space import check_initial_points, check_space, flatten_space


def _default_tune_space() -> dict[str, Any]:
    return {"loss.lambda_je": {"loguniform": [1e-3, 10.0]},
            "loss.je_bins": {"choice": [16, 32, 64]},
            "loss.je_bandwidth": {"uniform": [0.5, 2.0]}}


@dataclass
class TuneConfig:
    """Ray Tune search (``posefr tune``); by default over the joint-entropy loss weights.

    The experiment lives in ``<storage_path>/<name>/``; each trial trains with the rest of this
    config plus its sampled values (see posefr_dist.tune).
    """

    #: where experiments go: a folder or s3:// URI
    storage_path: str = "out/tune"
    name: str = "posefr-tune"
    num_samples: int = 8
    #: trials running at once; 0 = as many as the cluster's CPUs/GPUs hold
    max_concurrent: int = 0
    #: objective: a metric the training reports (``val/...`` or ``train/...``)
    metric: str = "val/tar@far=0.01/90+"
    mode: str = "max"
    #: ``optuna`` (TPE) or ``random``
    search: str = "optuna"
    #: TPE samples this many trials at random before it models the objective
    tpe_startup_trials: int = 5
    seed: int = 0
    #: dotted config key -> distribution: ``{loguniform: [lo, hi]}``, ``{uniform: [lo, hi]}``,
    #: ``{randint: [lo, hi]}`` (both ends included), ``{choice: [a, b, ...]}``, ``{grid: [...]}``
    #: (random search only)
    space: dict[str, Any] = field(default_factory=_default_tune_space)
    #: trials to run first, e.g. known-good values: dotted key -> value (Optuna needs every key of
    #: the space; random search samples the keys not given)
    initial_points: list[dict[str, Any]] = field(default_factory=list)
    #: ``asha`` (early stopping on the metric) or ``fifo`` (every trial runs all epochs)
    scheduler: str = "asha"
    #: ASHA's clock: ``epochs_done`` (completed epochs) or ``training_iteration`` (reports so far:
    #: the same unless train.val_every_steps adds validations within epochs)
    time_attr: str = "epochs_done"
    grace_period: int = 1
    reduction_factor: float = 2.0
    #: CPUs of each trial's driver (it waits on the Train controller; the workers' come from train.*)
    driver_cpus: float = 0.2
    #: CPUs each trial leaves to Ray Data's read/decode tasks when max_concurrent is automatic
    data_cpus: float = 1.0
    #: retries of a failed trial; each retry resumes its training run from its last checkpoint
    max_failures: int = 1
    #: with --resume, also rerun trials that had failed
    resume_errored: bool = True
    #: interrupt the experiment (resumable with --resume) once this many trials have finished;
    #: 0 = off. For sessions on a budget, and to test resuming.
    stop_after_trials: int = 0

    def __post_init__(self) -> None:
        _check(bool(self.storage_path), "tune.storage_path", "must not be empty")
        _check(bool(self.name) and "/" not in self.name, "tune.name", "must be a non-empty name without '/'")
        _check(self.num_samples >= 1, "tune.num_samples", f"must be >= 1, got {self.num_samples}")
        _check(self.max_concurrent >= 0, "tune.max_concurrent", "must be >= 0 (0 = automatic)")
        _check(self.metric.startswith(("val/", "train/")), "tune.metric",
               f"must name a reported metric such as 'val/tar@far=0.01/90+', got {self.metric!r}")
        _one_of(self.mode, ("max", "min"), "tune.mode")
        _one_of(self.search, ("optuna", "random"), "tune.search")
        _check(self.tpe_startup_trials >= 1, "tune.tpe_startup_trials", "must be >= 1")
        _one_of(self.scheduler, ("asha", "fifo"), "tune.scheduler")
        _one_of(self.time_attr, ("epochs_done", "training_iteration"), "tune.time_attr")
        _check(self.grace_period >= 1, "tune.grace_period", f"must be >= 1, got {self.grace_period}")
        _check(self.reduction_factor > 1, "tune.reduction_factor", f"must be > 1, got {self.reduction_factor}")
        _check(self.driver_cpus > 0, "tune.driver_cpus", "must be > 0 (Ray Tune rejects 0; 0.2 is plenty)")
        _check(self.data_cpus >= 0, "tune.data_cpus", "must be >= 0")
        _check(self.max_failures >= -1, "tune.max_failures", "must be >= -1 (-1 = unlimited)")
        _check(self.stop_after_trials >= 0, "tune.stop_after_trials", "must be >= 0")
        # the keys and values of the space are checked against the whole config (Config, below)
        self.space = check_space(flatten_space(self.space, cls=Config), self.search, cls=Config)
        self.initial_points = check_initial_points(self.initial_points, self.space, self.search, cls=Config)


@dataclass
class Config:
    """The whole configuration of a run. Sections are added by the stages that use them."""

    data: DataConfig = field(default_factory=DataConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    #: free-form note copied into outputs
    name: str = "posefr"
