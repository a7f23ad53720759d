"""Training reads: cached and streamed splits give the planned batches, identical row for row,
across decode parallelism, fresh drivers and resume positions; bad rows; raw shards."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from posefr_dist.config import DataConfig
from posefr_dist.data import loader as L
from posefr_dist.data.pack import pack
from posefr_dist.data.synth import synthesize
from tests.data_utils import copy_root, nan_points, rewrite_shard, set_cell, tiny_cfg

REPO = Path(__file__).resolve().parents[1]
CFG = DataConfig(shuffle_buffer=32, chunk_rows=16, decode_batch_size=32)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("loader") / "shards"
    synthesize(tiny_cfg(identities=10, views_per_identity=12, rows_per_shard=32), str(r), use_ray=False)
    return r


def _cfg(**kw) -> DataConfig:
    return dataclasses.replace(CFG, **kw)


def _epoch(handle, cfg, *, epoch=0, rank=0, world=2, start=0, augment=True):
    return list(L.RankBatches(handle, cfg, seed=11, epoch=epoch, rank=rank, world=world, batch_size=8, start=start,
                              augment=cfg.augment if augment else None))


def _same(a, b, keys=("gid", "image", "points", "label", "yaw_deg", "has_points")):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for k in keys:
            np.testing.assert_array_equal(x[k].numpy(), y[k].numpy(), err_msg=k)


def test_cached_and_streamed_batches_are_identical(root, ray_local):
    cached = L.prepare(str(root), _cfg(cache="memory"))
    streamed = L.prepare(str(root), _cfg(cache="off"))
    assert cached["train"].is_cached and not streamed["train"].is_cached
    seen = []
    for epoch in (0, 1):
        for rank in (0, 1):
            a = _epoch(cached["train"], CFG, epoch=epoch, rank=rank)
            _same(a, _epoch(streamed["train"], CFG, epoch=epoch, rank=rank))  # augmented images too
            seen.append(np.concatenate([b["gid"].numpy() for b in a]))
            assert a[0]["image"].dtype.is_floating_point and float(a[0]["image"].abs().max()) <= 1.0
    # the two ranks of an epoch share no row; the epochs differ in order
    assert not set(seen[0]) & set(seen[1])
    assert not np.array_equal(seen[0], seen[2])
    val_c = [b["sample_id"] for b in L.iter_split(cached["val"], CFG, 7)]
    val_s = [b["sample_id"] for b in L.iter_split(streamed["val"], CFG, 7)]
    np.testing.assert_array_equal(np.concatenate(val_c), np.concatenate(val_s))


def test_one_or_two_decode_tasks_give_the_same_stream(root, ray_local):
    one = L.prepare(str(root), _cfg(cache="off", decode_concurrency=1))
    two = L.prepare(str(root), _cfg(cache="off", decode_concurrency=2, decode_cpus=0.5))
    for rank in (0, 1):
        _same(_epoch(one["train"], _cfg(decode_concurrency=1), rank=rank),
              _epoch(two["train"], _cfg(decode_concurrency=2, decode_cpus=0.5), rank=rank))


DRIVER = """
import json, sys
import numpy as np, ray
from posefr_dist.config import DataConfig
from posefr_dist.data import loader as L
ray.init(address=sys.argv[2], logging_level="ERROR")
cfg = DataConfig(shuffle_buffer=32, chunk_rows=16, decode_batch_size=32, cache=sys.argv[3])
h = L.prepare(sys.argv[1], cfg)["train"]
out = {f"{e}/{r}": [b["gid"].tolist() for b in L.RankBatches(h, cfg, seed=11, epoch=e, rank=r, world=2,
                                                            batch_size=8)]
       for e in (0, 1) for r in (0, 1)}
