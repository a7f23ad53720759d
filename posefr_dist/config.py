"""Typed configuration: dataclasses validated on construction, YAML files, dotted overrides.

A config is built in three steps, each of which can fail with a message naming the field:

1. defaults (the dataclass fields below),
2. a YAML file (``load_config("jobs/configs/demo.yaml")``),
3. ``key=value`` overrides in dotted form (``train.epochs=3 loss.lambda_je=0.5``); the value is
   parsed as YAML, so ``true``, ``3``, ``1e-3`` and ``[0, 30, 60, 90]`` have their natural types.

Unknown keys are rejected (with the closest valid names), values are coerced to the declared type
where that is lossless, and each section checks its own invariants in ``__post_init__``.

Example:
    >>> cfg = load_config(None, ["train.epochs=2", "model.variant=2d-only"])
    >>> cfg.train.epochs, cfg.model.variant
    (2, '2d-only')
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the dotted key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _one_of(value: Any, allowed: Iterable[Any], key: str) -> None:
    allowed = list(allowed)
    _check(value in allowed, key, f"got {value!r}; allowed: {', '.join(map(repr, allowed))}")


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class AugmentConfig:
    """Training-time augmentation applied by the data pipeline."""

    enabled: bool = True
    #: probability of a horizontal flip (negates yaw and mirrors the points' x)
    hflip_prob: float = 0.5
    #: max relative change of brightness / contrast / saturation
    color_jitter: float = 0.2
    #: max relative zoom in or out
    scale: float = 0.05
    #: max shift as a fraction of the image side
    shift: float = 0.04
    #: share of a cloud's points dropped and replaced by copies of kept points, per sample and
    #: epoch (0 = off), so the 3D branch never sees the same cloud twice
    point_dropout: float = 0.0
    #: Gaussian jitter of every point, in the cloud's unit-scale coordinates (0 = off)
    point_jitter: float = 0.0

    def __post_init__(self) -> None:
        _check(0.0 <= self.hflip_prob <= 1.0, "data.augment.hflip_prob", "must be in [0, 1]")
        for name in ("color_jitter", "scale", "shift"):
            v = getattr(self, name)
            _check(0.0 <= v < 0.5, f"data.augment.{name}", f"must be in [0, 0.5), got {v}")
        _check(0.0 <= self.point_dropout < 1.0, "data.augment.point_dropout",
               f"must be in [0, 1), got {self.point_dropout}")
        _check(0.0 <= self.point_jitter < 0.2, "data.augment.point_jitter",
               f"must be in [0, 0.2), got {self.point_jitter}")


@dataclass
class DataConfig:
    """Where the shards are and how they are streamed."""

    #: shard root: a folder, file:// or s3:// URI holding manifest.json and train/ val/ test/
    uri: str = "out/demo/shards"
    #: rows per training batch (per worker)
    batch_size: int = 32
    #: what a bad row does: ``error`` stops with file, row and field; ``skip`` drops and counts it
    #: (in training a skipped row's place is taken by the next good row of its shuffle window)
    on_bad_row: str = "error"
    #: rows shuffled together each epoch (a window of whole chunks; 0 = no shuffle within windows)
    shuffle_buffer: int = 512
    #: deal the chunks to the ranks in a new order each epoch (else file order)
    shuffle_blocks: bool = True
    #: rows per chunk, the unit the epoch plan permutes and deals to ranks (a chunk never crosses a
    #: Parquet row group; the shard writer makes 64-row groups)
    chunk_rows: int = 64
    #: rows each decode task reads and decodes (whole chunks; >= 256 keeps per-task overhead small)
    decode_batch_size: int = 256
    #: decode tasks in flight at most (0 = as many as Ray schedules)
    decode_concurrency: int = 0
    #: CPUs each decode task asks Ray for
    decode_cpus: float = 1.0
    #: ``memory``: decode each split once into the object store and index it every epoch;
    #: ``off``: stream and decode every epoch; ``auto``: memory when the decoded split fits
    #: ``cache_fraction`` of the object store, else off
    cache: str = "auto"
    #: share of the object store the decoded train + val splits may take under ``cache: auto``
    cache_fraction: float = 0.5
    #: batches each training worker prepares ahead of the step (gather, augment, to tensors)
    prefetch_batches: int = 2
    #: write each rank's global row ids per step to ``<trace_dir>/rank<R>.jsonl`` ('' = off; for
    #: checking determinism)
    trace_dir: str = ""
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        _check(bool(self.uri), "data.uri", "must not be empty")
        _check(self.batch_size > 0, "data.batch_size", f"must be > 0, got {self.batch_size}")
        _one_of(self.on_bad_row, ("error", "skip"), "data.on_bad_row")
        _check(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0")
        _check(self.decode_batch_size > 0, "data.decode_batch_size", "must be > 0")
        _check(self.chunk_rows > 0, "data.chunk_rows", f"must be > 0, got {self.chunk_rows}")
        _check(self.decode_concurrency >= 0, "data.decode_concurrency", "must be >= 0 (0 = Ray's choice)")
        _check(self.decode_cpus > 0, "data.decode_cpus", "must be > 0")
        _one_of(self.cache, ("auto", "memory", "off"), "data.cache")
        _check(0.0 < self.cache_fraction <= 1.0, "data.cache_fraction", f"must be in (0, 1], got {self.cache_fraction}")
        _check(self.prefetch_batches >= 1, "data.prefetch_batches", "must be >= 1")


@dataclass
class SynthConfig:
    """The procedural synthetic face generator (``posefr synth``)."""

    identities: int = 200
    views_per_identity: int = 20
    seed: int = 0
    image_size: int = 112
    points: int = 1024
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    rows_per_shard: int = 256
    #: near-frontal enrollment views per identity (|yaw| <= enroll_max_yaw)
    enrollment_views: int = 2
    enroll_max_yaw: float = 10.0
    #: largest |yaw| of a probe view, degrees
    max_yaw: float = 100.0
    max_pitch: float = 15.0
    #: per-pixel Gaussian noise (0..255 scale)
    noise: float = 6.0
    #: 0..1: how strongly identities differ in shape and appearance (lower = harder)
    identity_strength: float = 1.0
    #: probe poses: ``stratified`` (equal counts in the |yaw| bins 0-30, 30-60, 60-90, 90+) or
    #: ``web`` (a web-photo mix: |yaw| half-normal with sigma 25 degrees, mostly below 45)
    pose_mix: str = "stratified"
    #: sample a point cloud per row; false writes null points (a 2D-only set, e.g. for pretraining)
    with_points: bool = True

    def __post_init__(self) -> None:
        _check(self.identities >= 3, "synth.identities", f"need >= 3 (one per split), got {self.identities}")
        _check(self.views_per_identity >= self.enrollment_views + 1, "synth.views_per_identity",
               f"must exceed enrollment_views ({self.enrollment_views})")
        _check(self.enrollment_views >= 1, "synth.enrollment_views", "must be >= 1")
        _check(32 <= self.image_size <= 512, "synth.image_size", f"must be in [32, 512], got {self.image_size}")
        _check(16 <= self.points <= 65536, "synth.points", f"must be in [16, 65536], got {self.points}")
        _check(0 < self.val_fraction < 1 and 0 < self.test_fraction < 1
               and self.val_fraction + self.test_fraction < 1, "synth.val_fraction",
               "val_fraction and test_fraction must be in (0, 1) and sum below 1")
        _check(self.rows_per_shard > 0, "synth.rows_per_shard", "must be > 0")
        _check(0 < self.max_yaw <= 180, "synth.max_yaw", "must be in (0, 180]")
        _check(0 <= self.max_pitch <= 60, "synth.max_pitch", "must be in [0, 60]")
        _check(0 <= self.enroll_max_yaw <= 30, "synth.enroll_max_yaw", "must be in [0, 30]")
        _check(self.noise >= 0, "synth.noise", "must be >= 0")
        _check(0 < self.identity_strength <= 2, "synth.identity_strength", "must be in (0, 2]")
        _one_of(self.pose_mix, ("stratified", "web"), "synth.pose_mix")


@dataclass
class ModelConfig:
    """The joint attention model (see posefr_dist.model.build_model)."""

    #: ``2d-only`` (baseline), ``jam`` (joint attention, lambda_je = 0), ``jam-je`` (the full method)
    variant: str = "jam-je"
    #: 2D encoder: ``ir18``, ``ir50`` or ``ir_tiny`` (CPU tests and demos)
    encoder_2d: str = "ir18"
    #: 3D encoder: ``pointnet2_ssg`` or ``pointnet2_tiny``
    encoder_3d: str = "pointnet2_ssg"
    embedding_dim: int = 512
    #: identity head: ``adaface``, ``arcface`` or ``cosface``
    head: str = "adaface"
    head_margin: float = 0.4
    head_h: float = 0.333
    head_scale: float = 64.0
    head_t_alpha: float = 0.01
    dropout: float = 0.0
    #: the joint attention's query/key width is C_F // attn_reduction (SAGAN: 8)
    attn_reduction: int = 8
    #: a pretrained 2D face model in AdaFace's layout (``.ckpt`` or ``.safetensors``) or this
    #: project's 2D export (``posefr export``/``posefr pretrain``: its folder or model.safetensors;
    #: its attention is not loaded); a path or an ``s3://`` URI, that the IR trunk and the shared
    #: output layer start from; '' = from scratch. A resumed run loads its own checkpoint over it.
    pretrained_2d: str = ""
    #: where the reshaping block puts the point features on the 2D grid: ``posed`` (projected at
    #: the sample's yaw and pitch with the image crop's projection, so cell (i, j) is the same face
    #: region in A_2D and A_3D) or ``frontal`` (the canonical x-y plane whatever the pose)
    splat: str = "posed"
    #: with ``splat: posed``, only points whose side faces the camera are placed
    splat_front_only: bool = False
    #: spectral normalisation of the attention's query/key/value 1x1 convs (SAGAN), which bounds
    #: the energies so the joint-entropy loss cannot fall by sharpening the softmax alone
    attn_spectral_norm: bool = True
    #: non-affine per-domain normalisation (instance norm) of each feature map before the shared Q/K
    attn_domain_norm: bool = False
    #: the 3D branch is classified by the 2D branch's identity head (the same class centres), which
    #: ties the 2D and 3D embedding spaces together; false = one AdaFace head per branch (the paper)
    shared_head: bool = False

    def __post_init__(self) -> None:
        _one_of(self.variant, ("2d-only", "jam", "jam-je"), "model.variant")
        _one_of(self.encoder_2d, ("ir18", "ir50", "ir_tiny"), "model.encoder_2d")
        _one_of(self.encoder_3d, ("pointnet2_ssg", "pointnet2_tiny"), "model.encoder_3d")
        _one_of(self.head, ("adaface", "arcface", "cosface"), "model.head")
        _check(self.embedding_dim > 0, "model.embedding_dim", "must be > 0")
        _check(self.head_scale > 0, "model.head_scale", "must be > 0")
        _check(0 < self.head_t_alpha <= 1, "model.head_t_alpha", "must be in (0, 1]")
        _check(0 <= self.dropout < 1, "model.dropout", "must be in [0, 1)")
        _check(self.attn_reduction >= 1, "model.attn_reduction", f"must be >= 1, got {self.attn_reduction}")
        _one_of(self.splat, ("posed", "frontal"), "model.splat")


@dataclass
class LossConfig:
    """L = L_2D + w_3d * L_3D + lambda_je * L_JE."""

    w_3d: float = 1.0
    lambda_je: float = 0.1
    #: bins per axis of the differentiable joint histogram of the two attention maps
    je_bins: int = 32
    #: Parzen kernel bandwidth, in units of one bin width
    je_bandwidth: float = 1.0
    #: how attention values are mapped to [0, 1] before binning: ``minmax`` (per attention row) or
    #: ``hw`` (r = H*W*a, r / (1 + r)); see posefr_dist.model.entropy
    je_norm: str = "minmax"
    #: lambda_JE rises linearly from 0 over this many epochs (0 = full weight from the start)
    je_warmup_epochs: int = 0
    #: ``joint``: L_JE = H(A_2D, A_3D), the joint entropy (the paper); ``mi``: L_JE = -MI(A_2D; A_3D)
    #: = H(A_2D, A_3D) - H(A_2D) - H(A_3D), which sharpening either map alone cannot lower
    je_form: str = "joint"

    def __post_init__(self) -> None:
        _check(self.w_3d >= 0, "loss.w_3d", "must be >= 0")
        _check(self.lambda_je >= 0, "loss.lambda_je", "must be >= 0")
        _check(2 <= self.je_bins <= 512, "loss.je_bins", f"must be in [2, 512], got {self.je_bins}")
        _check(self.je_bandwidth > 0, "loss.je_bandwidth", "must be > 0")
        _one_of(self.je_norm, ("minmax", "hw"), "loss.je_norm")
        _check(self.je_warmup_epochs >= 0, "loss.je_warmup_epochs", "must be >= 0")
        _one_of(self.je_form, ("joint", "mi"), "loss.je_form")


@dataclass
class EvalConfig:
    """Pose-binned verification (DESIGN.md, "Verification protocol")."""

    fars: list[float] = field(default_factory=lambda: [0.1, 0.01, 0.001, 0.0001])
    yaw_edges: list[float] = field(default_factory=lambda: [0.0, 30.0, 60.0, 90.0])
    #: gallery = rows with |yaw| <= this (when the data do not say otherwise)
    enroll_max_yaw: float = 15.0
    batch_size: int = 256

    def __post_init__(self) -> None:
        _check(len(self.fars) > 0 and all(0 < f < 1 for f in self.fars), "eval.fars",
               f"need one or more values in (0, 1), got {self.fars}")
        e = self.yaw_edges
        _check(len(e) >= 1 and e[0] == 0 and all(a < b for a, b in zip(e, e[1:])), "eval.yaw_edges",
               f"must start at 0 and increase strictly, got {e}")
        _check(self.enroll_max_yaw >= 0, "eval.enroll_max_yaw", "must be >= 0")
        _check(self.batch_size > 0, "eval.batch_size", "must be > 0")


@dataclass
class TrainConfig:
    """Distributed training: Ray Train worker group under DeepSpeed."""

    epochs: int = 2
    #: ``sgd`` (momentum) or ``adamw``
    optimizer: str = "sgd"
    lr: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    #: linear warm-up over this many optimizer steps, then cosine decay to lr * min_lr_ratio
    warmup_steps: int = 20
    min_lr_ratio: float = 0.01
    #: clip the global gradient norm (0 = off)
    grad_clip: float = 5.0
    grad_accum: int = 1
    #: DeepSpeed ZeRO stage 0..3
    zero_stage: int = 0
    #: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32`` or ``bf16``
    precision: str = "auto"
    seed: int = 0
    #: learning-rate multiplier of the parameters loaded from ``model.pretrained_2d`` (the new
    #: modules: attention, 3D branch, heads, train at the full rate)
    pretrained_lr_mult: float = 1.0
    #: the parameters loaded from ``model.pretrained_2d`` stay frozen for this many epochs
    freeze_pretrained_epochs: int = 0
    #: Ray Train workers; ``min_workers`` > 0 makes the group elastic in [min_workers, num_workers]
    num_workers: int = 2
    min_workers: int = 0
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    #: where runs, checkpoints and results go: a folder or s3:// URI
    storage_path: str = "out/runs"
    run_name: str = "posefr-train"
    #: worker-group restarts allowed after failures (resumes from the last checkpoint)
    max_failures: int = 2
    #: checkpoints kept, best first by ``checkpoint_metric``
    keep_checkpoints: int = 2
    checkpoint_metric: str = "val/tar@far=0.01/90+"
    checkpoint_mode: str = "max"
    #: also validate + checkpoint every N optimizer steps (0 = once per epoch only)
    val_every_steps: int = 0
    #: cap optimizer steps per epoch (0 = the whole split); for smoke runs
    max_steps_per_epoch: int = 0
    #: rank 0 serves Prometheus metrics on this port (0 = off)
    metrics_port: int = 0
    log_every_steps: int = 10
    #: level of Ray Train's own ``ray.train`` console logs (it logs every report, with its whole
    #: metrics dict, per rank, at INFO); its system log files keep every level
    ray_log_level: str = "WARNING"
    #: checkpoint URI to start from (weights, optimizer, epoch); '' = fresh or automatic resume
    resume_from: str = ""
    #: kept for older configs: the data order is always planned from (seed, epoch, world size)
    #: (data/plan.py), so a resumed run sees the batches an uninterrupted one would
    deterministic: bool = True
    #: testing hook "EPOCH:STEP:RANK": that worker process dies once at that point
    chaos_kill_at: str = ""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        _one_of(self.optimizer, ("sgd", "adamw"), "train.optimizer")
        _check(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        _check(0 <= self.momentum < 1, "train.momentum", "must be in [0, 1)")
        _check(self.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
        _check(self.grad_clip >= 0, "train.grad_clip", "must be >= 0")
        _check(self.grad_accum >= 1, "train.grad_accum", "must be >= 1")
        _check(self.pretrained_lr_mult > 0, "train.pretrained_lr_mult", "must be > 0")
        _check(0 <= self.freeze_pretrained_epochs < self.epochs, "train.freeze_pretrained_epochs",
               f"must be in [0, train.epochs={self.epochs})")
        _one_of(self.zero_stage, (0, 1, 2, 3), "train.zero_stage")
        _one_of(self.precision, ("auto", "fp32", "bf16"), "train.precision")
        _check(self.num_workers >= 1, "train.num_workers", f"must be >= 1, got {self.num_workers}")
        _check(0 <= self.min_workers <= self.num_workers, "train.min_workers",
               f"must be in [0, num_workers={self.num_workers}]")
        _check(self.cpus_per_worker > 0, "train.cpus_per_worker", "must be > 0")
        _check(self.gpus_per_worker > 0, "train.gpus_per_worker", "must be > 0")
        _check(bool(self.storage_path), "train.storage_path", "must not be empty")
        _check(bool(self.run_name) and "/" not in self.run_name, "train.run_name", "must be a non-empty name without '/'")
        _check(self.max_failures >= -1, "train.max_failures", "must be >= -1 (-1 = unlimited)")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints", "must be >= 1")
        _check(self.checkpoint_metric.startswith("val/"), "train.checkpoint_metric",
               f"must name a validation metric such as 'val/tar@far=0.01/90+', got {self.checkpoint_metric!r}")
        _one_of(self.checkpoint_mode, ("max", "min"), "train.checkpoint_mode")
        _check(self.val_every_steps >= 0, "train.val_every_steps", "must be >= 0")
        _check(self.max_steps_per_epoch >= 0, "train.max_steps_per_epoch", "must be >= 0")
        _check(0 <= self.metrics_port < 65536, "train.metrics_port", "must be a port number or 0")
        _check(self.log_every_steps >= 1, "train.log_every_steps", "must be >= 1")
        self.ray_log_level = self.ray_log_level.upper()
        _one_of(self.ray_log_level, ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), "train.ray_log_level")
        if self.chaos_kill_at:
            parts = self.chaos_kill_at.split(":")
            _check(len(parts) == 3 and all(p.isdigit() for p in parts), "train.chaos_kill_at",
                   f"expected EPOCH:STEP:RANK, got {self.chaos_kill_at!r}")


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
        from posefr_dist.tune.space import check_initial_points, check_space, flatten_space  # no Ray

        self.space = check_space(flatten_space(self.space), self.search)
        self.initial_points = check_initial_points(self.initial_points, self.space, self.search)


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


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` where that is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        _check(isinstance(value, Mapping), key, f"expected a mapping for section, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        _check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        _check(isinstance(value, Mapping), key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        _check(isinstance(value, int) and not isinstance(value, bool), key,
               f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, (str, int, float)) and not isinstance(value, bool), key,
               f"expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{key}: unknown key{hint}")
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def from_dict(tree: Mapping[str, Any], cls: type = Config) -> Any:
    """Build and validate a config of type ``cls`` from plain data (e.g. :func:`to_dict` output)."""
    return _build(cls, tree)


def key_type(key: str, cls: type = Config) -> Any:
    """The annotated type of the field a dotted key names (``loss.je_bins`` -> ``int``).

    Raises:
        ConfigError: the key names no field, or names a whole section.
    """
    parts = key.split(".")
    node: Any = cls
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node)]
        here = ".".join(parts[: i + 1])
        if part not in names:
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{here}: unknown key{hint}")
        tp = typing.get_type_hints(node)[part]
        if i + 1 < len(parts):
            _check(dataclasses.is_dataclass(tp), here, f"is a value, not a section (in {key!r})")
            node = tp
        else:
            _check(not dataclasses.is_dataclass(tp), key, "names a whole section; name one of its fields")
            return tp
    raise ConfigError(f"{key}: empty key")


def check_value(key: str, value: Any, cls: type = Config) -> Any:
    """Validate one dotted ``key: value`` (type and the section's own checks, other fields at their
    defaults) without building a whole config; returns the value coerced to the field's type."""
    parts = key.split(".")
    tp = key_type(key, cls)
    coerced = _coerce(value, tp, key)
    node: Any = cls
    for part in parts[:-1]:
        node = typing.get_type_hints(node)[part]
    section = ".".join(parts[:-1])
    try:
        node(**{parts[-1]: coerced})
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{section or key}: {e}") from e
    return coerced


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form of a config (for YAML/JSON output)."""
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """``["a.b=3", "c=x"]`` -> ``[("a.b", 3), ("c", "x")]`` with YAML-typed values."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.epochs=3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from e
        if isinstance(value, (int, float)) and ":" in raw:
            value = raw.strip()  # YAML 1.1 reads 1:0:0 as a base-60 number
        out.append((key, value))
    return out


def merge_overrides(tree: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    return tree


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (), cls: type = Config) -> Any:
    """Build a config of type ``cls`` from defaults, an optional YAML file and overrides.

    Args:
        path: YAML file (mapping of sections) or None for defaults only.
        overrides: dotted ``key=value`` strings applied after the file.
        cls: the dataclass to build (``Config`` by default).

    Returns:
        A validated instance of ``cls``.

    Raises:
        ConfigError: naming the file or the dotted key that is wrong.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p}: invalid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping of sections")
        tree = loaded
    tree = merge_overrides(tree, overrides)
    try:
        return _build(cls, tree)
    except ConfigError as e:
        where = f"config file {path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None


def dump_config(cfg: Any) -> str:
    """YAML text of a config, loadable again with :func:`load_config`."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
