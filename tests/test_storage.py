import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posefr_dist import storage
from tests.conftest import free_port, stop_process, wait_for_port


def test_local_roundtrip_atomic(tmp_path):
    uri = str(tmp_path / "a" / "b.txt")
    storage.write_text(uri, "hello")
    assert storage.read_text(uri) == "hello"
    assert storage.exists(uri)
    # no temp files left behind
    assert os.listdir(tmp_path / "a") == ["b.txt"]
    assert storage.list_files(str(tmp_path)) == [uri]
    storage.delete(str(tmp_path / "a"))
    assert not storage.exists(uri)


def test_file_scheme(tmp_path):
    uri = f"file://{tmp_path}/x.bin"
    storage.write_bytes(uri, b"\x00\x01")
    assert storage.read_bytes(uri) == b"\x00\x01"
    assert storage.local_path(uri) == str(tmp_path / "x.bin")


def test_unknown_scheme():
    with pytest.raises(storage.StorageError, match="unsupported scheme"):
        storage.resolve("gs://bucket/x")


def test_s3_roundtrip(s3_uri):
    storage.write_text(storage.join(s3_uri, "d/one.txt"), "1")
    storage.write_text(storage.join(s3_uri, "d/two.txt"), "2")
    files = storage.list_files(s3_uri)
    assert files == [storage.join(s3_uri, "d/one.txt"), storage.join(s3_uri, "d/two.txt")]
    assert storage.read_text(files[1]) == "2"
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(s3_uri, "missing"))
    storage.delete(s3_uri)
    assert storage.list_files(s3_uri) == []


def test_s3_wrong_endpoint_fails_fast(s3_server, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    t0 = time.monotonic()
    with pytest.raises(storage.S3EndpointError,
                       match=re.escape(f"cannot reach the S3 endpoint {endpoint} (connection refused); "
                                       "check AWS_ENDPOINT_URL")):
        storage.read_bytes(f"s3://{s3_server['bucket']}/x")
    assert time.monotonic() - t0 < 60  # a bound against hanging, not a timing target


# --------------------------------------------------------------------------------------------
# S3 failures that tell their causes apart, against a moto server that enforces authentication
# --------------------------------------------------------------------------------------------

AUTH_BUCKET = "posefr-auth"
MISSING_BUCKET = "posefr-nowhere"
TEXT_KEY = "data/hello.txt"
TABLE_KEY = "data/table.parquet"
#: IAM actions the fixture makes before authentication starts (create_user, put_user_policy,
#: create_access_key); moto authenticates every request after the first this many
SETUP_ACTIONS = 3


def _parquet_bytes() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]}), buf, row_group_size=2)
    return buf.getvalue()


@pytest.fixture(scope="module")
def auth_s3():
    """A second moto server that checks every request's signature against the access keys of
    the IAM users it knows (``INITIAL_NO_AUTH_ACTION_COUNT``: only the first SETUP_ACTIONS
    requests go unchecked; they create the user and its key). One bucket with a text file and
    a Parquet file, written with that key."""
    import boto3

    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(SETUP_ACTIONS))
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=60)
        endpoint = f"http://127.0.0.1:{port}"
        anon = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup",
                    aws_secret_access_key="setup")
        iam = boto3.client("iam", **anon)
        iam.create_user(UserName="posefr-test")
        iam.put_user_policy(UserName="posefr-test", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        k = iam.create_access_key(UserName="posefr-test")["AccessKey"]
        key, secret = k["AccessKeyId"], k["SecretAccessKey"]
        # authentication is on from here: the setup key is refused, the user's key accepted
        with pytest.raises(Exception, match="InvalidAccessKeyId"):
            boto3.client("s3", **anon).list_buckets()
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key,
                          aws_secret_access_key=secret)
        s3.create_bucket(Bucket=AUTH_BUCKET)
        s3.put_object(Bucket=AUTH_BUCKET, Key=TEXT_KEY, Body=b"hello")
        s3.put_object(Bucket=AUTH_BUCKET, Key=TABLE_KEY, Body=_parquet_bytes())
        yield {"endpoint": endpoint, "port": port, "key": key, "secret": secret}
    finally:
        stop_process(proc)


