"""One place that turns a URI into a filesystem.

Accepted forms: a plain path (``out/shards``), ``file:///abs/path`` and ``s3://bucket/prefix``.
For S3 the endpoint comes from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), credentials and
region from the usual AWS variables; nothing is configured in code. Requests are retried on
transient errors and bounded by connect/request timeouts, so a wrong endpoint fails with a clear
message instead of hanging.

Writes are atomic: a local file is written under a temporary name and renamed; an S3 object only
becomes visible when its upload completes, so a crashed writer never leaves a half file that a
later reader mistakes for a finished one.
"""

from __future__ import annotations

import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

import pyarrow.fs as pafs

T = TypeVar("T")

#: seconds; a dead endpoint must fail fast, a slow one must still be served
S3_CONNECT_TIMEOUT = float(os.environ.get("POSEFR_S3_CONNECT_TIMEOUT", "5"))
S3_REQUEST_TIMEOUT = float(os.environ.get("POSEFR_S3_REQUEST_TIMEOUT", "30"))
S3_MAX_ATTEMPTS = int(os.environ.get("POSEFR_S3_MAX_ATTEMPTS", "3"))


class StorageError(OSError):
    """An object-storage or filesystem operation failed; the message names the URI and the cause."""


@dataclass(frozen=True)
class Location:
    """A resolved URI: a pyarrow filesystem and the path inside it."""

    fs: pafs.FileSystem
    path: str
    uri: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")


def is_remote(uri: str) -> bool:
    return uri.startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path components onto a URI or path (``/`` separators, no normalisation of ``s3://``)."""
    if is_remote(uri) or uri.startswith("file://"):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _s3_filesystem() -> pafs.S3FileSystem:
    endpoint = s3_endpoint()
    kwargs: dict = dict(
        connect_timeout=S3_CONNECT_TIMEOUT,
        request_timeout=S3_REQUEST_TIMEOUT,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
        region=os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
    )
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        if not host:
            scheme, host = "https", endpoint
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
        if scheme == "http":
            kwargs["allow_bucket_creation"] = True
    key = os.environ.get("AWS_ACCESS_KEY_ID")
    secret = os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"))
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> Location:
    """Resolve ``uri`` to a :class:`Location` (filesystem + path)."""
    if not uri:
        raise StorageError("empty URI")
    if uri.startswith("s3://"):
        path = uri[len("s3://"):].rstrip("/")
        if not path:
            raise StorageError(f"{uri}: no bucket in S3 URI")
        return Location(_s3_filesystem(), path, uri)
    if uri.startswith("file://"):
        path = uri[len("file://"):]
    elif "://" in uri:
        raise StorageError(f"{uri}: unsupported scheme (use a path, file:// or s3://)")
    else:
        path = uri
    return Location(pafs.LocalFileSystem(), os.path.abspath(path), uri)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path)`` for ``uri``: what Ray Data and pyarrow readers take."""
    loc = resolve(uri)
    return loc.fs, loc.path


def _explain(uri: str, err: Exception) -> StorageError:
    msg = str(err)
    if is_remote(uri):
        hint = (
            f" (endpoint {s3_endpoint() or 'AWS default'}; check AWS_ENDPOINT_URL, "
            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and that the bucket exists)"
        )
        return StorageError(f"{uri}: S3 request failed: {msg}{hint}")
    return StorageError(f"{uri}: {msg}")


def _transient(err: Exception) -> bool:
    text = str(err).lower()
    return any(s in text for s in ("timeout", "timed out", "temporarily", "slowdown", "503", "500", "connection reset"))


def with_retries(uri: str, fn: Callable[[], T], attempts: int = S3_MAX_ATTEMPTS) -> T:
    """Run ``fn`` with retries on transient errors; other errors are re-raised explained."""
    delay = 0.2
    for i in range(attempts):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except (OSError, IOError) as e:
            if isinstance(e, StorageError):
                raise
            if i + 1 < attempts and _transient(e):
                time.sleep(delay)
                delay *= 2
                continue
            raise _explain(uri, e) from e
    raise AssertionError("unreachable")


def exists(uri: str) -> bool:
    loc = resolve(uri)
    info = with_retries(uri, lambda: loc.fs.get_file_info(loc.path))
    return info.type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    loc = resolve(uri)

    def _read() -> bytes:
        try:
            with loc.fs.open_input_stream(loc.path) as f:
                return f.read()
        except FileNotFoundError:
            raise
        except OSError as e:
            if "not found" in str(e).lower() or "no such file" in str(e).lower():
                raise FileNotFoundError(f"{uri}: no such file") from e
            raise

    return with_retries(uri, _read)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def makedirs(uri: str) -> None:
    loc = resolve(uri)
    if loc.is_s3:
        return  # S3 has no directories; prefixes appear with their objects
    with_retries(uri, lambda: loc.fs.create_dir(loc.path, recursive=True))


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri`` atomically (temp + rename locally; one upload on S3)."""
    loc = resolve(uri)
    if loc.is_s3:
        def _put() -> None:
            with loc.fs.open_output_stream(loc.path) as f:
                f.write(data)
        with_retries(uri, _put)
        return
    parent = os.path.dirname(loc.path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(loc.path)}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, loc.path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Files directly or recursively under ``uri`` ending with ``suffix``, sorted, as URIs."""
    loc = resolve(uri)
    sel = pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)
    infos = with_retries(uri, lambda: loc.fs.get_file_info(sel))
    out = []
    for info in infos:
        if info.type != pafs.FileType.File or not info.path.endswith(suffix):
            continue
        rel = info.path[len(loc.path):].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue  # temp files and hidden metadata
        out.append(join(uri, rel) if rel else uri)
    return sorted(out)


def delete(uri: str) -> None:
    """Remove a file or a whole folder/prefix; missing is fine."""
    loc = resolve(uri)
    info = with_retries(uri, lambda: loc.fs.get_file_info(loc.path))
    if info.type == pafs.FileType.NotFound:
        if loc.is_s3:  # a prefix without a marker object
            for f in list_files(uri):
                sub = resolve(f)
                with_retries(f, lambda sub=sub: sub.fs.delete_file(sub.path))
        return
    if info.type == pafs.FileType.Directory:
        with_retries(uri, lambda: loc.fs.delete_dir(loc.path))
    else:
        with_retries(uri, lambda: loc.fs.delete_file(loc.path))


def local_path(uri: str) -> str | None:
    """The local filesystem path of ``uri``, or None for remote URIs."""
    loc = resolve(uri)
    return None if loc.is_s3 else loc.path


def upload_dir(local_dir: str, uri: str, last: Iterable[str] = ()) -> None:
    """Copy a local folder's files to ``uri`` (each file written atomically); the relative paths in
    ``last`` are written after all others (a marker that says the folder is complete)."""
    final = set(last)
    rels = sorted(os.path.relpath(os.path.join(root, name), local_dir).replace(os.sep, "/")
                  for root, _, files in os.walk(local_dir) for name in files)
    for rel in sorted(rels, key=lambda r: r in final):
        with open(os.path.join(local_dir, rel), "rb") as f:
            write_bytes(join(uri, rel), f.read())


def download_dir(uri: str, local_dir: str) -> str:
    """Copy the files under ``uri`` into ``local_dir``; returns ``local_dir``."""
    prefix = uri.rstrip("/")
    for f in list_files(uri):
        rel = f[len(prefix):].lstrip("/")
        dst = os.path.join(local_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, "wb") as out:
            out.write(read_bytes(f))
    return local_dir
