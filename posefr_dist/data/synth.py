"""``posefr synth``: the procedural synthetic face data set, written as shards by Ray tasks.

Every random choice derives from the seed through ``numpy.random.default_rng([seed, tag, ...])``,
so the same seed gives byte-identical shards whatever the number of Ray workers.

Per identity: ``enrollment_views`` near-frontal views (|yaw| <= enroll_max_yaw) and the rest
(``pose_mix: stratified``) stratified over the |yaw| bins 0-30, 30-60, 60-90, 90-max_yaw with a
random sign, so each pose bin gets the same number of probes, or (``pose_mix: web``) a web-photo
mix: |yaw| half-normal with sigma :data:`WEB_YAW_SIGMA` degrees, clipped to max_yaw, random sign;
pitch is uniform in ±max_pitch; the expression is drawn per view.

``with_points: false`` writes a 2D-only set: every row's ``points`` is null (``num_points`` still
records the configured N) and no point cloud is sampled.
"""

from __future__ import annotations

import io
import logging
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from posefr_dist import storage
from posefr_dist.config import SynthConfig
from posefr_dist.data import render as R
from posefr_dist.data import shards as S
from posefr_dist.data.schema import SPLITS

log = logging.getLogger(__name__)

GENERATOR = "posefr-synth"
GENERATOR_VERSION = 2
_YAW_BINS = ((0.0, 30.0), (30.0, 60.0), (60.0, 90.0), (90.0, None))
#: sigma (degrees) of the half-normal |yaw| of ``pose_mix: web`` probes
WEB_YAW_SIGMA = 25.0
#: SynthConfig fields added after version 1 of the generator, with their defaults: left out of the
#: manifest's ``generator.params`` at those defaults, so a default set's manifest is unchanged
_NEW_PARAMS = {"pose_mix": "stratified", "with_points": True}


def manifest_params(cfg: SynthConfig) -> dict[str, Any]:
    """The ``generator.params`` a set generated with ``cfg`` records in its manifest."""
    return {k: v for k, v in asdict(cfg).items() if not (k in _NEW_PARAMS and v == _NEW_PARAMS[k])}


def split_identities(cfg: SynthConfig) -> dict[str, list[int]]:
    """Identity indices per split (disjoint, deterministic in the seed)."""
    perm = np.random.default_rng([cfg.seed, 0]).permutation(cfg.identities)
    n_test = max(1, int(round(cfg.identities * cfg.test_fraction)))
    n_val = max(1, int(round(cfg.identities * cfg.val_fraction)))
    n_train = cfg.identities - n_test - n_val
    if n_train < 1:
        raise ValueError(f"synth: {cfg.identities} identities leave none for training")
    return {
        "train": sorted(perm[:n_train].tolist()),
        "val": sorted(perm[n_train:n_train + n_val].tolist()),
        "test": sorted(perm[n_train + n_val:].tolist()),
    }


def view_plan(cfg: SynthConfig, identity: int) -> list[dict[str, Any]]:
    """Pose and expression of every view of one identity."""
    rng = np.random.default_rng([cfg.seed, 1, identity])
    views = []
    for v in range(cfg.views_per_identity):
        if v < cfg.enrollment_views:
            yaw = rng.uniform(-cfg.enroll_max_yaw, cfg.enroll_max_yaw)
        elif cfg.pose_mix == "web":
            yaw = min(abs(rng.normal(0.0, WEB_YAW_SIGMA)), cfg.max_yaw) * rng.choice((-1.0, 1.0))
        else:
            lo, hi = _YAW_BINS[(v - cfg.enrollment_views) % len(_YAW_BINS)]
            hi = cfg.max_yaw if hi is None else min(hi, cfg.max_yaw)
            lo = min(lo, hi)
            yaw = rng.uniform(lo, hi) * rng.choice((-1.0, 1.0))
        pitch = rng.uniform(-cfg.max_pitch, cfg.max_pitch)
        expr = R.EXPRESSIONS[0] if v < cfg.enrollment_views else str(rng.choice(R.EXPRESSIONS, p=R.EXPRESSION_PROBS))
        views.append({"view": v, "yaw": float(yaw), "pitch": float(pitch), "expression": expr})
    return views


def subject_id(identity: int) -> str:
    return f"syn{identity:06d}"


