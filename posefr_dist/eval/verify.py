"""Exact pose-binned verification (DESIGN.md, "Verification protocol (exact)").

Gallery = rows with ``enrollment = true``; probes = all other rows. Every probe is scored against
every gallery row (cosine similarity); a pair is genuine iff the subject_ids are equal. Probes are
binned by |yaw| (left-closed; edges 0, 30, 60, 90 give ``0-30``, ``30-60``, ``60-90``, ``90+``),
probes with a null yaw go to ``unknown-pose``, and ``all`` holds every probe.

In each bin and for each target FAR the threshold is the (k+1)-th largest impostor score,
k = floor(FAR * N) (see :mod:`posefr_dist.eval.exact`). The scores are never all in memory:

1. *Pass 1* scores every block of probes against the gallery and builds fine histograms (C cells
   over [-1, 1], default 2**16) of genuine and impostor scores per bin. The impostor histogram
   says which cell holds the (k+1)-th largest impostor score and how many lie above that cell.
2. *Pass 2* re-scores the blocks (bit-identically: same blocks, same shapes) and collects only the
   scores that fall in those cells; sorting them gives t exactly, and the genuine and impostor
   scores above t are counted exactly. The collected counts are checked against the pass-1
   histogram, so a pass that did not reproduce its scores stops with an error, never with a
   wrong figure.

*Speculation* (large inputs, on by default above ``VerifyOptions.speculate_min_pairs`` pairs): a
pilot on a random ~2 % of the probes, in 16 groups, predicts where each threshold will fall; the
range of the 16 group predictions, padded, is collected during pass 1 already. When every needed
cell was collected (the usual case), pass 2 is skipped; when not, pass 2 collects the missing cells.
The result is the same either way; only the time differs.

Memory: a task holds two (block_size, G) buffers and one output block, the histograms
(bins x C x 2 counters) and the collected scores. Those are the scores of the few cells that
hold a threshold; speculation collects at most ``2 * speculation_budget`` per bin (past that it
gives up on the bin, and pass 2 collects); collected scores are merged (equal values counted
once) past ``scoring.CHUNK_COMPACT_AT`` values, so heavy ties cost the room of one value. None of
it grows with the number of pairs.

The threshold is also set on all impostors of all bins (the ``all`` bin's threshold, the way an
operator sets one threshold for a deployment) and applied to every bin:
``tar_at_global_threshold`` / ``far_at_global_threshold``.

EER, AUC and the ROC points for plots come from the fine histograms: EER on the ROC at cell
edges (linear interpolation between the two edges that bracket FPR = FNR), AUC counting two
scores in the same cell as a tie (``auc_max_error`` bounds the difference to the exact AUC).
The cell width, 2/C (3.05e-5 for C = 2**16), is their resolution in score.

Ray: with ``use_ray=True`` (Ray must already be initialised: library code never starts Ray), the
gallery and each chunk of probe blocks are put in the object store once and each chunk is a Ray
task (one CPU, torch single-threaded); without Ray the same kernel runs in-process on
``VerifyOptions.threads`` worker threads (default: torch's thread count), each with torch
single-threaded (one worker runs in the calling thread, with its torch settings). Training's
validation uses :func:`verify_arrays` (in-process).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from posefr_dist.eval.embeddings import EmbeddingSet, from_arrays, load_embeddings
from posefr_dist.eval.exact import (FarPoint, auc_from_hist, below_resolution_point, check_fars,
                                    eer_from_hist, far_key, far_rank, roc_points)
from posefr_dist.eval.scoring import (DEFAULT_CELLS, ChunkResult, Gallery, MultisetAccumulator,
                                      PassPlan, ProbeChunk, cell_index_np, check_cells, compact,
                                      iter_blocks, score_chunk)

DEFAULT_FARS = (0.1, 0.01, 0.001, 0.0001)
DEFAULT_YAW_EDGES = (0.0, 30.0, 60.0, 90.0)
UNKNOWN_POSE = "unknown-pose"
ALL = "all"
#: pairs per block when block_size is not given (3 float32/int32 buffers: 48 MiB)
BLOCK_PAIRS = 1 << 22
REPORT_VERSION = 1


@dataclass
class VerifyOptions:
    """Tuning of the streaming computation; none of it changes a reported figure except
    ``cells`` (the resolution of EER, AUC and the plotted ROC)."""

    #: histogram cells over [-1, 1] (power of two)
    cells: int = DEFAULT_CELLS
    #: probes per matmul block; None = about ``BLOCK_PAIRS`` pairs per block
    block_size: int | None = None
    #: blocks per task (Ray task or in-process work item); None = about 8 per CPU, 1..32 blocks
    blocks_per_task: int | None = None
    #: collect predicted threshold cells during pass 1 (None = when pairs >= speculate_min_pairs)
    speculate: bool | None = None
    speculate_min_pairs: int = 1 << 26
    #: share of probes scored by the pilot (at least ``pilot_groups`` probes)
    pilot_fraction: float = 0.02
    pilot_groups: int = 16
    #: cells added on each side of a predicted range
    pilot_pad_cells: int = 2
    #: largest number of pairs (estimated) that speculation may collect, over all ranges
    speculation_budget: int = 1 << 24
    #: Ray tasks in flight at once; None = 2 per CPU of the cluster
    max_in_flight: int | None = None
    #: in-process worker threads (each runs torch single-threaded); None = torch.get_num_threads()
    threads: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.cells = check_cells(self.cells)
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {self.block_size}")
        if self.blocks_per_task is not None and self.blocks_per_task < 1:
            raise ValueError(f"blocks_per_task: must be >= 1, got {self.blocks_per_task}")
        if not (0.0 < self.pilot_fraction < 1.0):
            raise ValueError(f"pilot_fraction: must be in (0, 1), got {self.pilot_fraction}")
        if self.pilot_groups < 2:
            raise ValueError(f"pilot_groups: must be >= 2, got {self.pilot_groups}")
        if self.pilot_pad_cells < 0 or self.speculation_budget < 0:
            raise ValueError("pilot_pad_cells and speculation_budget must be >= 0")
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(f"max_in_flight: must be >= 1, got {self.max_in_flight}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: must be >= 1, got {self.threads}")


class VerifyError(RuntimeError):
    """The computation could not finish exactly (e.g. scores not reproducible between passes)."""


# --------------------------------------------------------------------------------------------
# Bins
# --------------------------------------------------------------------------------------------


def check_yaw_edges(edges: Iterable[float]) -> tuple[float, ...]:
    e = tuple(float(x) for x in edges)
    if not e or e[0] != 0.0 or any(b <= a for a, b in zip(e, e[1:])) or any(math.isinf(x) for x in e):
        raise ValueError(f"yaw_edges: must start at 0 and increase strictly, got {list(e)}")
    return e


def _fmt_edge(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def yaw_bin_names(edges: Sequence[float]) -> list[str]:
    """``0-30``, ``30-60``, ``60-90``, ``90+`` for edges 0, 30, 60, 90."""
    names = [f"{_fmt_edge(a)}-{_fmt_edge(b)}" for a, b in zip(edges, edges[1:])]
    return names + [f"{_fmt_edge(edges[-1])}+"]


def yaw_bin_index(yaw: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bin of each |yaw| (left-closed), len(edges) for unknown (NaN) yaw."""
    a = np.abs(np.asarray(yaw, dtype=np.float64))
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), a, side="right") - 1
    idx[np.isnan(a)] = len(edges)
    return idx.astype(np.int64)


