"""Joint-entropy loss of two attention maps through a differentiable joint histogram.

For one sample with attention maps A_2D, A_3D (both [HW, HW], rows are softmax distributions),
every position pair (i, j) gives one observation (a_2D, a_3D) = (A_2D[i, j], A_3D[i, j]). The loss
is the entropy of their joint distribution,

    L_JE = -sum_{k,l} P(k, l) log P(k, l),

estimated with a Parzen (soft-binning) joint histogram and averaged over the samples that have
both maps.

Normalisation (``norm``). Softmax values are about 1/(HW) and mostly tiny, so binning them on a
fixed [0, 1] range puts nearly everything in the first bin. Each map is therefore rescaled to
[0, 1] before binning:

* ``"minmax"`` (default): per attention row (one query position),
  ``u = (a - min) / (max - min + 1e-3 * mean|a|)``. Every row then spans (almost exactly) the
  full range whatever the softmax temperature, so the histogram spreads over the bins, and the
  loss cannot be lowered by merely flattening the attention (rescaling removes the scale), only
  by changing its shape and the 2D-3D dependence. The small term relative to the row's mean
  bounds the gradient of nearly flat rows; an all-equal row (e.g. zeros) maps to 0 with a zero
  gradient.
* ``"hw"``: ``r = HW * a`` (1 = uniform weight), ``u = r / (1 + r)``: smooth, no clamp, uniform
  attention lands at 0.5. Keeps the attention's absolute scale, so flatter attention means a
  lower joint entropy.

Binning. ``bins`` equal bins on [0, 1] with centres c_k = (k + 1/2)/bins. Each value is spread over
the bins with Gaussian weights normalised over the bins (a softmax of -(u - c_k)^2 / (2 s^2)), so
each observation carries unit mass and P sums to 1 exactly. The bandwidth s is given in units of
one bin width (``bandwidth=1`` means s = 1/bins). As the bandwidth goes to 0 the weights become
one-hot on the bin holding u, i.e. the hard histogram (``numpy.histogram2d`` on [0, 1]).

Mutual information. From the same soft joint histogram P (per sample), with marginals
P2(k) = sum_l P(k, l) and P3(l) = sum_k P(k, l): MI = H(P2) + H(P3) - H(P) >= 0 (nats), so
L_JE = H(P2) + H(P3) - MI. ``mutual_information`` and ``histogram_entropies`` report the terms
(diagnostics: does a lower L_JE come from aligned maps, a higher MI, or from lower marginal
entropies, i.e. sharper maps?).

Numerics. The computation runs in float32 (float64 when given float64) whatever the input dtype
and with autocast disabled,
the memberships come from a softmax (no underflow to 0/0 at small bandwidths), and P log P uses
``log(max(P, tiny))`` so an empty bin contributes 0 to the value and a finite term to the gradient.
"""

from __future__ import annotations

import torch

__all__ = ["normalise_attention", "soft_bin", "joint_histogram", "joint_entropy", "entropy",
           "histogram_entropies", "mutual_information", "joint_entropy_loss", "NORMS"]

NORMS = ("minmax", "hw")
#: min-max denominator = (max - min) + MINMAX_REL_EPS * mean|a| over the row
MINMAX_REL_EPS = 1e-3
_FLOOR = {torch.float32: 1e-20, torch.float64: 1e-200}


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def normalise_attention(a: torch.Tensor, norm: str = "minmax") -> torch.Tensor:
    """Map attention rows (last dim) to [0, 1]; see the module docstring."""
    if norm == "minmax":
        lo = a.amin(dim=-1, keepdim=True)
        hi = a.amax(dim=-1, keepdim=True)
        # a small floor relative to the row's scale bounds the gradient of nearly flat rows
        denom = (hi - lo) + MINMAX_REL_EPS * a.abs().mean(dim=-1, keepdim=True)
        floor = _FLOOR[a.dtype] if a.dtype in _FLOOR else 1e-12
        ok = denom > floor
        # an all-equal (e.g. all-zero) row maps to 0 with a zero gradient instead of 0/0
        return torch.where(ok, (a - lo) / denom.clamp_min(floor), torch.zeros_like(a))
    if norm == "hw":
        r = a.clamp_min(0) * a.shape[-1]
        return r / (1.0 + r)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def soft_bin(u: torch.Tensor, bins: int, bandwidth: float) -> torch.Tensor:
    """Memberships ``[..., bins]`` of values ``u`` in [0, 1]; each row sums to 1."""
    centres = (torch.arange(bins, dtype=u.dtype, device=u.device) + 0.5) / bins
    sigma = bandwidth / bins
    logits = -((u.unsqueeze(-1) - centres) ** 2) / (2.0 * sigma * sigma)
    return torch.softmax(logits, dim=-1)


