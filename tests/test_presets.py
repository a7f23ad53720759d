"""Every shipped preset loads and validates, and the manifests/configs reference existing files."""

from pathlib import Path

import pytest

from posefr_dist.config import load_config

REPO = Path(__file__).resolve().parents[1]
PRESETS = sorted((REPO / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", PRESETS, ids=[p.name for p in PRESETS])
def test_preset_loads(path):
    cfg = load_config(path)
    assert cfg.train.epochs >= 1


def test_job_entry_points_exist():
    for name in ("train.py", "evaluate.py"):
        assert (REPO / "jobs" / name).exists()


def test_manifests_reference_shipped_configs():
    import re

    for f in list((REPO / "k8s").rglob("*.yaml")) + list((REPO / "cluster").glob("*.yaml")):
        for ref in re.findall(r"jobs/configs/[\w.-]+\.yaml", f.read_text()):
            assert (REPO / ref).exists(), f"{f.relative_to(REPO)} references missing {ref}"
