"""The multi-host testbed itself (cluster/testbed.sh through tests/testbed.py): a Ray head and two
worker hosts, each in its own network namespace.

Addresses, Ray nodes and S3 from every host; a cut link and a killed host seen by Ray within a
bounded time and brought back; `down` leaving nothing; `up` over a crashed testbed. The tests run
in this order on one module-scoped testbed; the last ones take it down and up again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from tests.testbed import SCRIPT, Testbed, processes_mentioning, testbed_fixture

pytestmark = [pytest.mark.slow, pytest.mark.testbed]

# Short health checks: a cut host is marked dead after at most ~3 x (1 s + 1 s).
bed = testbed_fixture("pfrtb", workers=2, worker_cpus=1, health_failures=3)

WORKERS = ("w1", "w2")
DETECT_S = 20  # bound on Ray marking a lost host dead (expected ~3-6 s; slack for a loaded machine)

# a driver on the head host: one task pinned to each worker host reports the node's address, the
# address its socket leaves from, and an object it wrote to and read back from S3
PROBE = r"""
import json, os, socket, sys
import ray

ray.init(logging_level="WARNING")

@ray.remote(num_cpus=0, max_retries=0)
def probe(host):
    import boto3
    s3_host = os.environ["AWS_ENDPOINT_URL"].split("://", 1)[1].split(":")[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((s3_host, 9))
        source = s.getsockname()[0]
    s3 = boto3.client("s3")
    key = f"probe/{host}"
    s3.put_object(Bucket=os.environ["POSEFR_TESTBED_BUCKET"], Key=key, Body=host.encode())
    back = s3.get_object(Bucket=os.environ["POSEFR_TESTBED_BUCKET"], Key=key)["Body"].read().decode()
    return {"node_ip": ray.util.get_node_ip_address(), "source": source, "s3": back,
            "endpoint": os.environ["AWS_ENDPOINT_URL"]}

hosts = sys.argv[1:]
refs = {h: probe.options(resources={f"host_{h}": 0.01}).remote(h) for h in hosts}
print("PROBE " + json.dumps({h: ray.get(r, timeout=120) for h, r in refs.items()}))
"""


def test_script_says_what_is_missing_without_root_or_ip(tmp_path):
    """Exit 2 with the reason (no testbed needed)."""
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    res = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "usage:" in res.stderr
    # no `ip` on PATH
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for d in ("/usr/bin", "/bin"):
        for f in os.listdir(d) if os.path.isdir(d) else []:
            if f != "ip" and not (bindir / f).exists():
                (bindir / f).symlink_to(os.path.join(d, f))
    res = subprocess.run([str(SCRIPT), "down"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PATH": str(bindir)})
    assert res.returncode == 2 and "iproute2" in res.stderr, res.stderr
    # not root
    if os.geteuid() == 0 and shutil.which("setpriv"):
        res = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                              str(SCRIPT), "status"], capture_output=True, text=True, timeout=30)
        assert res.returncode == 2 and "root" in res.stderr, res.stderr


@pytest.fixture(scope="module")
def probe(bed: Testbed) -> dict:
    out = bed.run("head", ["python", "-c", PROBE, *WORKERS], timeout=180).stdout
    line = next(line for line in out.splitlines() if line.startswith("PROBE "))
    return json.loads(line.removeprefix("PROBE "))


def test_every_host_has_its_own_address_and_ray_node(bed: Testbed):
    addrs = {}
    for h in bed.hosts:
        out = bed.run(h, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"], timeout=30).stdout
        addrs[h] = out.split()[3].split("/")[0]
    assert addrs == {h: bed.ip(h) for h in bed.hosts}
    assert len(set(addrs.values())) == 3
    nodes = bed.nodes()
    assert sorted(n["ip"] for n in nodes if n["state"] == "ALIVE") == sorted(addrs.values())
    assert bed.alive_nodes() == 3
    for w in WORKERS:
        (node,) = [n for n in nodes if n["ip"] == bed.ip(w)]
        assert node["resources"].get(f"host_{w}") == 1 and node["resources"].get("CPU") == 1


def test_tasks_pinned_to_a_host_run_there(bed: Testbed, probe: dict):
    for w in WORKERS:
        assert probe[w]["node_ip"] == bed.ip(w), probe
        assert probe[w]["source"] == bed.ip(w), probe  # the task's own network stack


def test_s3_on_the_head_is_reachable_from_every_worker_host(bed: Testbed, probe: dict):
    for w in WORKERS:
        assert probe[w]["endpoint"] == bed.s3_endpoint
        assert probe[w]["s3"] == w
    # and from the root namespace over the bridge
    import boto3

    s3 = boto3.client("s3", endpoint_url=bed.s3_endpoint, aws_access_key_id="testing",
                      aws_secret_access_key="testing", region_name="us-east-1")
    assert s3.get_object(Bucket=bed.bucket, Key="probe/w1")["Body"].read() == b"w1"


def test_cut_host_is_marked_dead_then_heals_and_restarts(bed: Testbed):
    t0 = time.monotonic()
    bed.cut("w2")
    assert bed.pids("w2"), "a cut host's processes keep running"
    bed.wait_node("w2", alive=False, timeout=DETECT_S)
    print(f"cut w2 marked dead within {time.monotonic() - t0:.1f}s")
    assert bed.alive_ips() == {bed.ip("head"), bed.ip("w1")}
    bed.heal("w2")
    bed.restart("w2")  # the cut raylet may have exited by itself by now, or not
    assert bed.alive_ips() == {bed.ip(h) for h in bed.hosts}


def test_killed_host_leaves_no_process_is_marked_dead_and_restarts(bed: Testbed):
    t0 = time.monotonic()
    bed.kill("w1")
    assert bed.pids("w1") == []
    bed.wait_node("w1", alive=False, timeout=DETECT_S)
    print(f"killed w1 marked dead within {time.monotonic() - t0:.1f}s")
    bed.restart("w1")
    assert bed.alive_ips() == {bed.ip(h) for h in bed.hosts}
    assert bed.alive_nodes() == 3
    # a host that runs with its node alive: `restart` leaves it alone
    pids = bed.pids("w1")
    bed.restart("w1")
    assert set(pids) <= set(bed.pids("w1")), "restart ended processes of a running host"


def test_up_over_a_crashed_testbed(bed: Testbed):
    # a crash: every process gone, no `down` (namespaces, links, state folder stay)
    for h in bed.hosts:
        for pid in bed.pids(h):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
    bed.wait_until(lambda: not any(bed.pids(h) for h in bed.hosts), 10, "the processes gone")
    stale = bed.leftovers()
    assert len([x for x in stale if x.startswith("namespace ")]) == 3, stale
    # the script's own `up` cleans the stale testbed (all three hosts) before it starts; a
    # head-only testbed of the same name, to keep the module short
    again = Testbed(bed.name, workers=0, state_dir=bed.state_dir, subnet=bed.subnet)
    again.up(fresh=False)
    assert again.alive_ips() == {bed.ip("head")}
    namespaces = [x.split()[1] for x in again.leftovers() if x.startswith("namespace ")]
    assert namespaces == [f"{bed.name}-head"]


def test_down_leaves_nothing_and_is_idempotent(bed: Testbed):
    bed.down()
    assert bed.leftovers() == []
    assert processes_mentioning(bed.state_dir) == []
    assert not os.path.exists(bed.state_dir)
    t0 = time.monotonic()
    bed.down()
    assert time.monotonic() - t0 < 10
    assert bed.leftovers() == []
