"""Helpers for tests that need shard roots, good and deliberately broken."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from posefr_dist.config import SynthConfig

TINY = dict(identities=8, views_per_identity=6, image_size=64, points=128, rows_per_shard=16,
            val_fraction=0.15, test_fraction=0.25)


#: the pretraining the demo and ablation tests start from (conftest's ``tiny_pretrain``): the
#: demo's pretraining preset at a tiny size on one worker (their ``--pretrain-set`` values)
TINY_PRETRAIN_CONFIG = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "pretrain-demo-cpu.yaml"
TINY_PRETRAIN_SETS = ("synth.identities=24", "synth.views_per_identity=4", "synth.rows_per_shard=64",
                      "train.epochs=1", "data.batch_size=8", "train.warmup_steps=2", "train.num_workers=1")


def tiny_cfg(**kw) -> SynthConfig:
    return SynthConfig(**{**TINY, **kw})


def copy_root(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_shard(root: Path, rel: str, edit: Callable[[pa.Table], pa.Table], fix_checksum: bool = True) -> Path:
    """Apply ``edit`` to one shard of ``root`` (and update the manifest checksum if asked)."""
    path = root / rel
    table = edit(pq.read_table(path))
    pq.write_table(table, path)
    if fix_checksum:
        man = json.loads((root / "manifest.json").read_text())
        for split in man["splits"].values():
            for s in split["shards"]:
                if s["path"] == rel:
                    s["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        (root / "manifest.json").write_text(json.dumps(man))
    return path


def set_cell(table: pa.Table, column: str, row: int, value, type_=None) -> pa.Table:
    values = table.column(column).to_pylist()
    values[row] = value
    idx = table.column_names.index(column)
    return table.set_column(idx, table.schema.field(column).with_type(type_ or table.schema.field(column).type),
                            pa.array(values, type_ or table.schema.field(column).type))


def nan_points(table: pa.Table, row: int) -> pa.Table:
    pts = np.asarray(table.column("points")[row].as_py(), np.float32)
    pts[5] = np.nan
    return set_cell(table, "points", row, pts.tolist())


def short_points(table: pa.Table, row: int | None) -> pa.Table:
    """Make ``points`` a variable-length list and cut one row's array short (none if row is None)."""
    values = table.column("points").to_pylist()
    if row is not None:
        values[row] = values[row][:-3]
    idx = table.column_names.index("points")
    t = pa.list_(pa.float32())
    return table.set_column(idx, pa.field("points", t), pa.array(values, t))
