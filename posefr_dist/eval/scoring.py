"""The scoring kernel: probe blocks against the gallery, fine histograms, and score collection.

Scores are float32 cosine similarities: one ``torch.matmul`` of a block of L2-normalised probe
embeddings against the normalised gallery. Each score falls in one of C cells over [-1, 1]:

    cell(s) = clamp(floor(s * C/2), -C/2, C/2 - 1) + C/2

With C a power of two, ``s * C/2`` is exact in float32, so cell j holds exactly the scores in
[edge_j, edge_{j+1}) with edge_j = (j - C/2) / (C/2) (float64, exact); the first cell also holds
scores below -1 and the last one scores >= 1 (rounding can put a score a hair outside [-1, 1]).
The cell is a non-decreasing function of the score, computed the same way in torch and NumPy,
which is all the exact threshold search needs.

Blocks are fixed in the global probe order (block j = probes [j*B, (j+1)*B)), and every pass
scores the same blocks with the same shapes, so a pass recomputes bit-identical scores (BLAS
results can depend on a block's shape; they do not depend on where a block runs).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

DEFAULT_CELLS = 1 << 16
#: collected scores a task keeps raw before merging equal values
CHUNK_COMPACT_AT = 1 << 22


def check_cells(cells: int) -> int:
    cells = int(cells)
    if cells < 2 or cells & (cells - 1) or cells > (1 << 24):
        raise ValueError(f"cells: must be a power of two in [2, 2**24], got {cells}")
    return cells


def cell_edges(cells: int) -> np.ndarray:
    """The C+1 cell edges over [-1, 1] (float64, exact dyadic values)."""
    h = cells // 2
    return (np.arange(cells + 1, dtype=np.float64) - h) / h


def cell_index_np(scores: np.ndarray, cells: int) -> np.ndarray:
    """Cell of each float32 score (int64), identical to :func:`cell_index_torch`."""
    h = np.float32(cells // 2)
    q = np.floor(np.asarray(scores, dtype=np.float32) * h)
    np.clip(q, -h, h - 1, out=q)
    q += h
    return q.astype(np.int64)


def cell_index_torch(scores, cells: int, out=None, work=None):
    """Cell of each float32 score as int32 (``out``), using ``work`` (float32) as scratch."""
    import torch

    h = float(cells // 2)
    work = torch.mul(scores, h, out=work) if work is not None else torch.mul(scores, h)
    work.floor_().clamp_(-h, h - 1).add_(h)
    if out is None:
        return work.to(torch.int32)
    out.copy_(work)
    return out


# --------------------------------------------------------------------------------------------
# What a scoring task receives and returns
# --------------------------------------------------------------------------------------------


@dataclass
class Gallery:
    """The gallery as every task sees it (put once in the Ray object store)."""

    #: (G, D) float32, rows L2-normalised
    emb: np.ndarray
    #: subject codes of the gallery rows, sorted (int64)
    codes_sorted: np.ndarray
    #: gallery row index of each entry of ``codes_sorted``
    order: np.ndarray

    @classmethod
    def build(cls, emb: np.ndarray, codes: np.ndarray) -> "Gallery":
        order = np.argsort(codes, kind="stable").astype(np.int64)
        return cls(np.ascontiguousarray(emb, dtype=np.float32), codes[order].astype(np.int64), order)

    @property
    def codes(self) -> np.ndarray:
        """Subject code of each gallery row, in row order."""
        out = np.empty_like(self.codes_sorted)
        out[self.order] = self.codes_sorted
        return out

    def genuine_pairs(self, probe_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(probe row, gallery row) of every genuine pair, sorted by probe row."""
        lo = np.searchsorted(self.codes_sorted, probe_codes, side="left")
        hi = np.searchsorted(self.codes_sorted, probe_codes, side="right")
        cnt = hi - lo
        total = int(cnt.sum())
        rows = np.repeat(np.arange(probe_codes.size, dtype=np.int64), cnt)
        if total == 0:
            return rows, np.zeros(0, dtype=np.int64)
        starts = np.cumsum(cnt) - cnt
        pos = np.arange(total, dtype=np.int64) - np.repeat(starts - lo, cnt)
        return rows, self.order[pos]

    def genuine_counts(self, probe_codes: np.ndarray) -> np.ndarray:
        lo = np.searchsorted(self.codes_sorted, probe_codes, side="left")
        hi = np.searchsorted(self.codes_sorted, probe_codes, side="right")
        return (hi - lo).astype(np.int64)


