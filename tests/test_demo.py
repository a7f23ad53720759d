"""The main job (`posefr demo`) end to end at a tiny size, as a separate process."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.data_utils import TINY_PRETRAIN_SETS

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_pipeline_tiny(tmp_path, tiny_pretrain):
    out = tmp_path / "demo"
    # stage 0 (the resumable pretraining) finds the session's tiny pretraining of the same preset
    # finished and reuses it; the pretraining itself is test_pretrain's
    shutil.copytree(tiny_pretrain["out"], out / "pretrain")
    cmd = [sys.executable, "-m", "posefr_dist.cli", "demo", "--out", str(out),
           "--config", str(REPO / "jobs" / "configs" / "demo-cpu.yaml"),
           "synth.identities=14", "synth.views_per_identity=8", "synth.rows_per_shard=64",
           "train.epochs=1", "data.batch_size=8", "train.warmup_steps=2", "train.freeze_pretrained_epochs=0",
           # one worker: the pipeline is under test here; 2-worker runs of this preset are test_train's
           "train.num_workers=1"]
    for kv in TINY_PRETRAIN_SETS:
        cmd += ["--pretrain-set", kv]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    for line in ("[0/4] pretrain", "[1/4] synth", "[2/4] validate", "[3/4] train 2d-only", "[3/4] train jam-je", "[4/4] compare",
                 "profile (90+) TAR@1%FAR"):
        assert line in r.stdout, r.stdout[-3000:]
    table = (out / "comparison.md").read_text()
    assert table.splitlines()[0].startswith("| yaw bin | 2d-only") and "| 90+ |" in table
    bins = json.loads((out / "comparison.json").read_text())
    assert set(bins) == {"2d-only", "jam-je"} and "90+" in bins["jam-je"]
    for variant in ("2d-only-seed0", "jam-je-seed0"):
        assert (out / "eval" / variant / "report.json").exists()
        assert (out / "models" / variant / "model.safetensors").exists()
    assert str(out) in r.stdout
    # both variants fine-tuned from the encoder of stage 0, which reused the finished pretraining
    assert "(reused)" in r.stdout, r.stdout[-3000:]
    enc = out / "pretrain" / "encoder"
    assert (enc / "config.json").exists() and (out / "pretrain" / "shards" / "manifest.json").exists()
    for variant in ("2d-only-seed0", "jam-je-seed0"):
        cfg = (out / "runs" / variant / "config.yaml").read_text()
        assert f"pretrained_2d: {enc}" in cfg, cfg
    # a local run's terminal is not flooded by Ray's own worker logs (raysupport.quiet_local_workers)
    logs = r.stdout + r.stderr
    assert "Failed to query Ray Train Controller actor state" not in logs
    assert "Reporting training result" not in logs
