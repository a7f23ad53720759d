"""The Ray Data pipeline: shards (folder or ``s3://``) -> decoded batches.

:func:`open_split` reads a split's manifest entries and every shard's Parquet footer (a truncated
shard is named before any work starts) and returns a :class:`SplitSource`: the split's layout
(files and row groups, see :mod:`posefr_dist.data.plan`) and what decoding needs.
:meth:`SplitSource.dataset` is a Ray Dataset that reads and decodes given windows of chunks in
``map_batches`` tasks (:func:`posefr_dist.data.decode.decode_table`: whole-column checks, images to
uint8 CHW, points to N x 3 float32), in order. :func:`build_dataset` is the whole split in file
order (embedding, tests); training uses :mod:`posefr_dist.data.loader` on top of the same source.

Bad rows follow ``data.on_bad_row``:

* ``error`` (default): stop with a :class:`ShardError` naming the file, the row (its index in the
  file and its sample_id) and the field;
* ``skip``: drop the row, log it and count it in a :class:`BadRowLog` actor whose count the caller
  reads (and training exports as a metric). Nothing is dropped silently.

Augmentation (``augment_batch``) is a plain NumPy function of a decoded batch and a generator,
seeded by the training loader with (seed, epoch, rank, batch).
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from posefr_dist import storage
from posefr_dist.config import AugmentConfig, DataConfig
from posefr_dist.data import decode as D
from posefr_dist.data import shards as S
from posefr_dist.data.plan import SplitLayout

log = logging.getLogger(__name__)

READ_COLUMNS = D.READ_COLUMNS
#: columns of a decoded batch; ``yaw_deg`` and ``pitch_deg`` are float32 with NaN where unknown
BATCH_COLUMNS = ("sample_id", "subject_id", "label", "image", "yaw_deg", "pitch_deg", "points", "has_points")


class BadRowLog:
    """Ray actor body that records skipped rows (file, row, field, reason), each row once however
    often it is read (a streamed split is decoded every epoch)."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, Any, str | None], tuple[str, Any, str | None, str, int]] = {}

    def add(self, records: list[tuple[str, Any, str | None, str, int]]) -> int:
        for rec in records:
            key = (rec[0], rec[1], rec[2])
            if key not in self._records:
                log.warning("skipped bad row: %s, row %s, field %s: %s", rec[0], rec[1], rec[2], rec[3])
                self._records[key] = tuple(rec)
        return self.count()

    def count(self) -> int:
        """Rows skipped so far (a record for a whole unreadable file counts its rows)."""
        return sum(r[4] for r in self._records.values())

    def records(self) -> list[tuple[str, Any, str | None, str, int]]:
        return list(self._records.values())


@dataclass
class SplitSource:
    """One split of a shard root, ready to be read: its layout and what decoding needs."""

    uri: str
    split: str
    layout: SplitLayout
    num_points: int
    image_size: int
    image_format: str
    identities: int
    on_bad_row: str
    chunk_rows: int
    bad_rows: Any  # ActorHandle of BadRowLog; None under on_bad_row=error
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def chunks(self) -> np.ndarray:
        return self.layout.chunks(self.chunk_rows)

    def row_bytes(self) -> int:
        """Decoded size of one row (image, points and the small columns)."""
        return 3 * self.image_size ** 2 + 12 * self.num_points + 96

    def decoded_bytes(self) -> int:
        return self.layout.total_rows * self.row_bytes()

    def file_order_windows(self, rows_per_window: int) -> list[np.ndarray]:
        """Every row in file order: row ranges ``[m, 3]`` (file, start, stop) of about
        ``rows_per_window`` rows each (whole chunks)."""
        chunks = self.chunks
        per = max(1, math.ceil(rows_per_window / self.chunk_rows))
        return [chunks[a:a + per] for a in range(0, len(chunks), per)]

    def dataset(self, windows: list[np.ndarray], *, drop_invalid: bool, windows_per_task: int = 1,
                concurrency: int = 0, cpus_per_task: float = 1.0) -> Any:
        """A Ray Dataset of the decoded rows of ``windows`` (each ``[m, 3]`` row ranges of file,
        start, stop), in order.

        Each ``map_batches`` task reads and decodes ``windows_per_task`` windows;
        ``concurrency`` caps the decode tasks in flight (0 = Ray's choice). With ``drop_invalid``
        bad rows (under ``on_bad_row=skip``) are left out, else they are kept with ``valid`` False.
        """
        import ray

        items = [{"w": i, "pieces": np.asarray(w, np.int64).reshape(-1).tolist()} for i, w in enumerate(windows)]
        ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
        ds.context.execution_options.preserve_order = True  # on the dataset's own context
        kwargs: dict[str, Any] = {}
        if concurrency:
            kwargs["concurrency"] = int(concurrency)
        ds = ds.map_batches(
            _decode_windows, batch_size=max(1, windows_per_task), batch_format="numpy", zero_copy_batch=True,
            num_cpus=cpus_per_task,
            fn_kwargs=dict(files=list(self.layout.files), offsets=self.layout.offsets,
                           expected_points=self.num_points, image_size=self.image_size,
                           image_format=self.image_format, on_bad_row=self.on_bad_row, bad_rows=self.bad_rows,
                           drop_invalid=drop_invalid),
            **kwargs,
        )
        ds.context.execution_options.preserve_order = True
        return ds

    def skipped(self) -> int:
        return skipped_count(self.bad_rows)