def joint_histogram(a_2d: torch.Tensor, a_3d: torch.Tensor, bins: int = 32, bandwidth: float = 1.0,
                    norm: str = "minmax") -> torch.Tensor:
    """Per-sample soft joint histogram ``[B, bins, bins]`` (each sums to 1) of two maps ``[B, ...]``."""
    if a_2d.shape != a_3d.shape:
        raise ValueError(f"attention maps differ in shape: {tuple(a_2d.shape)} vs {tuple(a_3d.shape)}")
    if bins < 2 or bandwidth <= 0:
        raise ValueError(f"need bins >= 2 and bandwidth > 0, got {bins}, {bandwidth}")
    dt = _work_dtype(a_2d)
    b = a_2d.shape[0]
    # autocast would run the matmul in half precision: the histogram stays in float32
    with torch.autocast(device_type=a_2d.device.type, enabled=False):
        u2 = normalise_attention(a_2d.to(dt), norm).reshape(b, -1)
        u3 = normalise_attention(a_3d.to(dt), norm).reshape(b, -1)
        w2 = soft_bin(u2, bins, bandwidth)  # [B, N, K]
        w3 = soft_bin(u3, bins, bandwidth)
        return (w2.transpose(1, 2) @ w3) / u2.shape[1]


def joint_entropy(p: torch.Tensor) -> torch.Tensor:
    """``-sum P log P`` over the last two dims; 0 log 0 = 0 with a finite gradient."""
    tiny = torch.finfo(p.dtype).tiny
    return -(p * p.clamp_min(tiny).log()).sum(dim=(-2, -1))


def entropy(p: torch.Tensor) -> torch.Tensor:
    """``-sum p log p`` over the last dim; 0 log 0 = 0 with a finite gradient."""
    tiny = torch.finfo(p.dtype).tiny
    return -(p * p.clamp_min(tiny).log()).sum(dim=-1)


def histogram_entropies(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(H(P2), H(P3), H(P))`` of joint histograms ``p [..., bins_2d, bins_3d]`` (nats, per histogram);
    P2 and P3 are its marginals (rows: the first map's bins, columns: the second's)."""
    return entropy(p.sum(dim=-1)), entropy(p.sum(dim=-2)), joint_entropy(p)


def mutual_information(a_2d: torch.Tensor, a_3d: torch.Tensor, bins: int = 32, bandwidth: float = 1.0,
                       norm: str = "minmax") -> torch.Tensor:
    """Per-sample mutual information ``[B]`` (nats) of paired attention maps,
    H(P2) + H(P3) - H(P23) of the soft joint histogram (:func:`joint_histogram`, same arguments).

    Between 0 (independent maps; up to rounding) and ``min(H(P2), H(P3))`` (a map with itself:
    its marginal entropy). As ``bandwidth`` -> 0 it is the MI of the hard 2D histogram.
    """
    h2, h3, h23 = histogram_entropies(joint_histogram(a_2d, a_3d, bins, bandwidth, norm))
    return h2 + h3 - h23


def joint_entropy_loss(a_2d: torch.Tensor, a_3d: torch.Tensor, bins: int = 32, bandwidth: float = 1.0,
                       norm: str = "minmax", mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean joint entropy (nats) of paired attention maps.

    Args:
        a_2d, a_3d: ``[B, HW, HW]`` (any trailing shape, the same for both) attention maps.
        bins: bins per axis.
        bandwidth: Gaussian kernel width in bin widths (-> 0: hard histogram).
        norm: ``"minmax"`` or ``"hw"`` (module docstring).
        mask: optional bool ``[B]``; only rows with True count. With no row, the result is a zero
            that is still connected to the inputs (so every parameter gets a gradient).

    Returns:
        A scalar in float32 (float64 for float64 inputs), between 0 and ``2 log(bins)``.
    """
    if mask is not None:
        mask = mask.to(torch.bool)
        if not bool(mask.any()):
            return (a_2d.sum() + a_3d.sum()).to(_work_dtype(a_2d)) * 0.0
        a_2d, a_3d = a_2d[mask], a_3d[mask]
    if a_2d.shape[0] == 0:
        return (a_2d.sum() + a_3d.sum()).to(_work_dtype(a_2d)) * 0.0
    return joint_entropy(joint_histogram(a_2d, a_3d, bins, bandwidth, norm)).mean()