print("PLAN " + json.dumps(out))
"""


def _plan(root, mode: str) -> dict[str, list[list[int]]]:
    """What DRIVER prints, computed in this process."""
    cfg = DataConfig(shuffle_buffer=32, chunk_rows=16, decode_batch_size=32, cache=mode)
    h = L.prepare(str(root), cfg)["train"]
    return {f"{e}/{r}": [b["gid"].tolist() for b in L.RankBatches(h, cfg, seed=11, epoch=e, rank=r, world=2,
                                                                  batch_size=8)]
            for e in (0, 1) for r in (0, 1)}


@pytest.mark.slow  # three driver processes, each importing Ray and torch
def test_two_fresh_drivers_see_the_same_sequences(root, ray_address, tmp_path):
    """Each driver is a new process joining the cluster; per rank and step the rows are equal: two
    fresh drivers (streamed and cached, started together) and this process (streamed)."""
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    procs = [subprocess.Popen([sys.executable, str(script), str(root), ray_address, mode], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for mode in ("off", "memory")]
    here = _plan(root, "off")
    runs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        runs.append(json.loads(next(ln for ln in out.splitlines() if ln.startswith("PLAN "))[5:]))
    runs.insert(1, json.loads(json.dumps(here)))
    assert runs[0] == runs[1] == runs[2]
    assert runs[0]["0/0"] != runs[0]["1/0"]


def test_resume_position_skips_without_decoding(root, tmp_path, ray_local):
    """Starting at batch k gives the tail of the full epoch; windows before k's are not decoded
    (a bad row in rank 0's first window fails a fresh start but not a resumed one)."""
    good = L.prepare(str(root), _cfg(cache="off"))["train"]
    full = _epoch(good, CFG)
    tail = _epoch(good, CFG, start=5)
    _same(full[5:], tail)
    plan = L.plan_for(good.source, CFG, seed=11, epoch=0, world=2)
    first = plan.windows(0)[0]
    f, a, _ = first.pieces[0]
    files = good.source.layout.files
    rel = str(Path(files[f]).relative_to(root))
    r = copy_root(root, tmp_path / "bad")
    rewrite_shard(r, rel, lambda t: set_cell(t, "image", int(a), b"garbage"))
    bad = L.prepare(str(r), _cfg(cache="off"))["train"]
    with pytest.raises(Exception, match="does not decode"):
        _epoch(bad, CFG)
    later = (first.rows + 7) // 8  # the first batch wholly past the broken window
    _same(full[later:], _epoch(bad, CFG, start=later), keys=("gid", "label", "points"))


def test_skipped_rows_are_replaced_the_same_way_cached_and_streamed(root, tmp_path, ray_local):
    r = copy_root(root, tmp_path / "skip")
    man = json.loads((r / "manifest.json").read_text())
    rel = man["splits"]["train"]["shards"][1]["path"]
    rewrite_shard(r, rel, lambda t: nan_points(set_cell(t, "image", 2, b"garbage"), 5))
    cached = L.prepare(str(r), _cfg(cache="memory", on_bad_row="skip"))
    streamed = L.prepare(str(r), _cfg(cache="off", on_bad_row="skip"))
    bad_gids = set()
    arrays = L.load_cached(cached["train"])
    bad_gids = set(np.flatnonzero(~arrays["valid"]).tolist())
    assert len(bad_gids) == 2
    for epoch in (0, 1):
        for rank in (0, 1):
            a = _epoch(cached["train"], _cfg(on_bad_row="skip"), epoch=epoch, rank=rank, augment=False)
            b = _epoch(streamed["train"], _cfg(on_bad_row="skip"), epoch=epoch, rank=rank, augment=False)
            _same(a, b)
            assert not bad_gids & set(np.concatenate([x["gid"].numpy() for x in a]).tolist())
    # each bad row counted once, however many epochs streamed it
    assert cached["train"].source.skipped() == 2 and streamed["train"].source.skipped() == 2


def test_raw_shards_give_the_same_batches(root, tmp_path, ray_local):
    raw = tmp_path / "raw"
    pack(str(root), str(raw))
    enc = L.prepare(str(root), _cfg(cache="off"))
    rw = L.prepare(str(raw), _cfg(cache="off"))
    assert rw["train"].source.image_format == "raw-chw-uint8"
    for rank in (0, 1):
        _same(_epoch(enc["train"], CFG, rank=rank), _epoch(rw["train"], CFG, rank=rank))


def test_cache_auto_follows_the_object_store_share(root, ray_local):
    src = L.prepare(str(root), _cfg(cache="off"))["train"].source
    assert L.cache_decision([src], _cfg(cache="auto"))  # a few MiB fit
    assert not L.cache_decision([src], _cfg(cache="auto", cache_fraction=1e-9))
    assert not L.cache_decision([src], _cfg(cache="off")) and L.cache_decision([src], _cfg(cache="memory"))
