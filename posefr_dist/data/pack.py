"""``posefr shards pack``: rewrite a shard root in the raw image form, for GPU nodes short of CPU.

The raw form (manifest ``"image_format": "raw-chw-uint8"``, see :mod:`posefr_dist.data.shards`)
stores each image decoded, as ``fixed_size_binary`` of ``3 * image_size**2`` bytes (uint8 pixels
in CHW order; Parquet FIXED_LEN_BYTE_ARRAY, one value per row, which pyarrow reads about an order
of magnitude faster than a ``fixed_size_list<uint8>`` column: figures in :mod:`shards`), so a
reader does no PNG/JPEG decoding and no row checks: every row is checked once here. All other
columns are copied unchanged. Files are zstd-compressed Parquet (row groups of 64 rows).

Layout: the same splits and, by default, the same file names as the source; the manifest is the
source's with new shard entries plus ``image_format`` and ``packed_from``. Shards are written
before the manifest, so an interrupted pack leaves no manifest that lists missing files.

:func:`pack_shard` packs one file and depends on nothing but its arguments, so a large set can
be packed as one Ray task per file; :func:`pack` is the plain loop over a root.
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
import time
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from posefr_dist import storage
from posefr_dist.data import shards as S
from posefr_dist.data.schema import MANIFEST_NAME

ON_BAD_ROW = ("error", "skip")


def encode_raw_table(table: pa.Table) -> bytes:
    """Parquet bytes of a raw-form table: zstd on every column, row groups of 64 rows, the same
    dictionary columns as :func:`shards.encode_table`; the same table always gives the same bytes."""
    buf = io.BytesIO()
    pq.write_table(
        table, buf, row_group_size=64, compression="ZSTD",  # a str covers every column, the nested points too
        use_dictionary=["dataset", "expression", "subject_id"], write_statistics=False,
    )
    return buf.getvalue()


def raw_shard_schema(source: pa.Schema, image_size: int) -> pa.Schema:
    """``source`` with the ``image`` field replaced by the raw type (other fields unchanged)."""
    i = source.get_field_index("image")
    return source.set(i, pa.field("image", S.raw_image_type(image_size), nullable=False))


def _row_problem(table: pa.Table, cols: dict[str, list], i: int, image_size: int,
                 num_points: int) -> tuple[str, str, np.ndarray | None]:
    """(field, reason, None) for a bad row, else ("", "", decoded HxWx3 image)."""
    for fname in ("sample_id", "subject_id", "dataset"):
        if cols[fname][i] is None:
            return fname, "null", None
    label = cols["label"][i]
    if label is None:
        return "label", "null", None
    if label < 0:
        return "label", f"negative label {label}", None
    for fname, rng in (("yaw_deg", S.YAW_RANGE), ("pitch_deg", S.PITCH_RANGE)):
        reason = S.check_angle(cols[fname][i], rng, nullable=True)
        if reason:
            return fname, reason, None
    p = table.column("points")[i]
    if p.is_valid:
        reason = S.check_points(p.values.to_numpy(zero_copy_only=False), num_points)
        if reason is None and cols["num_points"][i] != num_points:
            reason = f"num_points {cols['num_points'][i]}, the data set (manifest.json) has {num_points}"
        if reason:
            return "points", reason, None
    try:
        img = S.decode_image(table.column("image")[i].as_py())
    except ValueError as e:
        return "image", str(e), None
    if img.shape != (image_size, image_size, 3):
        return "image", f"is {img.shape[1]}x{img.shape[0]}, expected {image_size}x{image_size} RGB", None
    return "", "", img


def pack_table(uri: str, table: pa.Table, *, image_size: int, num_points: int,
               on_bad_row: str = "error") -> tuple[pa.Table, list[dict[str, Any]]]:
    """Check every row of one encoded shard table (read from ``uri``) and return (raw table, skipped).

    A bad row raises :class:`shards.ShardError` naming ``uri``, the row and the field
    (``on_bad_row="error"``) or is dropped and recorded as ``{"file", "row", "field", "reason"}``
    (``"skip"``). A schema problem always raises."""
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row {on_bad_row!r}: one of {ON_BAD_ROW}")
    problems = S._check_schema(uri, table)
    if problems:
        p = problems[0]
        raise S.ShardError(p.file, p.row, p.field, p.reason)
    cols = {c: table.column(c).to_pylist()
            for c in ("sample_id", "subject_id", "dataset", "label", "yaw_deg", "pitch_deg", "num_points")}
    keep: list[int] = []
    images: list[np.ndarray] = []
    skipped: list[dict[str, Any]] = []
    for i in range(table.num_rows):
        field, reason, img = _row_problem(table, cols, i, image_size, num_points)
        if img is None:
            if on_bad_row == "error":
                raise S.ShardError(uri, i, field, reason)
            skipped.append({"file": uri, "row": i, "field": field, "reason": reason})
            continue
        keep.append(i)
        images.append(img.transpose(2, 0, 1).reshape(-1))
    out = table.take(pa.array(keep, pa.int64())) if len(keep) < table.num_rows else table
    flat = np.ascontiguousarray(np.concatenate(images) if images else np.zeros(0, np.uint8))
    # fixed_size_binary[3*size*size]: one CHW image per value, no validity bitmap (no nulls)
    col = pa.FixedSizeBinaryArray.from_buffers(S.raw_image_type(image_size), len(images),
                                               [None, pa.py_buffer(flat)])
    schema = raw_shard_schema(table.schema, image_size)
    idx = schema.get_field_index("image")
    return out.set_column(idx, schema.field("image"), col), skipped


def _write(table: pa.Table, uri: str) -> dict[str, Any]:
    data = encode_raw_table(table)
    storage.write_bytes(uri, data)
    return {"rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _read_source(uri: str, entry: dict[str, Any] | None) -> tuple[pa.Table, int]:
    """The source table and its size in bytes; a checksum differing from the manifest raises."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise S.ShardError(uri, None, None, "shard listed in manifest.json is missing") from None
    if entry and "sha256" in entry and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise S.ShardError(uri, None, None, "checksum differs from manifest.json (changed or truncated)")
    try:
        return pq.read_table(pa.BufferReader(data)), len(data)
    except (pa.ArrowException, OSError) as e:
        raise S.ShardError(uri, None, None, f"not a readable Parquet file (truncated or corrupt): {e}") from None


