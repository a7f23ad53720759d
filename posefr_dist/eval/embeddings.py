"""Reading and validating embeddings tables (the output of ``posefr embed``).

Columns (``posefr_dist.data.schema.embedding_schema``): ``sample_id``, ``subject_id``, ``yaw_deg``,
``enrollment``, ``embedding``. A source is a ``pyarrow.Table``, one Parquet file, or a folder of
Parquet files (read recursively, sorted; names starting with ``.`` or ``_`` are skipped), as a
local path, ``file://`` or ``s3://`` URI.

Bad input stops with an :class:`EmbeddingsError` naming the file, the row (0-based, within that
file) and the field: a missing column, a wrong type, a null ``sample_id``/``subject_id``/
``enrollment``/``embedding``, embeddings of unequal length, NaN/inf or an all-zero embedding, a
NaN/inf yaw (an unknown pose is written as null), a duplicated ``sample_id``. Nothing is dropped.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from posefr_dist.data.schema import EMBEDDING_COLUMNS


class EmbeddingsError(ValueError):
    """An embeddings table is malformed; the message names the file, row and field."""


@dataclass
class EmbeddingSet:
    """Validated embeddings as arrays."""

    #: (n, D) float32, rows L2-normalised
    emb: np.ndarray
    #: dense subject code per row (int64); equal codes = equal subject_id
    codes: np.ndarray
    #: |yaw| is binned; NaN = unknown pose (null in the table)
    yaw: np.ndarray
    enrollment: np.ndarray
    #: where the rows came from (for messages and the report)
    source: str

    @property
    def dim(self) -> int:
        return int(self.emb.shape[1])

    def __len__(self) -> int:
        return int(self.emb.shape[0])


def _err(name: str, msg: str, row: int | None = None, field: str | None = None) -> EmbeddingsError:
    where = name
    if row is not None:
        where += f": row {row}"
    if field is not None:
        where += f": field '{field}'"
    return EmbeddingsError(f"{where}: {msg}")


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def normalise_rows(x: np.ndarray, rows_per_step: int = 1 << 16) -> np.ndarray:
    """L2-normalise rows in float64, stored as float32 (in steps, to bound memory)."""
    out = np.empty(x.shape, dtype=np.float32)
    for i in range(0, x.shape[0], rows_per_step):
        part = np.asarray(x[i:i + rows_per_step], dtype=np.float64)
        out[i:i + rows_per_step] = part / np.linalg.norm(part, axis=1, keepdims=True)
    return out


def _check_embedding_values(flat: np.ndarray, dim: int, name: str, row_offset: int = 0) -> np.ndarray:
    """(n, D) view of ``flat``; raises on NaN/inf or a zero row."""
    emb = flat.reshape(-1, dim)
    bad = ~np.isfinite(emb)
    if bad.any():
        pos = _first(bad.ravel())
        r, j = divmod(pos, dim)
        raise _err(name, f"value {float(emb[r, j])!r} at index {j} (NaN and inf are not allowed)",
                   row_offset + r, "embedding")
    zero = ~np.any(emb != 0, axis=1)
    if zero.any():
        raise _err(name, "all-zero embedding (cosine similarity undefined)",
                   row_offset + _first(zero), "embedding")
    return emb


def _table_arrays(table: pa.Table, name: str, dim: int | None) -> tuple:
    """Validate one table; returns (emb float (n, D) unnormalised, yaw, enrollment, sample_id
    and subject_id as pyarrow arrays)."""
    missing = [c for c in EMBEDDING_COLUMNS if c not in table.column_names]
    if missing:
        raise _err(name, f"missing column(s) {missing}; an embeddings table has {list(EMBEDDING_COLUMNS)}")
    cols = {c: table.column(c).combine_chunks() for c in EMBEDDING_COLUMNS}

    for c in ("sample_id", "subject_id"):
        t = cols[c].type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
            raise _err(name, f"type {t}, expected string", field=c)
    if not pa.types.is_boolean(cols["enrollment"].type):
        raise _err(name, f"type {cols['enrollment'].type}, expected bool", field="enrollment")
    yt = cols["yaw_deg"].type
    if not (pa.types.is_floating(yt) or pa.types.is_integer(yt) or pa.types.is_null(yt)):
        raise _err(name, f"type {yt}, expected float32", field="yaw_deg")
    et = cols["embedding"].type
    if not (pa.types.is_fixed_size_list(et) or pa.types.is_list(et) or pa.types.is_large_list(et)) \
            or not pa.types.is_floating(et.value_type):
        raise _err(name, f"type {et}, expected fixed_size_list<float32>[D]", field="embedding")

    for c in ("sample_id", "subject_id", "enrollment", "embedding"):
        if cols[c].null_count:
            raise _err(name, "null", _first(cols[c].is_null().to_numpy(zero_copy_only=False)), c)

    e = cols["embedding"]
    n = len(e)
    lengths = pc.list_value_length(e).to_numpy(zero_copy_only=False).astype(np.int64) if n else np.zeros(0, np.int64)
    if n:
        d0 = int(lengths[0]) if dim is None else dim
        wrong = lengths != d0
        if wrong.any():
            r = _first(wrong)
            first = "the first row's length" if dim is None else "the dimension of the files before"
            raise _err(name, f"{int(lengths[r])} values, expected {d0} ({first})", r, "embedding")
        if d0 == 0:
            raise _err(name, "empty embedding", 0, "embedding")
        dim = d0
    flat_arr = e.flatten()
    if flat_arr.null_count:
        pos = _first(flat_arr.is_null().to_numpy(zero_copy_only=False))
        raise _err(name, f"null value at index {pos % dim}", pos // dim, "embedding")
    flat = flat_arr.to_numpy(zero_copy_only=False)
    emb = _check_embedding_values(flat, dim, name) if n else np.zeros((0, dim or 0), np.float32)

    yaw_col = cols["yaw_deg"]
    yaw = np.asarray(yaw_col.cast(pa.float64()).fill_null(np.nan).to_numpy(zero_copy_only=False)
                     if not pa.types.is_null(yt) else np.full(n, np.nan), dtype=np.float64)
    bad_yaw = np.isinf(yaw) | (np.isnan(yaw) & ~yaw_col.is_null().to_numpy(zero_copy_only=False))
    if bad_yaw.any():
        r = _first(bad_yaw)
        raise _err(name, f"{float(yaw[r])!r} (write null for an unknown pose)", r, "yaw_deg")
    enrollment = cols["enrollment"].to_numpy(zero_copy_only=False).astype(bool)
    return emb, yaw, enrollment, cols["sample_id"], cols["subject_id"]


def _encode(values: pa.Array) -> np.ndarray:
    enc = pc.dictionary_encode(values)
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def _check_unique(sample_ids: pa.Array, names: Sequence[tuple[str, int]]) -> None:
    """Duplicated sample_id -> error naming both places (names: (file, rows) per part)."""
    codes = _encode(sample_ids)
    counts = np.bincount(codes)
    if counts.size and counts.max() > 1:
        dup = int(np.argmax(counts > 1))
        rows = np.flatnonzero(codes == dup)[:2]
        where = []
        for r in rows:
            for file, size in names:
                if r < size:
                    where.append(f"{file} row {r}")
                    break
                r -= size
        raise EmbeddingsError(f"duplicate sample_id {sample_ids[int(rows[0])].as_py()!r} at "
                              f"{' and '.join(where)}; field 'sample_id' must be unique")


def _list_parquet(uri: str):
    """(filesystem, [(display name, path)]) for a file or folder URI."""
    import pyarrow.fs as pafs

    if uri.startswith(("s3://", "file://")):
        from posefr_dist import storage

        fs, path = storage.filesystem(uri)
    else:
        fs, path = pafs.LocalFileSystem(), os.path.abspath(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise EmbeddingsError(f"{uri}: no such file or folder")
    if info.type == pafs.FileType.File:
        return fs, [(uri, path)]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    files = []
    for i in infos:
        rel = i.path[len(path):].lstrip("/")
        if i.type != pafs.FileType.File or not rel.endswith(".parquet"):
            continue
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        files.append((posixpath.join(uri.rstrip("/"), rel), i.path))
    if not files:
        raise EmbeddingsError(f"{uri}: no Parquet files in this folder")
    return fs, sorted(files)


def _read_parquet(fs, path: str, name: str) -> pa.Table:
    import pyarrow.parquet as pq

    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            have = pf.schema_arrow.names
            missing = [c for c in EMBEDDING_COLUMNS if c not in have]
            if missing:
                raise _err(name, f"missing column(s) {missing}; an embeddings table has {list(EMBEDDING_COLUMNS)}")
            return pf.read(columns=list(EMBEDDING_COLUMNS))
    except EmbeddingsError:
        raise
    except (OSError, pa.ArrowInvalid) as e:
        raise EmbeddingsError(f"{name}: cannot read as Parquet: {e}") from e


def load_embeddings(source: pa.Table | str | os.PathLike, name: str | None = None) -> EmbeddingSet:
    """Read and validate embeddings from a table, a Parquet file or a folder of them.

    Raises:
        EmbeddingsError: malformed input (the message names file, row and field), or no gallery
            rows (``enrollment = true``) or no probe rows.
    """
    if isinstance(source, pa.Table):
        parts = [(name or "<table>", source)]
        uri = name or "<table>"
    else:
        uri = os.fspath(source)
        fs, files = _list_parquet(uri)
        parts = ((n, _read_parquet(fs, p, n)) for n, p in files)

    embs, yaws, enrolls, samples, subjects, sizes = [], [], [], [], [], []
    dim = None
    for part_name, table in parts:
        emb, yaw, enr, sid, subj = _table_arrays(table, part_name, dim)
        if len(yaw):
            dim = emb.shape[1]
            embs.append(emb)
            yaws.append(yaw)
            enrolls.append(enr)
            samples.append(sid)
            subjects.append(subj)
        sizes.append((part_name, len(yaw)))
    if not embs:
        raise EmbeddingsError(f"{uri}: no rows")
    _check_unique(pa.concat_arrays([s.cast(pa.large_string()) for s in samples]),
                  [s for s in sizes if s[1]])
    enrollment = np.concatenate(enrolls)
    emb = normalise_rows(np.concatenate(embs) if len(embs) > 1 else embs[0])
    out = EmbeddingSet(
        emb=emb,
        codes=_encode(pa.concat_arrays([s.cast(pa.large_string()) for s in subjects])),
        yaw=np.concatenate(yaws),
        enrollment=enrollment,
        source=uri,
    )
    check_split(out)
    return out


def check_split(es: EmbeddingSet) -> None:
    if not es.enrollment.any():
        raise EmbeddingsError(f"{es.source}: no gallery rows (enrollment = true); verification needs a gallery")
    if es.enrollment.all():
        raise EmbeddingsError(f"{es.source}: no probe rows (enrollment = false); every row is in the gallery")


def from_arrays(emb, subject_ids, yaw, enrollment, name: str = "<arrays>") -> EmbeddingSet:
    """Validate in-memory arrays (``yaw`` NaN or None = unknown pose, as arrays have no null)."""
    e = np.asarray(emb)
    if e.ndim != 2 or e.shape[0] == 0 or e.shape[1] == 0:
        raise _err(name, f"shape {e.shape}, expected (rows, dim) with rows, dim > 0", field="embedding")
    if not np.issubdtype(e.dtype, np.floating):
        e = e.astype(np.float32)
    n = e.shape[0]
    subj = np.asarray(subject_ids, dtype=object) if not isinstance(subject_ids, np.ndarray) else subject_ids
    if subj.shape != (n,):
        raise _err(name, f"{subj.shape[0] if subj.ndim else 0} values for {n} embeddings", field="subject_id")
    if subj.dtype == object:
        nulls = np.array([v is None or (isinstance(v, float) and v != v) for v in subj], dtype=bool)
        if nulls.any():
            raise _err(name, "null", _first(nulls), "subject_id")
    if yaw is None:
        y = np.full(n, np.nan)
    else:
        y = np.asarray([np.nan if v is None else v for v in yaw] if not isinstance(yaw, np.ndarray) else yaw,
                       dtype=np.float64)
    if y.shape != (n,):
        raise _err(name, f"{y.size} values for {n} embeddings", field="yaw_deg")
    if np.isinf(y).any():
        raise _err(name, f"{float(y[_first(np.isinf(y))])!r}", _first(np.isinf(y)), "yaw_deg")
    enr = np.asarray(enrollment)
    if enr.shape != (n,) or enr.dtype != bool:
        raise _err(name, f"expected {n} bools, got shape {enr.shape} dtype {enr.dtype}", field="enrollment")
    _check_embedding_values(e.reshape(-1), e.shape[1], name)
    _, codes = np.unique(subj, return_inverse=True)
    out = EmbeddingSet(normalise_rows(e), codes.astype(np.int64).ravel(), y, enr, name)
    check_split(out)
    return out
