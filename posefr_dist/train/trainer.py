"""``posefr train``: build and run the Ray Train ``TorchTrainer`` for a config.

Everything that can be checked before workers start is checked here (config values, the shard
manifest, the storage path, the checkpoint to resume from), so a bad value fails in seconds with a
message naming the field.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from posefr_dist import storage
from posefr_dist.config import Config, ConfigError, dump_config, to_dict
from posefr_dist.data import shards as S
from posefr_dist.raysupport import worker_env

log = logging.getLogger("posefr.train")


@dataclass
class TrainOutcome:
    """What a finished run leaves behind."""

    run_uri: str
    best_checkpoint: str | None
    best_metrics: dict[str, Any]
    last_metrics: dict[str, Any]
    history: list[dict[str, Any]]
    error: str | None = None


def _history_callback(run: str, storage_path: str):
    """A controller-side callback that keeps ``<run>/history.json``: every report in order."""
    import ray.train

    class HistoryCallback(ray.train.UserCallback):
        def __init__(self) -> None:
            self.rows: list[dict[str, Any]] = []

        def after_report(self, run_context, metrics, checkpoint) -> None:
            row = dict(metrics[0]) if metrics else {}
            if checkpoint is not None:
                path = checkpoint.path
                row["checkpoint"] = ("s3://" + path.lstrip("/")) if storage_path.startswith("s3://") else path
            row["time"] = time.time()
            self.rows.append(row)
            storage.write_text(storage.join(run, "history.json"),
                               json.dumps(self.rows, indent=1, default=_json_default))

    return HistoryCallback()


def _json_default(x: Any) -> Any:
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def data_meta(cfg: Config) -> dict[str, Any]:
    """Label count, sizes and row counts from the shard manifest (fails before any worker starts)."""
    try:
        man = S.read_manifest(cfg.data.uri)
    except S.ShardError as e:
        raise ConfigError(f"data.uri: {e}") from None
    for split in ("train", "val"):
        if split not in man["splits"] or not man["splits"][split]["rows"]:
            raise ConfigError(f"data.uri: {cfg.data.uri} has no rows in split {split!r}")
    train = man["splits"]["train"]
    if not train.get("identities"):
        raise ConfigError(f"data.uri: manifest of {cfg.data.uri} gives no identity count for 'train'")
    return {"num_classes": int(train["identities"]), "image_size": int(man["image_size"]),
            "num_points": int(man["num_points"]), "train_rows": int(train["rows"]),
            "val_rows": int(man["splits"]["val"]["rows"])}


def check_config(cfg: Config) -> dict[str, Any]:
    """Cross-field checks; returns the data facts the workers need."""
    meta = data_meta(cfg)
    tc = cfg.train
    if meta["image_size"] % 16:
        raise ConfigError(f"data.uri: image size {meta['image_size']} is not a multiple of 16")
    per_worker = meta["train_rows"] // tc.num_workers
    if per_worker < cfg.data.batch_size * tc.grad_accum:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} x train.grad_accum {tc.grad_accum} exceeds the "
            f"{per_worker} train rows each of the {tc.num_workers} workers gets")
    if tc.min_workers and tc.zero_stage and tc.min_workers < tc.num_workers:
        log.warning("train.min_workers with ZeRO-%d: a resize restores the consolidated weights with a fresh "
                    "optimizer state (ZeRO partitions are per world size)", tc.zero_stage)
    if cfg.model.variant != "2d-only" and meta["num_points"] <= 0:
        raise ConfigError(f"model.variant: {cfg.model.variant} needs 3D points but the shards have none")
    check_pretrained_2d(cfg, meta)
    if tc.resume_from and not storage.exists(storage.join(tc.resume_from, "meta.json")):
        raise ConfigError(f"train.resume_from: {tc.resume_from} is not a checkpoint (no meta.json)")
    if tc.use_gpu is False and tc.precision == "bf16":
        log.warning("train.precision=bf16 on the CPU: supported by DeepSpeed but slow")
    return meta


def check_pretrained_2d(cfg: Config, meta: dict[str, Any]) -> None:
    """``model.pretrained_2d`` exists and is an AdaFace-layout file or a ``posefr-2d`` export; an
    export must match the run's 2D encoder, image size and embedding size (read from its
    ``config.json``; no weights are read here). The ``train.*pretrained*`` settings need it."""
    tc, uri = cfg.train, cfg.model.pretrained_2d
    if not uri:
        if tc.pretrained_lr_mult != 1.0 or tc.freeze_pretrained_epochs:
            key = "train.pretrained_lr_mult" if tc.pretrained_lr_mult != 1.0 else "train.freeze_pretrained_epochs"
            raise ConfigError(f"{key}: applies to the parameters loaded from model.pretrained_2d, which is not set")
        return
    from posefr_dist.train.checkpoint import resolve_pretrained_2d

    try:
        info = resolve_pretrained_2d(uri)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"model.pretrained_2d: {e}") from None
    conf = info["config"]
    if conf is None:
        return
    for field, want, key in (("encoder_2d", cfg.model.encoder_2d, "model.encoder_2d"),
                             ("image_size", meta["image_size"], "the data's image size"),
                             ("embedding_dim", cfg.model.embedding_dim, "model.embedding_dim")):
        if conf.get(field) != want:
            raise ConfigError(f"model.pretrained_2d: {uri} was exported with {field} {conf.get(field)!r}, "
                              f"this run has {want!r} ({key})")


def worker_config(cfg: Config) -> dict[str, Any]:
    """The config the workers get: local paths the workers open themselves made absolute, since a
    worker's working directory is not the driver's."""
    tree = to_dict(cfg)
    for section, key in (("model", "pretrained_2d"), ("train", "resume_from"), ("data", "trace_dir")):
        uri = tree[section][key]
        if uri:
            tree[section][key] = storage.local_path(uri) or uri
    return tree


def run_uri(cfg: Config) -> str:
    return storage.join(cfg.train.storage_path, cfg.train.run_name)


def build_trainer(cfg: Config, meta: dict[str, Any], callbacks: list | None = None):
    """The ``TorchTrainer`` for ``cfg`` and its (train, val) :class:`SplitSource` pair.

    ``callbacks`` are extra Ray Train ``UserCallback`` objects (e.g. Tune's report forwarding).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from posefr_dist.data.loader import prepare
    from posefr_dist.train.loop import train_loop_per_worker

    tc = cfg.train
    # decoded once here when data.cache allows; every worker then reads its planned batches (a
    # function of seed, epoch and world size) from the cache or its own stream: see data/loader.py
    handles = prepare(cfg.data.uri, cfg.data)
    resources = {"CPU": tc.cpus_per_worker, **tc.worker_resources}
    if tc.use_gpu:
        resources["GPU"] = tc.gpus_per_worker
    workers = (tc.min_workers, tc.num_workers) if tc.min_workers else tc.num_workers
    fs, path = storage.filesystem(tc.storage_path)
    local = storage.local_path(tc.storage_path)
    chaos_dir = os.path.join(local, tc.run_name) if local else None
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": worker_config(cfg), "meta": meta, "chaos_dir": chaos_dir, "data": handles},
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=tc.use_gpu,
                                               resources_per_worker=resources,
                                               elastic_resize_monitor_interval_s=tc.elastic_resize_interval_s),
        run_config=ray.train.RunConfig(
            name=tc.run_name, storage_path=path, storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures,
                                                   max_preemption_failures=tc.max_preemptions),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=tc.keep_checkpoints, checkpoint_score_attribute=tc.checkpoint_metric,
                checkpoint_score_order=tc.checkpoint_mode),
            worker_runtime_env={"env_vars": worker_env()},
            logging_config=ray.train.LoggingConfig(log_level=tc.ray_log_level),
            callbacks=[_history_callback(storage.join(tc.storage_path, tc.run_name), tc.storage_path),
                       *(callbacks or [])],
        ),
    ), (handles["train"].source, handles["val"].source)


