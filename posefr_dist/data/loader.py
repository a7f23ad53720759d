"""What a training worker reads: its planned batches of the train split, and the val split.

The driver decides per split (:func:`prepare`) whether it is **cached** (``data.cache``): decoded
once by Ray Data (in file order, order preserved) and assembled into one object in the object
store, a dict of arrays indexed by global row id that every worker on a node maps without a copy;
or **streamed**: each rank decodes only its own windows of chunks, in plan order, with one Ray Data
pipeline for the whole run (:class:`RankStream`). :class:`RankBatches` turns the epoch plan (:mod:`posefr_dist.data.plan`)
into batches either way, identical row for row, from any batch index on (a resumed run starts
there without decoding what it skips); a background thread gathers, augments (seeded by
``(seed, epoch, rank, batch)``) and converts ``prefetch_batches`` batches ahead of the step.
Batches hold tensors only: ``image`` (float32 in [-1, 1]), ``points``, ``label``, ``has_points``,
``yaw_deg``, ``pitch_deg`` and ``gid`` (global row id).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from posefr_dist.config import AugmentConfig, DataConfig
from posefr_dist.data import decode as D
from posefr_dist.data.pipeline import SplitSource, augment_batch, open_split, to_float_images
from posefr_dist.data.plan import EpochPlan, resolve_window, window_chunks_for

log = logging.getLogger(__name__)

#: columns a training batch carries (as tensors)
TRAIN_COLUMNS = ("image", "points", "label", "has_points", "yaw_deg", "pitch_deg", "gid")


@dataclass
class SplitHandle:
    """A split as the workers get it: the source, and the cached arrays' object ref when cached."""

    source: SplitSource
    cached: Any = None  # ObjectRef of the dict of arrays, or None (streamed)

    @property
    def is_cached(self) -> bool:
        return self.cached is not None


