"""The sections of a config that the stages use: data (+ augmentation), synth, model, loss, eval
and train. Each dataclass checks its own invariants in ``__post_init__``; the tune section and the
root :class:`~posefr_dist.config.Config` are in ``posefr_dist.config.root``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from posefr_dist.config.core import _check, _one_of


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
    #: rows shuffled together each epoch (a window of whole chunks; 0 = no shuffle within windows).
    #: Every step of a window draws from the same rows, so keep it large: on identity-sorted shards
    #: (8 views per identity), 512-row windows left the loss after 2 epochs at 9.7 where a whole
    #: share (or a global shuffle) reached 8.4-8.8. A streamed window is decoded in memory at once.
    shuffle_buffer: int = 4096
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
    #: ``cache_fraction`` of the object store of the driver's node (where the cache lives), else off
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
    #: Ray Train workers; ``min_workers`` > 0 makes the group elastic in [min_workers, num_workers]:
    #: it (re)starts with as many workers as the cluster holds (at least ``min_workers``) and grows
    #: back when capacity returns (checked every ``elastic_resize_interval_s``; a resize restarts
    #: the group from its last checkpoint)
    num_workers: int = 2
    min_workers: int = 0
    elastic_resize_interval_s: float = 60.0
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    #: custom Ray resources each worker also needs, e.g. ``{train_slot: 1}`` where every node
    #: offers one ``train_slot``, so that a node hosts one worker (and a lost node costs one)
    worker_resources: dict[str, float] = field(default_factory=dict)
    #: where runs, checkpoints and results go: a folder or s3:// URI
    storage_path: str = "out/runs"
    run_name: str = "posefr-train"
    #: worker-group restarts allowed after failures (resumes from the last checkpoint)
    max_failures: int = 2
    #: restarts allowed after node preemptions (drained nodes: spot reclaims, SIGTERM to a Ray
    #: node), counted apart from ``max_failures``; -1 = unlimited
    max_preemptions: int = -1
    #: every N optimizer steps the workers ask Ray Train whether a node of theirs is being
    #: preempted (a barrier across workers, one round trip to Ray Train's controller); on the
    #: first notice they save a checkpoint at once and train on until the node goes. Ray notices
    #: a drain within RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S (5 s): keep N steps well inside the
    #: nodes' grace period. 0 = never ask
    preemption_check_steps: int = 10
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
        _check(self.elastic_resize_interval_s > 0, "train.elastic_resize_interval_s", "must be > 0")
        _check(self.max_preemptions >= -1, "train.max_preemptions", "must be >= -1 (-1 = unlimited)")
        _check(self.preemption_check_steps >= 0, "train.preemption_check_steps", "must be >= 0")
        for name, amount in self.worker_resources.items():
            _check(name not in ("CPU", "GPU", "memory") and isinstance(amount, (int, float)) and amount > 0,
                   f"train.worker_resources.{name}",
                   "must be a custom resource (CPU and GPU have their own keys) with an amount > 0")
        self.worker_resources = {str(k): float(v) for k, v in self.worker_resources.items()}
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
