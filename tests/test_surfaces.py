"""Shipped surfaces that had no test of their own:

- the training Prometheus exporter (``train.metrics_port``), scraped over HTTP during a run (the
  ZeRO-2 run that the resume tests start from);
- ZeRO-2 training resumed on another number of workers, checked on the weights;
- the ``posefr`` command: ``synth`` + ``shards validate``, ``verify``, ``train --resume-from``.

The training tests are end-to-end runs of the real trainer on the session's local Ray: marked slow.
"""

from __future__ import annotations

import json
import math
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from posefr_dist.cli import main as posefr_main
from posefr_dist.config import load_config
from tests.conftest import free_port
from tests.data_utils import nan_points, rewrite_shard, tiny_cfg

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "jobs" / "configs" / "tiny-cpu.yaml"
#: a validation metric that is defined on the tiny validation split (it has few 90+ probes)
METRIC = "val/tar@far=0.1/all"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from posefr_dist.data.synth import synthesize

    root = tmp_path_factory.mktemp("surfaces") / "shards"
    synthesize(tiny_cfg(identities=16, views_per_identity=8, rows_per_shard=32), str(root), use_ray=False)
    return str(root)


def _cfg(shards: str, storage_path, name: str, *extra: str):
    return load_config(TINY_CONFIG, [f"data.uri={shards}", f"train.storage_path={storage_path}",
                                     f"train.run_name={name}", f"train.checkpoint_metric={METRIC}", *extra])


def _epoch_checkpoints(history: list[dict]) -> dict[int, str]:
    return {int(h["epoch"]): h["checkpoint"] for h in history if h.get("end_of_epoch")}


def _param_names(ckpt: str) -> list[str]:
    """Names of the model's parameters (not its buffers: batch-norm statistics, spectral-norm
    vectors and AdaFace's norm EMA change in any forward pass in training mode)."""
    from posefr_dist.train.checkpoint import load_model

    model, _ = load_model(ckpt)
    return [n for n, _ in model.named_parameters()]


# --------------------------------------------------------------------------------------------
# The training exporter
# --------------------------------------------------------------------------------------------

#: every family TrainingMetrics serves (k8s/monitoring/podmonitor.yaml scrapes the port "posefr-metrics"
#: without a keep list, so these names are what dashboards and alerts see)
EXPORTED = ("posefr_train_samples_per_second", "posefr_train_loss", "posefr_train_learning_rate",
            "posefr_train_epoch", "posefr_train_step", "posefr_train_data_wait_fraction",
            "posefr_data_skipped_rows", "posefr_val_tar")


