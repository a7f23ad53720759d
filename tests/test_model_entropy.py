"""Joint-entropy loss: agreement with a hard histogram, dependence, gradients, low precision."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from posefr_dist.model import joint_entropy_loss, joint_histogram, normalise_attention
from posefr_dist.model.entropy import MINMAX_REL_EPS

torch.set_num_threads(1)


def _attention(b: int, hw: int, seed: int, temp: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(b, hw, hw, generator=g, dtype=torch.float64) * temp, dim=-1)


def _numpy_hard_je(a2: np.ndarray, a3: np.ndarray, bins: int) -> float:
    """Reference: min-max rows, numpy.histogram2d on [0, 1], -sum P log P, mean over samples."""

    def norm(a: np.ndarray) -> np.ndarray:
        lo, hi = a.min(-1, keepdims=True), a.max(-1, keepdims=True)
        return (a - lo) / ((hi - lo) + MINMAX_REL_EPS * np.abs(a).mean(-1, keepdims=True))

    out = []
    for x, y in zip(norm(a2), norm(a3)):
        h, _, _ = np.histogram2d(x.ravel(), y.ravel(), bins=bins, range=[[0, 1], [0, 1]])
        p = h / h.sum()
        p = p[p > 0]
        out.append(-(p * np.log(p)).sum())
    return float(np.mean(out))


def test_matches_hard_histogram_as_bandwidth_shrinks():
    a2, a3 = _attention(3, 20, 0, temp=2.0), _attention(3, 20, 1, temp=2.0)
    bins = 8
    ref = _numpy_hard_je(a2.numpy(), a3.numpy(), bins)
    errs = [abs(float(joint_entropy_loss(a2, a3, bins=bins, bandwidth=bw)) - ref) for bw in (1.0, 0.3, 0.1, 1e-3)]
    assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-9, errs


def test_soft_histogram_is_a_distribution():
    a2, a3 = _attention(2, 10, 2), _attention(2, 10, 3)
    p = joint_histogram(a2, a3, bins=16, bandwidth=1.0)
    assert p.shape == (2, 16, 16)
    assert torch.allclose(p.sum(dim=(1, 2)), torch.ones(2, dtype=p.dtype))
    assert (p >= 0).all()
    je = joint_entropy_loss(a2, a3, bins=16)
    assert 0 <= float(je) <= 2 * math.log(16)


@pytest.mark.parametrize("norm", ["minmax", "hw"])
def test_lower_for_dependent_than_independent_maps(norm):
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 16, 16, generator=g) * 2
    a2 = torch.softmax(logits, -1)
    dependent = torch.softmax(1.5 * logits, -1)  # a monotone function of a2, row by row
    independent = torch.softmax(torch.randn(4, 16, 16, generator=g) * 2, -1)
    dep = joint_entropy_loss(a2, dependent, bins=16, bandwidth=0.5, norm=norm)
    ind = joint_entropy_loss(a2, independent, bins=16, bandwidth=0.5, norm=norm)
    same = joint_entropy_loss(a2, a2, bins=16, bandwidth=0.5, norm=norm)
    assert float(same) < float(ind)
    assert float(dep) < float(ind)


def test_minmax_spreads_softmax_values_over_the_bins():
    # softmax values are ~1/HW: on a fixed [0, 1] range they would all fall in the first bin
    a = _attention(2, 49, 5).float()
    u = normalise_attention(a, "minmax")
    hist = torch.histc(u, bins=8, min=0, max=1)
    assert (hist > 0).sum() >= 6
    assert float(u.amin()) == 0.0 and float(u.amax()) > 0.99


def test_gradcheck_float64():
    a2 = _attention(2, 5, 6, temp=2.0).requires_grad_(True)
    a3 = _attention(2, 5, 7, temp=2.0).requires_grad_(True)
    for norm in ("minmax", "hw"):
        assert torch.autograd.gradcheck(
            lambda x, y: joint_entropy_loss(x, y, bins=6, bandwidth=1.0, norm=norm), (a2, a3),
            eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_finite_with_zeros_and_empty_bins(dtype):
    a2 = torch.zeros(2, 9, 9, dtype=dtype, requires_grad=True)
    a3 = torch.softmax(torch.randn(2, 9, 9), -1).to(dtype).requires_grad_(True)
    for bw in (1.0, 1e-3):  # a tiny bandwidth leaves most joint bins exactly empty
        loss = joint_entropy_loss(a2, a3, bins=32, bandwidth=bw)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        a2.grad = a3.grad = None
        loss.backward()
        assert torch.isfinite(a2.grad.float()).all() and torch.isfinite(a3.grad.float()).all()


def test_mask_selects_rows_and_empty_mask_is_connected_zero():
    a2, a3 = _attention(3, 6, 8).float(), _attention(3, 6, 9).float()
    mask = torch.tensor([True, False, True])
    assert torch.allclose(joint_entropy_loss(a2, a3, mask=mask), joint_entropy_loss(a2[mask], a3[mask]))
    x = a2.clone().requires_grad_(True)
    zero = joint_entropy_loss(x, a3, mask=torch.zeros(3, dtype=torch.bool))
    assert float(zero.detach()) == 0.0
    zero.backward()
    assert x.grad is not None and float(x.grad.abs().sum()) == 0.0


def test_rejects_bad_arguments():
    a = _attention(1, 4, 0)
    with pytest.raises(ValueError, match="shape"):
        joint_entropy_loss(a, a[:, :2])
    with pytest.raises(ValueError, match="norm"):
        joint_entropy_loss(a, a, norm="zscore")
    with pytest.raises(ValueError, match="bins"):
        joint_entropy_loss(a, a, bins=1)


def test_autocast_does_not_lower_the_histogram_precision():
    a2, a3 = _attention(2, 16, 10).float(), _attention(2, 16, 11).float()
    ref = joint_entropy_loss(a2, a3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = joint_entropy_loss(a2, a3)
    assert low.dtype == torch.float32 and torch.allclose(low, ref, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# mutual information
# --------------------------------------------------------------------------------------------


def _numpy_hard_mi(a2: np.ndarray, a3: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference per sample: (H(P2), H(P3), MI) of numpy.histogram2d on min-max rows, in nats."""

    def norm(a: np.ndarray) -> np.ndarray:
        lo, hi = a.min(-1, keepdims=True), a.max(-1, keepdims=True)
        return (a - lo) / ((hi - lo) + MINMAX_REL_EPS * np.abs(a).mean(-1, keepdims=True))

    def h(p: np.ndarray) -> float:
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    h2, h3, mi = [], [], []
    for x, y in zip(norm(a2), norm(a3)):
        c, _, _ = np.histogram2d(x.ravel(), y.ravel(), bins=bins, range=[[0, 1], [0, 1]])
        p = c / c.sum()
        p2, p3 = p.sum(1), p.sum(0)
        h2.append(h(p2))
        h3.append(h(p3))
        mi.append(float(sum(p[i, j] * np.log(p[i, j] / (p2[i] * p3[j]))
                            for i in range(bins) for j in range(bins) if p[i, j] > 0)))
    return np.array(h2), np.array(h3), np.array(mi)