# --------------------------------------------------------------------------------------------
# Preparation: gallery, bin-sorted probes, fixed blocks
# --------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    gallery: Gallery
    probe_emb: np.ndarray
    probe_codes: np.ndarray
    probe_pbin: np.ndarray
    #: partition bins: the yaw bins, then unknown-pose when present
    pbin_names: list[str]
    #: report bins: name -> partition bins
    bins: dict[str, list[int]]
    n_probes: np.ndarray
    n_genuine: np.ndarray
    n_impostor: np.ndarray
    block_size: int
    gallery_subjects: int
    source: str

    def chunks(self, blocks_per_task: int) -> list[tuple[int, int]]:
        step = self.block_size * blocks_per_task
        n = self.probe_emb.shape[0]
        return [(a, min(n, a + step)) for a in range(0, n, step)]

    def chunk(self, a: int, b: int) -> ProbeChunk:
        return ProbeChunk(self.probe_emb[a:b], self.probe_codes[a:b], self.probe_pbin[a:b])

    def counts(self, name: str) -> tuple[int, int, int]:
        p = self.bins[name]
        return int(self.n_probes[p].sum()), int(self.n_genuine[p].sum()), int(self.n_impostor[p].sum())


def _prepare(es: EmbeddingSet, yaw_edges: Sequence[float], opts: VerifyOptions) -> _Prepared:
    gal = es.enrollment
    gallery = Gallery.build(es.emb[gal], es.codes[gal])
    g_size = int(gal.sum())
    pidx = np.flatnonzero(~gal)
    pbin = yaw_bin_index(es.yaw[pidx], yaw_edges)
    order = np.argsort(pbin, kind="stable")
    pidx, pbin = pidx[order], pbin[order]
    names = yaw_bin_names(yaw_edges)
    n_yaw = len(names)
    has_unknown = bool(np.any(pbin == n_yaw))
    pbin_names = names + ([UNKNOWN_POSE] if has_unknown else [])
    bins = {n: [i] for i, n in enumerate(names)}
    if has_unknown:
        bins[UNKNOWN_POSE] = [n_yaw]
    bins[ALL] = list(range(len(pbin_names)))
    codes = es.codes[pidx]
    gen_per_probe = gallery.genuine_counts(codes)
    n_p = np.bincount(pbin, minlength=len(pbin_names)).astype(np.int64)
    n_g = np.bincount(pbin, weights=gen_per_probe, minlength=len(pbin_names)).astype(np.int64)
    n_i = n_p * g_size - n_g
    block = opts.block_size or max(1, BLOCK_PAIRS // max(1, g_size))
    return _Prepared(
        gallery=gallery, probe_emb=np.ascontiguousarray(es.emb[pidx]), probe_codes=codes,
        probe_pbin=pbin, pbin_names=pbin_names, bins=bins, n_probes=n_p, n_genuine=n_g,
        n_impostor=n_i, block_size=int(block), gallery_subjects=int(np.unique(es.codes[gal]).size),
        source=es.source,
    )


# --------------------------------------------------------------------------------------------
# Executors: in-process, or Ray tasks
# --------------------------------------------------------------------------------------------


class _Accumulated:
    """Merged results of one pass. With ``cap``, a bin whose collected scores pass ``cap``
    values drops them (``overflowed``): speculation gave up there and pass 2 collects."""

    def __init__(self, n_pbins: int, cells: int, cap: int | None = None) -> None:
        self.gen_hist = np.zeros((n_pbins, cells), dtype=np.int64)
        self.imp_hist = np.zeros((n_pbins, cells), dtype=np.int64)
        self._gen = [MultisetAccumulator(cap=cap) for _ in range(n_pbins)]
        self._imp = [MultisetAccumulator(cap=cap) for _ in range(n_pbins)]

    def add(self, r: ChunkResult) -> None:
        for b, h in r.gen_hist.items():
            self.gen_hist[b] += h
        for b, h in r.imp_hist.items():
            self.imp_hist[b] += h
        for b, (v, c) in r.gen_vals.items():
            self._gen[b].add(v, c)
        for b, (v, c) in r.imp_vals.items():
            self._imp[b].add(v, c)

    def overflowed(self) -> set[int]:
        return {b for b, (g, i) in enumerate(zip(self._gen, self._imp)) if g.overflowed or i.overflowed}

    def values(self) -> tuple[list, list]:
        return [m.result() for m in self._gen], [m.result() for m in self._imp]


class _InProcess:
    """Chunks in this process: on ``workers`` threads, each running torch single-threaded (the
    calling thread's torch settings are left alone). Independent single-threaded workers keep
    their speed when other processes share the CPUs, where one multi-threaded op per step
    waits for its slowest thread."""

    def __init__(self, prep: _Prepared, workers: int | None) -> None:
        import torch

        self.prep = prep
        self.parallelism = max(1, workers or torch.get_num_threads())

    def run(self, chunks: list[ProbeChunk], plan: PassPlan, sink: Callable[[ChunkResult], None]) -> None:
        if self.parallelism == 1 or len(chunks) == 1:
            for c in chunks:
                sink(score_chunk(self.prep.gallery, c, plan))
            return
        import concurrent.futures as cf

        import torch

        with cf.ThreadPoolExecutor(self.parallelism, initializer=torch.set_num_threads,
                                   initargs=(1,)) as pool:
            todo = list(chunks)
            pending: set = set()
            while todo or pending:
                while todo and len(pending) < 2 * self.parallelism:
                    pending.add(pool.submit(score_chunk, self.prep.gallery, todo.pop(0), plan))
                done, pending = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
                for f in done:
                    sink(f.result())


class _RayTasks:
    """Chunks as Ray tasks; the gallery and every probe chunk go to the object store once."""

    def __init__(self, prep: _Prepared, max_in_flight: int | None) -> None:
        import ray

        self.ray = ray
        self.gallery_ref = ray.put(prep.gallery)
        self.remote = ray.remote(num_cpus=1)(score_chunk)
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.parallelism = max(1, cpus)
        self.max_in_flight = max_in_flight or max(2, 2 * cpus)
        self._refs: dict[int, Any] = {}

    def ref(self, chunk: ProbeChunk):
        key = id(chunk)
        if key not in self._refs:
            self._refs[key] = (self.ray.put(chunk), chunk)  # keep chunk alive: id stays unique
        return self._refs[key][0]

    def run(self, chunks: list[ProbeChunk], plan: PassPlan, sink: Callable[[ChunkResult], None]) -> None:
        ray = self.ray
        plan_ref = ray.put(plan)
        pending: list = []
        todo = list(chunks)
        while todo or pending:
            while todo and len(pending) < self.max_in_flight:
                pending.append(self.remote.remote(self.gallery_ref, self.ref(todo.pop(0)), plan_ref))
            done, pending = ray.wait(pending, num_returns=1)
            sink(ray.get(done[0]))


# --------------------------------------------------------------------------------------------
# Threshold search on histograms
# --------------------------------------------------------------------------------------------


def _locate(hist: np.ndarray, rank: int) -> tuple[int, int]:
    """Cell holding the ``rank``-th largest score (1-based) and the count in cells above it."""
    tail = np.cumsum(hist[::-1])  # tail[j] = count in the top j+1 cells
    j = int(np.searchsorted(tail, rank, side="left"))
    cell = hist.size - 1 - j
    above = int(tail[j - 1]) if j > 0 else 0
    return cell, above


def _pilot_windows(prep: _Prepared, fars: Sequence[float], opts: VerifyOptions, executor,
                   cells: int) -> tuple[dict[int, np.ndarray], int]:
    """Predict the threshold cells from a pilot; returns (uint8 tables per partition bin,
    number of pilot probes)."""
    n = prep.probe_emb.shape[0]
    rng = np.random.default_rng(opts.seed)
    n_pilot = max(opts.pilot_groups, int(math.ceil(opts.pilot_fraction * n)))
    pick = np.sort(rng.choice(n, size=min(n, n_pilot), replace=False))
    group = rng.integers(0, opts.pilot_groups, size=pick.size)
    # one run of full-size blocks: probes ordered by (group, bin), the pair scored under a
    # pseudo-bin group * n_pb + bin so that each group's histograms stay apart
    n_pb = len(prep.pbin_names)
    pseudo = group * n_pb + prep.probe_pbin[pick]
    order = np.argsort(pseudo, kind="stable")
    pick, pseudo = pick[order], pseudo[order]
    step = prep.block_size * max(1, -(-pick.size // prep.block_size) // (2 * executor.parallelism))
    chunks = [ProbeChunk(prep.probe_emb[pick[a:a + step]], prep.probe_codes[pick[a:a + step]], pseudo[a:a + step])
              for a in range(0, pick.size, step)]
    imp = np.zeros((opts.pilot_groups * n_pb, cells), dtype=np.int64)

    def add(r: ChunkResult) -> None:
        for b, h in r.imp_hist.items():
            imp[b] += h

    executor.run(chunks, PassPlan(cells, prep.block_size, histograms=True), add)
    imp = imp.reshape(opts.pilot_groups, n_pb, cells)

    ranges: list[tuple[list[int], int, int, float]] = []
    for name, pbs in prep.bins.items():
        n_full = int(prep.n_impostor[pbs].sum())
        h_groups = imp[:, pbs].sum(axis=1)
        n_groups = h_groups.sum(axis=1)
        h_all = h_groups.sum(axis=0)
        n_all = int(n_groups.sum())
        if n_full == 0 or n_all == 0:
            continue
        tails = np.cumsum(h_groups[:, ::-1], axis=1)  # per group: count in the top j+1 cells
        for far in fars:
            k = far_rank(far, n_full)
            if k == 0:
                continue
            q = (k + 1) / n_full
            found = [cells - 1 - int(np.searchsorted(tails[g], max(1, math.ceil(q * n_groups[g]))))
                     for g in range(opts.pilot_groups) if n_groups[g] > 0]
            lo = max(0, min(found) - opts.pilot_pad_cells)
            hi = min(cells - 1, max(found) + opts.pilot_pad_cells)
            est_pairs = h_all[lo:hi + 1].sum() / n_all * n_full
            ranges.append((pbs, lo, hi, float(est_pairs)))

    # the cheapest ranges first, as long as the estimated total stays within the budget
    luts: dict[int, np.ndarray] = {}
    spent = 0.0
    for pbs, lo, hi, est in sorted(ranges, key=lambda r: r[3]):
        if spent + est > opts.speculation_budget:
            break  # too wide to collect on speculation; pass 2 collects it if it is needed
        spent += est
        for b in pbs:
            luts.setdefault(b, np.zeros(cells, dtype=np.uint8))[lo:hi + 1] = 1
    return luts, int(pick.size)


# --------------------------------------------------------------------------------------------
# The computation
# --------------------------------------------------------------------------------------------


@dataclass
class BinResult:
    """Everything computed for one report bin."""

    probes: int
    genuine: int
    impostor: int
    points: list[FarPoint]
    global_points: list[FarPoint]
    eer: float | None
    auc: float | None
    auc_max_error: float | None
    roc_far: list[float] = field(default_factory=list)
    roc_tar: list[float] = field(default_factory=list)


@dataclass
class VerifyResult:
    bins: dict[str, BinResult]
    fars: tuple[float, ...]
    yaw_edges: tuple[float, ...]
    cells: int
    block_size: int
    passes: int
    #: (bin, cell) pairs that pass 2 had to collect (0 when speculation covered every threshold)
    pass2_cells: int
    pilot_probes: int
    gallery_rows: int
    gallery_subjects: int
    probe_rows: int
    dim: int
    source: str


class _CellValues:
    """Collected scores per partition bin, looked up by cell (sorted unique values, counts)."""

    def __init__(self, gen: list, imp: list, cells: int) -> None:
        self.cells = cells
        self._sets = {"gen": list(gen), "imp": list(imp)}
        self._cell_of = {k: [cell_index_np(v, cells) for v, _ in s] for k, s in self._sets.items()}

    def get(self, kind: str, pbins: Sequence[int], cell: int) -> tuple[np.ndarray, np.ndarray]:
        vs, cs = [], []
        for b in pbins:
            v, c = self._sets[kind][b]
            m = self._cell_of[kind][b] == cell
            vs.append(v[m])
            cs.append(np.ones(int(m.sum()), np.int64) if c is None else c[m])
        return compact(np.concatenate(vs), np.concatenate(cs))

    def replace(self, kind: str, b: int, cell: int, values: tuple[np.ndarray, np.ndarray]) -> None:
        v, c = self._sets[kind][b]
        keep = self._cell_of[kind][b] != cell
        c = np.ones(v.size, np.int64) if c is None else c
        nv, nc = np.concatenate([v[keep], values[0]]), np.concatenate([c[keep], values[1]])
        self._sets[kind][b] = (nv, nc)
        self._cell_of[kind][b] = cell_index_np(nv, self.cells)


def _exact_point(far: float, k: int, n_gen: int, n_imp: int, cell: int, imp_above: int,
                 gen_above: int, imp_cell: tuple, gen_cell: tuple) -> FarPoint:
    """Finish the threshold search inside one cell."""
    v, c = imp_cell  # ascending values
    need = k + 1 - imp_above  # rank of t among the cell's impostors, from the top
    from_top = np.cumsum(c[::-1])
    j = int(np.searchsorted(from_top, need, side="left"))
    if j >= v.size:
        raise VerifyError(f"cell {cell} holds {int(from_top[-1]) if v.size else 0} impostor scores, "
                          f"fewer than the {need} the histogram promised")
    t = v[v.size - 1 - j]
    imp_gt = imp_above + int(c[v > t].sum())
    gv, gc = gen_cell
    gen_gt = gen_above + int(gc[gv > t].sum())
    return FarPoint(far=far, k=k, n_genuine=n_gen, n_impostor=n_imp, threshold=float(t),
                    genuine_above=gen_gt, impostor_above=imp_gt, below_resolution=False)


def _count_above(hist: np.ndarray, cell: int) -> int:
    return int(hist[cell + 1:].sum())


def _operating_points(prep: _Prepared, fars: tuple[float, ...], gen_hist: np.ndarray,
                      imp_hist: np.ndarray, wanted: dict, values: _CellValues) -> dict[str, BinResult]:
    """Exact points per bin and FAR, the global-threshold points, and the histogram figures."""
    results: dict[str, BinResult] = {}
    all_points: dict[float, FarPoint] = {}
    for name, pbs in prep.bins.items():
        gh = gen_hist[pbs].sum(axis=0)
        ih = imp_hist[pbs].sum(axis=0)
        n_gen, n_imp = int(gh.sum()), int(ih.sum())
        points = []
        for far in fars:
            if (name, far) not in wanted:
                points.append(below_resolution_point(far, n_gen, n_imp))
                continue
            k, cell, above = wanted[(name, far)]
            points.append(_exact_point(far, k, n_gen, n_imp, cell, above, _count_above(gh, cell),
                                       values.get("imp", pbs, cell), values.get("gen", pbs, cell)))
        if name == ALL:
            all_points = {p.far: p for p in points}
        auc, auc_err = auc_from_hist(gh, ih)
        rf, rt = roc_points(gh, ih)
        n_p, _, _ = prep.counts(name)
        results[name] = BinResult(probes=n_p, genuine=n_gen, impostor=n_imp, points=points,
                                  global_points=[], eer=eer_from_hist(gh, ih), auc=auc,
                                  auc_max_error=auc_err, roc_far=rf, roc_tar=rt)

    # one threshold per FAR, set on all impostors, applied to every bin
    for name, pbs in prep.bins.items():
        gh = gen_hist[pbs].sum(axis=0)
        ih = imp_hist[pbs].sum(axis=0)
        n_gen, n_imp = int(gh.sum()), int(ih.sum())
        gp = []
        for far in fars:
            ref = all_points[far]
            if ref.threshold is None:
                gp.append(FarPoint(far, ref.k, n_gen, n_imp, None, None, None, True))
                continue
            cell = wanted[(ALL, far)][1]
            t = np.float32(ref.threshold)
            gv, gc = values.get("gen", pbs, cell)
            iv, ic = values.get("imp", pbs, cell)
            gp.append(FarPoint(
                far=far, k=ref.k, n_genuine=n_gen, n_impostor=n_imp, threshold=ref.threshold,
                genuine_above=_count_above(gh, cell) + int(gc[gv > t].sum()),
                impostor_above=_count_above(ih, cell) + int(ic[iv > t].sum()),
                below_resolution=False))
        results[name].global_points = gp

    return results


def _run(prep: _Prepared, fars: tuple[float, ...], opts: VerifyOptions, use_ray: bool, dim: int,
         yaw_edges: tuple[float, ...]) -> VerifyResult:
    cells = opts.cells
    n_pb = len(prep.pbin_names)
    executor = _RayTasks(prep, opts.max_in_flight) if use_ray else _InProcess(prep, opts.threads)
    n_probes = prep.probe_emb.shape[0]
    n_blocks = -(-n_probes // prep.block_size)
    bpt = opts.blocks_per_task
    if bpt is None:
        bpt = min(32, max(1, n_blocks // (8 * executor.parallelism)))
    chunks = [prep.chunk(a, b) for a, b in prep.chunks(bpt)]
    total_pairs = n_probes * prep.gallery.emb.shape[0]

    speculate = opts.speculate
    if speculate is None:
        speculate = total_pairs >= opts.speculate_min_pairs
    luts: dict[int, np.ndarray] = {}
    pilot_probes = 0
    if speculate:
        luts, pilot_probes = _pilot_windows(prep, fars, opts, executor, cells)

    # pass 1: histograms (+ speculative collection, given up per bin past a hard cap)
    acc = _Accumulated(n_pb, cells, cap=2 * opts.speculation_budget)
    executor.run(chunks, PassPlan(cells, prep.block_size, histograms=True, collect=luts), acc.add)
    gen_hist, imp_hist = acc.gen_hist, acc.imp_hist
    gen_vals, imp_vals = acc.values()
    for b in acc.overflowed():
        luts.pop(b, None)
    del acc

    # the cells that hold each threshold
    wanted: dict[tuple[str, float], tuple[int, int, int]] = {}  # -> (k, cell, imp_above)
    needed: dict[int, set[int]] = {b: set() for b in range(n_pb)}
    for name, pbs in prep.bins.items():
        h = imp_hist[pbs].sum(axis=0)
        n_imp = int(h.sum())
        for far in fars:
            k = far_rank(far, n_imp)
            if n_imp == 0 or k == 0:
                continue
            cell, above = _locate(h, k + 1)
            wanted[(name, far)] = (k, cell, above)
            for b in pbs:
                if gen_hist[b, cell] or imp_hist[b, cell]:
                    needed[b].add(cell)

    # pass 2 for what speculation did not collect
    missing = {b: sorted(c for c in cs if b not in luts or not luts[b][c]) for b, cs in needed.items()}
    missing = {b: cs for b, cs in missing.items() if cs}
    passes = 1
    values = _CellValues(gen_vals, imp_vals, cells)
    if missing:
        passes = 2
        tables = {}
        for b, cs in missing.items():
            t = np.zeros(cells, dtype=np.uint8)
            t[cs] = 1
            tables[b] = t
        acc2 = _Accumulated(n_pb, cells)
        executor.run(chunks, PassPlan(cells, prep.block_size, histograms=False, collect=tables), acc2.add)
        gen2, imp2 = acc2.values()
        del acc2
        v2 = _CellValues(gen2, imp2, cells)
        for b, cs in missing.items():
            for c in cs:
                for kind, hist in (("gen", gen_hist), ("imp", imp_hist)):
                    got = v2.get(kind, [b], c)
                    if int(got[1].sum()) != int(hist[b, c]):
                        raise VerifyError(
                            f"pass 2 found {int(got[1].sum())} {kind} scores in cell {c} of bin "
                            f"{prep.pbin_names[b]!r}, pass 1 counted {int(hist[b, c])}: the scores "
                            "were not reproduced bit for bit between passes")
                    values.replace(kind, b, c, got)

    for b, cs in needed.items():  # every cell the search reads holds all of its scores
        for c in cs:
            for kind, hist in (("gen", gen_hist), ("imp", imp_hist)):
                if int(values.get(kind, [b], c)[1].sum()) != int(hist[b, c]):
                    raise VerifyError(f"internal: cell {c} of bin {prep.pbin_names[b]!r} is incomplete")
    results = _operating_points(prep, fars, gen_hist, imp_hist, wanted, values)

    order = [n for n in prep.bins if n != ALL] + [ALL]
    return VerifyResult(
        bins={n: results[n] for n in order}, fars=fars, yaw_edges=yaw_edges, cells=cells,
        block_size=prep.block_size, passes=passes, pilot_probes=pilot_probes,
        pass2_cells=sum(len(cs) for cs in missing.values()),
        gallery_rows=int(prep.gallery.emb.shape[0]), gallery_subjects=prep.gallery_subjects,
        probe_rows=n_probes, dim=dim, source=prep.source)


def _need_ray(use_ray: bool) -> None:
    if not use_ray:
        return
    import ray

    if not ray.is_initialized():
        raise RuntimeError("use_ray=True but Ray is not initialised: call ray.init() (or "
                           "posefr_dist.raysupport.ensure_ray()) first, or pass use_ray=False")


def verify_embeddings(es: EmbeddingSet, fars: Iterable[float] = DEFAULT_FARS,
                      yaw_edges: Iterable[float] = DEFAULT_YAW_EDGES,
                      options: VerifyOptions | None = None, use_ray: bool = False) -> VerifyResult:
    """Exact pose-binned verification of validated embeddings (see the module docstring)."""
    fars_t = check_fars(fars)
    edges = check_yaw_edges(yaw_edges)
    opts = options or VerifyOptions()
    _need_ray(use_ray)
    prep = _prepare(es, edges, opts)
    return _run(prep, fars_t, opts, use_ray, es.dim, edges)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


def verify_source(source, fars: Iterable[float] = DEFAULT_FARS, yaw_edges: Iterable[float] = DEFAULT_YAW_EDGES,
           options: VerifyOptions | None = None, use_ray: bool = False) -> dict:
    """Report dict (see :func:`build_report`) for a ``pyarrow.Table``, a Parquet file or a
    folder of them (path, ``file://`` or ``s3://``)."""
    _need_ray(use_ray)
    es = load_embeddings(source)
    return build_report(verify_embeddings(es, fars, yaw_edges, options, use_ray))


def verify_arrays(emb, subject_ids, yaw, enrollment, fars: Iterable[float] = DEFAULT_FARS,
                  yaw_edges: Iterable[float] = DEFAULT_YAW_EDGES,
                  options: VerifyOptions | None = None) -> dict:
    """In-process verification of arrays (training's validation): same code path, no Ray.

    Args:
        emb: (n, D) embeddings (need not be normalised).
        subject_ids: n identities (strings or integers).
        yaw: n yaw angles in degrees; NaN or None = unknown pose.
        enrollment: n bools, True = gallery.

    Returns:
        The report dict of :func:`build_report`.
    """
    es = from_arrays(emb, subject_ids, yaw, enrollment)
    return build_report(verify_embeddings(es, fars, yaw_edges, options, use_ray=False))


def pair_scores(es: EmbeddingSet, yaw_edges: Iterable[float] = DEFAULT_YAW_EDGES,
                block_size: int | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All genuine and impostor scores per report bin, in memory (small inputs, tests and the
    in-memory reference). Scored with the same blocks as the streaming path, so the float32
    scores are identical."""
    edges = check_yaw_edges(yaw_edges)
    prep = _prepare(es, edges, VerifyOptions(block_size=block_size))
    n_pb = len(prep.pbin_names)
    gen: list[list[np.ndarray]] = [[] for _ in range(n_pb)]
    imp: list[list[np.ndarray]] = [[] for _ in range(n_pb)]
    chunk = prep.chunk(0, prep.probe_emb.shape[0])
    g_codes = np.empty(prep.gallery.emb.shape[0], dtype=np.int64)
    g_codes[prep.gallery.order] = prep.gallery.codes_sorted
    for start, s in iter_blocks(prep.gallery, chunk, prep.block_size):
        a = s.numpy()
        same = chunk.codes[start:start + a.shape[0], None] == g_codes[None, :]
        for r in range(a.shape[0]):
            b = int(chunk.pbin[start + r])
            gen[b].append(a[r][same[r]].copy())
            imp[b].append(a[r][~same[r]].copy())
    flat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, np.float32)  # noqa: E731
    out = {}
    for name, pbs in prep.bins.items():
        out[name] = (flat([x for b in pbs for x in gen[b]]), flat([x for b in pbs for x in imp[b]]))
    return out


def _num(x: float | None) -> float | None:
    return None if x is None else float(x)


def build_report(res: VerifyResult) -> dict:
    """The ``report.json`` structure: ``{"protocol": {...}, "bins": {name: B}}``.

    Each B: ``probes``, ``genuine``, ``impostor`` (pair counts); ``tar_at_far``,
    ``threshold_at_far``, ``achieved_far`` (keyed by ``repr(float(far))``; None where the FAR is
    below resolution, listed in ``far_below_resolution``, or TAR None without genuine pairs);
    ``tar_at_global_threshold`` and ``far_at_global_threshold`` (the ``all`` bin's threshold
    applied here); ``eer``, ``auc``, ``auc_max_error``; ``roc`` (thinned, for plots).
    """
    keys = [far_key(f) for f in res.fars]
    bins = {}
    for name, b in res.bins.items():
        bins[name] = {
            "probes": b.probes,
            "genuine": b.genuine,
            "impostor": b.impostor,
            "tar_at_far": {k: _num(p.tar) for k, p in zip(keys, b.points)},
            "threshold_at_far": {k: _num(p.threshold) for k, p in zip(keys, b.points)},
            "achieved_far": {k: _num(p.achieved_far) for k, p in zip(keys, b.points)},
            "far_below_resolution": [k for k, p in zip(keys, b.points) if p.below_resolution],
            "tar_at_global_threshold": {k: _num(p.tar) for k, p in zip(keys, b.global_points)},
            "far_at_global_threshold": {k: _num(p.achieved_far) for k, p in zip(keys, b.global_points)},
            "eer": _num(b.eer),
            "auc": _num(b.auc),
            "auc_max_error": _num(b.auc_max_error),
            "roc": {"far": b.roc_far, "tar": b.roc_tar},
        }
    protocol = {
        "name": "posefr exact pose-binned verification",
        "version": REPORT_VERSION,
        "source": res.source,
        "gallery": "rows with enrollment = true",
        "probes": "rows with enrollment = false; every probe against every gallery row",
        "score": "cosine similarity (float32) of L2-normalised embeddings",
        "genuine": "probe and gallery row have the same subject_id",
        "yaw_bins": "left-closed on |yaw_deg| of the probe; null yaw -> unknown-pose; all = every probe",
        "yaw_edges": list(res.yaw_edges),
        "bins": list(res.bins),
        "fars": list(res.fars),
        "threshold_rule": ("t = (k+1)-th largest impostor score of the bin, k = floor(FAR * N) with FAR "
                           "read as its decimal repr; TAR = share of genuine > t; achieved FAR = share "
                           "of impostors > t (<= FAR); equals the largest TPR with FPR <= FAR"),
        "far_below_resolution": ("FAR < 1/N (k = 0): tar, threshold and achieved_far are null and the "
                                 "FAR key is listed in the bin's far_below_resolution"),
        "global_threshold": ("per FAR, bins.all.threshold_at_far (set on the impostors of all bins); "
                             "tar_at_global_threshold / far_at_global_threshold apply it to each bin"),
        "histogram_cells": res.cells,
        "score_resolution": 2.0 / res.cells,
        "eer_auc_roc": ("from the fine histograms: EER on the ROC at cell edges, linearly "
                        "interpolated; AUC counts two scores in one cell as a tie (exact AUC within "
                        "auc_max_error); roc = thinned cell-edge points for plots"),
        "gallery_rows": res.gallery_rows,
        "gallery_subjects": res.gallery_subjects,
        "probe_rows": res.probe_rows,
        "embedding_dim": res.dim,
        "passes": res.passes,
        "pass2_cells": res.pass2_cells,
        "pilot_probes": res.pilot_probes,
        "block_size": res.block_size,
    }
    return {"protocol": protocol, "bins": bins}


def run_verify(emb_uri: str, out_dir: str, fars: Iterable[float] = DEFAULT_FARS,
               yaw_edges: Iterable[float] = DEFAULT_YAW_EDGES, block_size: int | None = None,
               use_ray: bool = True, options: VerifyOptions | None = None) -> dict:
    """Verify the embeddings at ``emb_uri`` and write the report files into ``out_dir``.

    With ``use_ray=True`` Ray must already be initialised (``posefr`` does it); the report
    (``report.json``, ``report.md``, ``roc.png``, ``tar_vs_yaw.png``) is written atomically.
    Returns the report dict.
    """
    from posefr_dist.eval.report import write_report

    opts = options or VerifyOptions()
    if block_size is not None:
        opts = dataclasses.replace(opts, block_size=block_size)
    report = verify_source(os.fspath(emb_uri), fars, yaw_edges, opts, use_ray)
    write_report(report, out_dir)
    return report
