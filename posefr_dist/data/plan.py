"""The epoch plan: which rows each rank trains on in an epoch, and in which order.

The plan is a pure function of the split's layout (its files and their Parquet row groups), the
config (chunk and window sizes) and ``(seed, epoch, world)``: two drivers, two decode-parallelism
settings, or a run and its resumed continuation all see the same rows in the same order.

* The split is cut into **chunks**: runs of at most ``chunk_rows`` consecutive rows of one row
  group of one file (the shard writer uses 64-row row groups, so a chunk is read with no waste).
* Each epoch the chunks are permuted (seeded by ``(seed, epoch)``) into one stream of rows, which
  is **dealt** to the ranks in equal contiguous shares (rank r gets rows ``[r R, (r + 1) R)`` of
  the stream, R = rows // world; at most world - 1 rows are left out).
* A rank's share is cut into **windows** of ``window_chunks * chunk_rows`` rows; the rows of a
  window are shuffled (seeded by ``(seed, epoch, rank, window)``). A window is also the unit a
  streaming reader decodes (the row ranges it covers), so a resumed run starts decoding at the
  window of its position and reads nothing before it.

A row that turns out bad under ``data.on_bad_row=skip`` is replaced by the next good row of its
window (:func:`resolve_window`), so a rank's sequence keeps its length and positions stay valid
for resuming; both the cached and the streaming reader apply that same rule.

Global row ids (``gid``) number the rows of the split in file order: file ``f`` row ``r`` is
``offsets[f] + r``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

#: seeds of the two shuffles, kept apart from any other use of (seed, epoch)
_CHUNK_SALT, _WINDOW_SALT = 0x0C4A, 0x3A1D


@dataclass(frozen=True)
class SplitLayout:
    """The files of one split and the row-group sizes of each (read from the Parquet footers)."""

    files: tuple[str, ...]
    row_groups: tuple[tuple[int, ...], ...]

    @property
    def file_rows(self) -> np.ndarray:
        return np.array([sum(g) for g in self.row_groups], np.int64)

    @property
    def offsets(self) -> np.ndarray:
        """Global id of each file's first row."""
        return np.concatenate([[0], np.cumsum(self.file_rows)[:-1]]).astype(np.int64) if self.files \
            else np.zeros(0, np.int64)

    @property
    def total_rows(self) -> int:
        return int(self.file_rows.sum())

    def chunks(self, chunk_rows: int) -> np.ndarray:
        """``[K, 3]`` int64 rows ``(file, start, stop)`` in file order; no chunk crosses a row group."""
        out = []
        for f, groups in enumerate(self.row_groups):
            start = 0
            for g in groups:
                for a in range(start, start + g, chunk_rows):
                    out.append((f, a, min(a + chunk_rows, start + g)))
                start += g
        return np.array(out, np.int64).reshape(-1, 3)


@dataclass(frozen=True)
class Window:
    """One window of a rank's epoch: the row ranges it reads (``[m, 3]`` of file, start, stop, in
    order) and the order of its rows (positions into those rows laid out range after range)."""

    index: int
    pieces: np.ndarray
    order: np.ndarray
    #: position of this window's first row in the rank's sequence
    start: int

    @property
    def rows(self) -> int:
        return int(self.order.size)


