"""One place that turns a URI into a filesystem.

Accepted forms: a plain path (``out/shards``), ``file:///abs/path`` and ``s3://bucket/prefix``.
For S3 the endpoint comes from ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), credentials and
region from the usual AWS variables; nothing is configured in code. Requests are retried on
transient errors and bounded by connect/request timeouts, so a wrong endpoint fails with a clear
message instead of hanging.

S3 failures name their cause (:func:`with_retries`, :func:`exists`, :func:`list_files`): an endpoint
that cannot be reached (:class:`S3EndpointError`), credentials the server rejects
(:class:`S3CredentialsError`) and a bucket that does not exist (:class:`S3BucketError`); the last
two are never retried. A HEAD request's 403 has no body, so it cannot say which credential check
failed, and a 404 cannot say whether the key or the bucket is missing: in both cases one listing
of an empty prefix of the bucket (whose errors carry the S3 error code) tells them apart.

Writes are atomic: a local file is written under a temporary name and renamed; an S3 object only
becomes visible when its upload completes, so a crashed writer never leaves a half file that a
later reader mistakes for a finished one.
"""

from __future__ import annotations

import os
import posixpath
import re
import threading
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

    #: which S3 failure this is, for callers that branch on it: "endpoint", "credentials",
    #: "bucket", or None (any other failure)
    cause: str | None = None


class S3EndpointError(StorageError):
    """The S3 endpoint cannot be reached: nothing listening, unknown host, connect timeout, TLS."""

    cause = "endpoint"


class S3CredentialsError(StorageError):
    """The S3 server rejected the request's credentials (unknown key, wrong secret, expired
    token) or denied the key access."""

    cause = "credentials"


class S3BucketError(StorageError):
    """The bucket of an S3 URI does not exist."""

    cause = "bucket"


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


# --------------------------------------------------------------------------------------------
# S3 failures by cause
# --------------------------------------------------------------------------------------------

#: S3 error codes (normalised: lower case, no underscores, as pyarrow's ``AWS Error
#: INVALID_ACCESS_KEY_ID`` and botocore's ``(InvalidAccessKeyId)`` both become
#: ``invalidaccesskeyid``) that mean the server rejected the credentials, with their S3 spelling
_CREDENTIAL_CODES = {c.lower(): c for c in (
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "InvalidClientTokenId", "UnrecognizedClient", "MissingAuthenticationToken", "AuthorizationHeaderMalformed",
    "InvalidSecurity", "RequestTimeTooSkewed", "AccessDenied", "AllAccessDisabled",
)}
_TOKEN_CODES = {"invalidtoken", "expiredtoken", "tokenrefreshrequired"}

#: buckets seen to exist, per endpoint: a missing key there needs no second look at its bucket
_BUCKETS_SEEN: set[tuple[str, str]] = set()
_BUCKETS_LOCK = threading.Lock()


def _endpoint_text() -> str:
    return s3_endpoint() or "the AWS default endpoint (AWS_ENDPOINT_URL not set)"


def _bucket(uri: str) -> str:
    return uri[len("s3://"):].split("/", 1)[0]


def _aws_code(text: str) -> str | None:
    """The S3 error code in an error text (pyarrow's or botocore's), normalised, or None."""
    m = re.search(r"AWS Error ([A-Z_]+)", text) or re.search(r"\(([A-Za-z]+)\) when calling", text)
    return m.group(1).replace("_", "").lower() if m else None


def _unreachable_detail(text: str) -> str | None:
    """Why a request did not reach the S3 server (unknown host, connection refused, connect
    timeout, TLS), from curl's or the OS's wording; None when it did reach it (or the text does
    not say: a connection reset mid-transfer is left to the transient-error retries)."""
    t = text.lower()
    if any(s in t for s in ("curlcode: 6,", "could not resolve", "name or service not known",
                            "nodename nor servname", "temporary failure in name resolution")):
        return "host name not found"
    connect_failed = any(s in t for s in ("curlcode: 7,", "could not connect", "failed to connect"))
    timeout = any(s in t for s in ("timed out", "timeout was reached", "curlcode: 28,"))
    if "connection timed out" in t or "connect timeout" in t or (connect_failed and timeout):
        return "connection timed out"
    if connect_failed or "connection refused" in t:
        return "connection refused"
    if any(s in t for s in ("curlcode: 35,", "curlcode: 60,", "ssl connect error", "ssl certificate")):
        return "TLS handshake failed; is the scheme (http:// or https://) right?"
    return None


def _forbidden_without_code(text: str) -> bool:
    """A 403 whose response had no body (HEAD requests): which credential check failed is unknown."""
    code = _aws_code(text)
    return (code == "accessdenied" and "no response body" in text.lower()) or \
        (code == "unknown" and "http status 403" in text.lower())


