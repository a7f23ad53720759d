"""The Ray Data pipeline: shards (folder or ``s3://``) -> decoded, augmented batches for training.

``build_dataset`` reads only the needed columns of one split, checks every shard file's footer
first (a truncated shard is named before any work starts), and decodes rows in ``map_batches``:
images to normalised float32 CHW in [-1, 1], points to N×3 float32. ``iter_epoch`` hands batches to
training through ``iter_torch_batches`` with a per-epoch local shuffle.

Bad rows follow ``data.on_bad_row``:

* ``error`` (default): stop with a :class:`ShardError` naming the file, the row (its index in the
  file and its sample_id) and the field;
* ``skip``: drop the row, log it and count it in a :class:`BadRowLog` actor whose count the caller
  reads (and training exports as a metric). Nothing is dropped silently.

Augmentation (``augment_batch``) is a plain NumPy function of a decoded batch and a generator, so
the training loop can also apply it with a generator seeded by (seed, epoch, rank, step).
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq

from posefr_dist import storage
from posefr_dist.config import AugmentConfig, DataConfig
from posefr_dist.data import shards as S

log = logging.getLogger(__name__)

READ_COLUMNS = ["sample_id", "subject_id", "label", "image", "yaw_deg", "pitch_deg", "points", "num_points"]
#: columns of a decoded batch; ``yaw_deg`` and ``pitch_deg`` are float32 with NaN where unknown
BATCH_COLUMNS = ("sample_id", "subject_id", "label", "image", "yaw_deg", "pitch_deg", "points", "has_points")


class BadRowLog:
    """Ray actor body that records skipped rows (file, row, field, reason)."""

    def __init__(self) -> None:
        self._records: list[tuple[str, Any, str | None, str, int]] = []

    def add(self, records: list[tuple[str, Any, str | None, str, int]]) -> int:
        for rec in records:
            log.warning("skipped bad row: %s, row %s, field %s: %s", rec[0], rec[1], rec[2], rec[3])
        self._records.extend(records)
        return self.count()

    def count(self) -> int:
        """Rows skipped so far (a record for a whole unreadable file counts its rows)."""
        return sum(r[4] for r in self._records)

    def records(self) -> list[tuple[str, Any, str | None, str, int]]:
        return list(self._records)


@dataclass
class ShardDataset:
    """A split as a Ray Dataset plus what the caller needs around it."""

    dataset: Any  # ray.data.Dataset
    bad_rows: Any  # ActorHandle of BadRowLog
    manifest: dict[str, Any]
    split: str
    num_classes: int
    num_points: int
    image_size: int

    def skipped(self) -> int:
        import ray

        return int(ray.get(self.bad_rows.count.remote()))

    def skipped_records(self) -> list[tuple]:
        import ray

        return ray.get(self.bad_rows.records.remote())


def _row_index(path: str, sample_id: str) -> int | str:
    """Index of ``sample_id`` in the shard ``path`` (read only on the error path)."""
    try:
        fs, p = storage.filesystem(path)
        ids = pq.read_table(p, columns=["sample_id"], filesystem=fs).column(0).to_pylist()
        return ids.index(sample_id)
    except Exception:
        return "?"


def _decode_batch(batch: dict[str, np.ndarray], *, expected_points: int, image_size: int, on_bad_row: str,
                  bad_rows: Any, uri_prefix: str) -> dict[str, np.ndarray]:
    """Decode a batch of raw shard rows; bad rows raise or are recorded and dropped."""
    n = len(batch["sample_id"])
    images = np.zeros((n, 3, image_size, image_size), np.uint8)
    points = np.zeros((n, expected_points, 3), np.float32)
    has_points = np.zeros(n, bool)
    yaw = np.full(n, np.nan, np.float32)
    pitch = np.full(n, np.nan, np.float32)
    keep = np.ones(n, bool)
    bad: list[tuple[str, Any, str | None, str, int]] = []
    for i in range(n):
        path = uri_prefix + str(batch["path"][i]) if "path" in batch else "?"
        sid = str(batch["sample_id"][i])
        field, reason = None, None
        try:
            img = S.decode_image(batch["image"][i])
            if img.shape[:2] != (image_size, image_size):
                field, reason = "image", f"is {img.shape[1]}x{img.shape[0]}, expected {image_size}x{image_size}"
            else:
                images[i] = img.transpose(2, 0, 1)
        except ValueError as e:
            field, reason = "image", str(e)
        if reason is None:
            if batch["label"][i] is None or (isinstance(batch["label"][i], float) and np.isnan(batch["label"][i])):
                field, reason = "label", "null"
        for name, rng_, out in (("yaw_deg", S.YAW_RANGE, yaw), ("pitch_deg", S.PITCH_RANGE, pitch)):
            if reason is None:
                a = batch[name][i]  # null -> NaN (unknown pose)
                if a is not None and not np.isnan(a):
                    r = S.check_angle(float(a), rng_, nullable=True)
                    if r:
                        field, reason = name, r
                    out[i] = a
        if reason is None:
            p = batch["points"][i]
            if p is not None:
                r = S.check_points(p, int(batch["num_points"][i]))
                if r is None and int(batch["num_points"][i]) != expected_points:
                    r = f"num_points {int(batch['num_points'][i])}, the data set has {expected_points}"
                if r:
                    field, reason = "points", r
                else:
                    points[i] = np.asarray(p, np.float32).reshape(expected_points, 3)
                    has_points[i] = True
        if reason is not None:
            row = _row_index(path, sid)
            if on_bad_row == "error":
                raise S.ShardError(path, f"{row} (sample_id {sid})", field, reason)
            bad.append((path, f"{row} (sample_id {sid})", field, reason, 1))
            keep[i] = False
    if bad:
        import ray

        ray.get(bad_rows.add.remote(bad))
    # images travel as uint8 (4x less to move between processes); collate() normalises them
    return {
        "sample_id": np.asarray(batch["sample_id"])[keep],
        "subject_id": np.asarray(batch["subject_id"])[keep],
        "label": np.asarray(batch["label"], dtype=np.int64)[keep],
        "image": images[keep],
        "yaw_deg": yaw[keep],
        "pitch_deg": pitch[keep],
        "points": points[keep],
        "has_points": has_points[keep],
    }


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
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        for i in range(n):
            sx = np.clip(((xs - w / 2 - tx[i]) / zoom[i] + w / 2).round(), 0, w - 1).astype(np.int32)
            sy = np.clip(((ys - h / 2 - ty[i]) / zoom[i] + h / 2).round(), 0, h - 1).astype(np.int32)
            img[i] = img[i][:, sy, sx]
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


def check_files(uris: list[str], manifest_rows: dict[str, int], on_bad_row: str, bad_rows: Any) -> list[str]:
    """Read each shard's Parquet footer; a truncated/corrupt file errors or is skipped (counted)."""
    good = []
    for uri in uris:
        fs, path = storage.filesystem(uri)
        try:
            storage.with_retries(uri, lambda: pq.read_metadata(path, filesystem=fs))
            good.append(uri)
        except FileNotFoundError:
            reason = "shard listed in manifest.json is missing"
        except (storage.StorageError, OSError, Exception) as e:  # pyarrow raises ArrowInvalid/OSError
            if isinstance(e, storage.StorageError) and "S3 request failed" in str(e):
                raise
            reason = f"not a readable Parquet file (truncated or corrupt): {e}"
        else:
            continue
        if on_bad_row == "error":
            raise S.ShardError(uri, None, None, reason)
        import ray

        ray.get(bad_rows.add.remote([(uri, "all", None, reason, int(manifest_rows.get(uri, 0)))]))
    return good


