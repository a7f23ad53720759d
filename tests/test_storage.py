import os
import time

import pytest

from posefr_dist import storage


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
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(storage.StorageError, match="S3 request failed.*AWS_ENDPOINT_URL"):
        storage.read_bytes(f"s3://{s3_server['bucket']}/x")
    assert time.monotonic() - t0 < 60  # a bound against hanging, not a timing target


def test_s3_wrong_credentials(monkeypatch):
    """A server that enforces authentication rejects unknown keys with a clear error."""
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import free_port, stop_process, wait_for_port

    port = free_port()
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="0")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "not-a-key")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-a-secret")
        with pytest.raises(storage.StorageError, match="S3 request failed.*AWS_ACCESS_KEY_ID"):
            storage.write_text("s3://some-bucket/x.txt", "x")
    finally:
        stop_process(proc)
