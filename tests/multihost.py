"""Shared steps of the multi-host tests and benchmark (not a test module): configs of runs on a
testbed (tests/testbed.py), S3 access from the root namespace, the training traces
(``data.trace_dir``: per-rank step records and ``workers.jsonl``, one line per worker start).
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from tests.testbed import Testbed

POSEFR = str(Path(sys.executable).with_name("posefr"))
BUCKET = "posefr"
WORKERS = ("w1", "w2", "w3")
#: optimizer steps per epoch of a 2-worker run of :func:`config` on the tests' shards (112 train rows, 2 x 8)
STEPS_PER_EPOCH = 7


def s3(bed: Testbed) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=bed.s3_endpoint.split("://", 1)[1], scheme="http",
                             access_key="testing", secret_key="testing", region="us-east-1")


def upload(bed: Testbed, local: Path, key: str) -> str:
    fs = s3(bed)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            with fs.open_output_stream(f"{BUCKET}/{key}/{f.relative_to(local).as_posix()}") as out:
                out.write(f.read_bytes())
    return f"s3://{BUCKET}/{key}"


def read(bed: Testbed, uri: str) -> bytes:
    with s3(bed).open_input_stream(uri.removeprefix("s3://")) as f:
        return f.read()


def config(tmp: Path, shards: str, name: str, **train: object) -> tuple[Path, Path]:
    """A YAML config of a tiny 2-worker run, one worker per host; returns it and its trace folder."""
    trace = tmp / f"trace-{name}"
    t = {"epochs": 2, "num_workers": 2, "cpus_per_worker": 1, "worker_resources": {"train_slot": 1},
         "storage_path": f"s3://{BUCKET}/mh/runs", "run_name": name, "val_every_steps": 2,
         "keep_checkpoints": 30, "checkpoint_metric": "val/tar@far=0.1/all", "max_failures": 3,
         "preemption_check_steps": 1, "lr": 0.05, "warmup_steps": 2, "log_every_steps": 5, **train}
    cfg = {"data": {"uri": shards, "batch_size": 8, "shuffle_buffer": 32, "decode_batch_size": 32, "cache": "off",
                    "trace_dir": str(trace)},
           "model": {"variant": "jam-je", "encoder_2d": "ir_tiny", "encoder_3d": "pointnet2_tiny", "embedding_dim": 64},
           "loss": {"lambda_je": 0.1, "je_bins": 16},
           "eval": {"fars": [0.1, 0.01], "batch_size": 64},
           "train": t}
    path = tmp / f"{name}.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path, trace


def train(bed: Testbed, config: Path, timeout: float = 600):
    """``posefr train`` on the head host, in the background."""
    return bed.popen("head", [POSEFR, "train", "--config", str(config)], timeout=timeout)


def steps(trace: Path, rank: int = 0) -> list[dict]:
    f = trace / f"rank{rank}.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def starts(trace: Path) -> list[dict]:
    f = trace / "workers.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines()] if f.exists() else []


def restarted(trace: Path, after: float):
    """True once both ranks of a new worker group started after ``after`` (a ``time.time()``)."""
    return lambda: len([s for s in starts(trace) if s["time"] > after]) >= 2


def strike(bed: Testbed, trace: Path, proc, action: str, epoch: int, batch: int, timeout: float = 240,
           after: float = 0.0, capacity: Future | None = None, run: str | None = None) -> tuple[str, float]:
    """Once rank 0 of the group started after ``after`` reached (epoch, batch) (and, with ``run``,
    a checkpoint of that group early in an epoch ``>= epoch`` is registered in the run's history,
    :func:`checkpointed`):
    ``bed.<action>`` (kill, cut, preempt) on the host of its rank 1, then wait for the restarted
    group. The previous victim's return (``capacity``, a :func:`restore` running in a thread; the
    restart needs its host) is awaited after the action, so the position is not missed while it
    works. Returns the host and the time of the action."""
    # the group's own steps: those after its start (the previous group may step on for a while
    # after the previous action, e.g. through a preemption's grace period)
    since = max((s["time"] for s in starts(trace) if s["time"] > after), default=after)
    wait(reached(trace, epoch, batch, since), proc, timeout, f"epoch {epoch} batch {batch} (before the {action})")
    if run is not None:
        # a report reaches the history when the controller next polls the workers: a checkpoint
        # saved just before the failure but not yet registered is not one the restart resumes from
        wait(checkpointed(bed, run, epoch, since), proc, timeout,
             f"a registered checkpoint early in epoch {epoch} or later (before the {action})")
    victim = host_of(bed, trace, 1, after=after)
    t = time.time()
    getattr(bed, action)(victim)
    if capacity is not None:
        capacity.result()  # its error, if any, is raised here
    wait(restarted(trace, t), proc, timeout, f"a restart after the {action} of {victim}")
    return victim, t


def wait(pred, proc, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before {what}:\n{tail(proc)}")
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}:\n{tail(proc)}")


def tail(proc) -> str:
    out = getattr(proc, "log_path", None)
    return Path(out).read_text()[-4000:] if out and Path(out).exists() else ""


def finish(proc, timeout: float = 300) -> None:
    rc = proc.wait(timeout=timeout)
    assert rc == 0, tail(proc)


def reached(trace: Path, epoch: int, batch: int, after: float = 0.0):
    """True once rank 0 has taken batch ``batch`` of ``epoch`` (or later) after ``after`` (a
    ``time.time()``: a group started then; its predecessor's steps do not count)."""
    return lambda: any((s["epoch"], s["batch"]) >= (epoch, batch) and s["time"] > after for s in steps(trace))


def checkpointed(bed: Testbed, name: str, epoch: int, after: float):
    """True once the run's history holds a checkpoint registered after ``after`` in the first
    steps of an epoch ``>= epoch`` (at least 3 of its STEPS_PER_EPOCH still to go: a failure
    struck now hits the middle of that epoch, not its end)."""
    def pred() -> bool:
        try:
            hist = history(bed, name)
        except FileNotFoundError:
            return False
        return any(h.get("checkpoint") and not h.get("end_of_epoch") and h.get("epoch", -1) >= epoch
                   and h["time"] > after and h["step"] - h["epoch"] * STEPS_PER_EPOCH <= STEPS_PER_EPOCH - 3
                   for h in hist)
    return pred


def host_of(bed: Testbed, trace: Path, rank: int, after: float = 0.0) -> str:
    ips = {bed.ip(h): h for h in WORKERS}
    start = [s for s in starts(trace) if s["rank"] == rank and s["time"] >= after][-1]
    return ips[start["node_ip"]]


def history(bed: Testbed, name: str) -> list[dict]:
    return json.loads(read(bed, f"s3://{BUCKET}/mh/runs/{name}/history.json"))


def final_weights(bed: Testbed, name: str, tmp: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    last = max((h for h in history(bed, name) if h.get("checkpoint")), key=lambda h: h["step"])
    local = tmp / f"{name}-final.safetensors"
    local.write_bytes(read(bed, last["checkpoint"].rstrip("/") + "/model.safetensors"))
    return load_file(str(local))


def epochs_reported(bed: Testbed, name: str) -> list[int]:
    return [int(h["epoch"]) for h in history(bed, name) if h.get("end_of_epoch")]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


def restore(bed: Testbed, *hosts: str) -> None:
    """Bring hosts back (for the next test): heal links, start Ray again where it is down."""
    for h in hosts:
        bed.heal(h)
        bed.restart(h)


def timeline(events: dict[str, float], starts: list[dict], hist: list[dict], taken: list[dict] = ()) -> str:
    """The failures, worker starts, reports and (``taken``) rank 0's batches of a run in time
    order (for messages)."""
    t0 = min([*events.values(), *(s["time"] for s in starts)], default=0.0)
    rows = [(t, f"{kind} (a host)") for kind, t in events.items()]
    rows += [(s["time"], f"start rank {s['rank']}/{s['world']} at epoch {s['epoch']} batch {s['batch']} "
                         f"step {s['global_step']}") for s in starts]
    rows += [(h["time"], f"report step {h['step']} epoch {h.get('epoch')}"
                         + (" checkpoint" if h.get("checkpoint") else "")
                         + (" (preemption)" if h.get("preemption_checkpoint") else "")) for h in hist]
    rows += [(s["time"], f"rank 0 takes epoch {s['epoch']} batch {s['batch']}") for s in taken]
    return "\n" + "\n".join(f"{t - t0:8.2f}s {what}" for t, what in sorted(rows))


def embeddings(n_gallery: int, n_probes: int, dim: int, seed: int = 0) -> pa.Table:
    from posefr_dist.data.schema import embedding_schema

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_gallery, dim), dtype=np.float32)
    subj = np.concatenate([np.arange(n_gallery), rng.integers(0, n_gallery, n_probes)])
    yaw = np.concatenate([rng.uniform(-15, 15, n_gallery), rng.uniform(-110, 110, n_probes)]).astype(np.float32)
    emb = centres[subj] + rng.standard_normal((subj.size, dim), dtype=np.float32) * (1 + np.abs(yaw) / 30)[:, None]
    enr = np.zeros(subj.size, bool)
    enr[:n_gallery] = True
    return pa.table({
        "sample_id": pa.array([f"r{i}" for i in range(subj.size)]),
        "subject_id": pa.array([f"s{s}" for s in subj]),
        "yaw_deg": pa.array(yaw, pa.float32()),
        "enrollment": pa.array(enr),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float32()), dim),
    }, schema=embedding_schema(dim))


def comparable(report: dict) -> dict:
    """A report without the path it was read from."""
    protocol = {k: v for k, v in report["protocol"].items() if k != "source"}
    return json.loads(json.dumps({"protocol": protocol, "bins": report["bins"]}))