@dataclass
class ProbeChunk:
    """A run of whole blocks of probes, in the global (bin-sorted) probe order."""

    #: (n, D) float32, rows L2-normalised
    emb: np.ndarray
    #: subject code per probe (int64)
    codes: np.ndarray
    #: partition-bin id per probe (non-decreasing)
    pbin: np.ndarray


@dataclass
class PassPlan:
    """What one scoring pass computes."""

    cells: int
    block_size: int
    #: build the fine histograms
    histograms: bool
    #: per partition bin, a uint8 table over cells: 1 = collect the scores that fall there
    collect: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass
class ChunkResult:
    """Histograms (dense, per partition bin present) and the collected float32 scores as
    ``(values, counts)`` in no particular order (counts None: each value once), genuine and
    impostor apart."""

    gen_hist: dict[int, np.ndarray] = field(default_factory=dict)
    imp_hist: dict[int, np.ndarray] = field(default_factory=dict)
    gen_vals: dict[int, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)
    imp_vals: dict[int, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Multisets of float32 scores
# --------------------------------------------------------------------------------------------


def compact(values: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge equal values: sorted unique values and the sum of their counts."""
    if values.size == 0:
        return values.astype(np.float32), counts.astype(np.int64)
    order = np.argsort(values, kind="stable")
    v = values[order]
    c = counts[order].astype(np.int64)
    starts = np.flatnonzero(np.concatenate(([True], v[1:] != v[:-1])))
    return v[starts], np.add.reduceat(c, starts)


class MultisetAccumulator:
    """Collects pieces of scores. Raw pieces are kept as they come (cheap); when the total passes
    ``compact_at`` they are merged into (sorted unique values, counts), so that many equal scores
    (ties) take the room of one. Past ``cap`` values (after merging), the content is dropped and
    ``overflowed`` set: the owner then gets those scores another way."""

    def __init__(self, compact_at: int = 1 << 24, cap: int | None = None) -> None:
        self._vals: list[np.ndarray] = []
        self._cnts: list[np.ndarray | None] = []
        self._size = 0
        self._compact_at = compact_at
        self._cap = cap
        self.overflowed = False

    def add(self, values: np.ndarray, counts: np.ndarray | None = None) -> None:
        if values.size == 0 or self.overflowed:
            return
        self._vals.append(values)
        self._cnts.append(counts)
        self._size += values.size
        if self._size > self._compact_at:
            self._merge()
            self._compact_at = max(self._compact_at, 2 * self._size)
        if self._cap is not None and self._size > self._cap:
            self._vals, self._cnts, self._size, self.overflowed = [], [], 0, True

    def __len__(self) -> int:
        return self._size

    def _counts(self) -> np.ndarray:
        return np.concatenate([np.ones(v.size, np.int64) if c is None else c
                               for v, c in zip(self._vals, self._cnts)])

    def _merge(self) -> None:
        v, c = compact(np.concatenate(self._vals), self._counts())
        self._vals, self._cnts, self._size = [v], [c], v.size

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        """(values, counts), not necessarily sorted or unique; counts None: each value once."""
        if not self._vals:
            return np.zeros(0, dtype=np.float32), None
        if len(self._vals) == 1:
            return self._vals[0], self._cnts[0]
        if all(c is None for c in self._cnts):
            return np.concatenate(self._vals), None
        return np.concatenate(self._vals), self._counts()


# --------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------


def _as_tensor(a: np.ndarray):
    import torch

    with warnings.catch_warnings():
        # arrays from the object store are read-only; the kernel never writes into them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def iter_blocks(gallery: Gallery, chunk: ProbeChunk, block_size: int):
    """Yield ``(start, scores)`` per block: ``scores`` is a (rows, G) float32 tensor that the
    next iteration overwrites."""
    import torch

    g_t = _as_tensor(gallery.emb).T
    p = _as_tensor(np.ascontiguousarray(chunk.emb, dtype=np.float32))
    n = p.shape[0]
    rows = min(block_size, n)
    buf = torch.empty(rows, g_t.shape[1], dtype=torch.float32)
    for start in range(0, n, block_size):
        stop = min(n, start + block_size)
        s = buf[: stop - start]
        torch.matmul(p[start:stop], g_t, out=s)
        yield start, s


def _segments(pbin: np.ndarray, start: int, stop: int) -> list[tuple[int, int, int]]:
    """(bin, first row, end row) of each run of equal bins in pbin[start:stop], block-relative."""
    b = pbin[start:stop]
    if b.size == 0:
        return []
    cuts = np.flatnonzero(b[1:] != b[:-1]) + 1
    lo = np.concatenate(([0], cuts))
    hi = np.concatenate((cuts, [b.size]))
    return [(int(b[i]), int(i), int(j)) for i, j in zip(lo, hi)]


def score_chunk(gallery: Gallery, chunk: ProbeChunk, plan: PassPlan) -> ChunkResult:
    """Score every probe of ``chunk`` against the gallery, block by block.

    Memory is three (block_size, G) buffers plus the histograms and the collected scores.
    """
    import torch

    cells = plan.cells
    n = chunk.emb.shape[0]
    if n == 0:
        return ChunkResult()
    rows_cap = min(plan.block_size, n)
    g_size = gallery.emb.shape[0]
    work = torch.empty(rows_cap, g_size, dtype=torch.float32)
    idx = torch.empty(rows_cap, g_size, dtype=torch.int32)
    luts = {b: torch.from_numpy(np.array(t, dtype=np.uint8)) for b, t in plan.collect.items()}

    present = np.unique(chunk.pbin)
    all_hist = {int(b): torch.zeros(cells, dtype=torch.int64) for b in present} if plan.histograms else {}
    # raw until large; merged (ties counted once) past CHUNK_COMPACT_AT values
    gen_vals = {int(b): MultisetAccumulator(CHUNK_COMPACT_AT) for b in present if int(b) in luts}
    imp_vals = {int(b): MultisetAccumulator(CHUNK_COMPACT_AT) for b in present if int(b) in luts}
    gen_cells: list[np.ndarray] = []
    gen_bins: list[np.ndarray] = []

    g_rows, g_cols = gallery.genuine_pairs(chunk.codes)
    g_codes = gallery.codes if luts else None

    for start, s in iter_blocks(gallery, chunk, plan.block_size):
        m = s.shape[0]
        ix = cell_index_torch(s, cells, out=idx[:m], work=work[:m])
        # genuine pairs of this block: gathered by index (few), split off the impostors later
        a, b = np.searchsorted(g_rows, [start, start + m])
        gr = g_rows[a:b] - start
        gs = s[torch.from_numpy(gr), torch.from_numpy(g_cols[a:b])].numpy().copy()
        gc = cell_index_np(gs, cells)
        gb = chunk.pbin[start + gr]
        if plan.histograms:
            gen_cells.append(gc)
            gen_bins.append(gb)
        for pb, r0, r1 in _segments(chunk.pbin, start, start + m):
            flat_idx = ix[r0:r1].reshape(-1)
            if plan.histograms:
                all_hist[pb] += torch.bincount(flat_idx, minlength=cells)
            lut = luts.get(pb)
            if lut is None:
                continue
            hit = torch.index_select(lut, 0, flat_idx).nonzero().squeeze(1)
            if hit.numel():
                pos = hit.numpy()
                vals = s[r0:r1].reshape(-1)[hit].numpy()
                row, col = np.divmod(pos, g_size)
                impostor = g_codes[col] != chunk.codes[start + r0 + row]
                imp_vals[pb].add(vals[impostor])
            sel = gb == pb
            if np.any(sel):
                keep = plan.collect[pb][gc[sel]] != 0
                gen_vals[pb].add(gs[sel][keep])

    out = ChunkResult()
    if plan.histograms:
        gc_all = np.concatenate(gen_cells) if gen_cells else np.zeros(0, np.int64)
        gb_all = np.concatenate(gen_bins) if gen_bins else np.zeros(0, np.int64)
        for pb, h in all_hist.items():
            gh = np.bincount(gc_all[gb_all == pb], minlength=cells).astype(np.int64)
            out.gen_hist[pb] = gh
            out.imp_hist[pb] = h.numpy() - gh
    for pb in gen_vals:
        out.gen_vals[pb] = gen_vals[pb].result()
        out.imp_vals[pb] = imp_vals[pb].result()
    return out
