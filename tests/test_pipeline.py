"""The Ray Data pipeline from a folder and from S3, augmentation, and bad-row policies."""

import json
from pathlib import Path

import numpy as np
import pytest

from posefr_dist import storage
from posefr_dist.config import AugmentConfig, DataConfig
from posefr_dist.data import pipeline as P
from posefr_dist.data import shards as S
from posefr_dist.data.synth import synthesize
from tests.data_utils import copy_root, nan_points, rewrite_shard, set_cell, short_points, tiny_cfg


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("pipe") / "shards"
    synthesize(tiny_cfg(), str(r), use_ray=False)
    return r


def _all_rows(sd, batch_size=8, **kw):
    rows = {}
    for b in P.iter_epoch(sd.dataset, batch_size, **kw):
        for i, sid in enumerate(b["sample_id"]):
            rows[sid] = {k: (v[i].numpy() if hasattr(v, "numpy") else v[i]) for k, v in b.items()}
    return rows


def _expected_rows(root: Path, split: str):
    import pyarrow.parquet as pq

    t = pq.read_table(sorted((root / split).glob("*.parquet")))
    return {r["sample_id"]: r for r in t.to_pylist()}


def test_folder_roundtrip_decodes_exactly(root, ray_local):
    sd = P.build_dataset(str(root), "val", DataConfig(), training=False)
    got = _all_rows(sd)
    want = _expected_rows(root, "val")
    assert got.keys() == want.keys()
    cfg = tiny_cfg()
    for sid, row in got.items():
        img = S.decode_image(want[sid]["image"]).transpose(2, 0, 1).astype(np.float32) * (2 / 255) - 1
        assert row["image"].shape == (3, cfg.image_size, cfg.image_size)
        np.testing.assert_allclose(row["image"], img, atol=1e-6)
        np.testing.assert_allclose(row["points"], np.asarray(want[sid]["points"]).reshape(-1, 3))
        assert row["label"] == want[sid]["label"] and row["has_points"]
        assert row["yaw_deg"] == pytest.approx(want[sid]["yaw_deg"])
    assert sd.skipped() == 0


def test_s3_roundtrip_matches_folder(root, ray_local, s3_uri):
    storage.upload_dir(str(root), s3_uri)
    sd = P.build_dataset(s3_uri, "val", DataConfig(), training=False)
    got = _all_rows(sd)
    local = _all_rows(P.build_dataset(str(root), "val", DataConfig(), training=False))
    assert got.keys() == local.keys()
    for sid in got:
        np.testing.assert_array_equal(got[sid]["image"], local[sid]["image"])
        np.testing.assert_array_equal(got[sid]["points"], local[sid]["points"])


def test_training_epoch_shuffles_and_covers_all(root, ray_local):
    sd = P.build_dataset(str(root), "train", DataConfig(), training=True, augment=False)
    order = []
    for epoch in (0, 1):
        ids = [sid for b in P.iter_epoch(sd.dataset, 4, epoch=epoch, shuffle_buffer=16) for sid in b["sample_id"]]
        order.append(ids)
    assert sorted(order[0]) == sorted(order[1]) == sorted(_expected_rows(root, "train"))
    assert order[0] != order[1]


def test_flip_consistency():
    rng = np.random.default_rng(0)
    n, h, w, k = 4, 8, 8, 5
    batch = {
        "sample_id": np.array([f"s{i}" for i in range(n)]),
        "image": rng.uniform(-1, 1, (n, 3, h, w)).astype(np.float32),
        "yaw_deg": np.array([10.0, -50.0, 95.0, 0.0], np.float32),
        "points": rng.normal(size=(n, k, 3)).astype(np.float32),
    }
    cfg = AugmentConfig(hflip_prob=1.0, color_jitter=0.0, scale=0.0, shift=0.0)
    out = P.augment_batch(batch, np.random.default_rng(1), cfg)
    np.testing.assert_array_equal(out["image"], batch["image"][..., ::-1])
    np.testing.assert_array_equal(out["yaw_deg"], -batch["yaw_deg"])
    np.testing.assert_array_equal(out["points"][..., 0], -batch["points"][..., 0])
    np.testing.assert_array_equal(out["points"][..., 1:], batch["points"][..., 1:])
    # flipping twice is the identity; the input is left untouched
    back = P.augment_batch(out, np.random.default_rng(2), cfg)
    np.testing.assert_array_equal(back["image"], batch["image"])
    none = P.augment_batch(batch, np.random.default_rng(1), AugmentConfig(hflip_prob=0.0, color_jitter=0.0,
                                                                            scale=0.0, shift=0.0))
    np.testing.assert_array_equal(none["image"], batch["image"])


