"""The single-process reference loop trains every variant on separable synthetic tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from posefr_dist.model import create_model
from posefr_dist.train import LOSS_TERMS, make_optimizer, train_reference, train_step

torch.set_num_threads(1)

SIZE, POINTS, IDS, PER_ID = 32, 128, 4, 16


def _separable_data(seed: int = 0):
    """Per identity: a smooth colour pattern (+ noise) and a stretched sphere of points (+ jitter)."""
    g = torch.Generator().manual_seed(seed)
    protos = F.interpolate(torch.rand(IDS, 3, 4, 4, generator=g) * 2 - 1, size=SIZE, mode="bilinear",
                           align_corners=False)
    shapes = F.normalize(torch.randn(IDS, POINTS, 3, generator=g), dim=-1)
    shapes = shapes * (1 + 0.3 * torch.rand(IDS, 1, 3, generator=g))
    labels = torch.arange(IDS).repeat_interleave(PER_ID)
    images = (protos[labels] + 0.5 * torch.randn(len(labels), 3, SIZE, SIZE, generator=g)).clamp(-1, 1)
    points = shapes[labels] + 0.05 * torch.randn(len(labels), POINTS, 3, generator=g)
    # every fourth sample has no 3D, as in data sets that only sometimes carry a scan
    has_points = torch.arange(len(labels)) % 4 != 3
    return images, points, has_points, labels


def _batches(data, batch_size: int = 16):
    images, points, has_points, labels = data

    def fn(epoch: int):
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(100 + epoch))
        for i in range(0, len(perm), batch_size):
            j = perm[i:i + batch_size]
            yield {"image": images[j], "points": points[j], "has_points": has_points[j], "label": labels[j],
                   "sample_id": [f"s{k}" for k in j.tolist()]}

    return fn


def _separation(model, images, labels) -> float:
    """Mean genuine cosine minus mean impostor cosine of the 2D embeddings."""
    model.eval()
    with torch.no_grad():
        e = F.normalize(model.embed_2d(images), dim=1)
    s = e @ e.T
    same = labels[:, None] == labels[None]
    off = ~torch.eye(len(labels), dtype=torch.bool)
    return float(s[same & off].mean() - s[~same].mean())


@pytest.mark.parametrize("name", ["2d-only/ir_tiny", "jam/ir_tiny/pointnet2_tiny", "jam-je/ir_tiny/pointnet2_tiny"])
def test_reference_loop_lowers_loss_and_separates_identities(name):
    torch.manual_seed(0)
    data = _separable_data()
    model = create_model(name, num_classes=IDS, image_size=SIZE, num_points=POINTS, embedding_dim=32)
    before = _separation(model, data[0], data[3])
    seen = []
    history = train_reference(model, _batches(data), epochs=5, lr=1e-3, optimizer="adamw", log=seen.append)
    after = _separation(model, data[0], data[3])
    assert len(history) == 5 and seen == history
    for h in history:
        assert h["steps"] == 4 and h["samples"] == IDS * PER_ID
        assert all(math.isfinite(h[k]) for k in LOSS_TERMS)
    first, last = history[0], history[-1]
    assert last["loss"] < 0.5 * first["loss"]
    assert last["loss_2d"] < first["loss_2d"]
    if name.startswith("2d-only"):
        assert first["loss_3d"] == 0 and first["n_3d"] == 0
    else:
        assert last["loss_3d"] < first["loss_3d"] and first["n_3d"] == 12  # 3 of 4 rows carry points
    assert (first["loss_je"] > 0) == name.startswith("jam-je")
    assert after > before + 0.3, (before, after)


def test_train_step_reports_floats_and_rejects_nan():
    torch.manual_seed(0)
    model = create_model("jam-je/ir_tiny/pointnet2_tiny", num_classes=IDS, image_size=SIZE, embedding_dim=16)
    opt = make_optimizer(model, "sgd", lr=0.01)
    images, points, has_points, labels = _separable_data()
    batch = {"image": images[:8], "points": points[:8], "has_points": has_points[:8], "label": labels[:8]}
    m = train_step(model, opt, batch, grad_clip=5.0)
    assert set(LOSS_TERMS) <= set(m) and all(isinstance(v, float) for v in m.values())
    assert m["grad_norm"] > 0
    bad = dict(batch, image=torch.full_like(batch["image"], float("nan")))
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train_step(model, opt, bad)
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer(model, "lion")