@pytest.fixture
def auth_env(auth_s3, monkeypatch):
    """The AWS variables point at the authenticating server with the user's valid key."""
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", auth_s3["endpoint"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", auth_s3["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", auth_s3["secret"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return auth_s3


def _parquet_file(uri: str):
    """What posefr_dist.data.decode does to open a shard."""
    fs, path = storage.filesystem(uri)
    return storage.with_retries(uri, lambda: pq.ParquetFile(fs.open_input_file(path)))


def _parquet_metadata(uri: str):
    """What posefr_dist.data.plan / pipeline do to read a shard's footer."""
    fs, path = storage.filesystem(uri)
    return storage.with_retries(uri, lambda: pq.read_metadata(path, filesystem=fs))


#: the storage calls under test, by name: (call, the key it is given in the bucket)
READS = {
    "read_bytes": (storage.read_bytes, TEXT_KEY),
    "read_text": (storage.read_text, TEXT_KEY),
    "exists": (storage.exists, TEXT_KEY),
    "list_files": (storage.list_files, "data"),
    "parquet_file": (_parquet_file, TABLE_KEY),
    "parquet_metadata": (_parquet_metadata, TABLE_KEY),
    "write_text": (lambda uri: storage.write_text(uri, "x"), "data/new.txt"),
}


def test_s3_auth_server_serves_valid_credentials(auth_env):
    base = f"s3://{AUTH_BUCKET}"
    assert storage.read_text(f"{base}/{TEXT_KEY}") == "hello"
    assert storage.exists(f"{base}/{TEXT_KEY}") and not storage.exists(f"{base}/data/missing.txt")
    assert storage.list_files(f"{base}/data") == [f"{base}/{TEXT_KEY}", f"{base}/{TABLE_KEY}"]
    pf = _parquet_file(f"{base}/{TABLE_KEY}")
    assert pf.metadata.num_row_groups == 2
    assert pf.read_row_groups([1], columns=["b"]).column("b").to_pylist() == ["z"]
    assert _parquet_metadata(f"{base}/{TABLE_KEY}").num_rows == 3
    with pytest.raises(FileNotFoundError):  # a missing key in a bucket that exists stays a missing file
        storage.read_bytes(f"{base}/data/missing.txt")
    storage.write_text(f"{base}/data/new.txt", "x")
    storage.delete(f"{base}/data/new.txt")


@pytest.mark.parametrize("op", list(READS))
@pytest.mark.parametrize("var,value,code", [
    ("AWS_ACCESS_KEY_ID", "AKIANOTAKEY0000000", "InvalidAccessKeyId"),
    ("AWS_SECRET_ACCESS_KEY", "not-the-secret", "SignatureDoesNotMatch"),
])
def test_s3_rejected_credentials_are_named(auth_env, monkeypatch, op, var, value, code):
    monkeypatch.setenv(var, value)
    call, key = READS[op]
    uri = f"s3://{AUTH_BUCKET}/{key}"
    with pytest.raises(storage.S3CredentialsError) as e:
        call(uri)
    assert str(e.value).startswith(f"{uri}: ")
    assert (f"the S3 server rejected the credentials ({code}); "
            "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") in str(e.value)
    assert e.value.cause == "credentials"


@pytest.mark.parametrize("op", list(READS))
def test_s3_missing_bucket_is_named(auth_env, op):
    call, key = READS[op]
    uri = f"s3://{MISSING_BUCKET}/{key}"
    with pytest.raises(storage.S3BucketError) as e:
        call(uri)
    assert str(e.value).startswith(f"{uri}: ")
    assert f"bucket '{MISSING_BUCKET}' does not exist" in str(e.value)
    assert "credentials" not in str(e.value) and "cannot reach" not in str(e.value)
    assert e.value.cause == "bucket"


#: every operation against a closed port; an unknown host through two of them (the wording of the
#: cause comes from one classifier; each case waits out pyarrow's connection retries, ~2 s)
UNREACHABLE = [*[(op, "refused", "connection refused") for op in
                 ("read_bytes", "exists", "list_files", "parquet_file", "write_text")],
               *[(op, "dns", "host name not found") for op in ("read_bytes", "parquet_file")]]


@pytest.mark.parametrize("op,where,detail", UNREACHABLE)
def test_s3_unreachable_endpoint_is_named(auth_env, monkeypatch, op, where, detail):
    endpoint = f"http://127.0.0.1:{free_port()}" if where == "refused" else "http://no-such-host.invalid:9000"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    call, key = READS[op]
    uri = f"s3://{AUTH_BUCKET}/{key}"
    t0 = time.monotonic()
    with pytest.raises(storage.S3EndpointError) as e:
        call(uri)
    assert time.monotonic() - t0 < 60  # a bound against hanging, not a timing target
    assert str(e.value).startswith(f"{uri}: ")
    assert f"cannot reach the S3 endpoint {endpoint} ({detail}); check AWS_ENDPOINT_URL" in str(e.value)
    assert e.value.cause == "endpoint"


def test_s3_three_causes_give_three_messages(auth_env, monkeypatch):
    uri = f"s3://{AUTH_BUCKET}/{TEXT_KEY}"
    messages = {}
    with monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
        with pytest.raises(storage.StorageError) as e:
            storage.read_bytes(uri)
        messages["endpoint"] = str(e.value)
    with monkeypatch.context() as m:
        m.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        with pytest.raises(storage.StorageError) as e:
            storage.read_bytes(uri)
        messages["credentials"] = str(e.value)
    with pytest.raises(storage.StorageError) as e:
        storage.read_bytes(f"s3://{MISSING_BUCKET}/{TEXT_KEY}")
    messages["bucket"] = str(e.value)
    # the message names the cause and only that cause
    marks = {"endpoint": "cannot reach the S3 endpoint", "credentials": "rejected the credentials",
             "bucket": "does not exist"}
    for cause, msg in messages.items():
        assert [c for c, mark in marks.items() if mark in msg] == [cause], msg


@pytest.mark.parametrize("case", ["credentials", "bucket"])
def test_s3_credential_and_bucket_errors_are_not_retried(auth_env, monkeypatch, case):
    if case == "credentials":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAKEY0000000")
        uri = f"s3://{AUTH_BUCKET}/{TEXT_KEY}"
        want = storage.S3CredentialsError
    else:
        uri = f"s3://{MISSING_BUCKET}/{TEXT_KEY}"
        want = storage.S3BucketError
    fs, path = storage.filesystem(uri)
    calls = []

    def write():
        calls.append(1)
        with fs.open_output_stream(path) as f:
            f.write(b"x")

    with pytest.raises(want):
        storage.with_retries(uri, write, attempts=3)
    assert len(calls) == 1


def test_transient_errors_are_still_retried():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise OSError("AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate (503)")
        return "ok"

    assert storage.with_retries("s3://b/k", flaky, attempts=3) == "ok" and len(calls) == 3


@pytest.mark.parametrize("text,cause,mark", [
    # pyarrow's wording for a 403 whose code pyarrow does not know
    ("When getting information for key 'k' in bucket 'b': AWS Error UNKNOWN (HTTP status 403) during "
     "HeadObject operation: No response body.", "credentials", "AccessDenied"),
    # botocore's wording (s3fs, boto3)
    ("An error occurred (InvalidAccessKeyId) when calling the GetObject operation: The AWS Access Key Id "
     "you provided does not exist in our records.", "credentials", "(InvalidAccessKeyId)"),
    ("An error occurred (NoSuchBucket) when calling the ListObjectsV2 operation: The specified bucket does "
     "not exist", "bucket", "bucket 'b' does not exist"),
    ("AWS Error NETWORK_CONNECTION during HeadObject operation: curlCode: 28, Timeout was reached; "
     "Details: Failed to connect to 10.0.0.1 port 9000 after 5000 ms: Timeout was reached", "endpoint",
     "(connection timed out)"),
    ("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 56, Failure when receiving data "
     "from the peer", None, None),  # a reset mid-transfer: transient, not an unreachable endpoint
    ("AWS Error NO_SUCH_KEY during GetObject operation", None, None),
])
def test_s3_error_texts_without_a_server(monkeypatch, text, cause, mark):
    """Wordings the moto server does not produce; the probe a bodiless 403 triggers is stubbed."""
    monkeypatch.setattr(storage, "_probe_bucket", lambda uri, cached=True: None)
    got = storage._classify("s3://b/k", OSError(text))
    if cause is None:
        assert got is None
    else:
        assert got.cause == cause and mark in str(got), str(got)
    assert storage._classify("/local/b/k", OSError(text)) is None  # local paths are never S3 causes


def test_shard_read_names_credential_cause(auth_env, monkeypatch):
    """decode.read_rows (the data pipeline's shard reader) carries the cause in its error."""
    from posefr_dist.data import decode
    from posefr_dist.data.shards import ShardError

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    uri = f"s3://{AUTH_BUCKET}/{TABLE_KEY}"
    decode._FILES.pop(uri, None)  # its per-process cache of open files
    with pytest.raises((ShardError, storage.StorageError),
                       match=re.escape("rejected the credentials (SignatureDoesNotMatch)")):
        decode.read_rows(uri, 0, 2, columns=["a"])


# --------------------------------------------------------------------------------------------
# The credentials reach Ray workers
# --------------------------------------------------------------------------------------------


def _read_in_task(uri: str) -> str:
    from posefr_dist import storage as st

    return st.read_text(uri)


def test_ray_worker_reads_with_environment_credentials(ray_local, auth_env, monkeypatch):
    """A task started with the variables posefr forwards to workers (raysupport.worker_env) reads
    from the authenticating server; with a wrong secret the task's error names the cause."""
    import ray

    from posefr_dist.raysupport import worker_env

    task = ray.remote(num_cpus=1, max_retries=0)(_read_in_task)
    uri = f"s3://{AUTH_BUCKET}/{TEXT_KEY}"
    env = worker_env()
    assert env["AWS_SECRET_ACCESS_KEY"] == auth_env["secret"]
    assert ray.get(task.options(runtime_env={"env_vars": env}).remote(uri), timeout=300) == "hello"

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(Exception) as e:
        ray.get(task.options(runtime_env={"env_vars": worker_env()}).remote(uri), timeout=300)
    assert "rejected the credentials (SignatureDoesNotMatch)" in str(e.value)
    assert isinstance(e.value, storage.S3CredentialsError)