def test_flip_matches_a_render_at_negated_yaw():
    """Mirroring a rendered view looks like the mirrored head at -yaw: check the silhouette."""
    from posefr_dist.data import render as R

    surf = R.HeadSurface(R.sample_identity(np.random.default_rng(2)))
    img = R.render(surf, 70.0, 0.0, np.random.default_rng(3), size=64, noise=0)
    batch = {"sample_id": np.array(["x"]), "image": (img.transpose(2, 0, 1)[None] / 127.5 - 1).astype(np.float32),
             "yaw_deg": np.array([70.0], np.float32), "points": np.zeros((1, 2, 3), np.float32)}
    out = P.augment_batch(batch, np.random.default_rng(0), AugmentConfig(hflip_prob=1.0, color_jitter=0.0,
                                                                           scale=0.0, shift=0.0))
    assert out["yaw_deg"][0] == -70.0
    other = R.render(surf, -70.0, 0.0, np.random.default_rng(3), size=64, noise=0)
    fa = (np.abs(out["image"][0] - out["image"][0][:, :1, :1]).sum(0) > 1e-3)
    ob = other.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
    fb = (np.abs(ob - ob[:, :1, :1]).sum(0) > 1e-3)
    assert (fa != fb).mean() < 0.08


def test_augment_changes_images_but_keeps_shapes(root, ray_local):
    sd = P.build_dataset(str(root), "val", DataConfig(), training=True, seed=7)
    plain = _all_rows(P.build_dataset(str(root), "val", DataConfig(), training=False))
    aug = _all_rows(sd)
    assert aug.keys() == plain.keys()
    diffs = [np.abs(aug[k]["image"] - plain[k]["image"]).mean() for k in aug]
    assert np.mean(diffs) > 0.01
    assert all(aug[k]["image"].shape == plain[k]["image"].shape for k in aug)
    # seeded: the same again
    again = _all_rows(P.build_dataset(str(root), "val", DataConfig(), training=True, seed=7))
    assert all(np.array_equal(again[k]["image"], aug[k]["image"]) for k in aug)


def _broken(root: Path, tmp_path: Path, name: str, edit, all_shards: bool = False) -> tuple[Path, str]:
    r = copy_root(root, tmp_path / name)
    man = json.loads((r / "manifest.json").read_text())
    shards = [s["path"] for s in man["splits"]["train"]["shards"]]
    rewrite_shard(r, shards[0], edit)
    for rel in shards[1:] if all_shards else []:
        # the other shards get the same (variable-length) points type, with no bad row
        rewrite_shard(r, rel, lambda t: short_points(t, None))
    return r, shards[0]


BROKEN = [
    ("image", lambda t: set_cell(t, "image", 3, b"garbage"), False, "image", "does not decode", 3),
    ("nan", lambda t: nan_points(t, 4), False, "points", "non-finite", 4),
    ("short", lambda t: short_points(t, 2), True, "points", "expected 3*num_points", 2),
]


@pytest.mark.parametrize("name, edit, all_shards, field, reason, row", BROKEN)
def test_bad_row_error_names_file_row_field(root, tmp_path, ray_local, name, edit, all_shards, field, reason, row):
    r, rel = _broken(root, tmp_path, name, edit, all_shards)
    sd = P.build_dataset(str(r), "train", DataConfig(on_bad_row="error"), training=False)
    with pytest.raises(Exception) as ei:
        _all_rows(sd)
    msg = str(ei.value)
    assert str(r / rel) in msg and f"row {row} " in msg and f"field {field}" in msg and reason in msg


@pytest.mark.parametrize("name, edit, all_shards, field, reason, row", BROKEN)
def test_bad_row_skip_counts(root, tmp_path, ray_local, name, edit, all_shards, field, reason, row):
    r, rel = _broken(root, tmp_path, name, edit, all_shards)
    sd = P.build_dataset(str(r), "train", DataConfig(on_bad_row="skip"), training=False)
    got = _all_rows(sd)
    want = _expected_rows(root, "train")
    assert len(got) == len(want) - 1
    assert sd.skipped() == 1
    (rec,) = sd.skipped_records()
    assert rec[0] == str(r / rel) and rec[1].startswith(f"{row} ") and rec[2] == field and reason in rec[3]


def test_truncated_shard_error_and_skip(root, tmp_path, ray_local):
    r = copy_root(root, tmp_path / "trunc")
    man = json.loads((r / "manifest.json").read_text())
    first = man["splits"]["train"]["shards"][0]
    data = (r / first["path"]).read_bytes()
    (r / first["path"]).write_bytes(data[: len(data) // 3])
    with pytest.raises(S.ShardError, match=r"part-00000.parquet: not a readable Parquet file \(truncated"):
        P.build_dataset(str(r), "train", DataConfig(on_bad_row="error"))
    sd = P.build_dataset(str(r), "train", DataConfig(on_bad_row="skip"))
    got = _all_rows(sd)
    assert len(got) == man["splits"]["train"]["rows"] - first["rows"]
    assert sd.skipped() == first["rows"]


def test_wrong_s3_endpoint_is_a_clear_error(root, ray_local, monkeypatch):
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(storage.StorageError, match="S3 request failed"):
        P.build_dataset("s3://posefr-test/nothing", "train", DataConfig())


def test_missing_split_and_manifest(root, tmp_path, ray_local):
    with pytest.raises(S.ShardError, match="manifest.json not found"):
        P.build_dataset(str(tmp_path / "empty"), "train", DataConfig())
    with pytest.raises(S.ShardError, match="no split 'dev'"):
        P.build_dataset(str(root), "dev", DataConfig())
