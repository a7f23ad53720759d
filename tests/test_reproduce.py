"""benchmarks/reproduce.py: the ablation table, and the whole script at a tiny size."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.reproduce import mean_std, table  # noqa: E402
from tests.data_utils import TINY_PRETRAIN_SETS  # noqa: E402


def report(values: dict[str, float]) -> dict:
    return {"bins": {b: {"tar_at_far": {"0.01": v, "0.001": v / 2}} for b, v in values.items()}}


def test_table_means_stds_and_paired_differences():
    results = {
        "2d-only": {0: report({"90+": 0.20, "all": 0.40}), 1: report({"90+": 0.30, "all": 0.50})},
        "jam-je": {0: report({"90+": 0.30, "all": 0.40}), 1: report({"90+": 0.50, "all": 0.60})},
    }
    md = table(results, ["90+", "all"])
    lines = md.splitlines()
    assert "| 2d-only | 25.0 ± 7.1 | 45.0 ± 7.1 |" in lines
    assert "| jam-je | 40.0 ± 14.1 | 50.0 ± 14.1 |" in lines
    # paired by seed: +10 and +20 -> 15 ± 7.1; all: 0 and +10 -> 5 ± 7.1
    assert "| jam-je − 2d-only (paired by seed) | +15.0 ± 7.1 | +5.0 ± 7.1 |" in lines
    assert any(line.startswith("TAR@0.001FAR") for line in lines)
    assert all(math.isnan(x) for x in mean_std([]))
    assert mean_std([1.0]) == (1.0, 0.0)


def test_extra_variants_are_jam_je_with_one_change(tmp_path):
    from posefr_dist.experiment import variant_config

    preset = str(REPO / "jobs" / "configs" / "reproduce-cpu.yaml")
    args = (0, str(tmp_path / "shards"), str(tmp_path / "runs"))
    base = variant_config(preset, "jam-je", *args)
    for name, (key, value) in {"jam-je-mi": ("loss.je_form", "mi"), "jam-je-dn": ("model.attn_domain_norm", True),
                               "jam-je-shared": ("model.shared_head", True),
                               "jam-je-frontal": ("model.splat", "frontal")}.items():
        cfg = variant_config(preset, name, *args)
        section, field = key.split(".")
        assert cfg.model.variant == "jam-je" and cfg.train.run_name == f"{name}-seed0"
        assert getattr(getattr(cfg, section), field) == value != getattr(getattr(base, section), field)
    assert variant_config(preset, "jam", *args).loss.lambda_je == 0
    with pytest.raises(ValueError, match="unknown variant"):
        variant_config(preset, "jam-xx", *args)


@pytest.mark.slow
def test_ablation_script_tiny(tmp_path, ray_address, tiny_pretrain):
    """The script as its own process (twice), joining the session's Ray as it joins a cluster's
    (RAY_ADDRESS) rather than starting a second local Ray next to it. It resumes an interrupted
    ablation: OUT/results.json already holds a finished 2d-only seed-0 result, so only jam trains,
    and the table pairs the two. Its pretraining finds the session's tiny pretraining (the same
    settings) finished in OUT/pretrain and reuses it."""
    from benchmarks.reproduce import FARS
    from posefr_dist.eval.exact import far_key

    out = tmp_path / "ablation"
    shutil.copytree(tiny_pretrain["out"], out / "pretrain")
    finished = {b: {"tar_at_far": {far_key(f): 0.5 for f in FARS}} for b in ("0-30", "30-60", "60-90", "90+", "all")}
    (out / "results.json").write_text(json.dumps({"reports": {"2d-only": {"0": {"bins": finished}}},
                                                  "train_seconds": {"2d-only/seed0": 1.0}}))
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    cmd = [sys.executable, str(REPO / "benchmarks" / "reproduce.py"), "--preset", "cpu", "--seeds", "0",
           "--variants", "2d-only,jam", "--out", str(out),
           "synth.identities=14", "synth.views_per_identity=8", "synth.rows_per_shard=64",
           "train.epochs=1", "data.batch_size=8", "train.warmup_steps=2", "train.freeze_pretrained_epochs=0",
           "train.num_workers=1"]
    for kv in TINY_PRETRAIN_SETS:
        cmd += ["--pretrain-set", kv]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "jam seed 0: trained in" in r.stdout and "2d-only seed 0: trained" not in r.stdout, r.stdout[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["reports"]) == {"2d-only", "jam"} and set(res["reports"]["jam"]) == {"0"}
    assert res["reports"]["2d-only"]["0"]["bins"] == finished  # kept as it was
    # pretrained once (reused here), and the variant fine-tuned from that encoder
    assert res["pretrain"]["protocol"] == "pretrained" and (out / "pretrain" / "encoder" / "config.json").exists()
    assert res["pretrain"]["reused"] == ["shards", "train", "export"], res["pretrain"]
    assert f"model.pretrained_2d={out / 'pretrain' / 'encoder'}" in res["overrides"]
    assert "tar_3d" in res["diagnostics"]["jam"]["0"]
    assert (out / "models" / "jam-seed0" / "model.safetensors").exists() and not (out / "models" / "2d-only-seed0").exists()
    md = (out / "table.md").read_text()
    assert "| 2d-only | 50.0 ± 0.0 |" in md and "| jam − 2d-only (paired by seed) |" in md and "Diagnostics" in md
    assert (out / "tar_vs_yaw.png").stat().st_size > 0
    # a second call resumes: nothing left to train, same table
    r2 = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-4000:]
    assert "trained in" not in r2.stdout
    assert (out / "table.md").read_text() == md