def _credentials_error(uri: str, code: str) -> S3CredentialsError:
    name = _CREDENTIAL_CODES.get(code, code)
    keys = "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    if code in _TOKEN_CODES or os.environ.get("AWS_SESSION_TOKEN"):
        keys += "/AWS_SESSION_TOKEN"
    unset = "" if os.environ.get("AWS_ACCESS_KEY_ID") else " (not set: the AWS default credential chain was used)"
    if code in ("accessdenied", "allaccessdisabled"):
        return S3CredentialsError(
            f"{uri}: S3 request failed: the S3 server denied access with these credentials ({name}); "
            f"check {keys}{unset} and that they may access bucket '{_bucket(uri)}'")
    return S3CredentialsError(
        f"{uri}: S3 request failed: the S3 server rejected the credentials ({name}); check {keys}{unset}")


def _bucket_error(uri: str) -> S3BucketError:
    return S3BucketError(f"{uri}: S3 request failed: bucket '{_bucket(uri)}' does not exist "
                         f"(S3 endpoint {_endpoint_text()})")


def _classify(uri: str, err: BaseException, probe: bool = True) -> StorageError | None:
    """The cause of an S3 failure as a :class:`StorageError` subclass, or None when the error is
    not one of the three (endpoint, credentials, bucket). A 403 without a body is looked into with
    :func:`_probe_bucket` (when ``probe``)."""
    if not is_remote(uri) or isinstance(err, FileNotFoundError):
        return None
    text = str(err)
    code = _aws_code(text)
    detail = _unreachable_detail(text)
    if detail is not None:
        return S3EndpointError(f"{uri}: S3 request failed: cannot reach the S3 endpoint {_endpoint_text()} "
                               f"({detail}); check AWS_ENDPOINT_URL")
    if code == "nosuchbucket":
        return _bucket_error(uri)
    if _forbidden_without_code(text):
        found = _probe_bucket(uri, cached=False) if probe else None
        return found if found is not None else _credentials_error(uri, "accessdenied")
    if code in _CREDENTIAL_CODES:
        return _credentials_error(uri, code)
    return None


def _probe_bucket(uri: str, cached: bool = True) -> StorageError | None:
    """List an empty prefix of the URI's bucket once: a listing's error carries the S3 error code
    (a HEAD's does not). Returns the cause it finds, or None when the bucket exists and the
    credentials are accepted. With ``cached``, a bucket seen before is taken to exist (the
    question after a not-found answer); without, the request is made (the question after a 403:
    the credentials may have changed since)."""
    bucket = _bucket(uri)
    key = (s3_endpoint() or "", bucket)
    if cached and key in _BUCKETS_SEEN:
        return None
    sel = pafs.FileSelector(f"{bucket}/.posefr-probe-{uuid.uuid4().hex}", recursive=False, allow_not_found=False)
    try:
        _s3_filesystem().get_file_info(sel)
    except FileNotFoundError:
        pass  # the (empty) prefix is missing: the bucket is there and the listing was allowed
    except OSError as e:
        return _classify(uri, e, probe=False)
    with _BUCKETS_LOCK:
        _BUCKETS_SEEN.add(key)
    return None


def _check_bucket(uri: str) -> None:
    """Raise the cause when ``uri``'s bucket is missing or refuses these credentials; called after
    a not-found answer, which alone cannot tell a missing key from a missing bucket."""
    found = _probe_bucket(uri)
    if found is not None:
        raise found


def _transient(err: Exception) -> bool:
    text = str(err).lower()
    return any(s in text for s in ("timeout", "timed out", "temporarily", "slowdown", "503", "500", "connection reset"))


def with_retries(uri: str, fn: Callable[[], T], attempts: int = S3_MAX_ATTEMPTS) -> T:
    """Run ``fn`` with retries on transient errors; other errors are re-raised explained.

    For S3 URIs an unreachable endpoint, rejected credentials and a missing bucket raise
    :class:`S3EndpointError`, :class:`S3CredentialsError` and :class:`S3BucketError` at once
    (pyarrow's own retry strategy has already retried the connection); a
    ``FileNotFoundError`` whose bucket turns out to be missing becomes :class:`S3BucketError`.
    """
    delay = 0.2
    for i in range(attempts):
        try:
            return fn()
        except FileNotFoundError:
            if is_remote(uri):
                _check_bucket(uri)
            raise
        except (OSError, IOError) as e:
            if isinstance(e, StorageError):
                raise
            known = _classify(uri, e)
            if known is not None:
                raise known from e
            if i + 1 < attempts and _transient(e):
                time.sleep(delay)
                delay *= 2
                continue
            raise _explain(uri, e) from e
    raise AssertionError("unreachable")


def exists(uri: str) -> bool:
    """Whether a file or folder is at ``uri``. On S3 a missing bucket is an error
    (:class:`S3BucketError`), not False."""
    loc = resolve(uri)
    info = with_retries(uri, lambda: loc.fs.get_file_info(loc.path))
    if info.type == pafs.FileType.NotFound:
        if loc.is_s3:
            _check_bucket(uri)
        return False
    return True


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
    """Files directly or recursively under ``uri`` ending with ``suffix``, sorted, as URIs (none
    when nothing is there; on S3 a missing bucket is an error, :class:`S3BucketError`)."""
    loc = resolve(uri)
    sel = pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)
    infos = with_retries(uri, lambda: loc.fs.get_file_info(sel))
    if not infos and loc.is_s3:
        _check_bucket(uri)  # allow_not_found also hides a missing bucket
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