def _assemble(total: int, *blocks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One dict of arrays indexed by global row id from decoded blocks (any order)."""
    strings = ("sample_id", "subject_id")
    # Ray Data hands string columns back as object arrays: make them one fixed-width buffer
    blocks = tuple({k: (np.asarray(v).astype(str) if k in strings else v) for k, v in b.items()} for b in blocks)
    first = blocks[0]
    out = {k: np.zeros((total,) + v.shape[1:], v.dtype) for k, v in first.items() if k != "gid"}
    for k in strings:
        width = max(b[k].dtype.itemsize for b in blocks) // np.dtype("<U1").itemsize
        out[k] = np.zeros(total, f"<U{max(width, 1)}")
    out["valid"] = np.zeros(total, bool)
    for b in blocks:
        for k, v in b.items():
            if k != "gid":
                out[k][b["gid"]] = v
    return out


def cache_split(source: SplitSource, cfg: DataConfig) -> Any:
    """Decode ``source`` once and put it in the object store; returns the object's ref."""
    import time

    import ray

    from posefr_dist.raysupport import on_this_node

    t0 = time.perf_counter()
    ds = source.dataset(source.file_order_windows(cfg.decode_batch_size), drop_invalid=False,
                        concurrency=cfg.decode_concurrency, cpus_per_task=cfg.decode_cpus)
    mat = ds.materialize()
    refs = mat.to_numpy_refs()
    # assembled on the driver's node, so the cache lives as long as the run does: a lost worker
    # node takes none of it (workers on other nodes fetch it once per worker start)
    ref = ray.remote(num_cpus=0, scheduling_strategy=on_this_node())(_assemble).remote(source.layout.total_rows, *refs)
    ray.wait([ref], fetch_local=False)
    del mat, refs
    log.info("%s split decoded once and cached: %d rows, %.0f MiB, in %.1fs", source.split,
             source.layout.total_rows, source.decoded_bytes() / 2**20, time.perf_counter() - t0)
    return ref


def cache_decision(sources: list[SplitSource], cfg: DataConfig) -> bool:
    """Whether ``data.cache`` caches these splits (all or none)."""
    if cfg.cache != "auto":
        return cfg.cache == "memory"
    import ray

    need = sum(s.decoded_bytes() for s in sources)
    # the cache is assembled on this (the driver's) node: its object store is what counts
    here = ray.get_runtime_context().get_node_id()
    store = next((float(n["Resources"].get("object_store_memory", 0.0)) for n in ray.nodes()
                  if n["NodeID"] == here and n["Alive"]), float(ray.cluster_resources().get("object_store_memory", 0.0)))
    fits = need <= cfg.cache_fraction * store
    log.info("data.cache=auto: decoded train+val need %.0f MiB, %.0f%% of this node's object store is %.0f MiB: %s",
             need / 2**20, 100 * cfg.cache_fraction, cfg.cache_fraction * store / 2**20,
             "caching" if fits else "streaming")
    return fits


def prepare(uri: str, cfg: DataConfig, splits: tuple[str, ...] = ("train", "val")) -> dict[str, SplitHandle]:
    """Open the splits and cache them when ``data.cache`` says so (driver side)."""
    sources = [open_split(uri, s, cfg) for s in splits]
    cached = cache_decision(sources, cfg)
    return {s.split: SplitHandle(s, cache_split(s, cfg) if cached else None) for s in sources}


class RankStream:
    """One streaming read per rank for a whole run: the windows of every epoch it will train on,
    in plan order, decoded by a single Ray Data pipeline (its start-up is paid once, and the next
    epoch's first windows decode while the current one ends).

    ``epochs`` are the epochs to read; ``batches`` the batches each trains on (the rest of a
    rank's share is not read); the first epoch starts at batch ``start``.
    """

    def __init__(self, handle: SplitHandle, cfg: DataConfig, *, seed: int, rank: int, world: int,
                 epochs: list[int], batch_size: int, batches: int | None = None, start: int = 0) -> None:
        self.handle, self.cfg, self.rank = handle, cfg, int(rank)
        self.plans = {e: plan_for(handle.source, cfg, seed=seed, epoch=e, world=world) for e in epochs}
        self.order: list[tuple[int, Any]] = []
        for i, e in enumerate(epochs):
            plan = self.plans[e]
            n = plan.rows_per_rank // batch_size if batches is None else min(batches, plan.rows_per_rank // batch_size)
            lo, hi = (start * batch_size if i == 0 else 0), n * batch_size
            if hi <= lo:
                continue
            first, _ = plan.locate(self.rank, lo)
            self.order += [(e, w) for w in plan.windows(self.rank)[first:] if w.start < hi]
        self._next = 0
        self._it: Iterator[dict[str, np.ndarray]] | None = None
        self._pending: list[dict[str, np.ndarray]] = []
        self._have = 0

    def _start(self) -> None:
        from posefr_dist.raysupport import quiet_ray_data

        quiet_ray_data()  # also in Ray Train workers
        src = self.handle.source
        rows = max(1, self.order[0][1].rows) if self.order else 1
        per_task = max(1, round(self.cfg.decode_batch_size / rows))
        ds = src.dataset([w.pieces for _, w in self.order], drop_invalid=False, windows_per_task=per_task,
                         concurrency=self.cfg.decode_concurrency, cpus_per_task=self.cfg.decode_cpus)
        self._it = iter(ds.iter_batches(batch_size=None, batch_format="numpy",
                                        prefetch_batches=self.cfg.prefetch_batches))

    def window(self, epoch: int, index: int) -> dict[str, np.ndarray]:
        """The decoded rows (in range order, ``valid`` marking good ones) of the next window, which
        must be window ``index`` of ``epoch``."""
        if self._next >= len(self.order):
            raise RuntimeError(f"rank {self.rank}: no window left to read (asked for epoch {epoch} window {index})")
        e, w = self.order[self._next]
        if (e, w.index) != (epoch, index):
            raise RuntimeError(f"rank {self.rank}: read out of plan order: asked for epoch {epoch} window {index}, "
                               f"the stream is at epoch {e} window {w.index}")
        if self._it is None:
            self._start()
        while self._have < w.rows:
            blk = next(self._it)
            self._pending.append(blk)
            self._have += len(blk["gid"])
        allrows = D.concat(self._pending)
        rows, rest = D.select(allrows, slice(0, w.rows)), D.select(allrows, slice(w.rows, None))
        self._pending, self._have = ([rest] if len(rest["gid"]) else []), len(rest["gid"])
        self._next += 1
        if not np.array_equal(rows["gid"], self.plans[e].piece_gids(w.pieces)):
            raise RuntimeError(f"window {w.index} of rank {self.rank}, epoch {e}: decoded rows out of plan order")
        return rows


class RankBatches:
    """Rank ``rank``'s batches of one epoch, from batch index ``start`` on.

    Iterating yields dicts of tensors (:data:`TRAIN_COLUMNS`), ``len(seq) // batch_size`` batches
    in all for the epoch (``batches`` caps them). A streamed split reads from ``stream`` (a
    :class:`RankStream` of the run), or from a stream of this epoch alone. ``close()`` (or leaving
    the ``with`` block) stops the producer thread.
    """

    def __init__(self, handle: SplitHandle, cfg: DataConfig, *, seed: int, epoch: int, rank: int, world: int,
                 batch_size: int, start: int = 0, augment: AugmentConfig | None = None,
                 pin_memory: bool = False, stream: RankStream | None = None, batches: int | None = None) -> None:
        self.handle, self.cfg, self.batch_size = handle, cfg, int(batch_size)
        self.pin_memory = bool(pin_memory)
        self.seed, self.epoch, self.rank, self.world, self.start = int(seed), int(epoch), int(rank), int(world), int(start)
        self.augment = augment
        # the run's stream already planned this epoch
        self.plan = stream.plans[epoch] if stream is not None and epoch in stream.plans else \
            plan_for(handle.source, cfg, seed=seed, epoch=epoch, world=world)
        self.num_batches = self.plan.rows_per_rank // self.batch_size
        if batches is not None:
            self.num_batches = min(self.num_batches, int(batches))
        self.stream = stream
        self._arrays: dict[str, np.ndarray] | None = None
        self._q: queue.Queue = queue.Queue(maxsize=max(1, cfg.prefetch_batches))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- producing ------------------------------------------------------------------------------

    def _batches_np(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """``(batch index, rows)`` in plan order, from ``start``."""
        b0, bs = self.start, self.batch_size
        if self.handle.is_cached:
            arrays = self._arrays
            seq = self.plan.sequence(self.rank, arrays["valid"])
            for b in range(b0, self.num_batches):
                idx = seq[b * bs:(b + 1) * bs]
                yield b, {k: arrays[k][idx] for k in TRAIN_COLUMNS if k != "gid"} | {"gid": idx}
            return
        yield from self._stream(b0)

    def _stream(self, b0: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        bs, limit = self.batch_size, self.num_batches * self.batch_size
        pos = b0 * bs
        if pos >= limit:
            return
        w0, _ = self.plan.locate(self.rank, pos)
        stream = self.stream or RankStream(self.handle, self.cfg, seed=self.seed, rank=self.rank, world=self.world,
                                           epochs=[self.epoch], batch_size=bs, batches=self.num_batches, start=b0)
        parts: list[dict[str, np.ndarray]] = []  # resolved rows not yet batched
        parts_rows = 0
        b = b0
        for w in self.plan.windows(self.rank)[w0:]:
            if w.start >= limit:
                break
            rows = stream.window(self.epoch, w.index)
            local = resolve_window(np.arange(w.rows), w.order, rows["valid"], w.index)
            lo = max(0, pos - w.start)  # the resume position may fall inside the first window
            hi = min(w.rows, limit - w.start)
            if hi > lo:
                parts.append(D.select(rows, local[lo:hi]))
                parts_rows += hi - lo
            while parts_rows >= bs:
                allp = D.concat(parts)
                out = {k: v[:bs] for k, v in allp.items()}
                parts = [{k: v[bs:] for k, v in allp.items()}]
                parts_rows -= bs
                yield b, {k: out[k] for k in TRAIN_COLUMNS}
                b += 1

    def _finish(self, b: int, rows: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        if self.augment is not None and self.augment.enabled:
            # the generator of batch b (1-based, as the loop counts micro-batches)
            rng = np.random.default_rng([self.seed, self.epoch, self.rank, b + 1])
            aug = augment_batch({k: rows[k] for k in ("image", "yaw_deg", "points")}, rng, self.augment)
            rows = {**rows, **aug}
        else:
            rows = {**rows, "image": to_float_images(rows["image"])}
        out = {}
        for k in TRAIN_COLUMNS:
            v = np.asarray(rows[k])
            if k == "label":
                v = v.astype(np.int64, copy=False)
            t = torch.from_numpy(np.ascontiguousarray(v) if v.flags.writeable else v.copy())
            out[k] = t.pin_memory() if self.pin_memory else t
        return out

    def _produce(self) -> None:
        try:
            for b, rows in self._batches_np():
                if not self._put((b, self._finish(b, rows))):
                    return
            self._put(("end", None))
        except BaseException as e:  # handed to the consumer
            self._put(("end", e))

    def _put(self, item: tuple[Any, Any]) -> bool:
        """Queue ``item`` unless the consumer closed first; False when it did."""
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    # -- consuming ------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.handle.is_cached and self._arrays is None:
            self._arrays = load_cached(self.handle)
        self._thread = threading.Thread(target=self._produce, name=f"posefr-batches-r{self.rank}", daemon=True)
        self._thread.start()
        try:
            while True:
                b, item = self._q.get()
                if b == "end":
                    if item is not None:
                        raise item
                    return
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    def __enter__(self) -> "RankBatches":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_LOADED: dict[Any, dict[str, np.ndarray]] = {}


def load_cached(handle: SplitHandle) -> dict[str, np.ndarray]:
    """The cached arrays of ``handle`` (fetched once per process; zero-copy from the object store)."""
    import ray

    key = handle.cached.hex() if hasattr(handle.cached, "hex") else id(handle.cached)
    if key not in _LOADED:
        _LOADED[key] = ray.get(handle.cached)
    return _LOADED[key]


def plan_for(source: SplitSource, cfg: DataConfig, *, seed: int, epoch: int, world: int) -> EpochPlan:
    """The epoch plan of ``source`` under ``cfg`` (see :mod:`posefr_dist.data.plan`)."""
    return EpochPlan(source.layout, seed=seed, epoch=epoch, world=world, chunk_rows=source.chunk_rows,
                     window_chunks=window_chunks_for(cfg.shuffle_buffer, source.chunk_rows),
                     shuffle_chunks=cfg.shuffle_blocks, shuffle_rows=cfg.shuffle_buffer > 0)


def iter_split(handle: SplitHandle, cfg: DataConfig, batch_size: int) -> Iterator[dict[str, Any]]:
    """Every good row of a split in file order, as numpy batches with ``sample_id`` and
    ``subject_id`` (validation and embedding): indexed from the cache or streamed."""
    if handle.is_cached:
        arrays = load_cached(handle)
        idx = np.flatnonzero(arrays["valid"])
        for a in range(0, len(idx), batch_size):
            sel = idx[a:a + batch_size]
            yield {k: v[sel] for k, v in arrays.items()}
        return
    src = handle.source
    ds = src.dataset(src.file_order_windows(cfg.decode_batch_size), drop_invalid=True,
                     concurrency=cfg.decode_concurrency, cpus_per_task=cfg.decode_cpus)
    yield from ds.iter_batches(batch_size=batch_size, batch_format="numpy")


__all__ = ["SplitHandle", "prepare", "cache_split", "cache_decision", "RankStream", "RankBatches", "load_cached", "plan_for",
           "iter_split", "TRAIN_COLUMNS"]
