"""Ray Tune search of the entropy-loss weights: trials run the real Ray Train trainer on CPU.

The end-to-end experiments (marked slow) share one local Ray (2 CPUs) and one tiny synthetic data
set; each trial is a 1-worker run of one to three epochs. The three-trial experiment, which several
tests assert on, keeps its state, runs and results in object storage (S3), and is interrupted after
two trials and resumed for the third. The rest checks the search space, the resources, the outputs
and the CLI without Ray.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import time
from pathlib import Path

import pytest

from posefr_dist.config import ConfigError, dump_config, load_config
from posefr_dist.data.synth import synthesize
from posefr_dist.tune.search import concurrency, experiment_uri, run_tune, trial_config
from posefr_dist.tune.space import apply_params
from tests.data_utils import tiny_cfg

REPO = Path(__file__).resolve().parents[1]
TUNE_CONFIG = REPO / "jobs" / "configs" / "tune-tiny-cpu.yaml"
#: a validation metric that is defined on the tiny validation split (it has few 90+ probes)
METRIC = "val/tar@far=0.1/all"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune") / "shards"
    synthesize(tiny_cfg(identities=24, views_per_identity=8, rows_per_shard=32, val_fraction=0.25,
                        test_fraction=0.15), str(root), use_ray=False)
    return str(root)


def _cfg(data: str, out: Path | str, name: str, *extra: str):
    from posefr_dist import storage

    return load_config(TUNE_CONFIG, [f"data.uri={data}", f"tune.storage_path={storage.join(str(out), 'tune')}",
                                     f"train.storage_path={storage.join(str(out), 'runs')}", f"tune.name={name}",
                                     f"tune.metric={METRIC}", *extra])


def _read(uri: str) -> str:
    from posefr_dist import storage

    return storage.read_text(uri)


def _history(run: str) -> list[dict]:
    from posefr_dist import storage

    return json.loads(_read(storage.join(run, "history.json")))


# --------------------------------------------------------------------------------------------
# Search space, resources, outputs, CLI (no Ray)
# --------------------------------------------------------------------------------------------


def test_default_space_is_the_entropy_weights():
    space = load_config(None).tune.space
    assert space == {"loss.lambda_je": {"loguniform": [1e-3, 10.0]}, "loss.je_bins": {"choice": [16, 32, 64]},
                     "loss.je_bandwidth": {"uniform": [0.5, 2.0]}}
    cfg = load_config(None)
    assert (cfg.tune.metric, cfg.tune.mode, cfg.tune.search, cfg.tune.scheduler) == \
        ("val/tar@far=0.01/90+", "max", "optuna", "asha")


@pytest.mark.parametrize("override, message", [
    ("tune.space.loss.lambda_jee={uniform: [1, 2]}", r"tune.space: loss.lambda_jee: unknown key; did you mean lambda_je"),
    ("tune.space.loss.lambda_je={normal: [0, 1]}", r"tune.space.loss.lambda_je: unknown distribution 'normal'"),
    ("tune.space.loss.lambda_je={loguniform: [0, 1]}", r"tune.space.loss.lambda_je: loguniform needs low > 0"),
    ("tune.space.loss.je_bandwidth={uniform: [2, 1]}", r"tune.space.loss.je_bandwidth: uniform needs low < high"),
    ("tune.space.loss.je_bins={uniform: [8, 64]}", r"tune.space.loss.je_bins: is an integer field; use randint"),
    ("tune.space.loss.je_bins={choice: [1, 16]}", r"tune.space: loss.je_bins: must be in \[2, 512\], got 1"),
    ("tune.space.loss.je_bins={randint: [8.5, 16]}", r"tune.space.loss.je_bins: randint takes integer bounds"),
    ("tune.space.loss.je_bins={grid: [16, 32]}", r"tune.space.loss.je_bins: grid needs tune.search=random"),
    ("tune.space.loss.w_3d=3", r"tune.space.loss.w_3d: expected one distribution"),
    ("tune.space.train.run_name={choice: [a, b]}", r"tune.space.train.run_name: cannot be searched"),
    ("tune.space.loss={choice: [1]}", r"tune.space: loss: names a whole section"),
    ("tune.initial_points=[{loss.lambda_je: 0.1}]", r"tune.initial_points\[0\]: Optuna needs a value for every key"),
    ("tune.time_attr=epoch", r"tune.time_attr: got 'epoch'"),
    ("tune.driver_cpus=0", r"tune.driver_cpus: must be > 0"),
])
def test_bad_space_and_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TUNE_CONFIG, [override])


def test_space_overrides_nest_replace_and_remove(tmp_path):
    cfg = load_config(TUNE_CONFIG, ["tune.space.loss.je_bins={choice: [16, 32]}", "tune.space.loss.je_bandwidth=null",
                                    "tune.space.train.lr={loguniform: [1e-6, 0.1]}"])
    assert cfg.tune.space == {"loss.lambda_je": {"loguniform": [1e-3, 10.0]}, "loss.je_bins": {"choice": [16, 32]},
                              "train.lr": {"loguniform": [1e-6, 0.1]}}
    # the resolved config (what an experiment saves) loads back the same
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg


def test_trial_config_applies_values_and_places_the_run():
    base = load_config(TUNE_CONFIG, [f"tune.metric={METRIC}"])
    cfg = trial_config(base, {"loss.lambda_je": 0.5, "loss.je_bins": 64, "loss.je_bandwidth": 1.5}, "s3://b/exp", "t1")
    assert (cfg.loss.lambda_je, cfg.loss.je_bins, cfg.loss.je_bandwidth) == (0.5, 64, 1.5)
    assert (cfg.train.storage_path, cfg.train.run_name) == ("s3://b/exp/runs", "t1")
    assert (cfg.train.checkpoint_metric, cfg.train.checkpoint_mode) == (METRIC, "max")
    assert base.loss.lambda_je == 0.1  # the base is untouched
    with pytest.raises(ConfigError, match="loss.je_bins"):
        apply_params(base, {"loss.je_bins": 1})


def test_concurrency_from_resources():
    cfg = load_config(TUNE_CONFIG, ["tune.max_concurrent=0"])  # 1 worker x 0.5 CPU + 0.2 driver
    assert concurrency(cfg, {"CPU": 2.0}) == 1
    assert concurrency(cfg, {"CPU": 16.0}) == 9  # 0.7 held + 1.0 for data per trial
    gpu = load_config(TUNE_CONFIG, ["tune.max_concurrent=0", "train.use_gpu=true", "train.num_workers=2"])
    assert concurrency(gpu, {"CPU": 64.0, "GPU": 8.0}) == 4
    with pytest.raises(ConfigError, match="one trial needs 2 GPU"):
        concurrency(gpu, {"CPU": 64.0, "GPU": 1.0})
    with pytest.raises(ConfigError, match="tune.max_concurrent: 2 trials hold 1.4 of the cluster's 2 CPUs"):
        concurrency(load_config(TUNE_CONFIG, ["tune.max_concurrent=2"]), {"CPU": 2.0})


def test_outputs_from_rows(tmp_path):
    """Table (sorted, CSV + Markdown), best config and plot from plain trial rows."""
    from posefr_dist.tune.results import sort_rows, write_outputs

    cfg = load_config(TUNE_CONFIG, [f"tune.metric={METRIC}", "tune.num_samples=4"])
    rows = []
    for tid, status, lam, obj in [("a", "completed", 0.01, 0.5), ("b", "stopped early", 3.0, 0.2),
                                  ("c", "error", 0.2, float("nan")), ("d", "completed", 0.1, 0.7)]:
        rows.append({"trial_id": tid, "status": status, "epochs_done": 2.0, "objective": obj, "objective_last": obj,
                     "loss.lambda_je": lam, "loss.je_bins": 32, "loss.je_bandwidth": 1.0, "train/loss": 1.0,
                     "time_s": 1.0, "run": f"runs/{tid}", "checkpoint": "", "error": ""})
    rows = sort_rows(rows, "max")
    assert [r["trial_id"] for r in rows] == ["d", "a", "b", "c"]
    outputs, summary = write_outputs(rows, cfg, str(tmp_path), wall_s=12.0)
    assert summary["best"]["trial_id"] == "d" and not summary["interrupted"]
    table = list(csv.DictReader(open(outputs["table_csv"])))
    assert [r["trial_id"] for r in table] == ["d", "a", "b", "c"] and table[0]["rank"] == "1"
    md = Path(outputs["table_md"]).read_text()
    assert md.count("\n| ") == 5 and "stopped early" in md
    assert Path(outputs["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = load_config(outputs["best_config"])
    assert best.loss.lambda_je == 0.1 and best.train.run_name == "tiny-je-best"
    assert best.train.storage_path == cfg.train.storage_path
    assert Path(outputs["best_config"]).read_text().startswith("# Best trial d")


def test_cli_parser_and_new_experiment_over_an_old_one(shards, tmp_path):
    from posefr_dist.tune.cli import add_tune_parser, main

    p = argparse.ArgumentParser()
    add_tune_parser(p.add_subparsers(dest="command"))
    args = p.parse_args(["tune", "--config", "c.yaml", "--num-samples", "3", "--max-concurrent", "1", "--resume",
                         "train.epochs=1"])
    assert (args.num_samples, args.max_concurrent, args.resume, args.overrides) == (3, 1, True, ["train.epochs=1"])
    assert callable(args.func)
    # an existing experiment is not overwritten; a bad value fails before Ray starts
    cfg = _cfg(shards, tmp_path, "exists")
    os.makedirs(experiment_uri(cfg))
    Path(experiment_uri(cfg), "base_config.yaml").write_text(dump_config(cfg))
    with pytest.raises(ConfigError, match="exists; continue it with --resume"):
        run_tune(cfg)
    common = ["tune", "--config", str(TUNE_CONFIG), f"data.uri={shards}", f"tune.storage_path={tmp_path}"]
    assert main([*common, "tune.space.loss.je_bins={choice: [1]}"]) == 1
    assert main(["tune", "--resume", "--config", str(TUNE_CONFIG), f"data.uri={shards}",
                 f"tune.storage_path={tmp_path}", "tune.name=none"]) == 1
    assert not (tmp_path / "tiny-je").exists()


# --------------------------------------------------------------------------------------------
# End to end (real local Ray; each trial a Ray Train run)
# --------------------------------------------------------------------------------------------

GOOD = {"train.lr": 0.05, "loss.lambda_je": 0.1, "loss.je_bins": 16, "loss.je_bandwidth": 1.0}
POOR = {**GOOD, "train.lr": 1e-6}  # learns nothing: its validation stays at the initial model's


def _finished_state(cfg, row) -> dict:
    """What a finished trial left: its run's files (written only by its training: modification
    time and bytes), its run's checkpoint folders, and its Tune results (bytes; Tune uploads its
    trial folders again, same content, when it restores an experiment)."""
    import pyarrow.fs as pafs

    from posefr_dist import storage

    fs, path = storage.filesystem(row["run"])
    state = {"checkpoints": sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(path))
                                   if i.base_name.startswith("checkpoint_"))}
    for name in ("history.json", "train_summary.json"):  # a stopped trial's training writes no summary
        info = fs.get_file_info(f"{path}/{name}")
        if info.type != pafs.FileType.NotFound:
            state[name] = (info.mtime, storage.read_bytes(storage.join(row["run"], name)))
    state["progress.csv"] = storage.read_bytes(storage.join(experiment_uri(cfg), f"trial_{row['trial_id']}",
                                                            "progress.csv"))
    return state


@pytest.fixture(scope="module")
def experiment(shards, tmp_path_factory, s3_server, ray_local):
    """3 trials of 3 epochs, one at a time, Optuna TPE + ASHA (one rung, after epoch 2), with the
    experiment's state, the trials' runs and the results in object storage (S3; the data local).
    It is interrupted once its first two trials have finished (``tune.stop_after_trials``) and
    resumed (``--resume``) for the third.

    Arranged so that ASHA's decision is certain: the space adds train.lr, the first two trials
    (initial points) are a learning one and one whose lr is too small to learn, and the objective
    is the epoch's mean training loss (min): after two epochs the first is ~10 below the second
    (68 against 78), while validation TARs on a split this small differ by noise. The second trial
    must be stopped at the rung.

    Yields (config, the interrupted outcome, its finished trials' state, the resumed outcome)."""
    from posefr_dist import storage

    out = f"s3://{s3_server['bucket']}/tune-experiment-{time.monotonic_ns()}"
    cfg = _cfg(shards, out, "je3", "tune.num_samples=3", "train.epochs=3", "tune.grace_period=2",
               "tune.metric=train/loss", "tune.mode=min", "tune.space.train.lr={loguniform: [1e-6, 0.1]}",
               f"tune.initial_points={json.dumps([GOOD, POOR])}", "tune.stop_after_trials=2")
    try:
        first = run_tune(cfg)
        finished = {r["trial_id"]: _finished_state(cfg, r) for r in first.rows
                    if r["status"] in ("completed", "stopped early")}
        time.sleep(1.1)  # S3 keeps modification times in whole seconds
        yield cfg, first, finished, run_tune(cfg, resume=True)
    finally:
        try:
            storage.delete(out)
        except Exception:
            pass


def _row_with_lr(rows, lr):
    return min(rows, key=lambda r: abs(math.log(r["train.lr"]) - math.log(lr)))


@pytest.mark.slow
def test_experiment_of_three_trials_completes(experiment):
    from posefr_dist import storage

    cfg, _, _, out = experiment
    print(f"\nexperiment wall time {out.wall_s:.1f}s\n" + _read(out.outputs["table_md"]))
    assert len(out.rows) == 3 and not out.interrupted
    assert all(r["status"] in ("completed", "stopped early") for r in out.rows), out.rows
    assert len({r["trial_id"] for r in out.rows}) == 3
    objectives = [r["objective"] for r in out.rows]
    assert objectives == sorted(objectives)  # mode min: best first
    for r in out.rows:  # every trial trained into its own run folder under the experiment
        hist = _history(r["run"])
        assert len([h for h in hist if h.get("end_of_epoch")]) == r["epochs_done"]
        assert storage.exists(storage.join(r["checkpoint"], "model.safetensors"))
    for name in ("table_csv", "table_md", "best_config", "plot", "summary"):
        assert len(storage.read_bytes(out.outputs[name])) > 0, name
    assert out.outputs["plot"].endswith("objective_vs_lambda_je.png")
    assert json.loads(_read(out.outputs["summary"]))["counts"]["error"] == 0


@pytest.mark.slow
def test_asha_stops_the_poor_trial_early(experiment):
    cfg, _, _, out = experiment
    good, poor = _row_with_lr(out.rows, GOOD["train.lr"]), _row_with_lr(out.rows, POOR["train.lr"])
    assert good is not poor and good["status"] == "completed" and good["epochs_done"] == 3
    from posefr_dist import storage

    good_at_rung = _history(good["run"])[1]["train/loss"]
    assert poor["objective_last"] > good_at_rung + 3  # the comparison ASHA made after epoch 2
    assert poor["status"] == "stopped early" and poor["epochs_done"] == 2
    # its training was stopped with the trial: two epochs in its history, no final summary
    assert len(_history(poor["run"])) == 2
    assert not storage.exists(storage.join(poor["run"], "train_summary.json"))


@pytest.mark.slow
def test_best_config_is_what_the_best_trial_trained(experiment, tmp_path):
    """best.yaml, fetched from object storage, is the config the best trial trained with (the
    config.yaml its training wrote into its run), but for where its own run goes; the trainer's
    upfront check accepts it. Training it is training that config, which the trial did."""
    from posefr_dist import storage
    from posefr_dist.train.trainer import check_config
    from posefr_dist.tune.search import load_config_text

    cfg, _, _, out = experiment
    local = tmp_path / "best.yaml"
    local.write_text(_read(out.outputs["best_config"]))
    best = load_config(local)
    row = out.best
    assert (best.loss.lambda_je, best.loss.je_bins, best.loss.je_bandwidth, best.train.lr) == \
        (row["loss.lambda_je"], row["loss.je_bins"], row["loss.je_bandwidth"], row["train.lr"])
    assert (best.train.storage_path, best.train.run_name) == (cfg.train.storage_path, "je3-best")
    check_config(best)
    trained = load_config_text(storage.read_text(storage.join(row["run"], "config.yaml")), "config.yaml")
    assert trained.train.run_name == row["trial_id"] and trained.loss.lambda_je == best.loss.lambda_je
    moved = apply_params(best, {}, train__storage_path=trained.train.storage_path,
                         train__run_name=trained.train.run_name)
    assert dump_config(moved) == dump_config(trained)


@pytest.mark.slow
def test_interrupted_experiment_resumes_without_rerunning_finished_trials(experiment):
    """The experiment above stopped after two trials; resumed, it ran the third only: the finished
    trials' runs were not written again (same times, same bytes, same checkpoints), nor were new
    results recorded for them."""
    import pyarrow.fs as pafs

    from posefr_dist import storage

    cfg, first, finished, second = experiment
    assert first.interrupted and not second.interrupted
    assert len(finished) == 2, first.rows
    assert {r["status"] for r in first.rows if r["trial_id"] in finished} == {"completed", "stopped early"}
    assert len(second.rows) == 3 and set(finished) < {r["trial_id"] for r in second.rows}, second.rows
    for tid, state in finished.items():
        row = next(r for r in second.rows if r["trial_id"] == tid)
        assert _finished_state(cfg, row) == state, tid
    assert {"history.json", "train_summary.json"} <= {k for s in finished.values() for k in s}
    new = next(r for r in second.rows if r["trial_id"] not in finished)
    assert new["status"] in ("completed", "stopped early") and _history(new["run"]), new
    fs, runs = storage.filesystem(storage.join(experiment_uri(cfg), "runs"))  # one run folder per trial
    assert len([i for i in fs.get_file_info(pafs.FileSelector(runs)) if i.type == pafs.FileType.Directory]) == 3
    assert len(list(csv.DictReader(io.StringIO(_read(second.outputs["table_csv"]))))) == 3


@pytest.mark.slow
def test_experiment_on_s3(experiment):
    """Experiment state, trial runs and results in object storage (the experiment above); resuming
    the finished experiment there runs nothing again."""
    from posefr_dist import storage
    from posefr_dist.tune.search import load_config_text

    cfg, _, _, out = experiment
    assert cfg.tune.storage_path.startswith("s3://")
    assert out.experiment_uri == f"{cfg.tune.storage_path}/je3"
    for r in out.rows:
        assert r["checkpoint"].startswith("s3://") and r["run"].startswith(f"{out.experiment_uri}/"), r
        assert storage.exists(storage.join(r["checkpoint"], "model.safetensors"))
    for uri in out.outputs.values():
        assert uri.startswith("s3://") and storage.exists(uri), uri
    best = load_config_text(storage.read_text(out.outputs["best_config"]), "best.yaml")
    assert best.loss.lambda_je == out.best["loss.lambda_je"]
    again = run_tune(cfg, resume=True)
    assert not again.interrupted
    assert [(r["trial_id"], r["status"], r["epochs_done"]) for r in again.rows] == \
        [(r["trial_id"], r["status"], r["epochs_done"]) for r in out.rows]
