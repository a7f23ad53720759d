"""Distributed training on CPU: Ray Train workers under DeepSpeed (gloo), fed by Ray Data.

These are end-to-end runs of the real trainer (about a minute each on 2 cores): marked slow.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from posefr_dist import storage
from posefr_dist.config import ConfigError, load_config
from posefr_dist.data.synth import synthesize
from posefr_dist.train.checkpoint import export_checkpoint, load_weights
from posefr_dist.train.trainer import check_config, train
from tests.data_utils import tiny_cfg

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "jobs" / "configs" / "tiny-cpu.yaml"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "shards"
    synthesize(tiny_cfg(identities=16, views_per_identity=8, rows_per_shard=32), str(root), use_ray=False)
    return str(root)


def _cfg(shards: str, storage_path: str, name: str, *extra: str):
    return load_config(TINY_CONFIG, [f"data.uri={shards}", f"train.storage_path={storage_path}",
                                     f"train.run_name={name}", *extra])


def _epochs(outcome) -> list[int]:
    return [int(h["epoch"]) for h in outcome.history if h.get("end_of_epoch")]


def _weights(ckpt: str) -> dict[str, torch.Tensor]:
    if storage.is_remote(ckpt):
        from safetensors.torch import load

        return load(storage.read_bytes(storage.join(ckpt, "model.safetensors")))
    return load_weights(ckpt)


#: the uninterrupted baseline and the mid-epoch killed run: 2 epochs, validated and checkpointed
#: every 2 steps too (all checkpoints kept)
MID_EPOCH = ("train.epochs=2", "train.val_every_steps=2", "train.keep_checkpoints=20",
             "train.checkpoint_metric=val/tar@far=0.1/all")


@pytest.fixture(scope="module")
def baseline(shards, tmp_path_factory, ray_local):
    """An uninterrupted 2-worker run of 2 epochs that also validates and checkpoints every 2 steps
    and traces the rows each rank trains on: the reference of the resume tests (its end-of-epoch
    checkpoints, its final weights) and of the mid-epoch kill (its trace, its final weights).
    Validation does not change what is trained: the runs compared with it validate elsewhere."""
    out = tmp_path_factory.mktemp("runs")
    cfg = _cfg(shards, str(out), "baseline", *MID_EPOCH, f"data.trace_dir={out / 'trace'}")
    return cfg, train(cfg)


def _last_checkpoint(run_uri: str) -> str:
    ckpts = glob.glob(os.path.join(run_uri, "checkpoint_2*"))
    return max(ckpts, key=lambda c: json.loads(Path(c, "meta.json").read_text())["global_step"])


def _epoch_end_checkpoint(outcome, epoch: int) -> str:
    return next(h["checkpoint"] for h in outcome.history if h.get("end_of_epoch") and int(h["epoch"]) == epoch)


@pytest.mark.slow
def test_two_workers_train_and_loss_falls(baseline):
    cfg, outcome = baseline
    assert _epochs(outcome) == [0, 1]
    losses = [h["train/loss"] for h in outcome.history if h.get("end_of_epoch")]
    assert losses[-1] < losses[0], losses
    assert outcome.best_checkpoint and os.path.exists(os.path.join(outcome.best_checkpoint, "meta.json"))
    meta = json.loads(Path(outcome.best_checkpoint, "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["num_classes"] > 0 and meta["config"]["train"]["run_name"] == "baseline"
    # every report carries the exact validation metrics
    last = outcome.history[-1]
    assert "val/tar@far=0.1/all" in last and "val/tar@far=0.01/90+" in last
    summary = json.loads(Path(outcome.run_uri, "train_summary.json").read_text())
    assert summary["best_checkpoint"] == outcome.best_checkpoint
    assert Path(outcome.run_uri, "config.yaml").exists()


@pytest.mark.slow
def test_export_of_best_checkpoint_embeds(baseline, tmp_path):
    from posefr_dist.model import load_2d

    _, outcome = baseline
    conf = export_checkpoint(outcome.best_checkpoint, str(tmp_path / "model"))
    model = load_2d(str(tmp_path / "model"))
    x = torch.randn(3, 3, model.image_size, model.image_size)
    e = model.embed(x)
    assert e.shape == (3, conf["embedding_dim"]) and torch.isfinite(e).all()
    # the same weights give the same 2D embeddings as the full model built from the checkpoint
    from posefr_dist.config import LossConfig, ModelConfig
    from posefr_dist.model import build_model

    meta = json.loads(Path(outcome.best_checkpoint, "meta.json").read_text())
    full = build_model(ModelConfig(**meta["config"]["model"]), LossConfig(**meta["config"]["loss"]),
                       meta["num_classes"], meta["image_size"], meta["num_points"])
    full.load_state_dict(load_weights(outcome.best_checkpoint))
    full.eval()
    with torch.no_grad():
        ref = full.embed_2d(x)
    torch.testing.assert_close(torch.nn.functional.normalize(e, dim=1), torch.nn.functional.normalize(ref, dim=1),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_killed_worker_is_replaced_and_no_epoch_counted_twice(killed):
    """The killed run of the mid-epoch test below (rank 1 killed in epoch 1, one failure allowed):
    its worker group is replaced, the run finishes, and every epoch is reported once."""
    out, outcome = killed
    assert (out / "killed" / "chaos-fired").exists(), "the worker was not killed"
    assert _epochs(outcome) == [0, 1]
    assert outcome.last_metrics["epoch"] == 1


@pytest.mark.slow
def test_run_failing_past_its_restarts_raises_and_keeps_its_checkpoint(shards, tmp_path, ray_local):
    """A worker killed at the start of epoch 1 with no restart allowed: ``train`` raises
    ``RuntimeError("training failed: ...")`` with the cause, and the epoch-0 checkpoint, the one a
    ``train.resume_from`` continues from, is kept and complete. (That resuming from a checkpoint
    ends at the uninterrupted run's weights is the mid-epoch kill test's, and on ZeRO-2 the CLI
    resume test's, in test_surfaces.)"""
    cfg = _cfg(shards, str(tmp_path), "stopped", "train.epochs=2", "train.num_workers=1", "train.cpus_per_worker=1",
               "train.max_steps_per_epoch=2", "train.keep_checkpoints=3", "train.checkpoint_metric=val/tar@far=0.1/all",
               "train.chaos_kill_at=1:0:0", "train.max_failures=0")
    with pytest.raises(RuntimeError, match="training failed: .*(died|exit|kill|Worker|worker)"):
        train(cfg)
    assert (tmp_path / "stopped" / "chaos-fired").exists(), "the worker was not killed"
    ckpts = sorted(glob.glob(str(tmp_path / "stopped" / "checkpoint_2*")))
    assert len(ckpts) == 1
    meta = json.loads(Path(ckpts[0], "meta.json").read_text())
    assert (meta["epoch"], meta["world_size"], meta["global_step"]) == (0, 1, 2)
    weights = _weights(ckpts[0])
    assert weights and all(torch.isfinite(v).all() for v in weights.values())
    check_config(_cfg(shards, str(tmp_path), "resumed", f"train.resume_from={ckpts[0]}"))  # a valid start


@pytest.mark.slow
def test_resume_from_two_workers_to_one(baseline, shards, tmp_path, ray_local):
    _, base = baseline
    first = _epoch_end_checkpoint(base, 0)
    out = train(_cfg(shards, str(tmp_path), "one", "train.epochs=2", "train.num_workers=1",
                     "train.cpus_per_worker=1", f"train.resume_from={first}"))
    assert _epochs(out) == [1]
    meta = json.loads(Path(out.best_checkpoint, "meta.json").read_text())
    assert meta["world_size"] == 1


@pytest.mark.slow
def test_train_from_s3_with_s3_storage(demo_twice):
    """The second run of the demo preset below: its shards read from S3, its run written there."""
    out, data, runs = demo_twice["outcomes"][1], demo_twice["data"][1], demo_twice["s3_runs"]
    assert data.startswith("s3://") and runs.startswith("s3://")
    assert _epochs(out) == [0, 1]
    assert out.best_checkpoint.startswith("s3://")
    assert storage.exists(storage.join(out.best_checkpoint, "model.safetensors"))
    assert storage.exists(storage.join(runs, "second", "train_summary.json"))
    losses = [h["train/loss"] for h in out.history if h.get("end_of_epoch")]
    assert losses[-1] < losses[0]


BAD_CONFIGS = [
    ("train.zero_stage=5", "train.zero_stage"),
    ("data.batch_size=1000", "data.batch_size"),
    ("model.encoder_2d=resnet9", "model.encoder_2d"),
    ("train.checkpoint_metric=loss", "train.checkpoint_metric"),
    ("model.pretrained_2d=/nonexistent/adaface_ir18.ckpt", "model.pretrained_2d"),
]

#: one fresh process calls the ``posefr`` entry point (posefr_dist.cli.main, what ``python -m
#: posefr_dist.cli`` runs) once per argument list, each with its own stderr; per case it prints the
#: exit code, the stderr, the seconds taken and whether Ray was started
CLI_CASES = """
import contextlib, io, json, logging, sys, time
from posefr_dist.cli import main
for argv in json.loads(sys.argv[1]):
    logging.root.handlers.clear()  # the command's logging.basicConfig binds to this case's stderr
    err, t0 = io.StringIO(), time.monotonic()
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
    ray = sys.modules.get("ray")
    print("CASE " + json.dumps({"rc": rc, "stderr": err.getvalue(), "seconds": time.monotonic() - t0,
                                "ray_started": bool(ray is not None and ray.is_initialized())}), flush=True)
"""


@pytest.fixture(scope="module")
def bad_config_runs(shards, tmp_path_factory):
    """The CLI on every bad config of BAD_CONFIGS, in one fresh process (one torch + Ray import
    for all of them), each with a storage path of its own."""
    root = tmp_path_factory.mktemp("bad-config")
    argvs, paths = [], {}
    for k, (override, _) in enumerate(BAD_CONFIGS):
        paths[override] = root / f"case{k}"
        paths[override].mkdir()
        argvs.append(["train", "--config", str(TINY_CONFIG), f"data.uri={shards}",
                      f"train.storage_path={paths[override]}", override])
    r = subprocess.run([sys.executable, "-c", CLI_CASES, json.dumps(argvs)], capture_output=True, text=True,
                       timeout=120 * len(BAD_CONFIGS), cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    cases = [json.loads(ln[5:]) for ln in r.stdout.splitlines() if ln.startswith("CASE ")]
    assert len(cases) == len(BAD_CONFIGS), r.stdout[-3000:] + r.stderr[-3000:]
    return {override: (case, paths[override]) for (override, _), case in zip(BAD_CONFIGS, cases)}


@pytest.mark.parametrize("override, field", BAD_CONFIGS)
def test_bad_config_fails_before_workers_start(bad_config_runs, override, field):
    """No Ray is needed to reject these: the CLI fails in seconds and names the field."""
    case, storage_path = bad_config_runs[override]
    assert case["rc"] == 1
    assert field in case["stderr"], case["stderr"]
    assert not case["ray_started"]
    assert not (storage_path / "tiny").exists()  # nothing started, nothing written
    assert case["seconds"] < 120


def test_missing_shards_fail_before_workers_start(tmp_path):
    cfg = load_config(TINY_CONFIG, [f"data.uri={tmp_path / 'none'}", f"train.storage_path={tmp_path}"])
    from posefr_dist.train.trainer import check_config

    with pytest.raises(ConfigError, match="data.uri.*manifest.json not found"):
        check_config(cfg)


def _trace(folder: Path) -> tuple[dict[tuple[int, int, int], list[int]], list[tuple[int, int, int]]]:
    """Per (rank, epoch, batch) the global row ids a run trained on (a rerun of a step replaces
    it), and every (rank, epoch, batch) in the order written."""
    steps, order = {}, []
    for f in sorted(folder.glob("rank*.jsonl")):
        rank = int(f.stem[4:])
        for line in f.read_text().splitlines():
            d = json.loads(line)
            key = (rank, d["epoch"], d["batch"])
            steps[key] = d["gid"]
            order.append(key)
    return steps, order


@pytest.fixture(scope="module")
def killed(shards, tmp_path_factory, ray_local):
    """The baseline's config with rank 1 killed at epoch 1 step 3 (one failure allowed), tracing
    its rows too. Returns (folder, outcome)."""
    out = tmp_path_factory.mktemp("killed")
    outcome = train(_cfg(shards, str(out), "killed", *MID_EPOCH, "train.chaos_kill_at=1:3:1", "train.max_failures=1",
                         f"data.trace_dir={out / 'trace'}"))
    return out, outcome


@pytest.mark.slow
def test_mid_epoch_kill_resumes_at_its_batch_with_the_same_rows_and_weights(baseline, killed):
    """A worker killed mid-epoch: the restarted group resumes at the last checkpoint's batch (it
    reads nothing before it), trains on the same rows per rank and step as the uninterrupted
    baseline, and ends with the same weights (1e-5)."""
    ref_cfg, ref = baseline
    out, got = killed
    assert (out / "killed" / "chaos-fired").exists(), "the worker was not killed"
    ref_steps, _ = _trace(Path(ref_cfg.data.trace_dir))
    got_steps, order = _trace(out / "trace")
    assert got_steps == ref_steps
    # rank 1's restart: the first step written after the kill is mid-epoch 1, not its start
    r1 = [k for k in order if k[0] == 1]
    restart = next(i for i in range(1, len(r1)) if r1[i][1:] <= r1[i - 1][1:])
    assert r1[restart][1] == 1 and r1[restart][2] > 0, r1
    a, b = _weights(_last_checkpoint(ref.run_uri)), _weights(_last_checkpoint(got.run_uri))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)


DEMO_CONFIG = REPO / "jobs" / "configs" / "demo-cpu.yaml"


@pytest.fixture(scope="module")
def demo_twice(shards, tmp_path_factory, s3_server, ray_local):
    """Two runs of the demo's jam-je preset on the tiny shards (from scratch, 2 epochs): the first
    reads the shards from their folder and writes its run to a folder; the second reads a copy of
    them in S3 and writes its run to S3."""
    local = tmp_path_factory.mktemp("demo-preset")
    s3 = f"s3://{s3_server['bucket']}/train-demo-preset-{time.monotonic_ns()}"
    storage.upload_dir(shards, storage.join(s3, "shards"))
    outs = []
    try:
        for name, data, runs in (("first", shards, str(local)), ("second", storage.join(s3, "shards"),
                                                                  storage.join(s3, "runs"))):
            cfg = load_config(DEMO_CONFIG, [f"data.uri={data}", f"train.storage_path={runs}", f"train.run_name={name}",
                                            "train.epochs=2", "data.batch_size=8", "model.pretrained_2d=",
                                            "train.pretrained_lr_mult=1.0", "train.freeze_pretrained_epochs=0",
                                            "model.variant=jam-je"])
            outs.append(train(cfg))
        yield {"outcomes": outs, "data": [shards, storage.join(s3, "shards")], "s3_runs": storage.join(s3, "runs")}
    finally:
        try:
            storage.delete(s3)
        except Exception:
            pass


@pytest.mark.slow
def test_jam_je_demo_preset_gives_identical_results_twice(demo_twice):
    """Two runs of the demo's jam-je preset (on tiny data, from scratch; the second from and to
    S3): the same validation TARs at every report and the same final weights."""
    outs = demo_twice["outcomes"]
    tars = [[{k: v for k, v in h.items() if k.startswith("val/tar")} for h in o.history] for o in outs]
    assert tars[0] and tars[0] == tars[1]
    # each run's last checkpoint (the run's latest is always kept)
    a, b = _weights(outs[0].history[-1]["checkpoint"]), _weights(outs[1].history[-1]["checkpoint"])
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
