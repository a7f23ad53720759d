"""``posefr pretrain``: a pretrained 2D encoder for ``model.pretrained_2d``, resumably.

Under one output URI ``OUT`` (folder or ``s3://``)::

    OUT/shards/     the pretraining set: the config's ``synth`` section (a 2D-only, web-pose set
                    in the preset jobs/configs/pretrain-cpu.yaml); reused when its manifest is there
    OUT/runs/       the ``2d-only`` training run (Ray Train + DeepSpeed, the ``posefr train`` path)
    OUT/encoder/    the best checkpoint's 2D path (``posefr export`` format): what
                    ``model.pretrained_2d=OUT/encoder`` loads
    OUT/pretrain.json  what was done: the URIs, the best checkpoint and its metrics

Each stage is skipped when its output is complete: ``OUT/encoder/config.json`` (written last)
ends the whole command at once; a run whose ``train_summary.json`` names a best checkpoint is not
trained again; an interrupted run resumes from its last checkpoint (Ray Train keeps the run's
state under ``OUT/runs/<run_name>``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any

from posefr_dist import storage
from posefr_dist.config import Config, ConfigError

log = logging.getLogger("posefr.pretrain")

#: the variant a pretraining run trains, whatever the config says
VARIANT = "2d-only"


@dataclass
class PretrainOutcome:
    """Where ``pretrain`` left things; ``reused`` names the stages it found already done."""

    encoder_uri: str
    shards_uri: str
    run_uri: str | None
    best_checkpoint: str | None
    reused: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


def encoder_uri(out_uri: str) -> str:
    return storage.join(out_uri, "encoder")


def ensure_shards(synth_cfg: Any, shards_uri: str) -> bool:
    """Generate the synthetic set into ``shards_uri`` unless a complete one of the same parameters
    is there. Returns True when an existing set was reused.

    Raises:
        ValueError: ``shards_uri`` holds a set of other parameters (or another generator).
    """
    from posefr_dist.data import shards as S
    from posefr_dist.data.synth import GENERATOR, manifest_params, synthesize

    if storage.exists(storage.join(shards_uri, "manifest.json")):
        man = S.read_manifest(shards_uri)
        gen = man.get("generator") or {}
        want = manifest_params(synth_cfg)
        have = gen.get("params") or {}
        if gen.get("name") != GENERATOR or have != want:
            diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
            raise ValueError(f"{shards_uri} holds another data set (generator {gen.get('name')!r}; differs in "
                             f"{', '.join(diff) or 'generator'}): choose another --out or remove it")
        missing = [s["path"] for split in man["splits"].values() for s in split.get("shards", [])
                   if not storage.exists(storage.join(shards_uri, s["path"]))]
        if missing:
            raise ValueError(f"{shards_uri}: manifest.json lists missing shards, e.g. {missing[:3]}; remove the "
                             "folder to generate it again")
        log.info("pretraining set %s is complete: reused", shards_uri)
        return True
    s = synth_cfg
    log.info("pretraining set: %d identities x %d views, %dx%d, pose mix %s, %s -> %s", s.identities,
             s.views_per_identity, s.image_size, s.image_size, s.pose_mix,
             f"{s.points} points" if s.with_points else "no points", shards_uri)
    synthesize(synth_cfg, shards_uri)
    return False


def pretrain_config(cfg: Config, out_uri: str) -> Config:
    """The training config of the pretraining run: ``2d-only`` on ``OUT/shards``, runs in ``OUT/runs``."""
    if cfg.model.variant != VARIANT:
        log.info("pretrain trains the %s variant (the config says %s)", VARIANT, cfg.model.variant)
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, variant=VARIANT),
        data=dataclasses.replace(cfg.data, uri=storage.join(out_uri, "shards")),
        train=dataclasses.replace(cfg.train, storage_path=storage.join(out_uri, "runs")),
    )


def _finished_run(run_uri: str) -> dict[str, Any] | None:
    """The summary of a finished run under ``run_uri`` whose best checkpoint is still there."""
    try:
        summary = json.loads(storage.read_text(storage.join(run_uri, "train_summary.json")))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    best = summary.get("best_checkpoint")
    if summary.get("error") or not best or not storage.exists(storage.join(best, "meta.json")):
        return None
    return summary


def pretrain(cfg: Config, out_uri: str) -> PretrainOutcome:
    """Synthesize (or reuse) the pretraining set, train ``2d-only`` on it with the distributed
    trainer and export the best checkpoint's 2D path to ``OUT/encoder``.

    Returns:
        The outcome; ``encoder_uri`` is the value for ``model.pretrained_2d``.

    Raises:
        ConfigError: a bad config value, before Ray starts.
        ValueError: ``OUT/shards`` holds another data set.
        RuntimeError: training failed or left no checkpoint.
    """
    from posefr_dist.raysupport import ensure_ray
    from posefr_dist.train.checkpoint import export_checkpoint
    from posefr_dist.train.trainer import run_uri, train

    if cfg.train.resume_from:
        raise ConfigError("train.resume_from: pretrain resumes its own run under OUT/runs; leave it empty")
    enc = encoder_uri(out_uri)
    shards = storage.join(out_uri, "shards")
    if storage.exists(storage.join(enc, "config.json")):
        log.info("%s is already exported: nothing to do", enc)
        done = storage.join(out_uri, "pretrain.json")
        prev = json.loads(storage.read_text(done)) if storage.exists(done) else {}
        return PretrainOutcome(enc, shards, prev.get("run_uri"), prev.get("best_checkpoint"),
                               ["shards", "train", "export"], dict(prev.get("metrics") or {}))
    run_cfg = pretrain_config(cfg, out_uri)
    ensure_ray()
    reused = ["shards"] if ensure_shards(run_cfg.synth, shards) else []
    run = run_uri(run_cfg)
    summary = _finished_run(run)
    if summary is not None:
        log.info("run %s is finished: reused its best checkpoint %s", run, summary["best_checkpoint"])
        reused.append("train")
        best, metrics = summary["best_checkpoint"], dict(summary.get("best_metrics") or {})
    else:
        outcome = train(run_cfg)
        if outcome.best_checkpoint is None:
            raise RuntimeError(f"pretraining run {run} reported no checkpoint")
        best, metrics = outcome.best_checkpoint, dict(outcome.best_metrics)
    export_checkpoint(best, enc)  # config.json last: it marks a finished export
    result = PretrainOutcome(enc, shards, run, best, reused, metrics)
    storage.write_text(storage.join(out_uri, "pretrain.json"),
                       json.dumps(dataclasses.asdict(result), indent=2, sort_keys=True, default=str) + "\n")
    return result


__all__ = ["pretrain", "PretrainOutcome", "ensure_shards", "pretrain_config", "encoder_uri"]