def skipped_count(bad_rows: Any) -> int:
    """Rows a :class:`BadRowLog` (``None``: none, ``on_bad_row=error``) has recorded as skipped."""
    if bad_rows is None:
        return 0
    import ray

    return int(ray.get(bad_rows.count.remote()))


def _decode_windows(batch: dict[str, np.ndarray], *, files: list[str], offsets: np.ndarray,
                    expected_points: int, image_size: int, image_format: str, on_bad_row: str, bad_rows: Any,
                    drop_invalid: bool) -> dict[str, np.ndarray]:
    """``map_batches`` body: read and decode the row ranges of each window of the batch, in order."""
    sel = np.concatenate([np.asarray(w, np.int64).reshape(-1, 3) for w in batch["pieces"]])
    table, fidx, ridx = D.read_chunks(files, sel)
    gid = offsets[fidx] + ridx
    out, bad = D.decode_table(table, files=files, file_idx=fidx, row_idx=ridx, gid=gid,
                              expected_points=expected_points, image_size=image_size, image_format=image_format,
                              on_bad_row=on_bad_row)
    if bad:
        import ray

        ray.get(bad_rows.add.remote(bad))
        if drop_invalid:
            out = D.select(out, out["valid"])
    return out


@dataclass
class ShardDataset:
    """A split as a Ray Dataset (decoded, file order) plus what the caller needs around it."""

    dataset: Any  # ray.data.Dataset
    bad_rows: Any  # ActorHandle of BadRowLog; None under on_bad_row=error
    manifest: dict[str, Any]
    split: str
    num_classes: int
    num_points: int
    image_size: int
    source: SplitSource | None = None

    def skipped(self) -> int:
        return skipped_count(self.bad_rows)

    def skipped_records(self) -> list[tuple]:
        if self.bad_rows is None:
            return []
        import ray

        return ray.get(self.bad_rows.records.remote())


def augment_batch(batch: dict[str, np.ndarray], rng: np.random.Generator, cfg: AugmentConfig) -> dict[str, np.ndarray]:
    """Colour jitter, small zoom/shift, horizontal flip (negates yaw, mirrors the points' x).

    Operates on decoded batches (CHW images, uint8 or float in [-1, 1]); returns a new dict with
    float images in [-1, 1].
    """
    out = dict(batch)
    img = to_float_images(np.asarray(batch["image"]))
    n, _, h, w = img.shape
    if n == 0 or not cfg.enabled:
        out["image"] = img
        return out
    flip = rng.random(n) < cfg.hflip_prob
    if cfg.scale > 0 or cfg.shift > 0:
        zoom = 1.0 + rng.uniform(-cfg.scale, cfg.scale, n)
        tx = rng.uniform(-cfg.shift, cfg.shift, n) * w
        ty = rng.uniform(-cfg.shift, cfg.shift, n) * h
        # nearest-neighbour resampling of the whole batch in one gather: source column of each
        # output column and source row of each output row, per image
        xs, ys = np.arange(w, dtype=np.float32)[None, :], np.arange(h, dtype=np.float32)[None, :]
        sx = np.clip(((xs - w / 2 - tx[:, None]) / zoom[:, None] + w / 2).round(), 0, w - 1).astype(np.intp)
        sy = np.clip(((ys - h / 2 - ty[:, None]) / zoom[:, None] + h / 2).round(), 0, h - 1).astype(np.intp)
        img = img[np.arange(n)[:, None, None, None], np.arange(img.shape[1])[None, :, None, None],
                  sy[:, None, :, None], sx[:, None, None, :]]
    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        x = (img + 1.0) * 0.5
        bright = rng.uniform(1 - j, 1 + j, (n, 1, 1, 1)).astype(np.float32)
        contrast = rng.uniform(1 - j, 1 + j, (n, 1, 1, 1)).astype(np.float32)
        sat = rng.uniform(1 - j, 1 + j, (n, 1, 1, 1)).astype(np.float32)
        x = x * bright
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = (x - mean) * contrast + mean
        grey = x.mean(axis=1, keepdims=True)
        x = (x - grey) * sat + grey
        img = np.clip(x, 0.0, 1.0) * 2.0 - 1.0
    img[flip] = img[flip][..., ::-1]
    out["image"] = np.ascontiguousarray(img)
    yaw = np.array(batch["yaw_deg"], dtype=np.float32, copy=True)
    yaw[flip] = -yaw[flip]
    out["yaw_deg"] = yaw
    pts = np.array(batch["points"], dtype=np.float32, copy=True)
    pts[flip, :, 0] = -pts[flip, :, 0]
    out["points"] = augment_points(pts, rng, cfg)
    return out


