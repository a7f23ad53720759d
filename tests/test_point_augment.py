"""Per-epoch resampling and jitter of point clouds (data.augment.point_dropout / point_jitter)."""

import numpy as np

from posefr_dist.config import AugmentConfig
from posefr_dist.data.pipeline import augment_batch, augment_points


def _clouds(b: int = 3, n: int = 64) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(b, n, 3)).astype(np.float32)


def test_dropout_keeps_count_and_support_subset():
    pts = _clouds()
    out = augment_points(pts, np.random.default_rng(1), AugmentConfig(point_dropout=0.25))
    assert out.shape == pts.shape and out.dtype == np.float32
    for i in range(pts.shape[0]):
        rows = {tuple(r) for r in pts[i]}
        got = [tuple(r) for r in out[i]]
        assert all(r in rows for r in got)  # only original points, no new ones
        assert len(set(got)) == pts.shape[1] - 16  # exactly round(0.25 * 64) dropped, filled by copies


def test_different_draws_give_different_clouds_and_same_seed_the_same():
    pts = _clouds()
    cfg = AugmentConfig(point_dropout=0.3, point_jitter=0.01)
    a = augment_points(pts, np.random.default_rng([0, 1]), cfg)
    b = augment_points(pts, np.random.default_rng([0, 1]), cfg)
    c = augment_points(pts, np.random.default_rng([0, 2]), cfg)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(np.sort(a, axis=1), np.sort(c, axis=1))


def test_jitter_scale():
    pts = np.zeros((4, 2000, 3), np.float32)
    out = augment_points(pts, np.random.default_rng(0), AugmentConfig(point_jitter=0.02))
    assert abs(float(out.std()) - 0.02) < 0.002


def test_off_draws_nothing_so_other_augmentation_is_unchanged():
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    batch = {"image": np.zeros((2, 3, 8, 8), np.uint8), "yaw_deg": np.zeros(2, np.float32), "points": _clouds(2)}
    augment_batch(batch, rng_a, AugmentConfig())
    augment_points(batch["points"], rng_b, AugmentConfig())  # draws nothing
    rng_c = np.random.default_rng(5)
    augment_batch(batch, rng_c, AugmentConfig())
    assert rng_a.random() == rng_c.random()
    assert rng_b.random() == np.random.default_rng(5).random()