def _scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]] | None:
    """Families -> [(labels, value)] of one scrape; None while nothing answers."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            text = r.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return None
    return {f.name: [(s.labels, s.value) for s in f.samples] for f in text_string_to_metric_families(text)}


def _value(scrape: dict, name: str, **labels: str) -> float | None:
    for lab, v in scrape.get(name, []):
        if all(lab.get(k) == w for k, w in labels.items()):
            return v
    return None


@pytest.mark.slow
def test_training_exporter_serves_the_metrics_during_a_run(zero2):
    """Rank 0 serves /metrics on train.metrics_port while it trains (the ZeRO-2 run of the fixture
    below, scraped every 0.2 s): every family is there, the step counter rises between scrapes,
    throughput, loss and learning rate are positive, and after the first validation the TAR per
    bin is a share."""
    outcome, scrapes, port = zero2["outcome"], zero2["scrapes"], zero2["port"]
    epochs = zero2["cfg"].train.epochs
    assert outcome.last_metrics["epoch"] == epochs - 1
    assert len(scrapes) >= 3, f"the exporter on port {port} answered {len(scrapes)} time(s) during the run"

    for s in scrapes:
        missing = [n for n in EXPORTED if n not in s]
        assert not missing, f"families missing from /metrics: {missing}"
    steps = [_value(s, "posefr_train_step") for s in scrapes]
    assert steps == sorted(steps), f"the step gauge went back: {steps}"
    assert steps[-1] > steps[0] and len(set(steps)) >= 2, f"the step gauge did not rise between scrapes: {steps}"
    stepped = [s for s in scrapes if _value(s, "posefr_train_step") >= 1]
    assert stepped, "no scrape after the first logged step"
    for s in stepped:  # set together with the step at every logged step
        assert _value(s, "posefr_train_samples_per_second") > 0
        assert _value(s, "posefr_train_learning_rate") > 0
        loss = _value(s, "posefr_train_loss", term="loss")
        assert loss is not None and math.isfinite(loss) and loss > 0
        assert {lab["term"] for lab, _ in s["posefr_train_loss"]} == {"loss", "loss_2d", "loss_3d", "loss_je"}
        assert 0 <= _value(s, "posefr_train_epoch") <= epochs - 1
    validated = [s for s in scrapes if s["posefr_val_tar"]]
    assert validated, "no scrape after the first validation"
    tar = _value(validated[-1], "posefr_val_tar", bin="all", far="0.1")
    assert tar is not None and 0.0 <= tar <= 1.0, validated[-1]["posefr_val_tar"]
    wait = _value(validated[-1], "posefr_train_data_wait_fraction")
    assert 0.0 <= wait <= 1.0
    # set with every validation: these shards have no bad row
    assert _value(validated[-1], "posefr_data_skipped_rows", split="train") == 0.0
    assert _value(validated[-1], "posefr_data_skipped_rows", split="val") == 0.0
    epochs_seen = {_value(s, "posefr_train_epoch") for s in scrapes}
    assert len(epochs_seen) >= 2, f"scraped during one epoch only: {epochs_seen}"
    print(f"{len(scrapes)} scrapes; steps seen {sorted(set(steps))}; epochs seen {sorted(epochs_seen)}")


# --------------------------------------------------------------------------------------------
# ZeRO-2: train on 2 workers, resume on 1 (and the CLI resume on 2)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero2(shards, tmp_path_factory, ray_local):
    """A 2-worker ZeRO-2 run of 2 epochs (both epoch checkpoints kept). Its rank 0 also serves the
    training exporter (``train.metrics_port``, a report at every step), scraped over HTTP every
    0.2 s while the run lasts: the scrapes are kept for the exporter test."""
    from posefr_dist.train.trainer import train

    out = tmp_path_factory.mktemp("zero2")
    port = free_port()
    cfg = _cfg(shards, out, "zero2", "train.zero_stage=2", "train.epochs=2", "train.keep_checkpoints=2",
               f"train.metrics_port={port}", "train.log_every_steps=1")
    url = f"http://127.0.0.1:{port}/metrics"
    scrapes: list[dict] = []
    done = threading.Event()

    def scrape_until_done() -> None:  # the trainer keeps the main thread
        while not done.is_set():
            s = _scrape(url)
            if s is not None:
                scrapes.append(s)
            done.wait(0.2)

    scraper = threading.Thread(target=scrape_until_done, daemon=True)
    scraper.start()
    try:
        outcome = train(cfg)
    finally:
        done.set()
        scraper.join(timeout=10)
    ckpts = _epoch_checkpoints(outcome.history)
    assert sorted(ckpts) == [0, 1], outcome.history
    return {"cfg": cfg, "outcome": outcome, "ckpts": ckpts, "scrapes": scrapes, "port": port}


@pytest.mark.slow
def test_zero2_resume_on_one_worker_starts_from_the_epoch0_weights(zero2, shards, tmp_path):
    """ZeRO-2 resume on another worker count loads the consolidated weights with a fresh optimizer
    (its fp32 master partitions refreshed from them). The resumed run trains its one epoch at a
    learning rate of 1e-30, so every optimizer step leaves the weights where they were: the
    parameters it saves must be the epoch-0 checkpoint's. A resume that silently kept the initial
    (seeded) weights, or ZeRO's stale fp32 masters, would save those instead, which are far away."""
    from posefr_dist.config import LossConfig, ModelConfig
    from posefr_dist.model import build_model
    from posefr_dist.train.checkpoint import load_weights
    from posefr_dist.train.trainer import train

    ck0, ck1 = zero2["ckpts"][0], zero2["ckpts"][1]
    meta0 = json.loads(Path(ck0, "meta.json").read_text())
    assert (meta0["world_size"], meta0["zero_stage"], meta0["epoch"]) == (2, 2, 0)
    resumed = train(_cfg(shards, tmp_path, "one", "train.zero_stage=2", "train.epochs=2", "train.num_workers=1",
                         "train.cpus_per_worker=1", "train.lr=1e-30", f"train.resume_from={ck0}"))
    ends = _epoch_checkpoints(resumed.history)
    assert sorted(ends) == [1], resumed.history
    meta = json.loads(Path(ends[1], "meta.json").read_text())
    assert (meta["world_size"], meta["zero_stage"], meta["epoch"]) == (1, 2, 1)
    assert meta["global_step"] > meta0["global_step"]

    names = _param_names(ck0)
    w0, w1, got = load_weights(ck0), load_weights(ck1), load_weights(ends[1])
    torch.manual_seed(zero2["cfg"].train.seed)  # seeded as the loop seeds its initial model
    init = build_model(ModelConfig(**meta0["config"]["model"]), LossConfig(**meta0["config"]["loss"]),
                       meta0["num_classes"], meta0["image_size"], meta0["num_points"]).state_dict()

    def dist(a: dict, b: dict) -> float:
        return max(float((a[n].float() - b[n].float()).abs().max()) for n in names)

    # the comparison can tell: training moved the weights away from the initial ones and on in epoch 1
    assert dist(w0, init) > 1e-3 and dist(w1, w0) > 1e-3, (dist(w0, init), dist(w1, w0))
    for n in names:
        torch.testing.assert_close(got[n], w0[n], rtol=0, atol=1e-20, msg=f"{n}: not the epoch-0 weights")
    # and it trained: its epoch loss is that of the epoch-0 weights, below the first epoch's from scratch
    loss0 = [h["train/loss"] for h in zero2["outcome"].history if h.get("end_of_epoch")][0]
    loss_resumed = [h["train/loss"] for h in resumed.history if h.get("end_of_epoch")][0]
    assert math.isfinite(loss_resumed) and loss_resumed < loss0, (loss_resumed, loss0)


