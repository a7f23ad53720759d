"""Variant comparisons with the system's own jobs: train (Ray Train + DeepSpeed), export, evaluate.

Used by ``posefr demo`` (one seed, ``2d-only`` vs ``jam-je``) and ``benchmarks/reproduce.py`` (the
ablation over variants and seeds). Every step goes through the same public functions a user calls:
``train``, ``export_checkpoint``, ``evaluate``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from posefr_dist import storage
from posefr_dist.config import Config, load_config

log = logging.getLogger("posefr.experiment")

#: the variants of the ablation, in the order tables show them
VARIANTS = ("2d-only", "jam", "jam-je")

#: options beyond the method's letter, run as named variants of ``jam-je`` (each one config change)
EXTRA_VARIANTS: dict[str, tuple[str, ...]] = {
    "jam-je-mi": ("loss.je_form=mi",),  # L_JE = -MI(A_2D; A_3D)
    "jam-je-dn": ("model.attn_domain_norm=true",),  # feature norms cannot sharpen the attention
    "jam-je-shared": ("model.shared_head=true",),  # one identity head for both branches
    "jam-je-frontal": ("model.splat=frontal",),  # the 3D map laid out frontally whatever the pose
}


@dataclass
class VariantRun:
    variant: str
    seed: int
    run_uri: str
    checkpoint: str | None
    model_uri: str
    report: dict[str, Any]
    train_seconds: float


def variant_config(base: str, variant: str, seed: int, shards_uri: str, runs_uri: str,
                   overrides: Sequence[str] = ()) -> Config:
    """The config of one variant from the YAML file ``base``: ``jam`` forces lambda_je = 0; the names
    of :data:`EXTRA_VARIANTS` are ``jam-je`` with their one change."""
    if variant not in VARIANTS and variant not in EXTRA_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join((*VARIANTS, *EXTRA_VARIANTS))}")
    model_variant = "jam-je" if variant in EXTRA_VARIANTS else variant
    extra = [f"model.variant={model_variant}", f"train.seed={seed}", f"data.uri={shards_uri}",
             f"train.storage_path={runs_uri}", f"train.run_name={variant}-seed{seed}"]
    if variant == "jam":
        extra.append("loss.lambda_je=0")
    extra += EXTRA_VARIANTS.get(variant, ())
    return load_config(base, [*extra, *overrides])


#: overrides that turn a fine-tuning preset into a from-scratch run (no pretrained 2D encoder)
FROM_SCRATCH = ("model.pretrained_2d=", "train.pretrained_lr_mult=1", "train.freeze_pretrained_epochs=0")


def pretrained_encoder(pretrain_config: str | None, pretrained: str | None, out_uri: str,
                       from_scratch: bool = False, pretrain_overrides: Sequence[str] = ()
                       ) -> tuple[list[str], dict[str, Any]]:
    """The overrides that start every variant from the same 2D encoder, and a record of it.

    ``pretrained`` (an export or AdaFace checkpoint URI) is used as given; otherwise ``posefr
    pretrain`` runs with ``pretrain_config`` into ``<out_uri>/pretrain`` (resumable: a finished
    pretraining is reused). ``from_scratch`` gives the old protocol: no pretrained encoder.
    """
    import time

    if from_scratch:
        return list(FROM_SCRATCH), {"protocol": "from scratch"}
    if pretrained:
        return [f"model.pretrained_2d={pretrained}"], {"protocol": "pretrained", "encoder": pretrained}
    if not pretrain_config:
        raise ValueError("no pretrained 2D encoder: give a pretraining config, an encoder URI, or from_scratch")
    from posefr_dist.train.pretrain import pretrain

    t0 = time.perf_counter()
    outcome = pretrain(load_config(pretrain_config, pretrain_overrides), storage.join(out_uri, "pretrain"))
    record = {"protocol": "pretrained", "encoder": outcome.encoder_uri, "pretrain_config": pretrain_config,
              "reused": outcome.reused, "seconds": time.perf_counter() - t0,
              "metrics": {k: v for k, v in (outcome.metrics or {}).items() if "tar@far=0.01" in k}}
    return [f"model.pretrained_2d={outcome.encoder_uri}"], record


def run_variant(cfg: Config, out_uri: str, split: str = "test", fars: Iterable[float] | None = None) -> VariantRun:
    """Train ``cfg``, export its best checkpoint and evaluate it on ``split``."""
    import time

    from posefr_dist.eval.embed import evaluate
    from posefr_dist.train.checkpoint import export_checkpoint
    from posefr_dist.train.trainer import train

    t0 = time.perf_counter()
    outcome = train(cfg)
    dt = time.perf_counter() - t0
    if outcome.best_checkpoint is None:
        raise RuntimeError(f"{cfg.train.run_name}: training reported no checkpoint")
    name = cfg.train.run_name
    model_uri = storage.join(out_uri, "models", name)
    export_checkpoint(outcome.best_checkpoint, model_uri)
    report = evaluate(model_uri, cfg.data.uri, storage.join(out_uri, "eval", name), split=split,
                      fars=list(fars or cfg.eval.fars), yaw_edges=cfg.eval.yaw_edges,
                      enroll_max_yaw=cfg.eval.enroll_max_yaw)
    return VariantRun(cfg.model.variant, cfg.train.seed, outcome.run_uri, outcome.best_checkpoint, model_uri,
                      report, dt)


def tar(report: dict[str, Any], bin_name: str, far: float) -> float | None:
    from posefr_dist.eval import far_key

    v = report["bins"].get(bin_name, {}).get("tar_at_far", {}).get(far_key(far))
    return None if v is None else float(v)


def _bins(report: dict[str, Any]) -> list[str]:
    return [b for b in report["bins"] if b != "unknown-pose"]


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def side_by_side(reports: dict[str, dict[str, Any]], far: float = 0.01, baseline: str = "2d-only") -> str:
    """Markdown: TAR@FAR per yaw bin, one column per variant, plus the difference to the baseline."""
    names = list(reports)
    bins = _bins(next(iter(reports.values())))
    others = [n for n in names if n != baseline]
    head = ["yaw bin"] + [f"{n} TAR@{far:g}FAR (%)" for n in names] + [f"{n} - {baseline} (points)" for n in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in bins:
        vals = [tar(reports[n], b, far) for n in names]
        row = [b] + [_pct(v) for v in vals]
        base = tar(reports[baseline], b, far) if baseline in reports else None
        for n in others:
            v = tar(reports[n], b, far)
            row.append("n/a" if v is None or base is None else f"{100 * (v - base):+.1f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def write_json(uri: str, obj: Any) -> None:
    storage.write_text(uri, json.dumps(obj, indent=2, sort_keys=True, default=str))