def pack_shard(src_uri: str, dst_uri: str, *, image_size: int, num_points: int, on_bad_row: str = "error",
               entry: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pack one shard file (a self-contained unit, e.g. one Ray task per file).

    Returns its manifest entry (``rows``, ``bytes``, ``sha256``) plus ``src_bytes`` and ``skipped``
    (records of dropped rows). ``entry``: the source's manifest entry, to check its checksum."""
    table, src_bytes = _read_source(src_uri, entry)
    raw, skipped = pack_table(src_uri, table, image_size=image_size, num_points=num_points, on_bad_row=on_bad_row)
    out = _write(raw, dst_uri)
    out.update(src_bytes=src_bytes, skipped=skipped)
    return out


def _same_root(a: str, b: str) -> bool:
    if storage.is_remote(a) or storage.is_remote(b):
        return a.rstrip("/") == b.rstrip("/")
    return os.path.realpath(storage.local_path(a) or a) == os.path.realpath(storage.local_path(b) or b)


def _recut(tables: Iterator[pa.Table], rows: int) -> Iterator[pa.Table]:
    """Tables of exactly ``rows`` rows (the last one shorter) from a stream of tables."""
    buf: list[pa.Table] = []
    have = 0
    for t in tables:
        buf.append(t)
        have += t.num_rows
        while have >= rows:
            all_ = pa.concat_tables(buf)
            yield all_.slice(0, rows)
            rest = all_.slice(rows)
            buf, have = [rest], rest.num_rows
    if have:
        yield pa.concat_tables(buf)


def pack(src_root: str, dst_root: str, *, on_bad_row: str = "error", rows_per_shard: int | None = None) -> dict:
    """Write the raw form of the shard root ``src_root`` (folder or ``s3://``) to ``dst_root``.

    Every row is checked once (image decodes to image_size x image_size RGB; label not null and
    >= 0; yaw/pitch in range or null; points, when not null, finite with 3 * the manifest's
    num_points values). A bad row raises :class:`shards.ShardError` naming the source file, the row
    and the field (``on_bad_row="error"``) or is dropped and counted (``"skip"``).

    ``rows_per_shard``: None keeps the source's files (same names, one output file per input file,
    possibly with fewer rows); a number re-cuts each split into ``part-NNNNN.parquet`` files of that
    many rows. Returns a summary: per split ``rows``, ``skipped``, ``shards``, ``bytes_before``,
    ``bytes_after``; the totals; ``skipped_rows`` (records with ``split``, ``file``, ``row``,
    ``field``, ``reason``); ``manifest`` (what was written).
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row {on_bad_row!r}: one of {ON_BAD_ROW}")
    if rows_per_shard is not None and rows_per_shard <= 0:
        raise ValueError(f"rows_per_shard must be > 0, got {rows_per_shard}")
    if _same_root(src_root, dst_root):
        raise ValueError(f"pack: source and destination are the same root ({src_root}); write to another one")
    t0 = time.perf_counter()
    man = S.read_manifest(src_root)
    man_uri = storage.join(src_root, MANIFEST_NAME)
    if S.image_format(man, src_root) != S.IMAGE_FORMAT_ENCODED:
        raise S.ShardError(man_uri, None, "image_format", f"already {S.image_format(man)}: nothing to pack")
    image_size, num_points = man.get("image_size"), man.get("num_points")
    if not (isinstance(image_size, int) and image_size > 0):
        raise S.ShardError(man_uri, None, "image_size", f"{image_size!r}: packing needs a positive image size")
    if not isinstance(num_points, int):
        raise S.ShardError(man_uri, None, "num_points", f"{num_points!r}: not an integer")

    out_man = copy.deepcopy(man)
    out_man["image_format"] = S.IMAGE_FORMAT_RAW
    out_man["packed_from"] = src_root
    summary: dict[str, Any] = {"src": src_root, "dst": dst_root, "image_format": S.IMAGE_FORMAT_RAW, "splits": {}}
    skipped_rows: list[dict[str, Any]] = []
    kw = dict(image_size=image_size, num_points=num_points, on_bad_row=on_bad_row)
    for split, info in man["splits"].items():
        entries: list[dict[str, Any]] = []
        before = skipped = 0
        src_entries = list(info.get("shards", []))
        if rows_per_shard is None:
            for e in src_entries:
                r = pack_shard(storage.join(src_root, e["path"]), storage.join(dst_root, e["path"]), entry=e, **kw)
                before += r["src_bytes"]
                skipped += len(r["skipped"])
                skipped_rows += [{"split": split, **s} for s in r["skipped"]]
                entries.append({**e, "rows": r["rows"], "bytes": r["bytes"], "sha256": r["sha256"]})
        else:
            def tables() -> Iterator[pa.Table]:
                nonlocal before, skipped
                for e in src_entries:
                    uri = storage.join(src_root, e["path"])
                    table, size = _read_source(uri, e)
                    raw, sk = pack_table(uri, table, **kw)
                    before += size
                    skipped += len(sk)
                    skipped_rows.extend({"split": split, **s} for s in sk)
                    yield raw

            for k, t in enumerate(_recut(tables(), rows_per_shard)):
                rel = f"{split}/{S.shard_name(k)}"
                entries.append({"path": rel, **_write(t, storage.join(dst_root, rel))})
        rows = sum(e["rows"] for e in entries)
        out_man["splits"][split] = {**info, "rows": rows, "shards": entries}
        summary["splits"][split] = {"rows": rows, "skipped": skipped, "shards": len(entries),
                                    "bytes_before": before, "bytes_after": sum(e["bytes"] for e in entries)}
    S.write_manifest(dst_root, out_man)
    for key in ("rows", "skipped", "bytes_before", "bytes_after"):
        summary[key] = sum(s[key] for s in summary["splits"].values())
    summary["skipped_rows"] = skipped_rows
    summary["seconds"] = time.perf_counter() - t0
    summary["manifest"] = out_man
    return summary