def test_mutual_information_matches_hard_histogram_as_bandwidth_shrinks():
    from posefr_dist.model import mutual_information
    from posefr_dist.model.entropy import histogram_entropies

    a2 = _attention(3, 20, 0, temp=2.0)
    a3 = torch.softmax(torch.log(a2) * 1.5 + 0.5 * torch.randn(3, 20, 20, generator=torch.Generator().manual_seed(1),
                                                               dtype=torch.float64), -1)  # partly dependent
    bins = 8
    r2, r3, rmi = _numpy_hard_mi(a2.numpy(), a3.numpy(), bins)
    assert (rmi > 0.1).all()  # the reference is not trivially 0
    errs = [float((mutual_information(a2, a3, bins=bins, bandwidth=bw) - torch.from_numpy(rmi)).abs().max())
            for bw in (1.0, 0.3, 0.1, 1e-3)]
    assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-9, errs
    mi = mutual_information(a2, a3, bins=bins, bandwidth=1e-3)
    assert mi.shape == (3,) and mi.dtype == torch.float64
    h2, h3, h23 = histogram_entropies(joint_histogram(a2, a3, bins=bins, bandwidth=1e-3))
    assert np.allclose(h2.numpy(), r2, atol=1e-9) and np.allclose(h3.numpy(), r3, atol=1e-9)
    # JE = H2 + H3 - MI, per sample
    assert torch.allclose(h2 + h3 - mi, h23, atol=1e-12)
    assert abs(float(h23.mean()) - float(joint_entropy_loss(a2, a3, bins=bins, bandwidth=1e-3))) < 1e-12


@pytest.mark.parametrize("norm", ["minmax", "hw"])
def test_mutual_information_of_a_map_with_itself_and_of_independent_maps(norm):
    from posefr_dist.model import mutual_information
    from posefr_dist.model.entropy import histogram_entropies

    a = _attention(2, 16, 3, temp=2.0)
    ratios = []
    for bw in (1.0, 0.3, 0.1, 1e-3):
        h2, h3, _ = histogram_entropies(joint_histogram(a, a, bins=16, bandwidth=bw, norm=norm))
        mi = mutual_information(a, a, bins=16, bandwidth=bw, norm=norm)
        # soft bins blur the diagonal: MI(a; a) <= H(a), equal in the hard limit
        assert torch.allclose(h2, h3) and (mi <= h2 + 1e-12).all()
        ratios.append(float((mi / h2).min()))
    assert all(r1 < r2 for r1, r2 in zip(ratios, ratios[1:])), ratios
    assert torch.allclose(mi, h2, atol=1e-9) and (h2 > 1.0).all()
    # independent maps (many positions, so the plug-in estimate's bias is small): MI ~ 0
    g = torch.Generator().manual_seed(5)
    x = torch.softmax(torch.randn(2, 64, 64, generator=g, dtype=torch.float64) * 2, -1)
    y = torch.softmax(torch.randn(2, 64, 64, generator=g, dtype=torch.float64) * 2, -1)
    mi_ind = mutual_information(x, y, bins=8, bandwidth=1.0, norm=norm)
    h_x = histogram_entropies(joint_histogram(x, y, bins=8, bandwidth=1.0, norm=norm))[0]
    assert (mi_ind >= -1e-9).all() and (mi_ind < 0.01 * h_x).all(), (mi_ind, h_x)
