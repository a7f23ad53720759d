"""Identity heads: logits against the published formulas on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch

from posefr_dist.model import AdaFaceHead, ArcFaceHead, CosFaceHead, build_head

torch.set_num_threads(1)

EPS = 1e-3  # the heads' cosine clamp and angle clip


def _set_kernel(head, columns):
    with torch.no_grad():
        head.kernel.copy_(torch.tensor(columns, dtype=torch.float32).T)


def _polar(r: float, deg: float) -> list[float]:
    return [r * math.cos(math.radians(deg)), r * math.sin(math.radians(deg))]


# class centres at 0, 90 and 180 degrees (the last given with length 2: it is normalised)
KERNEL = [[1.0, 0.0], [0.0, 1.0], [-2.0, 0.0]]
CENTRE_DEG = [0.0, 90.0, 180.0]


def _cos(deg_a: float, deg_b: float) -> float:
    c = math.cos(math.radians(deg_a - deg_b))
    return min(max(c, -1 + EPS), 1 - EPS)


def _adaface_expected(norms, angles, labels, mean, std, m, h, s):
    """The published AdaFace head, scalar by scalar."""
    out = []
    for r, ang, y in zip(norms, angles, labels):
        ms = min(max((min(max(r, 0.001), 100) - mean) / (std + EPS) * h, -1.0), 1.0)
        row = []
        for c, centre in enumerate(CENTRE_DEG):
            cos = _cos(ang, centre)
            if c == y:
                theta = min(max(math.acos(cos) + (-m * ms), EPS), math.pi - EPS)
                row.append(s * (math.cos(theta) - (m + m * ms)))
            else:
                row.append(s * cos)
        out.append(row)
    return torch.tensor(out)


def test_adaface_hand_computed_batch_statistics():
    # t_alpha = 1: the EMA equals this batch's mean (4) and unbiased std (sqrt 2) of the norms
    head = AdaFaceHead(2, 3, m=0.4, h=0.333, s=64.0, t_alpha=1.0)
    _set_kernel(head, KERNEL)
    emb = torch.tensor([_polar(3.0, 30.0), _polar(5.0, 100.0)])
    labels = torch.tensor([0, 1])
    logits = head(emb, labels)
    expected = _adaface_expected([3.0, 5.0], [30.0, 100.0], [0, 1], 4.0, math.sqrt(2), 0.4, 0.333, 64.0)
    assert torch.allclose(logits, expected, atol=1e-4)
    assert torch.allclose(head.batch_mean, torch.tensor([4.0]))
    assert torch.allclose(head.batch_std, torch.tensor([math.sqrt(2)]))
    # margin_scaler = (3 - 4) / (sqrt2 + 1e-3) * 0.333 by hand: the target angle grows by -m * ms
    ms = -1 / (math.sqrt(2) + 1e-3) * 0.333
    hand = 64 * (math.cos(math.radians(30) - 0.4 * ms) - (0.4 + 0.4 * ms))
    assert logits[0, 0].item() == pytest.approx(hand, abs=1e-4)


def test_adaface_ema_clip_and_eval_mode():
    # default EMA start (mean 20, std 100), t_alpha 0.01, and h = 2 so that the scaler clips
    head = AdaFaceHead(2, 3, m=0.4, h=2.0, s=64.0, t_alpha=0.01)
    _set_kernel(head, KERNEL)
    norms, angles, labels = [0.0005, 150.0, 20.0], [10.0, 170.0, 80.0], [0, 2, 1]
    emb = torch.tensor([_polar(r, a) for r, a in zip(norms, angles)])
    logits = head(emb, torch.tensor(labels))
    clipped = [min(max(r, 0.001), 100) for r in norms]
    mu = sum(clipped) / 3
    sd = math.sqrt(sum((c - mu) ** 2 for c in clipped) / 2)
    mean, std = 0.01 * mu + 0.99 * 20, 0.01 * sd + 0.99 * 100
    expected = _adaface_expected(norms, angles, labels, mean, std, 0.4, 2.0, 64.0)
    assert torch.allclose(logits, expected, atol=1e-3)
    assert head.batch_mean.item() == pytest.approx(mean, rel=1e-6)
    # eval mode uses the EMA but leaves it alone
    head.eval()
    head(emb, torch.tensor(labels))
    assert head.batch_mean.item() == pytest.approx(mean, rel=1e-6)


def test_arcface_and_cosface_hand_computed():
    emb = torch.tensor([_polar(2.0, 40.0), _polar(0.5, 135.0)])
    labels = torch.tensor([1, 2])
    arc = ArcFaceHead(2, 3, m=0.5, s=30.0)
    cos = CosFaceHead(2, 3, m=0.35, s=30.0)
    for head in (arc, cos):
        _set_kernel(head, KERNEL)
    exp_arc, exp_cos = [], []
    for (ang, y) in zip([40.0, 135.0], [1, 2]):
        ra, rc = [], []
        for c, centre in enumerate(CENTRE_DEG):
            cv = _cos(ang, centre)
            if c == y:
                ra.append(30 * math.cos(min(max(math.acos(cv) + 0.5, EPS), math.pi - EPS)))
                rc.append(30 * (cv - 0.35))
            else:
                ra.append(30 * cv)
                rc.append(30 * cv)
        exp_arc.append(ra)
        exp_cos.append(rc)
    assert torch.allclose(arc(emb, labels), torch.tensor(exp_arc), atol=1e-4)
    assert torch.allclose(cos(emb, labels), torch.tensor(exp_cos), atol=1e-4)


@pytest.mark.parametrize("name", ["adaface", "arcface", "cosface"])
def test_heads_are_finite_in_bf16_and_train(name):
    torch.manual_seed(0)
    head = build_head(name, 8, 5, m=0.4, s=64.0).to(torch.bfloat16)
    emb = torch.randn(6, 8, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 5, (6,))
    logits = head(emb, labels)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert torch.isfinite(emb.grad.float()).all() and torch.isfinite(head.kernel.grad.float()).all()


def test_single_row_batch_keeps_ema_finite():
    head = AdaFaceHead(4, 3, t_alpha=0.5)
    head(torch.randn(1, 4), torch.tensor([0]))
    assert torch.isfinite(head.batch_mean).all() and torch.isfinite(head.batch_std).all()


def test_unknown_head():
    with pytest.raises(ValueError, match="unknown head"):
        build_head("sphereface", 4, 3, m=0.4, s=64.0)
