"""``ray job submit`` of the job entry points (jobs/) to a real local Ray head with its dashboard.

The head is started by this module (``ray start --head --block`` in its own session, with
``RAY_AUTH_MODE=disabled`` as for every local test head; production keeps token auth on) on free
loopback ports, with a temp dir of its own, and only its processes are stopped at the end: the
whole session of the ``ray start`` process, then anything still running with that temp dir in its
command line. ``ray stop`` is not used: it stops every Ray instance on the machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.conftest import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
START_TIMEOUT = 180
JOB_TIMEOUT = 420

pytestmark = pytest.mark.slow


def head_env() -> dict[str, str]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")  # `python` in entrypoints = this venv
    env.pop("RAY_ADDRESS", None)
    return env


def _processes_of(session: int, marker: str) -> list[int]:
    """PIDs in ``session`` or with ``marker`` (the head's temp dir) in their command line."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat[stat.rindex(")") + 2] in "ZX":
                continue  # exited, not yet reaped by its parent
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            sid = os.getsid(pid)
        except (OSError, ProcessLookupError, ValueError, IndexError):
            continue
        if sid == session or marker in cmdline:
            found.append(pid)
    return found


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:  # a graceful stop takes ~30 s on 2 busy cores; what is left after 2 s is killed (the
        # head is thrown away with its temp dir: nothing of it needs an orderly stop)
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.monotonic() + 30
    while True:
        left = _processes_of(proc.pid, temp_dir)
        if not left or time.monotonic() > deadline:
            break
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    assert not _processes_of(proc.pid, temp_dir), "processes of the test head survived"


def head_command(temp_dir: str) -> tuple[list[str], dict[str, int]]:
    """``ray start --head --block`` on free loopback ports (every one Ray opens), and those ports."""
    ports = {name: free_port() for name in ("gcs", "dashboard", "agent_http", "agent_grpc", "client",
                                             "runtime_env", "metrics")}
    cmd = [RAY, "start", "--head", f"--port={ports['gcs']}", f"--dashboard-port={ports['dashboard']}",
           "--dashboard-host=127.0.0.1", "--num-cpus=2", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           "--include-dashboard=true", f"--dashboard-agent-listen-port={ports['agent_http']}",
           f"--dashboard-agent-grpc-port={ports['agent_grpc']}", f"--ray-client-server-port={ports['client']}",
           f"--runtime-env-agent-port={ports['runtime_env']}", f"--metrics-export-port={ports['metrics']}",
           "--object-store-memory=200000000", "--block"]
    return cmd, ports


@contextlib.contextmanager
def running_head(temp_dir: str, env: dict[str, str], probe: Callable[[str], Any]) -> Iterator[str]:
    """A ``ray start --head`` (:func:`head_command`) in ``temp_dir`` with ``env``, yielded (as its
    job API address) once ``probe(address)`` answers; stopped on the way out."""
    cmd, ports = head_command(temp_dir)
    log = open(os.path.join(temp_dir, "ray-start.log"), "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard']}"
    try:
        wait_for_port(ports["dashboard"], timeout=START_TIMEOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # the job API answers once the dashboard's modules are up
            assert proc.poll() is None, Path(temp_dir, "ray-start.log").read_text()[-3000:]
            try:
                probe(address)
                break
            except (OSError, ValueError):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the Ray job API at {address} did not answer in {START_TIMEOUT}s")
                time.sleep(1.0)
        yield address
    finally:
        _stop_head(proc, temp_dir)
        log.close()


def _job_api_answers(address: str) -> None:
    for path in ("/api/version", "/api/jobs/"):
        with urllib.request.urlopen(f"{address}{path}", timeout=5) as r:
            json.loads(r.read())


@pytest.fixture(scope="module")
def ray_head():
    """A local Ray head with its dashboard (job API) on free loopback ports."""
    temp_dir = tempfile.mkdtemp(prefix="rj-", dir="/tmp")  # Ray's socket paths must stay short
    try:
        with running_head(temp_dir, head_env(), _job_api_answers) as address:
            yield {"address": address, "temp_dir": temp_dir}
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


def ray_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=head_env(), capture_output=True, text=True, timeout=timeout)


def runtime_env_json() -> str:
    """What the upload leaves out: the virtualenv (GBs), outputs, caches, git objects. (Workers
    inherit RAY_USAGE_STATS_ENABLED etc. from the head's environment.)"""
    return json.dumps({"excludes": [".venv", "out", ".cache", ".git", "*.egg-info"]})


def submit(head: dict, job_id: str, *entrypoint: str, runtime_env: tuple[str, ...] = ()) -> None:
    runtime_env = runtime_env or ("--runtime-env-json", runtime_env_json())
    r = ray_cli("job", "submit", "--address", head["address"], "--submission-id", job_id,
                "--working-dir", str(REPO), *runtime_env, "--no-wait", "--", *entrypoint, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def wait_for_job(head: dict, job_id: str, timeout: float = JOB_TIMEOUT) -> str:
    """The job's terminal status (SUCCEEDED, FAILED or STOPPED), polled through the job API."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"{head['address']}/api/jobs/{job_id}", timeout=10) as r:
            status = json.loads(r.read())["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        if time.monotonic() > deadline:
            ray_cli("job", "stop", "--address", head["address"], job_id, timeout=60)
            raise TimeoutError(f"job {job_id} still {status} after {timeout}s:\n{job_logs(head, job_id)[-3000:]}")
        time.sleep(2.0)


def job_logs(head: dict, job_id: str) -> str:
    r = ray_cli("job", "logs", "--address", head["address"], job_id)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def eval_inputs(tmp_path_factory):
    """Tiny synthetic shards and an exported untrained 2D model."""
    import torch

    from posefr_dist.config import LossConfig, ModelConfig
    from posefr_dist.data.synth import synthesize
    from posefr_dist.model import build_model, export_2d
    from tests.data_utils import tiny_cfg

    root = tmp_path_factory.mktemp("jobs")
    synthesize(tiny_cfg(identities=10, views_per_identity=8), str(root / "shards"), use_ray=False)
    torch.manual_seed(0)
    m = build_model(ModelConfig(variant="2d-only", encoder_2d="ir_tiny", embedding_dim=32), LossConfig(),
                    num_classes=5, image_size=64, num_points=128)
    m.eval()
    export_2d(m, str(root / "model"))
    return root


def test_evaluate_job_succeeds_and_writes_the_report(ray_head, eval_inputs):
    out = eval_inputs / "eval-out"
    job_id = f"posefr-evaluate-{time.monotonic_ns()}"
    submit(ray_head, job_id, "python", "jobs/evaluate.py", "--model", str(eval_inputs / "model"),
           "--data", str(eval_inputs / "shards"), "--out", str(out), "--far", "0.1,0.01", "--batch-size", "16")
    status = wait_for_job(ray_head, job_id)
    logs = job_logs(ray_head, job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["bins"]) >= {"0-30", "30-60", "60-90", "90+", "all"} and rep["bins"]["all"]["probes"] > 0
    for name in ("report.md", "roc.png", "tar_vs_yaw.png", "embeddings/_SUCCESS"):
        assert (out / name).exists(), name
    assert f"report: {out}" in logs and "| 90+ |" in logs  # the driver's output is in the job's logs
    r = ray_cli("job", "status", "--address", ray_head["address"], job_id)
    assert r.returncode == 0 and f"job '{job_id}' succeeded" in (r.stdout + r.stderr).lower(), r.stdout[-2000:]


def test_failing_job_ends_failed_with_its_message_in_the_logs(ray_head, eval_inputs):
    missing = eval_inputs / "no-such-model"
    job_id = f"posefr-evaluate-missing-{time.monotonic_ns()}"
    submit(ray_head, job_id, "python", "jobs/evaluate.py", "--model", str(missing),
           "--data", str(eval_inputs / "shards"), "--out", str(eval_inputs / "never"))
    status = wait_for_job(ray_head, job_id)
    logs = job_logs(ray_head, job_id)
    assert status == "FAILED", logs[-4000:]
    assert f"exported model {missing}: config.json is missing" in logs, logs[-4000:]
    assert not (eval_inputs / "never" / "report.json").exists()


def test_documented_runtime_env_yaml_reaches_the_job_code(ray_head, eval_inputs):
    """The documented submission (``--runtime-env jobs/runtime_env.yaml``) runs the job's code: here
    it stops at the first check of the data, with the project's own message."""
    missing = eval_inputs / "no-such-shards"
    job_id = f"posefr-evaluate-runtime-env-{time.monotonic_ns()}"
    submit(ray_head, job_id, "python", "jobs/evaluate.py", "--model", str(eval_inputs / "model"),
           "--data", str(missing), "--out", str(eval_inputs / "never2"),
           runtime_env=("--runtime-env", str(REPO / "jobs" / "runtime_env.yaml")))
    status = wait_for_job(ray_head, job_id)
    logs = job_logs(ray_head, job_id)
    assert status == "FAILED", logs[-4000:]
    assert "Failed to merge the Job's runtime env" not in logs, logs[-4000:]
    assert f"posefr evaluate: error: {missing}/manifest.json: manifest.json not found" in logs, logs[-4000:]