def build_dataset(uri: str, split: str, cfg: DataConfig, *, training: bool = False, augment: bool | None = None,
                  seed: int | None = None, shuffle_seed: int | None = None) -> ShardDataset:
    """A split of the shard root ``uri`` as a decoded Ray Dataset.

    Args:
        uri: shard root (folder, ``file://`` or ``s3://``).
        split: ``train``, ``val`` or ``test``.
        cfg: the data section of the config (bad-row policy, batch sizes, augmentation).
        training: shuffle file order and (unless ``augment=False``) augment.
        augment: override whether to augment (default: ``training and cfg.augment.enabled``).
        seed: makes augmentation deterministic in (seed, rows); None draws fresh randomness on
            every execution, i.e. every epoch.
        shuffle_seed: seeds the file order of a training read (a new, deterministic order each
            epoch); None = a random order.
    """
    import ray

    man = S.read_manifest(uri)
    uris = S.shard_uris(uri, split, man)
    if not uris:
        raise S.ShardError(storage.join(uri, "manifest.json"), None, "splits", f"split {split!r} has no shards")
    rows_of = {storage.join(uri, e["path"]): int(e["rows"]) for e in man["splits"][split]["shards"]}
    bad_rows = ray.remote(num_cpus=0)(BadRowLog).remote()
    uris = check_files(uris, rows_of, cfg.on_bad_row, bad_rows)
    if not uris:
        raise S.ShardError(uri, None, None, f"split {split!r}: no readable shard left")
    fs, _ = storage.filesystem(uris[0])
    paths = [storage.filesystem(u)[1] for u in uris]
    # Ray reports paths without the scheme; put it back so errors show the URI the user gave
    prefix = "s3://" if uri.startswith("s3://") else ""
    shuffle = None
    if training and cfg.shuffle_blocks:
        shuffle = ray.data.FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else "files"
    ds = ray.data.read_parquet(paths, filesystem=fs, include_paths=True, shuffle=shuffle) \
        .select_columns(READ_COLUMNS + ["path"])
    num_points = int(man.get("num_points") or 0)
    image_size = int(man.get("image_size") or 112)
    ds = ds.map_batches(
        _decode_batch, batch_size=cfg.decode_batch_size, batch_format="numpy", zero_copy_batch=False,
        fn_kwargs=dict(expected_points=num_points, image_size=image_size, on_bad_row=cfg.on_bad_row,
                       bad_rows=bad_rows, uri_prefix=prefix),
    )
    if (training if augment is None else augment) and cfg.augment.enabled:
        ds = ds.map_batches(_augment_map, batch_size=cfg.decode_batch_size, batch_format="numpy",
                            fn_kwargs=dict(cfg=cfg.augment, seed=seed))
    identities = int(man["splits"][split].get("identities") or 0)
    return ShardDataset(ds, bad_rows, man, split, identities, num_points, image_size)


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
    """Iterate one epoch of a Dataset (or a Ray Train dataset shard) as torch batches.

    The local shuffle is seeded by (seed, epoch), so each epoch has its own order.
    """
    kwargs: dict[str, Any] = dict(batch_size=batch_size, collate_fn=_collate_fn(), drop_last=drop_last)
    if shuffle_buffer > 0:
        kwargs.update(local_shuffle_buffer_size=shuffle_buffer, local_shuffle_seed=seed * 1000003 + epoch)
    yield from ds.iter_torch_batches(**kwargs)
