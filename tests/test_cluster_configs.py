"""The `ray up` configs and the local-cluster script in cluster/, checked without starting anything.

- every ``cluster/*.yaml`` validates against the ``ray-schema.json`` shipped in the installed
  ray package, and passes what ``ray up`` itself checks before it contacts the cloud
  (``prepare_config`` + ``validate_config``);
- project rules: a head that takes no tasks, a GPU worker type that scales from 0, setup commands
  that install the project copied by file_mounts, token auth on every node;
- broken copies (unknown key, wrong type, missing head type, ...) are reported;
- ``cluster/local_cluster.sh`` is valid bash with the documented settings and subcommands.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LOCAL_SCRIPT = CLUSTER / "local_cluster.sh"


def ray_schema() -> dict:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def configs() -> list[Path]:
    return sorted(p for p in CLUSTER.glob("*.y*ml"))


def load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def schema_errors(config: Any) -> list[str]:
    """Ray's cluster-launcher schema (Draft 7), all errors."""
    validator = jsonschema.Draft7Validator(ray_schema())
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path)))]


def ray_up_errors(config: dict) -> list[str]:
    """What `ray up` checks before it talks to the provider: defaults filled in, then
    ``validate_config`` (the schema again plus head type / worker count rules)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except (jsonschema.ValidationError, ValueError, RuntimeError, KeyError, NotImplementedError) as e:
        return [f"{type(e).__name__}: {getattr(e, 'message', e)}"]
    return []


def start_commands(config: dict, which: str) -> list[str]:
    return [" ".join(c.split()) for c in config.get(f"{which}_start_ray_commands") or []]


def ray_start_words(config: dict, which: str) -> list[list[str]]:
    out = []
    for cmd in start_commands(config, which):
        for part in re.split(r";|&&", cmd):
            words = shlex.split(part)
            if "ray" in words and "start" in words:
                out.append(words)
    return out


def project_errors(config: dict) -> list[str]:
    """The cluster this project needs."""
    errors = []
    types = config.get("available_node_types") or {}
    head_type = config.get("head_node_type")
    head = types.get(head_type) or {}
    res = head.get("resources") or {}
    if res.get("CPU") != 0 or res.get("GPU", 0) != 0:
        errors.append("head node type: resources must be {CPU: 0, GPU: 0} (no tasks on the head)")
    workers = {name: t for name, t in types.items() if name != head_type}
    gpu = {n: t for n, t in workers.items() if n.startswith("gpu") or (t.get("resources") or {}).get("GPU")}
    if not gpu:
        errors.append("no GPU worker type")
    for name, t in gpu.items():
        if t.get("min_workers", 0) != 0:
            errors.append(f"worker type {name}: min_workers must be 0 (GPUs scale from zero)")
        if t.get("max_workers", 0) < 1:
            errors.append(f"worker type {name}: max_workers must allow scaling up")
    mounts = config.get("file_mounts") or {}
    project_dest = [dest for dest, src in mounts.items() if (ROOT / src).resolve() == ROOT]
    if not project_dest:
        errors.append("file_mounts must copy the project (local path '.') to the nodes")
    for dest, src in mounts.items():
        if not str(src).startswith("~") and not (ROOT / src).exists():
            errors.append(f"file_mounts: local path {src!r} does not exist (relative to the repository root)")
    setup = " ; ".join(config.get("setup_commands") or [])
    if not any(re.search(rf"pip install [^;]*(-e )?{re.escape(d)}(\s|$)", setup) for d in project_dest):
        errors.append("setup_commands must pip-install the project from its file_mounts destination")
    if not any(d.endswith("/.ray/auth_token") for d in mounts):
        errors.append("file_mounts must carry the Ray auth token (~/.ray/auth_token) to the nodes")
    for which in ("head", "worker"):
        starts = ray_start_words(config, which)
        if not starts:
            errors.append(f"{which}_start_ray_commands: no `ray start`")
        for words in starts:
            if "RAY_AUTH_MODE=token" not in words:
                errors.append(f"{which}_start_ray_commands: `ray start` must run with RAY_AUTH_MODE=token")
            if "--disable-usage-stats" not in words:
                errors.append(f"{which}_start_ray_commands: pass --disable-usage-stats")
    for words in ray_start_words(config, "head"):
        host = next((w.split("=", 1)[1] for w in words if w.startswith("--dashboard-host=")), None)
        if host != "127.0.0.1":
            errors.append("head: the dashboard must listen on 127.0.0.1 (reach it with `ray dashboard`)")
    return errors


# ---------------------------------------------------------------------------------------------
# the real configs
# ---------------------------------------------------------------------------------------------


def test_there_is_a_gpu_cluster_config():
    assert "aws-gpu.yaml" in [p.name for p in configs()]


@pytest.mark.parametrize("path", configs(), ids=lambda p: p.name)
def test_config_validates_against_rays_schema(path):
    assert schema_errors(load(path)) == []


@pytest.mark.parametrize("path", configs(), ids=lambda p: p.name)
def test_config_passes_ray_up_validation(path):
    assert ray_up_errors(load(path)) == []


@pytest.mark.parametrize("path", configs(), ids=lambda p: p.name)
def test_config_matches_the_project_layout(path):
    assert project_errors(load(path)) == []


def test_docker_images_match_the_installed_ray():
    """Nodes run Ray's image of the installed version, or the project's image (`make image`,
    tests/test_image.py), which the Dockerfile builds on that Ray image."""
    import importlib.metadata

    version = importlib.metadata.version("ray")
    base = re.search(r"rayproject/ray:\S+", (ROOT / "Dockerfile").read_text())
    for path in configs():
        config = load(path)
        images = [v for k, v in (config.get("docker") or {}).items() if k.endswith("image")]
        images += [t["docker"]["worker_image"] for t in config["available_node_types"].values()
                   if "worker_image" in (t.get("docker") or {})]
        assert images, path.name
        for image in images:
            if image.startswith("ghcr.io/posefr/posefr-dist:"):
                image = base.group(0) if base else "the Dockerfile names no rayproject/ray base image"
            assert image.startswith(f"rayproject/ray:{version}-"), f"{path.name}: {image}"


# ---------------------------------------------------------------------------------------------
# broken copies
# ---------------------------------------------------------------------------------------------

BROKEN = [
    ("unknown-top-level-key", lambda c: c.update(max_worker=3), schema_errors, "'max_worker' was unexpected"),
    ("unknown-node-type-key", lambda c: c["available_node_types"]["gpu"].update(min_worker=0), schema_errors,
     "'min_worker' was unexpected"),
    ("wrong-type", lambda c: c.update(max_workers="twelve"), schema_errors, "is not of type 'integer'"),
    ("negative-resources", lambda c: c["available_node_types"]["head"]["resources"].update(CPU=-1), schema_errors,
     "less than the minimum of 0"),
    ("commands-not-a-list", lambda c: c.update(setup_commands="pip install -e ."), schema_errors,
     "is not of type 'array'"),
    ("provider-without-type", lambda c: c["provider"].pop("type"), schema_errors, "'type' is a required property"),
    ("unknown-docker-key", lambda c: c["docker"].update(imagee="x"), schema_errors, "'imagee' was unexpected"),
    ("missing-head-type", lambda c: c.update(head_node_type="nope"), ray_up_errors,
     "`head_node_type` must be one of `available_node_types`"),
    ("min-workers-above-max", lambda c: c["available_node_types"]["cpu"].update(min_workers=20), ray_up_errors,
     "smaller than the sum of `min_workers`"),
    ("head-takes-tasks", lambda c: c["available_node_types"]["head"].update(resources={}), project_errors,
     "no tasks on the head"),
    ("gpu-not-from-zero", lambda c: c["available_node_types"]["gpu"].update(min_workers=1), project_errors,
     "min_workers must be 0"),
    ("project-not-mounted", lambda c: c["file_mounts"].pop("~/posefr-dist"), project_errors,
     "must copy the project"),
    ("project-not-installed", lambda c: c.update(setup_commands=["true"]), project_errors,
     "must pip-install the project"),
    ("missing-local-path", lambda c: c["file_mounts"].update({"~/data": "no/such/dir"}), project_errors,
     "does not exist"),
    ("auth-disabled", lambda c: c.update(worker_start_ray_commands=[
        "ray stop", "RAY_AUTH_MODE=disabled ray start --address=$RAY_HEAD_IP:6379 --disable-usage-stats"]),
     project_errors, "worker_start_ray_commands: `ray start` must run with RAY_AUTH_MODE=token"),
    ("dashboard-on-all-interfaces", lambda c: c.update(head_start_ray_commands=[
        c["head_start_ray_commands"][1].replace("--dashboard-host=127.0.0.1", "--dashboard-host=0.0.0.0")]),
     project_errors, "must listen on 127.0.0.1"),
]


@pytest.mark.parametrize("case_id,mutate,check,expected", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_config_is_reported(case_id, mutate, check, expected):
    config = load(CLUSTER / "aws-gpu.yaml")
    assert not any(expected in e for e in check(config))
    mutate(config)
    errors = check(config)
    assert any(expected in e for e in errors), f"{expected!r} not in {errors}"


# ---------------------------------------------------------------------------------------------
# cluster/local_cluster.sh
# ---------------------------------------------------------------------------------------------


def run_script(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LOCAL_SCRIPT), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_local_cluster_script_is_valid_bash_and_executable():
    assert os.access(LOCAL_SCRIPT, os.X_OK)
    assert subprocess.run(["bash", "-n", str(LOCAL_SCRIPT)], capture_output=True).returncode == 0


def test_local_cluster_script_starts_ray_as_documented():
    text = LOCAL_SCRIPT.read_text()
    assert "export RAY_AUTH_MODE=disabled" in text
    for flag in ("--head", "--address=", "--temp-dir=", "--disable-usage-stats", "--dashboard-host=127.0.0.1",
                 "--include-dashboard=true", "--block"):
        assert flag in text, flag
    assert "ray stop" not in text.replace("`ray stop`", ""), "must not stop other Ray instances on the machine"
    assert "pkill" not in text and "killall" not in text


def test_local_cluster_script_usage_and_status_when_stopped(tmp_path):
    result = run_script()
    assert result.returncode == 2 and "usage:" in result.stderr
    result = run_script("restart")
    assert result.returncode == 2
    result = run_script("status", env={"POSEFR_RAY_STATE": str(tmp_path / "state")})
    assert result.returncode == 3 and "not running" in result.stdout
    result = run_script("stop", env={"POSEFR_RAY_STATE": str(tmp_path / "state")})
    assert result.returncode == 0 and "stopped" in result.stdout
