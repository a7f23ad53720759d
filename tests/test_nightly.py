"""``posefr nightly``: model registry, history, comparisons, regression gate, idempotence, Pushgateway.

The fast tests replace the evaluation (``posefr_dist.eval.embed.evaluate``) with canned reports
whose TARs the test chooses; everything else (registry, history files, comparisons, summary,
metrics text file, exit codes) is the real code. The slow test runs two real nights on synthetic
shards with a real local Ray and a real Prometheus Pushgateway (Debian's ``prometheus-pushgateway``,
which CI installs; without it that test fails).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from posefr_dist import storage
from posefr_dist.eval import nightly as N
from posefr_dist.eval import verify_arrays
from tests.conftest import free_port, stop_process, wait_for_port

REPO = Path(__file__).resolve().parents[1]
PUSHGATEWAY_BIN = "/usr/bin/prometheus-pushgateway"
FARS = ("0.1", "0.01")
BINS = ("0-30", "30-60", "60-90", "90+", "all")

# --------------------------------------------------------------------------------------------
# helpers: a registry of (weightless) model folders, canned reports
# --------------------------------------------------------------------------------------------


def add_model(models: Path, name: str, created=None, fmt: str = "posefr-2d") -> Path:
    d = models / name
    d.mkdir(parents=True, exist_ok=True)
    conf = {"format": fmt, "version": 1, "encoder_2d": "ir_tiny", "image_size": 64, "embedding_dim": 32}
    if created is not None:
        conf["created"] = created
    (d / "config.json").write_text(json.dumps(conf))
    return d


_SKELETON: dict = {}


def canned_report(tars: dict[str, dict[str, float | None]] | float) -> dict:
    """A real report (verify_arrays on random embeddings) whose TARs are replaced by ``tars``
    (one value for every bin and FAR, or {bin: {far: value}})."""
    if not _SKELETON:
        rng = np.random.default_rng(0)
        n = 120
        yaw = rng.uniform(-100, 100, n)
        yaw[:12] = 0.0
        subj = np.repeat(np.arange(12), 10)
        enroll = np.zeros(n, bool)
        enroll[::10] = True
        yaw[::10] = 0.0
        _SKELETON.update(verify_arrays(rng.normal(size=(n, 8)), subj, yaw, enroll, fars=(0.1, 0.01)))
    rep = copy.deepcopy(_SKELETON)
    for b in BINS:
        for f in FARS:
            v = tars if not isinstance(tars, dict) else tars.get(b, {}).get(f)
            rep["bins"][b]["tar_at_far"][f] = v
    return json.loads(json.dumps(rep))


class FakeEvaluate:
    """Stands in for ``posefr_dist.eval.embed.evaluate``: the TARs of a model come from ``tars``."""

    def __init__(self, tars: dict[str, object]):
        self.tars = tars
        self.calls: list[str] = []
        self.fail_on: str | None = None

    def __call__(self, model_uri, data_uri, out_uri, *, split="test", **kw):
        name = model_uri.rstrip("/").rsplit("/", 1)[-1]
        self.calls.append(name)
        os.makedirs(out_uri, exist_ok=True)
        for f in ("roc.png", "tar_vs_yaw.png"):
            Path(out_uri, f).write_bytes(b"\x89PNG fake " + name.encode())
        return canned_report(self.tars[name])


@pytest.fixture
def fake_eval(monkeypatch):
    import posefr_dist.eval.embed as E

    fake = FakeEvaluate({})
    monkeypatch.setattr(E, "evaluate", fake)
    return fake


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``root`` (hidden ones too): modification time (ns) and bytes."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath, f)
            out[str(p.relative_to(root))] = (p.stat().st_mtime_ns, p.read_bytes())
    return out


def run(models, history, date, *extra, data="unused-data") -> int:
    return N.main(["nightly", "--models", str(models), "--data", str(data), "--history", str(history),
                   "--date", date, "--far", "0.1,0.01", *extra])


# --------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------


def test_creation_time_config_then_registry_then_mtime(tmp_path):
    models = tmp_path / "models"
    add_model(models, "a", created="2026-01-03T00:00:00Z")
    add_model(models, "b", created=1767225600)  # 2026-01-01T00:00:00Z, Unix seconds
    add_model(models, "c")  # registry.json
    d = add_model(models, "d")  # mtime
    add_model(models, "not-a-model", created="2030-01-01", fmt="something-else")
    (models / "_tmp").mkdir()
    (models / "registry.json").write_text(json.dumps({"models": {"c": {"created_at": "2026-01-02T12:00:00"},
                                                                 "gone": {"created_at": "2020-01-01"}}}))
    os.utime(d / "config.json", (1798761600, 1798761600))  # 2027-01-01
    reg = N.list_models(str(models))
    assert [m.name for m in reg] == ["b", "c", "a", "d"]
    assert [m.created_iso for m in reg] == ["2026-01-01T00:00:00Z", "2026-01-02T12:00:00Z", "2026-01-03T00:00:00Z",
                                            "2027-01-01T00:00:00Z"]
    assert [m.created_from for m in reg] == ["config.json created", "registry.json created_at",
                                             "config.json created", "config.json modification time"]
    assert reg[0].uri == os.path.join(str(models), "b")


def test_bad_creation_time_names_the_file_and_field(tmp_path):
    models = tmp_path / "models"
    add_model(models, "a", created="yesterday")
    with pytest.raises(N.NightlyError, match=r"a/config.json: created: 'yesterday' is not an ISO 8601"):
        N.list_models(str(models))


def test_usage_and_registry_errors(tmp_path, fake_eval, capsys):
    models, history = tmp_path / "models", tmp_path / "history"
    assert run(models, history, "2026-01-01") == 1
    assert "no exported model" in capsys.readouterr().err
    add_model(models, "a", created="2026-01-01")
    assert run(models, history, "2026-01-01", "--model", "zzz") == 1
    err = capsys.readouterr().err
    assert err.startswith("posefr nightly: error: ") and "no model zzz (models: a)" in err
    with pytest.raises(SystemExit) as e:
        run(models, history, "2026-13-01")
    assert e.value.code == 2
    assert "not a calendar date" in capsys.readouterr().err
    assert not history.exists() and fake_eval.calls == []


# --------------------------------------------------------------------------------------------
# history, comparisons, gate (canned evaluation)
# --------------------------------------------------------------------------------------------


def test_history_comparisons_and_gate(tmp_path, fake_eval, capsys):
    models, history = tmp_path / "models", tmp_path / "history"
    fake_eval.tars.update(a=0.80, b=0.795)
    add_model(models, "a", created="2026-01-01T10:00:00Z")
    assert run(models, history, "2026-01-01") == 0
    night = history / "2026-01-01" / "a"
    assert sorted(p.name for p in night.iterdir()) == ["metrics.prom", "report.json", "report.md", "roc.png",
                                                       "tar_vs_yaw.png"]
    rep = json.loads((night / "report.json").read_text())
    assert rep["nightly"] == {"date": "2026-01-01", "model": "a", "model_uri": str(models / "a"),
                              "created": "2026-01-01T10:00:00Z", "created_from": "config.json created",
                              "data": "unused-data", "split": "test"}
    prom = (night / "metrics.prom").read_text()
    assert 'posefr_tar{bin="all",far="0.1",model="a"} 0.8' in prom
    assert 'posefr_nightly_regressions{model="a"} 0.0' in prom
    assert "nothing earlier to compare with" in capsys.readouterr().out

    # a newer model, 0.5 points worse: within --max-drop 0.01
    add_model(models, "b", created="2026-01-02T10:00:00Z")
    assert run(models, history, "2026-01-02") == 0
    s = json.loads((history / "2026-01-02" / "summary.json").read_text())
    comps = s["models"]["b"]["comparisons"]
    assert {(c["against"], c["against_model"], c["against_date"]) for c in comps} == {("previous-model", "a", "2026-01-01")}
    assert len(comps) == len(BINS) * len(FARS) and not any(c["regression"] for c in comps)
    assert s["regressions"] == []
    capsys.readouterr()

    # the next night the same model b is worse in one bin and FAR (the data changed, say):
    # against its previous night (0.795 -> 0.70) and against the previous model a (0.80 -> 0.70)
    fake_eval.tars["b"] = {b: {f: 0.795 for f in FARS} for b in BINS}
    fake_eval.tars["b"]["90+"]["0.01"] = 0.70
    fake_eval.tars["b"]["60-90"]["0.1"] = None  # no figure: not compared
    assert run(models, history, "2026-01-03") == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "posefr nightly: regression: model b, bin 90+, FAR 0.01: TAR 0.7950 -> 0.7000 (drop 0.0950 > max 0.01) "
        "against its report of the previous night (night 2026-01-02)",
        "posefr nightly: regression: model b, bin 90+, FAR 0.01: TAR 0.8000 -> 0.7000 (drop 0.1000 > max 0.01) "
        "against previous model a (night 2026-01-01)",
    ]
    s = json.loads((history / "2026-01-03" / "summary.json").read_text())
    assert len(s["models"]["b"]["comparisons"]) == 2 * (len(BINS) * len(FARS) - 1)
    assert [(r["model"], r["bin"], r["far"], r["against"]) for r in s["regressions"]] == [
        ("b", "90+", "0.01", "previous-night"), ("b", "90+", "0.01", "previous-model")]
    prom = (history / "2026-01-03" / "b" / "metrics.prom").read_text()
    assert 'posefr_nightly_regressions{model="b"} 2.0' in prom
    assert 'posefr_nightly_tar_drop{against="previous-model",bin="90+",far="0.01",model="b"} 0.1' in prom
    md = (history / "2026-01-03" / "b" / "report.md").read_text()
    assert "## Nightly" in md and "**regression**" in md

    # a looser gate passes the same night without evaluating it again; only the night's summary
    # (which records the gate and its verdict) changes
    before = snapshot(history)
    assert run(models, history, "2026-01-03", "--max-drop", "0.1") == 0
    after = snapshot(history)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == {"2026-01-03/summary.json"}
    assert json.loads(after["2026-01-03/summary.json"][1])["regressions"] == []
    assert fake_eval.calls == ["a", "b", "b"]


def test_rerun_of_a_night_changes_nothing_and_gives_the_same_code(tmp_path, fake_eval, capsys):
    models, history = tmp_path / "models", tmp_path / "history"
    fake_eval.tars.update(a=0.9, b=0.5)
    add_model(models, "a", created="2026-01-01")
    assert run(models, history, "2026-01-01") == 0
    add_model(models, "b", created="2026-01-02")
    assert run(models, history, "2026-01-02") == 3
    first = capsys.readouterr()
    before = snapshot(history)
    time.sleep(0.05)
    for _ in range(2):
        assert run(models, history, "2026-01-02") == 3
        again = capsys.readouterr()
        assert again.err == first.err
        assert "already evaluated" in again.out
        assert snapshot(history) == before
        assert run(models, history, "2026-01-01", "--model", "a") == 0
        assert snapshot(history) == before
    assert fake_eval.calls == ["a", "b"]


def test_a_failed_push_is_an_error_after_the_history_is_written(tmp_path, fake_eval, capsys):
    models, history = tmp_path / "models", tmp_path / "history"
    fake_eval.tars.update(a=0.9, b=0.5)
    add_model(models, "a", created="2026-01-01")
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    assert run(models, history, "2026-01-01", "--pushgateway", dead) == 1
    err = capsys.readouterr().err
    assert f"posefr nightly: error: push of model a to {dead} failed" in err
    assert (history / "2026-01-01" / "a" / "report.json").exists()
    add_model(models, "b", created="2026-01-02")
    assert run(models, history, "2026-01-02", "--pushgateway", dead) == 3  # the regression wins
    err = capsys.readouterr().err
    assert "regression: model b" in err and "push of model b" in err


def test_previous_model_is_the_newest_older_one_with_a_report(tmp_path, fake_eval, capsys):
    models, history = tmp_path / "models", tmp_path / "history"
    fake_eval.tars.update(a=0.9, b=0.1, c=0.85)
    add_model(models, "a", created="2026-01-01")
    add_model(models, "b", created="2026-01-02")  # never evaluated
    add_model(models, "c", created="2026-01-03")
    assert run(models, history, "2026-01-01", "--model", "a") == 0
    assert run(models, history, "2026-01-05") == 3  # newest = c; a is its previous model with a report
    err = capsys.readouterr().err
    assert "model c, bin all, FAR 0.1: TAR 0.9000 -> 0.8500" in err and "previous model a (night 2026-01-01)" in err
    # a night evaluates several models in creation order, each compared with the one before it
    assert run(models, history, "2026-01-06", "--model", "c", "--model", "b") == 3
    s = json.loads((history / "2026-01-06" / "summary.json").read_text())
    against = {m: sorted({(c["against"], c["against_model"], c["against_date"]) for c in v["comparisons"]})
               for m, v in s["models"].items()}
    assert against == {"b": [("previous-model", "a", "2026-01-01")],
                       "c": [("previous-model", "b", "2026-01-06"), ("previous-night", "c", "2026-01-05")]}
    assert {r["model"] for r in s["regressions"]} == {"b"}  # c is far better than b, equal to itself


def test_other_data_is_not_compared(tmp_path, fake_eval, capsys):
    models, history = tmp_path / "models", tmp_path / "history"
    fake_eval.tars.update(a=0.9, b=0.1)
    add_model(models, "a", created="2026-01-01")
    assert run(models, history, "2026-01-01", data="s3://x/shards-v1") == 0
    add_model(models, "b", created="2026-01-02")
    assert run(models, history, "2026-01-02", data="s3://x/shards-v2") == 0
    out = capsys.readouterr().out
    assert "not compared with previous-model a (2026-01-01): data differs ('s3://x/shards-v1' then, " in out


def test_a_crashed_night_does_not_look_finished(tmp_path, fake_eval, monkeypatch, capsys):
    models, history = tmp_path / "models", tmp_path / "history"
    fake_eval.tars.update(a=0.9)
    add_model(models, "a", created="2026-01-01")
    real = storage.write_text

    def crash_on_report(uri, text):
        if uri.endswith("report.json"):
            raise OSError("disk full")
        return real(uri, text)

    monkeypatch.setattr(storage, "write_text", crash_on_report)
    with pytest.raises(OSError):
        N.run_nightly(str(models), "d", str(history), date="2026-01-01")
    night = history / "2026-01-01" / "a"
    assert (night / "report.md").exists() and not (night / "report.json").exists()
    assert [p.name for p in night.iterdir() if p.name.startswith(".")] == []  # no temp files left
    assert N.history_index(str(history)) == {}
    monkeypatch.setattr(storage, "write_text", real)
    assert run(models, history, "2026-01-01") == 0
    assert (night / "report.json").exists() and fake_eval.calls == ["a", "a"]


def test_history_and_registry_on_s3(s3_uri, fake_eval, capsys):
    """Models (creation time from the object's last-modified time) and history in object storage."""
    models, history = storage.join(s3_uri, "models"), storage.join(s3_uri, "nightly")
    fake_eval.tars.update(a=0.9, b=0.2)
    conf = json.dumps({"format": "posefr-2d", "version": 1})
    storage.write_text(storage.join(models, "a", "config.json"), conf)
    time.sleep(1.1)  # S3 last-modified times have one-second resolution
    storage.write_text(storage.join(models, "b", "config.json"), conf)
    reg = N.list_models(models)
    assert [m.name for m in reg] == ["a", "b"] and reg[0].created_from == "config.json modification time"
    assert run(models, history, "2026-01-01", "--model", "a") == 0
    assert run(models, history, "2026-01-02") == 3
    assert "model b, bin all, FAR 0.1: TAR 0.9000 -> 0.2000" in capsys.readouterr().err
    files = storage.list_files(history)
    assert storage.join(history, "2026-01-02", "b", "report.json") in files
    assert storage.join(history, "2026-01-02", "b", "metrics.prom") in files
    assert N.history_index(history) == {"a": ["2026-01-01"], "b": ["2026-01-02"]}
    assert run(models, history, "2026-01-02") == 3 and fake_eval.calls == ["a", "b"]


# --------------------------------------------------------------------------------------------
# end to end: real evaluation on a real local Ray, real Pushgateway, the job entry point
# --------------------------------------------------------------------------------------------


@pytest.fixture
def pushgateway(tmp_path):
    exe = shutil.which("prometheus-pushgateway") or PUSHGATEWAY_BIN
    if not os.path.exists(exe):
        pytest.fail(f"{PUSHGATEWAY_BIN} is missing: install Debian's prometheus-pushgateway "
                    "(apt-get install -y prometheus-pushgateway; `make test` does it through scripts/install.sh)")
    port = free_port()
    log = open(tmp_path / "pushgateway.log", "wb")
    proc = subprocess.Popen([exe, f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=30)
        yield f"127.0.0.1:{port}"
    finally:
        stop_process(proc)
        log.close()


def scrape(gateway: str) -> list[str]:
    with urllib.request.urlopen(f"http://{gateway}/metrics", timeout=10) as r:
        return r.read().decode().splitlines()


def export_models(models: Path) -> None:
    """alpha: an untrained 2d-only model; beta: alpha with its embedding layer's weights zeroed and
    its bias set to seeded noise, so every image gets (nearly) the same embedding: recognition gone."""
    import torch
    from safetensors.torch import load_file, save_file

    from posefr_dist.config import LossConfig, ModelConfig
    from posefr_dist.model import build_model, export_2d

    torch.manual_seed(0)
    m = build_model(ModelConfig(variant="2d-only", encoder_2d="ir_tiny", embedding_dim=32), LossConfig(),
                    num_classes=5, image_size=64, num_points=128)
    m.eval()
    export_2d(m, str(models / "alpha"))
    shutil.copytree(models / "alpha", models / "beta")
    w = load_file(str(models / "beta" / "model.safetensors"))
    w["head.3.weight"] = torch.zeros_like(w["head.3.weight"])
    w["head.3.bias"] = torch.randn(w["head.3.bias"].shape, generator=torch.Generator().manual_seed(1))
    save_file(w, str(models / "beta" / "model.safetensors"), metadata={"format": "posefr-2d"})
    for name, created in (("alpha", "2026-01-01T12:00:00Z"), ("beta", "2026-01-02T12:00:00Z")):
        p = models / name / "config.json"
        conf = json.loads(p.read_text())
        conf["created"] = created
        p.write_text(json.dumps(conf, indent=2))


@pytest.mark.slow
def test_two_real_nights_regression_rerun_and_pushgateway(tmp_path, ray_local, pushgateway, capsys):
    from posefr_dist.data.synth import synthesize
    from tests.data_utils import tiny_cfg

    shards, staged, models, history = (tmp_path / "shards", tmp_path / "staged", tmp_path / "models",
                                       tmp_path / "history")
    synthesize(tiny_cfg(identities=12, views_per_identity=10), str(shards), use_ray=False)
    export_models(staged)
    args = ["--data", str(shards), "--history", str(history), "--far", "0.1,0.01", "--batch-size", "16",
            "--pushgateway", pushgateway]

    # night 1: the registry holds alpha only
    shutil.copytree(staged / "alpha", models / "alpha")
    assert N.main(["nightly", "--models", str(models), "--date", "2026-01-01", *args]) == 0, capsys.readouterr().err
    capsys.readouterr()
    r1 = json.loads((history / "2026-01-01" / "alpha" / "report.json").read_text())
    tar1 = r1["bins"]["all"]["tar_at_far"]["0.1"]
    assert tar1 > 0.15, "the untrained model must recognise somewhat for the regression to show"

    # night 2: beta, newer and worse, is the newest model
    shutil.copytree(staged / "beta", models / "beta")
    assert N.main(["nightly", "--models", str(models), "--date", "2026-01-02", *args]) == 3
    err = capsys.readouterr().err
    r2 = json.loads((history / "2026-01-02" / "beta" / "report.json").read_text())
    tar2 = r2["bins"]["all"]["tar_at_far"]["0.1"]
    assert tar2 < tar1 - 0.05, (tar1, tar2)  # the fixture really is worse
    assert (f"posefr nightly: regression: model beta, bin all, FAR 0.1: TAR {tar1:.4f} -> {tar2:.4f} "
            f"(drop {tar1 - tar2:.4f} > max 0.01) against previous model alpha (night 2026-01-01)") in err
    for night, name in (("2026-01-01", "alpha"), ("2026-01-02", "beta")):
        files = sorted(p.name for p in (history / night / name).iterdir())
        assert files == ["metrics.prom", "report.json", "report.md", "roc.png", "tar_vs_yaw.png"], files
    summary = json.loads((history / "2026-01-02" / "summary.json").read_text())
    assert summary["regressions"] and all(r["model"] == "beta" for r in summary["regressions"])

    # the Pushgateway holds both models' figures (job posefr_nightly, one group per model)
    lines = scrape(pushgateway)
    for name, tar in (("alpha", tar1), ("beta", tar2)):
        hit = [ln for ln in lines if ln.startswith("posefr_tar{") and 'bin="all"' in ln and 'far="0.1"' in ln
               and f'model="{name}"' in ln and 'job="posefr_nightly"' in ln]
        assert len(hit) == 1, (name, [ln for ln in lines if ln.startswith("posefr_")])
        assert float(hit[0].rsplit(" ", 1)[1]) == pytest.approx(tar)
    regs = {ln for ln in lines if ln.startswith("posefr_nightly_regressions{")}
    assert any('model="beta"' in ln and not ln.endswith(" 0") for ln in regs), regs

    # rerun night 2 through the job entry point, in a fresh process: nothing changes, same verdict
    before = snapshot(history)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    r = subprocess.run([sys.executable, "jobs/nightly.py", "--models", str(models), "--date", "2026-01-02", *args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 3, r.stderr[-3000:]
    assert [ln for ln in r.stderr.splitlines() if "regression:" in ln] == \
        [ln for ln in err.splitlines() if "regression:" in ln]
    assert "already evaluated" in r.stdout
    assert snapshot(history) == before
    # and night 1 again, in process
    assert N.main(["nightly", "--models", str(models), "--date", "2026-01-01", "--model", "alpha", *args]) == 0
    assert snapshot(history) == before
