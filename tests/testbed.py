"""A multi-host Ray testbed for tests (not a test module): cluster/testbed.sh driven from Python.

Every host (``head``, ``w1``..``wN``) is its own network namespace with its own address; the head
runs the Ray head and moto's S3 server, each worker a Ray worker node offering the resource
``host_wK``. Failures are real: :meth:`Testbed.kill` (SIGKILL to a host's processes),
:meth:`Testbed.cut` / :meth:`Testbed.heal` (its link down / up), :meth:`Testbed.preempt` (SIGTERM
to its ``ray start``: a PREEMPTION drain, then SIGKILL after a grace period) and
:meth:`Testbed.restart`. Needs root and iproute2's ``ip`` (:func:`testbed_unavailable` says why
not); see cluster/testbed.sh for what runs where.

A module-scoped fixture that always takes the testbed down (also when a test fails, and at exit
as a last resort)::

    from tests.testbed import testbed_fixture

    testbed = testbed_fixture("pfrx", workers=2)      # the fixture is named like the variable

    @pytest.mark.slow
    @pytest.mark.testbed
    def test_something(testbed):
        out = testbed.run("head", ["python", "-c", "import ray; ray.init(); ..."], timeout=120)
        testbed.kill("w1")
        testbed.restart("w1")

or by hand, the same steps (skip, atexit, up, down in finally)::

    @pytest.fixture(scope="module")
    def bed():
        why = testbed_unavailable()
        if why:
            pytest.skip(why)
        tb = Testbed("pfrx", workers=3, worker_resources={"train_slot": 1})
        atexit.register(tb.down_quietly)
        tb.up()
        try:
            yield tb
        finally:
            tb.down()

Use a different ``name`` per test module: two testbeds of one name would be one testbed. The
default subnet derives from the name (10.213.<1..250>), so testbeds of different names in parallel
pytest runs do not share addresses (``up`` refuses a subnet that is in use).

Commands run inside a host with :meth:`Testbed.run` / :meth:`Testbed.popen` get the testbed
environment: ``RAY_ADDRESS`` (the head's GCS), ``AWS_ENDPOINT_URL`` (the head's S3) with the
credentials ``testing`` / ``testing``, ``RAY_AUTH_MODE=disabled``, the project's venv first on
``PATH``. A Ray driver must run inside a host (``head`` usually): a driver needs a Ray node on its
own address, and the root namespace has none.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "cluster" / "testbed.sh"
GCS_PORT = 6379
S3_PORT = 9000
DASHBOARD_PORT = 8265


class TestbedError(RuntimeError):
    """A testbed command failed; the message holds its output."""

    __test__ = False  # not a test class for pytest


def testbed_unavailable() -> str | None:
    """Why no testbed can run on this machine (not root, no ``ip``), or None when one can."""
    why = []
    if not sys.platform.startswith("linux"):
        why.append("network namespaces need Linux")
    elif os.geteuid() != 0:
        why.append("not root (network namespaces, veths and the bridge need root)")
    if not shutil.which("ip"):  # on PATH, as cluster/testbed.sh looks for it
        why.append("iproute2's `ip` is missing (apt-get install iproute2)")
    if not why:
        return None
    return "multi-host testbed (cluster/testbed.sh) unavailable: " + "; ".join(why)


def default_subnet(name: str) -> str:
    """The /24 (three octets) a testbed of this name uses by default: 10.213.<1..250>."""
    return f"10.213.{zlib.crc32(name.encode()) % 250 + 1}"


class Testbed:
    """One testbed: a head and ``workers`` worker hosts named ``w1``..``wN``.

    ``worker_resources``: custom resources every worker host offers besides ``host_wK``.
    ``extra_env``: variables (name -> value) for the hosts' processes and for :meth:`run` /
    :meth:`popen`. Health checks: a cut host is marked dead after at most about
    ``health_failures * (health_period_ms + health_timeout_ms)`` ms, a killed one sooner.
    """

    __test__ = False

    def __init__(
        self,
        name: str,
        workers: int = 2,
        worker_cpus: int = 1,
        head_cpus: int = 0,
        grace: int = 10,
        dashboard: bool = False,
        state_dir: str | os.PathLike | None = None,
        *,
        subnet: str | None = None,
        object_store: int = 200_000_000,
        worker_resources: Mapping[str, float] | None = None,
        extra_env: Mapping[str, str] | None = None,
        timeout: int = 120,
        health_period_ms: int = 1000,
        health_timeout_ms: int = 1000,
        health_failures: int = 5,
        bucket: str = "posefr",
        log_dir: str | os.PathLike | None = None,
    ):
        self.name = name
        self.workers = workers
        self.worker_cpus = worker_cpus
        self.head_cpus = head_cpus
        self.grace = grace
        self.dashboard = dashboard
        self.state_dir = str(state_dir or f"/tmp/posefr-testbed-{name}")
        self.subnet = subnet or default_subnet(name)
        self.object_store = object_store
        self.worker_resources = dict(worker_resources or {})
        self.extra_env = dict(extra_env or {})
        self.timeout = timeout
        self.health_period_ms = health_period_ms
        self.health_timeout_ms = health_timeout_ms
        self.health_failures = health_failures
        self.bucket = bucket
        self._log_dir = Path(log_dir) if log_dir else None
        self._procs: list[subprocess.Popen] = []

    @property
    def log_dir(self) -> Path:
        """Where :meth:`popen` writes its commands' output by default (made on first use, outside
        the state folder, which ``down`` deletes)."""
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix=f"posefr-tblogs-{self.name}-"))
        return self._log_dir

    # --- addresses --------------------------------------------------------------------------
    @property
    def hosts(self) -> list[str]:
        return ["head"] + [f"w{k}" for k in range(1, self.workers + 1)]

    def ip(self, host: str) -> str:
        if host == "head":
            return f"{self.subnet}.2"
        if host.startswith("w") and host[1:].isdigit() and 1 <= int(host[1:]) <= self.workers:
            return f"{self.subnet}.{10 + int(host[1:])}"
        raise ValueError(f"unknown host {host!r} (hosts: {self.hosts})")

    @property
    def bridge_ip(self) -> str:
        """The root namespace's address on the testbed's bridge."""
        return f"{self.subnet}.1"

    @property
    def ray_address(self) -> str:
        """The head's GCS address (``RAY_ADDRESS`` inside the hosts)."""
        return f"{self.ip('head')}:{GCS_PORT}"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.ip('head')}:{S3_PORT}"

    @property
    def job_address(self) -> str:
        """The job API (``ray job submit --address``); only with ``dashboard=True``."""
        return f"http://{self.ip('head')}:{DASHBOARD_PORT}"

    # --- the script -------------------------------------------------------------------------
    def _script_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.update(extra or {})
        env.update(self.extra_env)
        env.update(
            POSEFR_TESTBED_NAME=self.name,
            POSEFR_TESTBED_STATE=self.state_dir,
            POSEFR_TESTBED_SUBNET=self.subnet,
            POSEFR_TESTBED_HEAD_CPUS=str(self.head_cpus),
            POSEFR_TESTBED_WORKER_CPUS=str(self.worker_cpus),
            POSEFR_TESTBED_OBJECT_STORE=str(self.object_store),
            POSEFR_TESTBED_GRACE=str(self.grace),
            POSEFR_TESTBED_DASHBOARD="1" if self.dashboard else "0",
            POSEFR_TESTBED_BUCKET=self.bucket,
            POSEFR_TESTBED_TIMEOUT=str(self.timeout),
            POSEFR_TESTBED_HEALTH_PERIOD_MS=str(self.health_period_ms),
            POSEFR_TESTBED_HEALTH_TIMEOUT_MS=str(self.health_timeout_ms),
            POSEFR_TESTBED_HEALTH_FAILURES=str(self.health_failures),
            POSEFR_TESTBED_PASS_ENV=" ".join(self.extra_env),
            POSEFR_TESTBED_WORKER_RESOURCES=json.dumps(self.worker_resources) if self.worker_resources else "",
        )
        env.setdefault("RAY", str(Path(sys.executable).with_name("ray")))
        return env

    def script(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """Run ``cluster/testbed.sh ARGS`` for this testbed; output captured."""
        cmd = [str(SCRIPT), *args]
        try:
            res = subprocess.run(cmd, env=self._script_env(), capture_output=True, text=True,
                                 timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise TestbedError(f"{shlex.join(cmd)} ran over {timeout}s:\n{_text(e.stdout)}{_text(e.stderr)}") from e
        if check and res.returncode != 0:
            raise TestbedError(f"{shlex.join(cmd)} failed ({res.returncode}):\n{res.stdout}{res.stderr}")
        return res

    # --- life cycle -------------------------------------------------------------------------
    def up(self, fresh: bool = True) -> None:
        """Start the testbed; ``fresh``: take a testbed of this name down first (also a running
        one). With ``fresh=False`` the script's ``up`` cleans a stale (crashed) testbed itself and
        refuses a running one."""
        if fresh:
            self.down()
        self.script("up", str(self.workers), timeout=self.timeout * 2 + 60)

    def down(self) -> None:
        """Stop everything, delete namespaces, links and the state folder; raises if something is
        left. Idempotent."""
        for p in self._procs:
            if p.poll() is None:
                p.kill()
        self._procs = [p for p in self._procs if p.poll() is None]
        self.script("down", timeout=120)

    def down_quietly(self) -> None:
        """:meth:`down` for atexit: never raises, only says what failed."""
        try:
            if self.leftovers() or os.path.exists(self.state_dir):
                self.down()
        except Exception as e:  # noqa: BLE001 - a last resort at exit
            print(f"testbed {self.name}: down at exit failed: {e}", file=sys.stderr)

    def __enter__(self) -> Testbed:
        self.up()
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    # --- failures ---------------------------------------------------------------------------
    def kill(self, host: str) -> None:
        """SIGKILL every process of the host (a machine lost); returns once none is left."""
        self.ip(host)
        self.script("kill", host)

    def cut(self, host: str) -> None:
        """Take the host's link down (partition); its processes keep running."""
        self.ip(host)
        self.script("cut", host)

    def heal(self, host: str) -> None:
        """Bring the host's link back up (a no-op when it is up)."""
        self.ip(host)
        self.script("heal", host)

    def preempt(self, host: str, grace: float | None = None, wait: bool = False) -> None:
        """Spot-style notice: SIGTERM to the host's ``ray start`` (Ray drains the node, reason
        PREEMPTION, deadline ``self.grace`` s), SIGKILL to what is left ``grace`` s later (default
        ``self.grace + 5``). Returns at once unless ``wait``."""
        self.ip(host)
        args = ["preempt", host] + ([str(int(round(grace)))] if grace is not None else [])
        self.script(*args, *(["--wait"] if wait else []),
                    timeout=(grace if grace is not None else self.grace + 5) + 60)

    def restart(self, host: str, force: bool = False) -> None:
        """Start Ray on the host again (ending what still runs there first); returns once its
        node is alive. A host that runs with its node alive is left alone unless ``force``.
        Heal a cut host first. Restarting the head needs the workers restarted too."""
        self.ip(host)
        self.script("restart", host, *(["--force"] if force else []), timeout=self.timeout * 2 + 60)

    # --- commands inside hosts ----------------------------------------------------------------
    def _exec_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        self.ip(host)
        if isinstance(argv, str):
            raise TypeError("argv is a list of arguments, not a string")
        return [str(SCRIPT), "exec", host, *map(str, argv)]

    def run(self, host: str, argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        """Run ``argv`` inside the host's namespace with the testbed environment (plus ``env``;
        the testbed's variables win); stdout and stderr captured as text. ``check``: raise
        :class:`TestbedError` with the output on a non-zero exit."""
        cmd = self._exec_argv(host, argv)
        try:
            res = subprocess.run(cmd, env=self._script_env(env), capture_output=True, text=True,
                                 timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise TestbedError(f"{host}: {shlex.join(map(str, argv))} ran over {timeout}s:\n"
                               f"{_text(e.stdout)[-4000:]}{_text(e.stderr)[-4000:]}") from e
        if check and res.returncode != 0:
            raise TestbedError(f"{host}: {shlex.join(map(str, argv))} failed ({res.returncode}):\n"
                               f"{res.stdout[-4000:]}{res.stderr[-6000:]}")
        return res

    def popen(self, host: str, argv: Sequence[str], timeout: float | None = None,
              env: Mapping[str, str] | None = None, log_path: str | os.PathLike | None = None,
              **kwargs) -> subprocess.Popen:
        """Start ``argv`` inside the host's namespace in the background (its own session). Its
        output goes to ``log_path`` (default: a new file in ``self.log_dir``; the path is the
        returned process's ``log_path``) unless ``stdout`` is given. ``timeout``: kill its process
        group after that many seconds. :meth:`down` kills it too."""
        cmd = self._exec_argv(host, argv)
        log = None
        if "stdout" not in kwargs:
            if log_path is None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                stem = Path(str(argv[0])).name if argv else "cmd"
                log_path = self.log_dir / f"{host}-{stem}-{time.monotonic_ns()}.log"
            log = open(log_path, "ab")  # noqa: SIM115 - closed when the process ends
            kwargs["stdout"] = log
            kwargs.setdefault("stderr", subprocess.STDOUT)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(cmd, env=self._script_env(env), **kwargs)
        if log is not None:
            log.close()  # the child has its own copy
        proc.log_path = str(log_path) if log_path is not None else None  # type: ignore[attr-defined]
        if timeout is not None:
            timer = threading.Timer(timeout, _kill_group, args=(proc,))
            timer.daemon = True
            timer.start()
        self._procs.append(proc)
        return proc

    def env(self) -> dict[str, str]:
        """The testbed environment for the root namespace (``cluster/testbed.sh env``)."""
        out = self.script("env").stdout
        env = {}
        for line in out.splitlines():
            words = shlex.split(line)
            if len(words) == 2 and words[0] == "export" and "=" in words[1]:
                k, v = words[1].split("=", 1)
                env[k] = v
        return env

    # --- Ray's view -------------------------------------------------------------------------
    def nodes(self) -> list[dict]:
        """Ray's nodes (alive and dead), asked from inside the head's namespace: dicts with
        ``node_id``, ``ip``, ``state`` ("ALIVE" / "DEAD"), ``activity`` ("IDLE" / "ACTIVE" /
        "DRAINING"), ``resources``, and for a dead node ``death_reason`` (e.g.
        "UNEXPECTED_TERMINATION", "AUTOSCALER_DRAIN_PREEMPTED") and ``death_message``."""
        out = self.script("nodes", timeout=60).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def alive_nodes(self) -> int:
        """How many Ray nodes are alive."""
        return sum(n["state"] == "ALIVE" for n in self.nodes())

    def alive_ips(self) -> set[str]:
        return {n["ip"] for n in self.nodes() if n["state"] == "ALIVE"}

    def wait_node(self, host: str, alive: bool, timeout: float = 60) -> float:
        """Wait until the host has an alive Ray node (``alive``) or none; returns the seconds it
        took (one poller in the head's namespace), raises :class:`TestbedError` after
        ``timeout``."""
        self.ip(host)
        res = self.script("wait", host, "alive" if alive else "dead", str(int(timeout)),
                          timeout=timeout + 60)
        return float(res.stdout.split()[-1])

    @staticmethod
    def wait_until(pred: Callable[[], object], timeout: float, what: str, every: float = 0.3) -> float:
        t0 = time.monotonic()
        while True:
            if pred():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TestbedError(f"timed out after {timeout}s waiting for {what}")
            time.sleep(every)

    # --- what is left ----------------------------------------------------------------------
    def pids(self, host: str) -> list[int]:
        """The processes in the host's namespace."""
        res = subprocess.run(["ip", "netns", "pids", f"{self.name}-{host}"], capture_output=True, text=True)
        return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []

    def leftovers(self) -> list[str]:
        """What of this testbed exists in the kernel: namespaces of its prefix with the processes
        in them, links of its prefix (veths, the bridge), and processes whose command line
        mentions the state folder. Empty after :meth:`down`."""
        prefix = f"{self.name}-"
        left = []
        ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
        for n in (line.split()[0] for line in ns if line.strip()):
            if n.startswith(prefix):
                pids = subprocess.run(["ip", "netns", "pids", n], capture_output=True, text=True).stdout.split()
                left.append(f"namespace {n}" + (f" with processes {' '.join(pids)}" if pids else ""))
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        for line in links.splitlines():
            parts = line.split(": ")
            if len(parts) > 1 and parts[1].split("@")[0].startswith(prefix):
                left.append(f"link {parts[1].split('@')[0]}")
        left += [f"process {pid}: {cmd[:200]}" for pid, cmd in processes_mentioning(self.state_dir)]
        return left


def processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of the running processes whose command line contains ``text``."""
    found = []
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append((int(d.name), cmd))
    return found


def testbed_fixture(name: str, *, scope: str = "module", fixture_name: str | None = None, **kwargs):
    """A pytest fixture yielding an up :class:`Testbed` (``Testbed(name, **kwargs)``): skipped
    with the reason when the machine cannot run one; always taken down afterwards (also when a
    test fails; at interpreter exit as a last resort), and checked to leave nothing behind.
    Bind it to a module variable: the variable's name is the fixture's (or give
    ``fixture_name``)."""

    def fixture():
        why = testbed_unavailable()
        if why:
            print(why, file=sys.stderr)
            pytest.skip(why)
        tb = Testbed(name, **kwargs)
        atexit.register(tb.down_quietly)
        try:
            tb.up()
            yield tb
        finally:
            tb.down()
            left = tb.leftovers()
            assert not left, f"testbed {name} left {left}"

    fixture.__name__ = fixture_name or f"testbed_{name}"
    return pytest.fixture(scope=scope, name=fixture_name)(fixture)


# imported into test modules, these are no tests (pytest collects functions named test*)
testbed_unavailable.__test__ = False  # type: ignore[attr-defined]
testbed_fixture.__test__ = False  # type: ignore[attr-defined]


def _kill_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, 9)
        except OSError:
            pass


def _text(b) -> str:
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b
