"""Reading chunks of shards and decoding them, a whole Arrow table at a time.

Every check is done on whole columns (nulls, angle ranges, finite points, list lengths); only a
row that fails one takes the slow path that builds its message (file, row, field). The only
per-row work left is the image codec for encoded (PNG/JPEG) shards; raw shards
(``image_format: raw-chw-uint8``, see ``posefr shards pack``) need none.

A decoded batch is a dict of NumPy arrays (see :data:`DECODED_COLUMNS`): images stay uint8 CHW
(4x less to move between processes than float; the loader normalises them), points are
``[n, N, 3]`` float32, angles float32 with NaN where unknown, and ``gid`` is the row's global id
in its split (see :mod:`posefr_dist.data.plan`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from posefr_dist import storage
from posefr_dist.data import shards as S

#: the shard columns training and embedding need (``dataset`` and ``expression`` stay behind)
READ_COLUMNS = ["sample_id", "subject_id", "label", "image", "yaw_deg", "pitch_deg", "points", "num_points"]
DECODED_COLUMNS = ("gid", "sample_id", "subject_id", "label", "image", "yaw_deg", "pitch_deg", "points",
                   "has_points", "valid")

RAW = "raw-chw-uint8"


# --------------------------------------------------------------------------------------------
# reading chunks
# --------------------------------------------------------------------------------------------

_FILES: "OrderedDict[str, pq.ParquetFile]" = OrderedDict()
_FILES_LOCK = threading.Lock()
_MAX_OPEN = 64


def _parquet_file(uri: str) -> pq.ParquetFile:
    """An open Parquet file (footer parsed once per process; shards are immutable)."""
    with _FILES_LOCK:
        pf = _FILES.get(uri)
        if pf is not None:
            _FILES.move_to_end(uri)
            return pf
    fs, path = storage.filesystem(uri)
    try:
        pf = storage.with_retries(uri, lambda: pq.ParquetFile(fs.open_input_file(path)))
    except FileNotFoundError:
        raise S.ShardError(uri, None, None, "shard listed in manifest.json is missing") from None
    except storage.StorageError:  # an unreachable endpoint, refused credentials, no bucket: as they are
        raise
    except (pa.ArrowInvalid, OSError) as e:
        raise S.ShardError(uri, None, None, f"not a readable Parquet file (truncated or corrupt): {e}") from None
    with _FILES_LOCK:
        _FILES[uri] = pf
        while len(_FILES) > _MAX_OPEN:
            _FILES.popitem(last=False)
    return pf


def read_rows(uri: str, start: int, stop: int, columns: list[str] = READ_COLUMNS) -> pa.Table:
    """Rows ``[start, stop)`` of one shard: only the row groups that hold them are read."""
    pf = _parquet_file(uri)
    md = pf.metadata
    groups, first, pos = [], None, 0
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        if pos + n > start and pos < stop:
            groups.append(g)
            first = pos if first is None else first
        pos += n
    if not groups:
        raise S.ShardError(uri, f"{start}-{stop}", None, f"the file has {pos} rows")
    try:
        t = storage.with_retries(uri, lambda: pf.read_row_groups(groups, columns=columns))
    except storage.StorageError:
        raise
    except (pa.ArrowInvalid, OSError) as e:
        raise S.ShardError(uri, None, None, f"not a readable Parquet file (truncated or corrupt): {e}") from None
    return t.slice(start - first, stop - start)


def read_chunks(files: list[str], chunks: np.ndarray, columns: list[str] = READ_COLUMNS
                ) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """The rows of ``chunks`` (``[k, 3]`` of file, start, stop) in order, with each row's file index
    and row index in its file."""
    tables, fidx, ridx = [], [], []
    for f, a, b in np.asarray(chunks, np.int64).reshape(-1, 3):
        tables.append(read_rows(files[f], int(a), int(b), columns))
        fidx.append(np.full(b - a, f, np.int64))
        ridx.append(np.arange(a, b, dtype=np.int64))
    if not tables:
        raise ValueError("no chunks to read")
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    return table, np.concatenate(fidx), np.concatenate(ridx)


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------


def _col(table: pa.Table, name: str) -> pa.Array:
    c = table.column(name)
    return c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c


def _floats(arr: pa.Array) -> np.ndarray:
    """Float column to float32 with NaN for nulls."""
    return np.asarray(arr.to_numpy(zero_copy_only=False), np.float32)


def _strings(arr: pa.Array) -> np.ndarray:
    """String column as a fixed-width unicode array (one buffer: moves between processes without
    pickling a Python object per row)."""
    return np.asarray(arr.to_numpy(zero_copy_only=False).astype(str))


def decode_table(table: pa.Table, *, files: list[str], file_idx: np.ndarray, row_idx: np.ndarray,
                 gid: np.ndarray, expected_points: int, image_size: int, image_format: str = "encoded",
                 on_bad_row: str = "error") -> tuple[dict[str, np.ndarray], list[tuple[str, str, str | None, str, int]]]:
    """Decode a table of shard rows; returns the decoded batch (every row, ``valid`` False for bad
    ones, which are zero-filled) and a record per bad row ``(file, row, field, reason, 1)``.

    Raises:
        ShardError: a bad row under ``on_bad_row='error'`` (the first one, by position).
    """
    n = table.num_rows
    reasons: dict[int, tuple[str, str]] = {}

    def flag(mask: np.ndarray, field: str, why) -> None:
        for i in np.flatnonzero(mask):
            flag_row(int(i), field, why(int(i)) if callable(why) else why)

    def flag_row(i: int, field: str, why: str) -> None:  # a row's first problem is the one reported
        reasons.setdefault(i, (field, why))

    # label
    label_arr = _col(table, "label")
    flag(np.asarray(label_arr.is_null().to_numpy(zero_copy_only=False)), "label", "null")
    labels = np.asarray(label_arr.fill_null(0).to_numpy(zero_copy_only=False), np.int64)

    # angles: null or NaN = unknown pose; otherwise in range
    angles = {}
    for name, (lo, hi) in (("yaw_deg", S.YAW_RANGE), ("pitch_deg", S.PITCH_RANGE)):
        a = _floats(_col(table, name))
        bad = np.isfinite(a) & ((a < lo) | (a > hi)) | np.isinf(a)
        flag(bad, name, lambda i, a=a, lo=lo, hi=hi: f"{a[i]} out of range [{lo}, {hi}]")
        angles[name] = a

    # points
    points = np.zeros((n, max(expected_points, 0), 3), np.float32)
    parr = _col(table, "points")
    has = np.asarray(parr.is_valid().to_numpy(zero_copy_only=False), bool)
    npts = np.asarray(_col(table, "num_points").fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
    if has.any():
        if pa.types.is_fixed_size_list(parr.type) and parr.type.list_size == 3 * expected_points > 0:
            flat = np.asarray(parr.values.to_numpy(zero_copy_only=False), np.float32)
            flat = flat[parr.offset * 3 * expected_points:(parr.offset + n) * 3 * expected_points]
            pts = flat.reshape(n, expected_points, 3)
            finite = np.isfinite(pts).all(axis=(1, 2))
            flag(has & ~finite, "points",
                 lambda i: f"{int((~np.isfinite(pts[i])).sum())} non-finite value(s) (NaN or inf)")
            flag(has & (npts != expected_points), "points",
                 lambda i: f"num_points {npts[i]}, the data set has {expected_points}")
            points[:] = pts  # rows with non-finite values are flagged (and zeroed when skipped)
            points[~has] = 0.0
        else:  # variable-length lists or a size other than the manifest's: the row-wise checks
            lengths = np.asarray(pc.fill_null(pc.list_value_length(parr), 0).to_numpy(zero_copy_only=False))
            for i in np.flatnonzero(has):
                v = parr[int(i)].values.to_numpy(zero_copy_only=False)
                r = S.check_points(v, int(npts[i]))
                if r is None and npts[i] != expected_points:
                    r = f"num_points {int(npts[i])}, the data set has {expected_points}"
                if r is None and lengths[i] != 3 * expected_points:
                    r = f"has {lengths[i]} values, expected 3*num_points = {3 * expected_points}"
                if r:
                    flag_row(int(i), "points", r)
                else:
                    points[i] = np.asarray(v, np.float32).reshape(expected_points, 3)

    # images
    images = np.zeros((n, 3, image_size, image_size), np.uint8)
    column = table.column("image")
    if isinstance(column, pa.Array):  # a RecordBatch's column
        column = pa.chunked_array([column], type=column.type)
    iarr = column.chunk(0) if column.num_chunks == 1 else (column.combine_chunks() if image_format != RAW else None)
    if image_format == RAW:
        size = 3 * image_size * image_size
        if not (pa.types.is_fixed_size_binary(column.type) and column.type.byte_width == size):
            flag(np.ones(n, bool), "image", f"type {column.type}, expected fixed_size_binary[{size}] "
                                            f"for a raw shard of {image_size}x{image_size} images")
        elif n:
            present = np.asarray(column.is_valid().to_numpy(zero_copy_only=False), bool)
            flag(~present, "image", "missing image")
            # each chunk's values buffer read in place and copied once (slots under null rows hold
            # whatever; those rows are flagged)
            at = 0
            for chunk in column.chunks:
                m = len(chunk)
                if m:
                    flat = np.frombuffer(chunk.buffers()[1], np.uint8)[chunk.offset * size:(chunk.offset + m) * size]
                    images[at:at + m] = flat.reshape(m, 3, image_size, image_size)
                at += m
    else:
        values = iarr.to_pylist()
        for i in range(n):
            data = values[i]
            try:
                img = S.decode_image(data)
            except ValueError as e:
                flag_row(i, "image", str(e))
                continue
            if img.shape[:2] != (image_size, image_size):
                flag_row(i, "image", f"is {img.shape[1]}x{img.shape[0]}, expected {image_size}x{image_size}")
                continue
            images[i] = img.transpose(2, 0, 1)

    valid = np.ones(n, bool)
    bad: list[tuple[str, str, str | None, str, int]] = []
    sids = _strings(_col(table, "sample_id"))
    for i in sorted(reasons):
        field, why = reasons[i]
        f = files[int(file_idx[i])]
        where = f"{int(row_idx[i])} (sample_id {sids[i]})"
        if on_bad_row == "error":
            raise S.ShardError(f, where, field, why)
        bad.append((f, where, field, why, 1))
        valid[i] = False
    if bad:
        images[~valid] = 0
        points[~valid] = 0.0
        labels[~valid] = 0
    return {
        "gid": np.asarray(gid, np.int64),
        "sample_id": sids,
        "subject_id": _strings(_col(table, "subject_id")),
        "label": labels,
        "image": images,
        "yaw_deg": angles["yaw_deg"],
        "pitch_deg": angles["pitch_deg"],
        "points": points,
        "has_points": has & valid,
        "valid": valid,
    }, bad


def select(batch: dict[str, np.ndarray], keep: np.ndarray) -> dict[str, np.ndarray]:
    """The rows ``keep`` (bool mask or indices) of a decoded batch."""
    return {k: v[keep] for k, v in batch.items()}


def concat(batches: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(batches) == 1:
        return batches[0]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


__all__ = ["READ_COLUMNS", "DECODED_COLUMNS", "RAW", "read_rows", "read_chunks", "decode_table", "select", "concat"]