def augment_points(pts: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Resample and jitter clouds ``[B, N, 3]`` so the 3D branch never sees the same cloud twice.

    ``point_dropout`` p: per cloud, round(p N) points chosen at random are replaced by copies of
    the kept ones (the point count stays N, the cloud's support is a random subset of it);
    ``point_jitter`` s: every point moves by N(0, s^2) per axis (unit-scale cloud coordinates).
    Draws nothing from ``rng`` when both are 0, so batches without point augmentation keep their
    other random draws.
    """
    b, n = pts.shape[0], pts.shape[1] if pts.ndim == 3 else 0
    if b == 0 or n == 0:
        return pts
    k = int(round(cfg.point_dropout * n))
    if 0 < k < n:
        order = np.argsort(rng.random((b, n)), axis=1)  # a random permutation per cloud
        keep = order[:, : n - k]
        fill = np.take_along_axis(keep, rng.integers(0, n - k, (b, k)), axis=1)
        idx = np.concatenate([keep, fill], axis=1)
        pts = np.take_along_axis(pts, idx[:, :, None], axis=1)
    if cfg.point_jitter > 0:
        pts = pts + rng.normal(0.0, cfg.point_jitter, pts.shape).astype(np.float32)
    return np.ascontiguousarray(pts, dtype=np.float32)


def to_float_images(img: np.ndarray) -> np.ndarray:
    """uint8 0..255 -> float32 in [-1, 1]; float input is copied unchanged."""
    if img.dtype == np.uint8:
        return img.astype(np.float32) * np.float32(2.0 / 255.0) - np.float32(1.0)
    return np.array(img, dtype=np.float32, copy=True)


def _augment_map(batch: dict[str, np.ndarray], *, cfg: AugmentConfig, seed: int | None) -> dict[str, np.ndarray]:
    if seed is None:
        rng = np.random.default_rng()
    else:  # deterministic in (seed, the batch's first row)
        first = str(batch["sample_id"][0]) if len(batch["sample_id"]) else ""
        rng = np.random.default_rng([seed, zlib.crc32(first.encode())])
    return augment_batch(batch, rng, cfg)


def check_files(uris: list[str], manifest_rows: dict[str, int], on_bad_row: str, bad_rows: Any
                ) -> tuple[list[str], list[tuple[int, ...]]]:
    """Read each shard's Parquet footer; a truncated/corrupt file errors or is skipped (counted).

    Returns the readable files and the row-group sizes of each.
    """
    good, groups = [], []
    for uri in uris:
        fs, path = storage.filesystem(uri)
        try:
            md = storage.with_retries(uri, lambda: pq.read_metadata(path, filesystem=fs))
            good.append(uri)
            groups.append(tuple(md.row_group(i).num_rows for i in range(md.num_row_groups)))
            continue
        except FileNotFoundError:
            reason = "shard listed in manifest.json is missing"
        except (storage.StorageError, OSError, Exception) as e:  # pyarrow raises ArrowInvalid/OSError
            if isinstance(e, storage.StorageError) and (e.cause is not None or "S3 request failed" in str(e)):
                raise  # the storage is unreachable or refuses us: not a bad shard
            reason = f"not a readable Parquet file (truncated or corrupt): {e}"
        if on_bad_row == "error":
            raise S.ShardError(uri, None, None, reason)
        import ray

        ray.get(bad_rows.add.remote([(uri, "all", None, reason, int(manifest_rows.get(uri, 0)))]))
    return good, groups


def open_split(uri: str, split: str, cfg: DataConfig) -> SplitSource:
    """The split ``split`` of the shard root ``uri``: manifest, readable files, their layout.

    Raises:
        ShardError: no manifest, no such split, an unreadable shard (``on_bad_row=error``) or none left.
    """
    import ray

    man = S.read_manifest(uri)
    uris = S.shard_uris(uri, split, man)
    if not uris:
        raise S.ShardError(storage.join(uri, "manifest.json"), None, "splits", f"split {split!r} has no shards")
    fmt = S.image_format(man)
    rows_of = {storage.join(uri, e["path"]): int(e["rows"]) for e in man["splits"][split]["shards"]}
    from posefr_dist.raysupport import on_this_node

    # on the driver's node: a lost worker node must not take the run's bad-row counts with it.
    # Under on_bad_row=error the first bad row raises, so nothing would ever be recorded: no
    # actor then (a process fewer per opened split; counts are 0)
    bad_rows = (ray.remote(num_cpus=0, scheduling_strategy=on_this_node())(BadRowLog).remote()
                if cfg.on_bad_row == "skip" else None)
    uris, groups = check_files(uris, rows_of, cfg.on_bad_row, bad_rows)
    if not uris:
        raise S.ShardError(uri, None, None, f"split {split!r}: no readable shard left")
    return SplitSource(uri=uri, split=split, layout=SplitLayout(tuple(uris), tuple(groups)),
                       num_points=int(man.get("num_points") or 0), image_size=int(man.get("image_size") or 112),
                       image_format=fmt, identities=int(man["splits"][split].get("identities") or 0),
                       on_bad_row=cfg.on_bad_row, chunk_rows=cfg.chunk_rows, bad_rows=bad_rows, manifest=man)


def build_dataset(uri: str, split: str, cfg: DataConfig, *, training: bool = False, augment: bool | None = None,
                  seed: int | None = None) -> ShardDataset:
    """A split of the shard root ``uri`` as a decoded Ray Dataset, in file order.

    Args:
        uri: shard root (folder, ``file://`` or ``s3://``).
        split: ``train``, ``val`` or ``test``.
        cfg: the data section of the config (bad-row policy, decode batch size, augmentation).
        training: augment (unless ``augment=False``); training itself reads through
            :mod:`posefr_dist.data.loader`, which plans the order.
        augment: override whether to augment (default: ``training and cfg.augment.enabled``).
        seed: makes augmentation deterministic in (seed, rows); None draws fresh randomness on
            every execution.
    """
    src = open_split(uri, split, cfg)
    ds = src.dataset(src.file_order_windows(cfg.decode_batch_size), drop_invalid=True,
                     concurrency=cfg.decode_concurrency)
    ds = ds.drop_columns(["gid", "valid"])
    if (training if augment is None else augment) and cfg.augment.enabled:
        ds = ds.map_batches(_augment_map, batch_size=cfg.decode_batch_size, batch_format="numpy",
                            fn_kwargs=dict(cfg=cfg.augment, seed=seed))
    return ShardDataset(ds, src.bad_rows, src.manifest, split, src.identities, src.num_points, src.image_size, src)


def collate(batch: dict[str, np.ndarray]) -> dict[str, Any]:
    """Numeric columns to torch tensors (images as float32 in [-1, 1]); string columns stay lists."""
    import torch

    out: dict[str, Any] = {}
    for k, v in batch.items():
        if k in ("sample_id", "subject_id", "path"):
            out[k] = [str(x) for x in v]
        elif k == "image":
            out[k] = torch.from_numpy(to_float_images(np.asarray(v)))
        else:
            arr = np.asarray(v)
            out[k] = torch.from_numpy(arr if arr.flags.writeable and arr.flags.c_contiguous else arr.copy())
    return out


def _collate_fn():
    from ray.data.collate_fn import NumpyBatchCollateFn

    class _Collate(NumpyBatchCollateFn):
        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
            return collate(batch)

    return _Collate()


def iter_epoch(ds: Any, batch_size: int, *, epoch: int = 0, seed: int = 0, shuffle_buffer: int = 0,
               drop_last: bool = False) -> Iterator[dict[str, Any]]:
    """Iterate a Dataset as torch batches (with an optional local shuffle seeded by (seed, epoch))."""
    kwargs: dict[str, Any] = dict(batch_size=batch_size, collate_fn=_collate_fn(), drop_last=drop_last)
    if shuffle_buffer > 0:
        kwargs.update(local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=seed * 1000003 + epoch)
    yield from ds.iter_torch_batches(**kwargs)
