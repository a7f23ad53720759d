"""posefr embed / evaluate end to end on synthetic shards with a real local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from posefr_dist import storage
from posefr_dist.config import LossConfig, ModelConfig
from posefr_dist.data.synth import synthesize
from posefr_dist.eval.embed import embed, evaluate
from posefr_dist.model import build_model, export_2d
from tests.data_utils import tiny_cfg

# end to end: each test embeds through Ray (two of them as CLI processes)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval") / "shards"
    synthesize(tiny_cfg(identities=12, views_per_identity=10, rows_per_shard=16), str(root), use_ray=False)
    return str(root)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    m = build_model(ModelConfig(variant="jam-je", encoder_2d="ir_tiny", encoder_3d="pointnet2_tiny", embedding_dim=32),
                    LossConfig(), num_classes=5, image_size=64, num_points=128)
    m.eval()
    out = tmp_path_factory.mktemp("model") / "m"
    export_2d(m, str(out))
    return str(out)


def test_embed_writes_the_embeddings_table(shards, model_dir, tmp_path, ray_local):
    out = tmp_path / "emb"
    s = embed(model_dir, shards, "test", str(out), batch_size=8, actors=2)
    t = pq.read_table(sorted(out.glob("part-*.parquet")))
    assert t.column_names == ["sample_id", "subject_id", "yaw_deg", "enrollment", "embedding"]
    assert t.schema.field("embedding").type.list_size == 32
    man = json.loads(Path(shards, "manifest.json").read_text())
    assert t.num_rows == s["rows"] == man["splits"]["test"]["rows"]
    yaw = t.column("yaw_deg").to_numpy()
    np.testing.assert_array_equal(t.column("enrollment").to_numpy(), np.abs(yaw) <= 15.0)
    assert json.loads((out / "_SUCCESS").read_text())["rows"] == t.num_rows
    # the actors' embeddings equal the model's own on the same images
    from posefr_dist.data import shards as S
    from posefr_dist.model import load_2d

    src = pq.read_table(S.shard_uris(shards, "test")[0]).slice(0, 4).to_pylist()
    imgs = np.stack([S.decode_image(r["image"]).transpose(2, 0, 1) for r in src]).astype(np.float32) * (2 / 255) - 1
    ref = load_2d(model_dir).embed(torch.from_numpy(imgs)).detach().numpy()
    got = {r["sample_id"]: r["embedding"] for r in t.to_pylist()}
    np.testing.assert_allclose(np.stack([got[r["sample_id"]] for r in src]), ref, rtol=1e-4, atol=1e-5)


def test_evaluate_end_to_end_cli(shards, model_dir, tmp_path, ray_local):
    out = tmp_path / "report"
    report = evaluate(model_dir, shards, str(out), fars=[0.1, 0.01], batch_size=16)
    for name in ("report.json", "report.md", "roc.png", "tar_vs_yaw.png"):
        assert (out / name).exists(), name
    rep = json.loads((out / "report.json").read_text())
    assert set(rep["bins"]) >= {"0-30", "30-60", "60-90", "90+", "all"}
    assert rep["bins"]["all"]["probes"] == report["bins"]["all"]["probes"] > 0
    assert set(rep["bins"]["all"]["tar_at_far"]) == {"0.1", "0.01"}


def test_evaluate_cli_runs_as_a_process(shards, model_dir, tmp_path, ray_address):
    """``posefr evaluate`` as its own process, joining the session's Ray (RAY_ADDRESS) as a
    driver does on a cluster, rather than starting a second local instance next to it."""
    out = tmp_path / "cli"
    env = dict(os.environ, RAY_ADDRESS=ray_address)
    r = subprocess.run([sys.executable, "-m", "posefr_dist.cli", "evaluate", "--model", model_dir, "--data", shards,
                        "--out", str(out), "--far", "0.1,0.01"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "90+" in r.stdout and (out / "report.json").exists()


def test_evaluate_from_s3(shards, model_dir, s3_uri, ray_local):
    storage.upload_dir(shards, storage.join(s3_uri, "shards"))
    storage.upload_dir(model_dir, storage.join(s3_uri, "model"))
    out = storage.join(s3_uri, "report")
    evaluate(storage.join(s3_uri, "model"), storage.join(s3_uri, "shards"), out, fars=[0.1])
    rep = json.loads(storage.read_text(storage.join(out, "report.json")))
    assert rep["bins"]["all"]["probes"] > 0
    assert storage.exists(storage.join(out, "embeddings", "_SUCCESS"))
