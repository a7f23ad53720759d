"""Exact TAR@FAR on scores held in memory, and the histogram-based figures (EER, AUC, ROC).

The rule (DESIGN.md, "Verification protocol (exact)"): with N impostor scores and a target FAR,
k = floor(FAR * N); the threshold t is the (k+1)-th largest impostor score; TAR is the share of
genuine scores strictly above t and the achieved FAR the share of impostor scores strictly above
t (at most k of them, so never above the target). Ties need no special case: every score equal to
t is rejected, genuine or impostor. The result equals the largest TPR among the ROC points whose
FPR is <= FAR (the points of ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``).

FAR is read as the decimal its ``repr`` shows (``0.29`` is 29/100, not the binary double just
below it), so ``k`` is what a person computes by hand and ``k / N <= FAR`` also holds in floating
point. When FAR < 1/N (k = 0) the only admissible ROC point is FPR = 0, which N impostors cannot
tell apart from a small non-zero FAR; such a FAR is *below resolution*: its TAR, threshold and
achieved FAR are None and ``below_resolution`` is set (the report lists it per bin).

:func:`tar_at_far` is the in-memory reference; the streaming computation in
:mod:`posefr_dist.eval.verify` gives identical results without holding the scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Iterable, Sequence

import numpy as np


def far_key(far: float) -> str:
    """The key a FAR has in reports: Python's ``repr`` of the float (``"0.01"``, ``"0.0001"``)."""
    return repr(float(far))


def check_fars(fars: Iterable[float]) -> tuple[float, ...]:
    """Validate target FARs (each in (0, 1), no duplicates); returns them as floats."""
    out = tuple(float(f) for f in fars)
    if not out:
        raise ValueError("fars: need one or more target FARs in (0, 1)")
    for f in out:
        if not (0.0 < f < 1.0) or math.isnan(f):
            raise ValueError(f"fars: every FAR must be in (0, 1), got {f!r}")
    if len(set(far_key(f) for f in out)) != len(out):
        raise ValueError(f"fars: duplicate values in {list(out)}")
    return out


def far_rank(far: float, n_impostor: int) -> int:
    """k = floor(FAR * N), FAR read as the decimal of its repr; the threshold is the (k+1)-th
    largest impostor score."""
    return math.floor(Fraction(far_key(far)) * int(n_impostor))


@dataclass(frozen=True)
class FarPoint:
    """The operating point for one target FAR.

    ``threshold``, ``tar`` and ``achieved_far`` are None when the FAR is below resolution
    (k = 0 or no impostors); ``tar`` is also None when there are no genuine scores.
    """

    far: float
    #: floor(FAR * N)
    k: int
    n_genuine: int
    n_impostor: int
    threshold: float | None
    #: genuine scores > threshold
    genuine_above: int | None
    #: impostor scores > threshold (<= k)
    impostor_above: int | None
    below_resolution: bool

    @property
    def tar(self) -> float | None:
        if self.genuine_above is None or self.n_genuine == 0:
            return None
        return self.genuine_above / self.n_genuine

    @property
    def achieved_far(self) -> float | None:
        if self.impostor_above is None or self.n_impostor == 0:
            return None
        return self.impostor_above / self.n_impostor


def below_resolution_point(far: float, n_genuine: int, n_impostor: int) -> FarPoint:
    k = far_rank(far, n_impostor)
    return FarPoint(far, k, n_genuine, n_impostor, None, None, None, True)


def tar_at_far(genuine: Sequence[float] | np.ndarray, impostor: Sequence[float] | np.ndarray,
               fars: Iterable[float]) -> list[FarPoint]:
    """Exact operating points from scores in memory (the reference for the streaming path).

    Args:
        genuine: genuine-pair scores (any float dtype; compared as given).
        impostor: impostor-pair scores.
        fars: target FARs in (0, 1).

    Returns:
        One :class:`FarPoint` per FAR, in the order given.

    Example:
        >>> p = tar_at_far([0.9, 0.8, 0.1], [0.7, 0.5, 0.3, 0.2], [0.25])[0]
        >>> p.threshold, p.tar, p.achieved_far
        (0.5, 0.6666666666666666, 0.25)
    """
    g = np.asarray(genuine).ravel()
    imp = np.asarray(impostor).ravel()
    n = imp.size
    out = []
    for far in check_fars(fars):
        k = far_rank(far, n)
        if n == 0 or k == 0:
            out.append(below_resolution_point(far, g.size, n))
            continue
        # the (k+1)-th largest is at ascending position n - k - 1
        t = np.partition(imp, n - k - 1)[n - k - 1]
        out.append(FarPoint(
            far=far, k=k, n_genuine=int(g.size), n_impostor=int(n), threshold=float(t),
            genuine_above=int(np.count_nonzero(g > t)), impostor_above=int(np.count_nonzero(imp > t)),
            below_resolution=False,
        ))
    return out