def _shard_plan(cfg: SynthConfig, splits: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Shards as (split, index, list of (identity, label, view)) so tasks need no shared state."""
    plans = []
    for split in SPLITS:
        rows = [(ident, label, v) for label, ident in enumerate(splits[split])
                for v in range(cfg.views_per_identity)]
        for k, start in enumerate(range(0, len(rows), cfg.rows_per_shard)):
            plans.append({"split": split, "index": k, "rows": rows[start:start + cfg.rows_per_shard]})
    return plans


def generate_rows(cfg: SynthConfig, rows: list[tuple[int, int, int]]) -> dict[str, list]:
    """Render the given (identity, label, view) rows as shard columns."""
    from PIL import Image

    cols: dict[str, list] = {c: [] for c in ("sample_id", "subject_id", "label", "dataset", "image",
                                            "yaw_deg", "pitch_deg", "expression", "points")}
    heads: dict[int, R.HeadSurface] = {}
    plans: dict[int, list[dict[str, Any]]] = {}
    points: dict[tuple[int, str], np.ndarray] = {}
    for ident, label, v in rows:
        if ident not in heads:
            heads = {ident: R.HeadSurface(R.sample_identity(np.random.default_rng([cfg.seed, 2, ident]),
                                                            cfg.identity_strength))}
            plans = {ident: view_plan(cfg, ident)}
        view = plans[ident][v]
        expr = view["expression"]
        surface = heads[ident].for_expression(expr)
        rng = np.random.default_rng([cfg.seed, 3, ident, v])
        img = R.render(surface, view["yaw"], view["pitch"], rng, size=cfg.image_size, noise=cfg.noise)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG", compress_level=1)
        key = (ident, expr)
        if not cfg.with_points:
            points[key] = None
        elif key not in points:
            seed = int(np.random.default_rng([cfg.seed, 4, ident, R.EXPRESSIONS.index(expr)]).integers(2**31))
            points[key] = R.sample_face_points(surface.ident, expr, cfg.points, seed)
        cols["sample_id"].append(f"synthetic/{subject_id(ident)}/{v:04d}")
        cols["subject_id"].append(subject_id(ident))
        cols["label"].append(label)
        cols["dataset"].append("synthetic")
        cols["image"].append(buf.getvalue())
        cols["yaw_deg"].append(view["yaw"])
        cols["pitch_deg"].append(view["pitch"])
        cols["expression"].append(expr)
        cols["points"].append(points[key])
    return cols


def _write_one(cfg_dict: dict[str, Any], out_uri: str, plan: dict[str, Any]) -> dict[str, Any]:
    cfg = SynthConfig(**cfg_dict)
    cols = generate_rows(cfg, plan["rows"])
    rel = f"{plan['split']}/{S.shard_name(plan['index'])}"
    entry = S.write_shard(S.build_table(cols, cfg.points), storage.join(out_uri, rel))
    entry["path"] = rel
    return {"split": plan["split"], "index": plan["index"], "entry": entry}


def synthesize(cfg: SynthConfig, out_uri: str, use_ray: bool = True) -> dict[str, Any]:
    """Generate the data set into ``out_uri``; returns the manifest (also written there)."""
    splits = split_identities(cfg)
    plans = _shard_plan(cfg, splits)
    t0 = time.perf_counter()
    cfg_dict = asdict(cfg)
    if use_ray:
        import ray

        from posefr_dist.raysupport import ensure_ray

        ensure_ray()
        task = ray.remote(num_cpus=1, max_retries=2)(_write_one)
        results = ray.get([task.remote(cfg_dict, out_uri, p) for p in plans])
    else:
        results = [_write_one(cfg_dict, out_uri, p) for p in plans]
    elapsed = time.perf_counter() - t0
    by_split: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    for r in sorted(results, key=lambda r: (SPLITS.index(r["split"]), r["index"])):
        by_split[r["split"]].append(r["entry"])
    manifest = S.make_manifest(
        generator={"name": GENERATOR, "version": GENERATOR_VERSION, "params": manifest_params(cfg)},
        dataset="synthetic", num_points=cfg.points, image_size=cfg.image_size,
        splits=by_split, identities={s: len(v) for s, v in splits.items()},
    )
    S.write_manifest(out_uri, manifest)
    total = sum(s["rows"] for s in manifest["splits"].values())
    log.info("synth: %d rows in %.1fs (%.0f rows/s)", total, elapsed, total / max(elapsed, 1e-9))
    manifest["_elapsed_s"] = elapsed
    return manifest