def _checkpoint_uri(cfg: Config, ckpt: Any) -> str:
    if cfg.train.storage_path.startswith("s3://"):
        return "s3://" + ckpt.path.lstrip("/")
    return ckpt.path


def train(cfg: Config, callbacks: list | None = None) -> TrainOutcome:
    """Run distributed training for ``cfg``; returns the best checkpoint and the metrics.

    Raises:
        ConfigError: a bad value or missing data, before any worker starts.
        RuntimeError: the run failed (after its allowed restarts); the message has the cause.
    """
    from posefr_dist.raysupport import ensure_ray

    meta = check_config(cfg)
    ensure_ray()
    uri = run_uri(cfg)
    storage.write_text(storage.join(uri, "config.yaml"), dump_config(cfg))
    trainer, (train_ds, val_ds) = build_trainer(cfg, meta, callbacks)
    log.info("training %s (%s, %s/%s) on %d worker(s): %d classes, %d train rows -> %s", cfg.model.variant,
             cfg.model.encoder_2d, cfg.model.encoder_3d, cfg.model.head, cfg.train.num_workers,
             meta["num_classes"], meta["train_rows"], uri)
    error = None
    try:
        result = trainer.fit()
    except Exception as e:  # TrainingFailedError carries the worker's traceback
        raise RuntimeError(f"training failed: {e}") from e
    try:
        history = json.loads(storage.read_text(storage.join(uri, "history.json")))
    except FileNotFoundError:
        history = []
    best = None
    best_metrics: dict[str, Any] = {}
    metric, mode = cfg.train.checkpoint_metric, cfg.train.checkpoint_mode
    if result.best_checkpoints:
        pick = max if mode == "max" else min
        ck, best_metrics = pick(result.best_checkpoints, key=lambda cm: cm[1].get(metric, float("-inf")))
        best = _checkpoint_uri(cfg, ck)
    if result.error is not None:
        error = str(result.error)
    outcome = TrainOutcome(uri, best, best_metrics, result.metrics or {}, history, error)
    summary = {"run": uri, "best_checkpoint": best, "best_metrics": best_metrics,
               "last_metrics": result.metrics or {}, "skipped_rows": {"train": train_ds.skipped(),
                                                                      "val": val_ds.skipped()},
               "error": error}
    storage.write_text(storage.join(uri, "train_summary.json"), json.dumps(summary, indent=2, default=str))
    if error:
        raise RuntimeError(f"training failed: {error}")
    return outcome