@pytest.mark.slow
def test_cli_train_resume_from_continues_the_epochs(zero2, shards, tmp_path, capsys):
    """``posefr train --resume-from`` the epoch-0 checkpoint on the same 2 workers (DeepSpeed's own
    state: weights, ZeRO-2 optimizer partitions, schedule): it reports epoch 1 only, continues the
    step count, and ends at the uninterrupted run's epoch-1 weights."""
    from posefr_dist.train.checkpoint import load_weights

    ck0, ck1 = zero2["ckpts"][0], zero2["ckpts"][1]
    rc = posefr_main(["train", "--config", str(TINY_CONFIG), "--resume-from", ck0, f"data.uri={shards}",
                      f"train.storage_path={tmp_path}", "train.run_name=cli-resumed", "train.zero_stage=2",
                      "train.epochs=2", f"train.checkpoint_metric={METRIC}"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    run = tmp_path / "cli-resumed"
    assert f"run: {run}" in out and "best checkpoint: " in out, out[-3000:]
    history = json.loads((run / "history.json").read_text())
    ends = _epoch_checkpoints(history)
    assert sorted(ends) == [1], history
    meta0 = json.loads(Path(ck0, "meta.json").read_text())
    meta = json.loads(Path(ends[1], "meta.json").read_text())
    assert meta["epoch"] == 1 and meta["world_size"] == 2
    assert meta["global_step"] == json.loads(Path(ck1, "meta.json").read_text())["global_step"] > meta0["global_step"]
    a, b = load_weights(ck1), load_weights(ends[1])
    for n in _param_names(ck1):
        torch.testing.assert_close(b[n], a[n], rtol=0, atol=1e-5, msg=n)


# --------------------------------------------------------------------------------------------
# posefr synth / shards validate / verify (no Ray)
# --------------------------------------------------------------------------------------------


def test_cli_synth_writes_shards_that_validate(tmp_path, capsys):
    out = tmp_path / "shards"
    ids, views = 6, 4
    rc = posefr_main(["synth", str(out), "--identities", str(ids), "--views-per-identity", str(views), "--seed", "3",
                      "--image-size", "64", "--points", "64", "--rows-per-shard", "8", "--val-fraction", "0.2",
                      "--test-fraction", "0.3", "--no-ray"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert f"wrote {ids * views} samples" in printed and f"of {ids} identities to {out}" in printed, printed
    man = json.loads((out / "manifest.json").read_text())
    assert (man["image_size"], man["num_points"]) == (64, 64)
    assert set(man["splits"]) == {"train", "val", "test"}
    assert sum(s["rows"] for s in man["splits"].values()) == ids * views
    assert sum(s["identities"] for s in man["splits"].values()) == ids  # identity-disjoint splits
    import hashlib

    for split in man["splits"].values():
        assert split["shards"] and sum(s["rows"] for s in split["shards"]) == split["rows"]
        for s in split["shards"]:
            assert hashlib.sha256((out / s["path"]).read_bytes()).hexdigest() == s["sha256"], s["path"]

    assert posefr_main(["shards", "validate", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{out}: OK" in printed
    for split, s in man["splits"].items():
        assert f"{split}: {s['rows']} rows, {s['identities']} identities" in printed, printed

    # the same command fails on a broken copy (a NaN in one point array; checksum kept valid)
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    rewrite_shard(bad, man["splits"]["train"]["shards"][0]["path"], lambda t: nan_points(t, 1))
    assert posefr_main(["shards", "validate", str(bad)]) == 1
    assert "points" in capsys.readouterr().err


def test_cli_verify_writes_the_report(tmp_path, capsys):
    from tests.test_verify_reference import gaussian_data, write_embeddings

    emb, subj, yaw, enr = gaussian_data(seed=5)
    src = tmp_path / "embeddings.parquet"
    write_embeddings(src, emb, subj, yaw, enr)
    out = tmp_path / "report"
    assert posefr_main(["verify", str(src), "--out", str(out), "--far", "0.1,0.01", "--no-ray"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out}/report.json" in printed and "| 90+ |" in printed, printed
    rep = json.loads((out / "report.json").read_text())
    bins = rep["bins"]
    probe_yaw = np.array([np.nan if y is None else abs(float(y)) for y, e in zip(yaw, enr) if not e])
    expect = {"0-30": ((probe_yaw >= 0) & (probe_yaw < 30)).sum(), "30-60": ((probe_yaw >= 30) & (probe_yaw < 60)).sum(),
              "60-90": ((probe_yaw >= 60) & (probe_yaw < 90)).sum(), "90+": (probe_yaw >= 90).sum(),
              "unknown-pose": np.isnan(probe_yaw).sum(), "all": len(probe_yaw)}
    assert {k: bins[k]["probes"] for k in expect} == {k: int(v) for k, v in expect.items()}
    gallery = int(enr.sum())
    for name in ("0-30", "30-60", "60-90", "90+", "all"):
        b = bins[name]
        assert b["genuine"] + b["impostor"] == b["probes"] * gallery, name
        assert set(b["tar_at_far"]) == {"0.1", "0.01"}, b["tar_at_far"]
    assert 0.0 < bins["all"]["tar_at_far"]["0.1"] <= 1.0
    for name in ("report.md", "roc.png", "tar_vs_yaw.png"):
        assert (out / name).stat().st_size > 0, name