# --------------------------------------------------------------------------------------------
# Figures from fine score histograms (cell counts over [-1, 1]; see scoring.cell_edges)
# --------------------------------------------------------------------------------------------


def _tail_counts(hist: np.ndarray) -> np.ndarray:
    """ge[c] = number of scores in cells >= c, for c = 0..C (ge[C] = 0)."""
    h = np.asarray(hist, dtype=np.int64)
    ge = np.zeros(h.size + 1, dtype=np.int64)
    ge[:-1] = np.cumsum(h[::-1])[::-1]
    return ge


def auc_from_hist(gen: np.ndarray, imp: np.ndarray) -> tuple[float | None, float | None]:
    """AUC = P(genuine > impostor) + 1/2 P(genuine = impostor), two scores in the same cell
    counted as a tie. Returns ``(auc, max_error)``: the exact AUC of the scores lies within
    ``max_error`` = 1/2 * sum_c gen_c * imp_c / (G * N). None when either side is empty."""
    g = np.asarray(gen, dtype=np.float64)
    i = np.asarray(imp, dtype=np.float64)
    n_g, n_i = g.sum(), i.sum()
    if n_g == 0 or n_i == 0:
        return None, None
    gen_gt = _tail_counts(gen)[1:].astype(np.float64)  # genuine in cells > c
    auc = float(np.sum(i * (gen_gt + 0.5 * g)) / (n_g * n_i))
    err = float(0.5 * np.sum(g * i) / (n_g * n_i))
    return auc, err


def roc_at_edges(gen: np.ndarray, imp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) when accepting scores in cells >= c, for c = 0..C (C+1 points, decreasing)."""
    g_ge = _tail_counts(gen)
    i_ge = _tail_counts(imp)
    n_g, n_i = g_ge[0], i_ge[0]
    fpr = i_ge / n_i if n_i else np.zeros(i_ge.size)
    tpr = g_ge / n_g if n_g else np.zeros(g_ge.size)
    return fpr, tpr


def eer_from_hist(gen: np.ndarray, imp: np.ndarray) -> float | None:
    """Equal error rate on the ROC at cell edges, interpolated linearly between the two edges
    that bracket FPR = FNR. None when either side is empty."""
    if np.sum(gen) == 0 or np.sum(imp) == 0:
        return None
    fpr, tpr = roc_at_edges(gen, imp)
    d = fpr - (1.0 - tpr)  # FPR - FNR: 1 at c = 0, -1 at c = C, non-increasing
    c1 = int(np.argmax(d < 0))
    c0 = c1 - 1
    d0, d1 = d[c0], d[c1]
    a = d0 / (d0 - d1)
    return float(fpr[c0] + a * (fpr[c1] - fpr[c0]))


def roc_points(gen: np.ndarray, imp: np.ndarray, n_points: int = 200) -> tuple[list[float], list[float]]:
    """A thinned ROC for plots: for log-spaced FPR targets from 1/N to 1, the cell-edge point
    with the largest TPR whose FPR does not exceed the target. Points with FPR = 0 are left out
    (a log axis cannot show them)."""
    n_i = int(np.sum(imp))
    if n_i == 0 or np.sum(gen) == 0:
        return [], []
    fpr, tpr = roc_at_edges(gen, imp)
    # reverse so FPR is non-decreasing; the best point with FPR <= f is the last one <= f
    fpr_r, tpr_r = fpr[::-1], tpr[::-1]
    targets = np.logspace(np.log10(1.0 / n_i), 0.0, n_points)
    pos = np.searchsorted(fpr_r, targets, side="right") - 1
    pos = np.unique(pos[pos >= 0])
    keep = fpr_r[pos] > 0
    return [float(x) for x in fpr_r[pos][keep]], [float(x) for x in tpr_r[pos][keep]]
