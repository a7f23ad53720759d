"""Parquet shards and their manifest (format version 1, see DESIGN.md): write, read, validate, inspect.

Layout under a root URI (folder or ``s3://``)::

    <root>/manifest.json
    <root>/train/part-00000.parquet ...
    <root>/val/part-00000.parquet ...
    <root>/test/part-00000.parquet ...

The manifest records the schema version, the generator or source, row counts per split and per
shard, identity counts and a SHA-256 per shard. Every shard is written atomically.

The ``image`` column has one of two forms, named by the manifest's ``image_format``:

* ``encoded`` (no ``image_format`` key): ``binary``, one PNG/JPEG per row;
* ``raw-chw-uint8`` (written by :mod:`posefr_dist.data.pack`): ``fixed_size_binary`` of
  ``3 * image_size * image_size`` bytes, the decoded RGB image in channel-major (CHW) order, so a
  reader does no image decoding (``img_hwc.transpose(2, 0, 1).tobytes()``).

  Why ``fixed_size_binary`` (Parquet FIXED_LEN_BYTE_ARRAY, one value per row) and not
  ``fixed_size_list<uint8>``: Parquet stores a list column with repetition/definition levels for
  every element, i.e. 37,632 of them per 112x112 row, and pyarrow read such a column at only
  ~3,000-4,500 rows/s; the same bytes as ``fixed_size_binary`` read at ~85,000 rows/s. A raw
  cell therefore comes back from Arrow as ``bytes``, like an encoded one: code that handles a
  cell must be told the form (see :func:`image_hwc`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from posefr_dist import storage
from posefr_dist.data.schema import MANIFEST_NAME, SCHEMA_VERSION, SHARD_COLUMNS, SPLITS, shard_schema


class ShardError(ValueError):
    """Bad shard data; the message names the file, the row and the field."""

    def __init__(self, file: str, row: int | str | None, field: str | None, reason: str):
        self.file, self.row, self.field, self.reason = file, row, field, reason
        where = file
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field {field}"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class Problem:
    """One finding of :func:`validate`."""

    file: str
    row: int | None
    field: str | None
    reason: str

    def __str__(self) -> str:
        row = "-" if self.row is None else str(self.row)
        return f"{self.file}\trow {row}\t{self.field or '-'}\t{self.reason}"


#: values of the manifest's ``image_format`` (a manifest without the key is the encoded form)
IMAGE_FORMAT_ENCODED = "encoded"
IMAGE_FORMAT_RAW = "raw-chw-uint8"
IMAGE_FORMATS = (IMAGE_FORMAT_ENCODED, IMAGE_FORMAT_RAW)


def image_format(manifest: Mapping[str, Any], root: str | None = None) -> str:
    """The manifest's image form: ``"encoded"`` (the default) or ``"raw-chw-uint8"``.

    An unknown value raises :class:`ShardError` naming manifest.json (under ``root`` when given)
    and the field ``image_format``."""
    fmt = manifest.get("image_format", IMAGE_FORMAT_ENCODED)
    if fmt not in IMAGE_FORMATS:
        uri = storage.join(root, MANIFEST_NAME) if root else MANIFEST_NAME
        raise ShardError(uri, None, "image_format", f"unknown image format {fmt!r} (expected one of {IMAGE_FORMATS})")
    return fmt


def raw_image_type(image_size: int) -> pa.DataType:
    """Arrow type of the ``image`` column in the raw form: ``fixed_size_binary`` of
    ``3 * image_size**2`` bytes (uint8 pixels, CHW order)."""
    return pa.binary(3 * int(image_size) * int(image_size))


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def encode_table(table: pa.Table) -> bytes:
    """Parquet bytes of ``table``; the same table always gives the same bytes."""
    buf = io.BytesIO()
    # images are already compressed PNG/JPEG: compressing them again costs time for nothing
    pq.write_table(
        table, buf, row_group_size=64, compression={c: ("NONE" if c == "image" else "SNAPPY") for c in table.column_names},
        use_dictionary=["dataset", "expression", "subject_id"], write_statistics=False,
    )
    return buf.getvalue()


def build_table(columns: Mapping[str, Any], num_points: int) -> pa.Table:
    """Arrow table in the shard schema from column lists (``points``: list of arrays or None)."""
    schema = shard_schema(num_points)
    pts = columns["points"]
    n = len(columns["sample_id"])
    if any(p is None for p in pts):
        pts_arr = pa.array([None if p is None else np.asarray(p, np.float32).reshape(-1) for p in pts],
                           type=schema.field("points").type)
    else:
        flat = np.concatenate([np.asarray(p, np.float32).reshape(-1) for p in pts]) if n else np.zeros(0, np.float32)
        pts_arr = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.float32()), 3 * num_points)
    arrays = []
    for f in schema:
        if f.name == "points":
            arrays.append(pts_arr)
        elif f.name == "num_points":
            arrays.append(pa.array(columns.get("num_points", [num_points] * n), pa.int32()))
        else:
            arrays.append(pa.array(columns[f.name], f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_shard(table: pa.Table, uri: str) -> dict[str, Any]:
    """Write one shard atomically; returns its manifest entry (path filled in by the caller)."""
    data = encode_table(table)
    storage.write_bytes(uri, data)
    return {"rows": table.num_rows, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def write_manifest(root: str, manifest: dict[str, Any]) -> None:
    storage.write_text(storage.join(root, MANIFEST_NAME), json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def make_manifest(generator: dict[str, Any], dataset: str, num_points: int, image_size: int,
                  splits: Mapping[str, Iterable[dict[str, Any]]], identities: Mapping[str, int]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "dataset": dataset,
        "generator": generator,
        "num_points": num_points,
        "image_size": image_size,
        "splits": {},
    }
    for split, shards in splits.items():
        shards = list(shards)
        out["splits"][split] = {
            "rows": sum(s["rows"] for s in shards),
            "identities": int(identities.get(split, 0)),
            "shards": shards,
        }
    return out


def read_manifest(root: str) -> dict[str, Any]:
    uri = storage.join(root, MANIFEST_NAME)
    try:
        text = storage.read_text(uri)
    except FileNotFoundError:
        raise ShardError(uri, None, None, "manifest.json not found: is this a shard root?") from None
    try:
        man = json.loads(text)
    except json.JSONDecodeError as e:
        raise ShardError(uri, None, None, f"invalid JSON: {e}") from None
    if man.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(uri, None, "schema_version",
                         f"unsupported schema version {man.get('schema_version')!r} (expected {SCHEMA_VERSION})")
    if not isinstance(man.get("splits"), dict):
        raise ShardError(uri, None, "splits", "missing or not a mapping")
    image_format(man, root)
    return man


def shard_uris(root: str, split: str, manifest: dict[str, Any] | None = None) -> list[str]:
    man = manifest or read_manifest(root)
    if split not in man["splits"]:
        raise ShardError(storage.join(root, MANIFEST_NAME), None, "splits",
                         f"no split {split!r}; the manifest has {sorted(man['splits'])}")
    return [storage.join(root, s["path"]) for s in man["splits"][split]["shards"]]


def read_shard_bytes(uri: str) -> pa.Table:
    """Read one shard; a truncated or non-Parquet file raises :class:`ShardError` naming it."""
    data = storage.read_bytes(uri)
    try:
        return pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, pa.ArrowException, OSError) as e:
        raise ShardError(uri, None, None, f"not a readable Parquet file (truncated or corrupt): {e}") from None


# --------------------------------------------------------------------------------------------
# Row checks shared by validate() and the streaming pipeline
# --------------------------------------------------------------------------------------------

YAW_RANGE = (-180.0, 180.0)
PITCH_RANGE = (-90.0, 90.0)


def check_points(value: Any, num_points: int | None) -> str | None:
    """Reason the ``points`` value is bad, or None. A null value is allowed (no 3D)."""
    if value is None:
        return None
    arr = np.asarray(value, dtype=np.float32)
    if num_points is None or num_points <= 0:
        return f"num_points is {num_points!r}"
    if arr.size != 3 * num_points:
        return f"has {arr.size} values, expected 3*num_points = {3 * num_points}"
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        return f"{bad} non-finite value(s) (NaN or inf)"
    return None


def check_angle(value: Any, rng: tuple[float, float], nullable: bool) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None if nullable and value is None else "missing or NaN"
    if not (rng[0] <= float(value) <= rng[1]):
        return f"{value} out of range [{rng[0]}, {rng[1]}]"
    return None


def decode_image(data: bytes | None) -> np.ndarray:
    """Decode PNG/JPEG bytes to an RGB uint8 HxWx3 array (raises ValueError on failure)."""
    from PIL import Image, UnidentifiedImageError

    if data is None:
        raise ValueError("missing image")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"image does not decode: {e}") from None


def image_hwc(value: Any, image_size: int | None = None, *, raw: bool = False) -> np.ndarray:
    """RGB uint8 HxWx3 array from an ``image`` cell (raises ValueError when bad).

    ``raw=False`` (the encoded form): ``value`` is PNG/JPEG bytes (or an Arrow binary scalar),
    decoded. ``raw=True`` (``raw-chw-uint8``): ``value`` is ``3 * image_size**2`` CHW uint8 pixels
    as bytes, an Arrow ``fixed_size_binary`` scalar or a uint8 sequence / numpy array, reshaped;
    ``image_size`` is then required. Both forms give ``bytes`` cells, hence the flag."""
    if isinstance(value, pa.Scalar):
        value = value.as_py()
    if value is None:
        raise ValueError("missing image")
    if not raw:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise ValueError(f"encoded image is {type(value).__name__}, expected PNG/JPEG bytes "
                             "(a raw image? pass raw=True)")
        return decode_image(bytes(value))
    if image_size is None:
        raise ValueError("a raw image needs the image size")
    want = 3 * image_size * image_size
    if isinstance(value, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(value, np.uint8)
        if arr.size != want:
            raise ValueError(f"raw image has {arr.size} bytes, expected 3*{image_size}*{image_size} = {want}")
    else:
        arr = np.asarray(value)
        if arr.size != want:
            raise ValueError(f"raw image has {arr.size} values, expected 3*{image_size}*{image_size} = {want}")
    return np.ascontiguousarray(arr.astype(np.uint8, copy=False).reshape(3, image_size, image_size).transpose(1, 2, 0))


# --------------------------------------------------------------------------------------------
# validate / inspect
# --------------------------------------------------------------------------------------------


def _check_schema(uri: str, table: pa.Table, image_format: str = IMAGE_FORMAT_ENCODED,
                  image_size: int | None = None) -> list[Problem]:
    """Column problems of one shard; ``image_format``/``image_size`` (from the manifest) say which
    ``image`` type is expected: ``binary`` (encoded) or ``fixed_size_binary[3*size*size]`` (raw)."""
    problems = []
    names = table.column_names
    for col in SHARD_COLUMNS:
        if col not in names:
            problems.append(Problem(uri, None, col, "missing column"))
    if problems:
        return problems
    n = None
    ptype = table.schema.field("points").type
    if pa.types.is_fixed_size_list(ptype):
        n = ptype.list_size
    expected = shard_schema(max(1, (n or 3) // 3))
    for f in expected:
        got = table.schema.field(f.name).type
        if f.name == "points":
            if not (pa.types.is_fixed_size_list(got) or pa.types.is_list(got) or pa.types.is_large_list(got)):
                problems.append(Problem(uri, None, "points", f"type {got}, expected a list of float32"))
        elif f.name == "image" and image_format == IMAGE_FORMAT_RAW:
            ok = pa.types.is_fixed_size_binary(got)
            if ok and image_size is not None:
                ok = got.byte_width == 3 * image_size * image_size
            if not ok:
                want = (raw_image_type(image_size) if image_size is not None else "fixed_size_binary[3*H*W]")
                old = (" (the fixed_size_list form of an older posefr shards pack: pack the source again)"
                       if pa.types.is_fixed_size_list(got) else "")
                problems.append(Problem(uri, None, "image", f"type {got}, expected {want} (image_format "
                                        f"{IMAGE_FORMAT_RAW}, image_size {image_size} in manifest.json){old}"))
        elif f.name == "image" and got != f.type and (pa.types.is_fixed_size_binary(got)
                                                      or pa.types.is_fixed_size_list(got)):
            problems.append(Problem(uri, None, "image", f"type {got}, expected {f.type} (a raw shard? manifest.json "
                                    f"has image_format {image_format!r})"))
        elif got != f.type:
            problems.append(Problem(uri, None, f.name, f"type {got}, expected {f.type}"))
    return problems


def validate_table(uri: str, table: pa.Table, check_images: bool = True,
                   image_format: str = IMAGE_FORMAT_ENCODED, image_size: int | None = None) -> list[Problem]:
    """Row-level checks of one shard table. ``image_format`` and ``image_size`` come from the
    manifest; raw images are checked for type and nulls (there is nothing to decode)."""
    problems = _check_schema(uri, table, image_format, image_size)
    if problems:
        return problems
    raw = image_format == IMAGE_FORMAT_RAW
    bad_raw: dict[int, str] = _raw_image_nulls(table.column("image")) if raw else {}
    cols = {c: table.column(c).to_pylist() for c in SHARD_COLUMNS if c not in ("image", "points")}
    images = table.column("image")
    points = table.column("points")
    for i in range(table.num_rows):
        for fname in ("sample_id", "subject_id", "label", "dataset"):
            if cols[fname][i] is None:
                problems.append(Problem(uri, i, fname, "null"))
        if cols["label"][i] is not None and cols["label"][i] < 0:
            problems.append(Problem(uri, i, "label", f"negative label {cols['label'][i]}"))
        if raw:
            if i in bad_raw:
                problems.append(Problem(uri, i, "image", bad_raw[i]))
        elif check_images:
            try:
                img = decode_image(images[i].as_py())
                if img.ndim != 3 or img.shape[2] != 3:
                    problems.append(Problem(uri, i, "image", f"not RGB: shape {img.shape}"))
            except ValueError as e:
                problems.append(Problem(uri, i, "image", str(e)))
        for fname, rng in (("yaw_deg", YAW_RANGE), ("pitch_deg", PITCH_RANGE)):
            reason = check_angle(cols[fname][i], rng, nullable=True)
            if reason:
                problems.append(Problem(uri, i, fname, reason))
        p = points[i]
        if p.is_valid:
            reason = check_points(p.values.to_numpy(zero_copy_only=False), cols["num_points"][i])
            if reason:
                problems.append(Problem(uri, i, "points", reason))
    return problems


def _raw_image_nulls(column: pa.ChunkedArray) -> dict[int, str]:
    """Null rows of a raw ``image`` column: {row: "null"} (a ``fixed_size_binary`` value has no
    per-pixel nulls)."""
    out: dict[int, str] = {}
    start = 0
    for chunk in column.chunks:
        if chunk.null_count:
            for j in np.flatnonzero(~np.asarray(chunk.is_valid().to_numpy(zero_copy_only=False), bool)):
                out[start + int(j)] = "null"
        start += len(chunk)
    return out


def validate(root: str, check_images: bool = True) -> tuple[list[Problem], dict[str, Any]]:
    """Check a shard root: manifest, checksums, schema, every row. Returns (problems, summary)."""
    man_uri = storage.join(root, MANIFEST_NAME)
    try:
        man = read_manifest(root)
    except ShardError as e:
        return [Problem(e.file, e.row, e.field, e.reason)], {}
    problems: list[Problem] = []
    summary: dict[str, Any] = {"splits": {}}
    fmt = image_format(man, root)  # read_manifest has rejected unknown values
    image_size = man.get("image_size")
    if fmt == IMAGE_FORMAT_RAW and not (isinstance(image_size, int) and image_size > 0):
        return [Problem(man_uri, None, "image_size",
                        f"{image_size!r}: the {IMAGE_FORMAT_RAW} form needs a positive image_size")], {}
    if not isinstance(image_size, int):
        image_size = None
    summary["image_format"] = fmt
    subjects_by_split: dict[str, set[str]] = {}
    seen_ids: dict[str, str] = {}
    for split, info in sorted(man["splits"].items()):
        label_of: dict[str, int] = {}
        labels: set[int] = set()
        rows = 0
        for entry in info.get("shards", []):
            uri = storage.join(root, entry["path"])
            try:
                data = storage.read_bytes(uri)
            except FileNotFoundError:
                problems.append(Problem(uri, None, None, "shard listed in manifest.json is missing"))
                continue
            if "sha256" in entry and hashlib.sha256(data).hexdigest() != entry["sha256"]:
                problems.append(Problem(uri, None, None, "checksum differs from manifest.json (changed or truncated)"))
            try:
                table = pq.read_table(pa.BufferReader(data))
            except (pa.ArrowException, OSError) as e:
                problems.append(Problem(uri, None, None, f"not a readable Parquet file (truncated or corrupt): {e}"))
                continue
            if table.num_rows != entry.get("rows"):
                problems.append(Problem(uri, None, None,
                                        f"{table.num_rows} rows, manifest.json says {entry.get('rows')}"))
            rows += table.num_rows
            row_problems = validate_table(uri, table, check_images=check_images, image_format=fmt,
                                          image_size=image_size)
            problems.extend(row_problems)
            if any(p.row is None for p in row_problems):
                continue  # schema problems: row checks below would only repeat them
            sids = table.column("sample_id").to_pylist()
            subs = table.column("subject_id").to_pylist()
            labs = table.column("label").to_pylist()
            for i, (sid, sub, lab) in enumerate(zip(sids, subs, labs)):
                if sid in seen_ids:
                    problems.append(Problem(uri, i, "sample_id", f"duplicate of a row in {seen_ids[sid]}"))
                else:
                    seen_ids[sid] = uri
                if sub is None or lab is None:
                    continue
                if label_of.setdefault(sub, lab) != lab:
                    problems.append(Problem(uri, i, "label",
                                            f"subject {sub} has label {lab} here and {label_of[sub]} elsewhere"))
                labels.add(lab)
        if labels and labels != set(range(len(labels))):
            missing = sorted(set(range(max(labels) + 1)) - labels)[:5]
            problems.append(Problem(man_uri, None, "label",
                                    f"split {split}: labels not dense 0..K-1 (missing e.g. {missing})"))
        if len(set(label_of.values())) != len(label_of):
            problems.append(Problem(man_uri, None, "label", f"split {split}: two subjects share a label"))
        if rows != info.get("rows"):
            problems.append(Problem(man_uri, None, "rows", f"split {split}: {rows} rows, manifest says {info.get('rows')}"))
        subjects_by_split[split] = set(label_of)
        summary["splits"][split] = {"rows": rows, "identities": len(label_of), "shards": len(info.get("shards", []))}
    names = sorted(subjects_by_split)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = subjects_by_split[a] & subjects_by_split[b]
            if both:
                problems.append(Problem(man_uri, None, "subject_id",
                                        f"splits {a} and {b} share {len(both)} subject(s), e.g. {sorted(both)[:3]}"))
    return problems, summary


def inspect(root: str, out_png: str | None = None, per_bin: int = 8,
            yaw_edges: tuple[float, ...] = (0, 30, 60, 90)) -> dict[str, Any]:
    """Counts per split and per |yaw| bin; optionally a contact sheet PNG across yaw bins."""
    from PIL import Image

    man = read_manifest(root)
    image_size = man.get("image_size")
    fmt = image_format(man, root)
    summary: dict[str, Any] = {"dataset": man.get("dataset"), "image_format": fmt, "splits": {}}
    edges = list(yaw_edges)
    labels = [f"{int(a)}-{int(b)}" for a, b in zip(edges, edges[1:])] + [f"{int(edges[-1])}+"]
    picks: dict[str, list[np.ndarray]] = {lab: [] for lab in labels}
    for split in sorted(man["splits"]):
        counts = {lab: 0 for lab in labels + ["unknown"]}
        for uri in shard_uris(root, split, man):
            t = read_shard_bytes(uri)
            yaw = t.column("yaw_deg").to_numpy(zero_copy_only=False)
            imgs = t.column("image")
            for i, y in enumerate(yaw):
                if y is None or np.isnan(y):
                    counts["unknown"] += 1
                    continue
                b = int(np.searchsorted(edges, abs(float(y)), side="right") - 1)
                lab = labels[min(b, len(labels) - 1)]
                counts[lab] += 1
                if out_png and len(picks[lab]) < per_bin and (i % 7 == 0):
                    picks[lab].append(image_hwc(imgs[i], image_size, raw=fmt == IMAGE_FORMAT_RAW))
        summary["splits"][split] = {"rows": man["splits"][split]["rows"],
                                    "identities": man["splits"][split].get("identities"), "yaw_bins": counts}
    if out_png:
        size = next((p[0].shape[0] for p in picks.values() if p), 64)
        sheet = np.full((len(labels) * size, per_bin * size, 3), 255, np.uint8)
        for r, lab in enumerate(labels):
            for c, img in enumerate(picks[lab]):
                im = np.asarray(Image.fromarray(img).resize((size, size)))
                sheet[r * size:(r + 1) * size, c * size:(c + 1) * size] = im
        buf = io.BytesIO()
        Image.fromarray(sheet).save(buf, format="PNG")
        storage.write_bytes(out_png, buf.getvalue())
        summary["contact_sheet"] = out_png
        summary["contact_sheet_rows"] = labels
    return summary
