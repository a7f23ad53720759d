"""Shared fixtures: a real S3 server on loopback, a real local Ray, temporary folders.

Everything started here is stopped and removed at the end of the session.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".cache" / "torch_extensions"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Ray Train's controller polls its workers every 2 s by default, and a worker's report waits in a
# one-slot queue until the next poll: a tiny test run with a report every second or two spends
# much of its time waiting on polls (20-30 s of a 3-epoch run that validates every 2 steps), and
# every run's start and end wait for one. Polls are cheap; a poll that a busy worker misses is
# only counted against the 10-minute health-check timeout. Set before Ray starts, so the local
# Ray's workers (Tune trials), subprocess drivers and the test heads inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

S3_BUCKET = "posefr-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def stop_process(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Terminate a server a test started; kill it if it does not exit within ``timeout``."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on a free loopback port with one bucket; the AWS variables point at it.

    The variables are set in this process before Ray starts, so Ray workers inherit them.
    """
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {k: os.environ.get(k) for k in
             ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    try:
        wait_for_port(port)
        endpoint = f"http://127.0.0.1:{port}"
        os.environ.update(
            AWS_ENDPOINT_URL=endpoint,
            AWS_ACCESS_KEY_ID="testing",
            AWS_SECRET_ACCESS_KEY="testing",
            AWS_DEFAULT_REGION="us-east-1",
        )
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=S3_BUCKET)
        yield {"endpoint": endpoint, "bucket": S3_BUCKET, "port": port}
    finally:
        stop_process(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def ray_local(s3_server, tmp_path_factory):
    """A real local Ray with 2 CPUs (S3 variables already set, so workers inherit them)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    # a short temp dir: Ray's unix socket paths must stay under 107 characters
    tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    info = ray.init(
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=tmp,
        logging_level="WARNING",
        runtime_env={"env_vars": {k: os.environ[k] for k in (
            "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
            "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR", "RAY_USAGE_STATS_ENABLED") if k in os.environ}},
    )
    try:
        yield info
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_address(ray_local) -> str:
    """The session Ray's GCS address: a test's subprocess driver joins it (``RAY_ADDRESS``) rather
    than starting a second local Ray next to it."""
    return ray_local.address_info["gcs_address"]


@pytest.fixture
def s3_uri(s3_server, request):
    """A fresh prefix in the test bucket, removed afterwards."""
    from posefr_dist import storage

    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")
    uri = f"s3://{s3_server['bucket']}/{name}-{time.monotonic_ns()}"
    yield uri
    try:
        storage.delete(uri)
    except Exception:
        pass


@pytest.fixture(scope="session")
def tiny_pretrain(ray_local, tmp_path_factory):
    """``posefr pretrain`` of data_utils.TINY_PRETRAIN_CONFIG with TINY_PRETRAIN_SETS, run once per
    session through the CLI in this process, on the session's Ray. Returns ``{"out": folder,
    "stdout": what the command printed}``.

    test_pretrain asserts on this run. The demo and ablation tests copy the folder into their
    ``OUT/pretrain``: their stage 0 is the same resumable pretraining, which then finds its export
    finished and reuses it (one pretraining per session instead of one per test). Tests must not
    change the folder; a test that changes it changes a copy."""
    import contextlib
    import io

    from posefr_dist.cli import main
    from tests.data_utils import TINY_PRETRAIN_CONFIG, TINY_PRETRAIN_SETS

    out = tmp_path_factory.mktemp("tiny-pretrain") / "pretrain"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["pretrain", "--config", str(TINY_PRETRAIN_CONFIG), "--out", str(out), *TINY_PRETRAIN_SETS])
    assert rc == 0, buf.getvalue()[-3000:]
    return {"out": out, "stdout": buf.getvalue()}