class EpochPlan:
    """The plan of one epoch for every rank (see the module docstring)."""

    def __init__(self, layout: SplitLayout, *, seed: int, epoch: int, world: int, chunk_rows: int = 64,
                 window_chunks: int = 8, shuffle_chunks: bool = True, shuffle_rows: bool = True) -> None:
        if world < 1:
            raise ValueError(f"world size must be >= 1, got {world}")
        self.layout, self.seed, self.epoch, self.world = layout, int(seed), int(epoch), int(world)
        self.shuffle_rows = bool(shuffle_rows)
        self.window_rows = max(1, int(window_chunks)) * int(chunk_rows)
        self.chunks = layout.chunks(chunk_rows)
        k = len(self.chunks)
        perm = np.random.default_rng([self.seed, self.epoch, _CHUNK_SALT]).permutation(k) if shuffle_chunks \
            else np.arange(k)
        #: the epoch's chunks in order, and where each starts in the epoch's row stream
        self.stream = self.chunks[perm]
        lens = self.stream[:, 2] - self.stream[:, 1]
        self._ends = np.cumsum(lens)
        self._starts = self._ends - lens
        total = int(self._ends[-1]) if k else 0
        #: rows every rank trains on this epoch: rank r takes stream rows [r R, (r + 1) R)
        self.rows_per_rank = total // self.world
        self._windows: dict[int, list[Window]] = {}

    def pieces(self, a: int, b: int) -> np.ndarray:
        """Row ranges ``(file, start, stop)`` of the epoch's stream rows ``[a, b)``."""
        if b <= a:
            return np.zeros((0, 3), np.int64)
        i0 = int(np.searchsorted(self._ends, a, side="right"))
        i1 = int(np.searchsorted(self._starts, b, side="left"))
        out = self.stream[i0:i1].copy()
        out[0, 1] += a - self._starts[i0]
        out[-1, 2] -= self._ends[i1 - 1] - b
        return out

    def windows(self, rank: int) -> list[Window]:
        """The rank's windows: its ``rows_per_rank`` stream rows cut every ``window_rows`` rows."""
        if rank not in self._windows:
            base, out = rank * self.rows_per_rank, []
            for w, a in enumerate(range(0, self.rows_per_rank, self.window_rows)):
                n = min(self.window_rows, self.rows_per_rank - a)
                if self.shuffle_rows:
                    order = np.random.default_rng([self.seed, self.epoch, rank, w, _WINDOW_SALT]).permutation(n)
                else:
                    order = np.arange(n)
                out.append(Window(w, self.pieces(base + a, base + a + n), order, a))
            self._windows[rank] = out
        return self._windows[rank]

    def piece_gids(self, pieces: np.ndarray) -> np.ndarray:
        """Global ids of the rows of ``pieces``, range after range."""
        if len(pieces) == 0:
            return np.zeros(0, np.int64)
        off = self.layout.offsets
        return np.concatenate([np.arange(off[f] + a, off[f] + b) for f, a, b in pieces])

    def sequence(self, rank: int, valid: np.ndarray | None = None) -> np.ndarray:
        """The global ids rank ``rank`` trains on, in order (``rows_per_rank`` of them).

        ``valid`` (bool per global id) marks rows a skip policy dropped; each is replaced as in
        :func:`resolve_window`.
        """
        parts = []
        for w in self.windows(rank):
            gids = self.piece_gids(w.pieces)
            parts.append(resolve_window(gids, w.order, None if valid is None else valid[gids], w.index))
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def locate(self, rank: int, position: int) -> tuple[int, int]:
        """``(window index, offset inside it)`` of sequence position ``position`` of ``rank``."""
        return position // self.window_rows, position % self.window_rows


def resolve_window(gids: np.ndarray, order: np.ndarray, valid: np.ndarray | None, window: int = 0) -> np.ndarray:
    """A window's rows in shuffled order, each invalid row replaced by the next valid one
    (cyclically, in the shuffled order).

    Args:
        gids: the window's global ids, chunk after chunk.
        order: the window's row order (positions into ``gids``).
        valid: bool per entry of ``gids``; None = all valid.

    Raises:
        ValueError: no row of the window is valid.
    """
    seq = gids[order]
    if valid is None or bool(np.all(valid)):
        return seq
    ok = np.asarray(valid, bool)[order]
    good = np.flatnonzero(ok)
    if good.size == 0:
        raise ValueError(f"every one of the {seq.size} rows of window {window} is bad: no row to train on")
    j = np.arange(seq.size)
    nxt = good[np.searchsorted(good, j) % good.size]
    return seq[nxt]


def window_chunks_for(shuffle_buffer: int, chunk_rows: int) -> int:
    """Chunks per window for ``data.shuffle_buffer`` rows (at least one chunk)."""
    return max(1, math.ceil(max(shuffle_buffer, 1) / chunk_rows))


__all__ = ["SplitLayout", "EpochPlan", "Window", "resolve_window", "window_chunks_for"]
