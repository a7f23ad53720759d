"""Checkpoint diagnostics (posefr_dist.eval.diagnose): the figures that explain the ablation."""

import json
import math

import numpy as np
import pytest
import torch

from posefr_dist.config import LossConfig, ModelConfig
from posefr_dist.data import shards as S
from posefr_dist.data.synth import synthesize
from posefr_dist.eval.diagnose import _bin_of, diagnose, diagnostics_table, read_split_arrays
from posefr_dist.eval.verify import verify_arrays
from posefr_dist.model import build_model
from posefr_dist.train.checkpoint import META, WEIGHTS, load_model

from .data_utils import rewrite_shard, set_cell, tiny_cfg


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("diag") / "shards"
    synthesize(tiny_cfg(identities=10, views_per_identity=8), str(r), use_ray=False)
    return r


def write_checkpoint(folder, variant, gamma=0.0, num_classes=6):
    from safetensors.torch import save_file

    mc = ModelConfig(variant=variant, encoder_2d="ir_tiny", encoder_3d="pointnet2_tiny", embedding_dim=32)
    lc = LossConfig(lambda_je=0.1, je_bins=8)
    torch.manual_seed(0)
    model = build_model(mc, lc, num_classes=num_classes, image_size=64, num_points=128)
    if model.jam is not None:
        with torch.no_grad():
            model.jam.gamma.fill_(gamma)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    import dataclasses

    meta = {"config": {"model": dataclasses.asdict(mc), "loss": dataclasses.asdict(lc)}, "num_classes": num_classes,
            "image_size": 64, "num_points": 128, "epoch": 3}
    (folder / META).write_text(json.dumps(meta))
    return model.eval()


def test_jam_je_diagnostics_match_direct_computation(root, tmp_path):
    model = write_checkpoint(tmp_path / "ckpt", "jam-je", gamma=0.25)
    rep = diagnose(str(tmp_path / "ckpt"), str(root), "test", fars=[0.1])
    data = read_split_arrays(str(root), "test")
    assert rep["rows"] == len(data["yaw"]) == sum(
        s["rows"] for s in S.read_manifest(str(root))["splits"]["test"]["shards"])
    assert rep["variant"] == "jam-je" and rep["epoch"] == 3
    # the 2D TARs are those of the verification protocol on the model's own embeddings
    with torch.no_grad():
        emb = model.embed_2d(torch.from_numpy(data["image"])).numpy()
    yaw = data["yaw"]
    direct = verify_arrays(emb, data["subject_id"], yaw, np.abs(yaw) <= 15, fars=[0.1], yaw_edges=[0, 30, 60, 90])
    for b, v in direct["bins"].items():
        assert rep["tar_2d"][b]["0.1"] == pytest.approx(v["tar_at_far"]["0.1"])
    att = rep["attention"]
    assert att["gamma"] == pytest.approx(0.25)
    hw = 16  # 64x64 input -> 4x4 map
    assert att["uniform_entropy"] == pytest.approx(math.log(hw))
    for b, h in att["row_entropy_2d"].items():
        assert 0 <= h <= math.log(hw) + 1e-5, b
    for b, je in att["je_2d_3d"].items():
        assert 0 <= je <= att["je_max"] + 1e-5, b
    # L_JE, MI(A_2D; A_3D) and the marginal entropies per yaw bin, directly: the model's attention
    # maps, its soft joint histogram per row, then numpy (MI as sum P log(P / (P2 P3)))
    from posefr_dist.model.entropy import joint_histogram

    keep = data["has_points"]
    with torch.no_grad():
        _, a2 = model.embed_2d(torch.from_numpy(data["image"]), return_attention=True)
        # the 3D map at each image's pose (model.splat: posed)
        _, a3 = model.jam(model.encoder_3d(torch.from_numpy(data["points"]), yaw_deg=torch.from_numpy(yaw),
                                           pitch_deg=torch.from_numpy(data["pitch"])), "3d")
        lc = model.loss_cfg
        p = joint_histogram(a2, a3, lc.je_bins, lc.je_bandwidth, lc.je_norm).double().numpy()[keep]
    p2, p3 = p.sum(2), p.sum(1)

    def ent(q, axes):
        return -np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0).sum(axes)

    outer = p2[:, :, None] * p3[:, None, :]
    direct_fig = {
        "je_2d_3d": ent(p, (1, 2)),
        "hist_entropy_2d": ent(p2, 1),
        "hist_entropy_3d": ent(p3, 1),
        "mi_2d_3d": np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0) / np.where(p > 0, outer, 1.0)), 0.0).sum((1, 2)),
    }
    ybins = _bin_of(yaw[keep], [0, 30, 60, 90])
    for name, rows in direct_fig.items():
        assert set(att[name]) == set(ybins.tolist()) | {"all"}, name
        for b, v in att[name].items():
            m = np.ones(len(rows), bool) if b == "all" else ybins == b
            assert v == pytest.approx(float(rows[m].mean()), rel=1e-4, abs=1e-6), (name, b)
    for b in att["mi_2d_3d"]:
        assert -1e-6 <= att["mi_2d_3d"][b] <= min(att["hist_entropy_2d"][b], att["hist_entropy_3d"][b]) + 1e-6
        assert att["je_2d_3d"][b] == pytest.approx(
            att["hist_entropy_2d"][b] + att["hist_entropy_3d"][b] - att["mi_2d_3d"][b], abs=1e-5)
    assert set(rep["tar_3d"]) >= {"0-30", "90+", "all"}
    # a bin with too few impostor pairs for the FAR reports None, as the verification does
    assert rep["tar_3d"]["all"]["0.1"] is not None
    assert all(0.0 <= v["0.1"] <= 1.0 for v in rep["tar_3d"].values() if v["0.1"] is not None)
    for b, c in rep["cross_cos"].items():
        assert -1.0 <= c <= 1.0, b
    table = diagnostics_table({"jam-je": [rep]}, far=0.1)
    assert "| jam-je | 1 |" in table and "0.250" in table and "MI(A_2D; A_3D)" in table
    assert len(table.splitlines()[2].split("|")) == len(table.splitlines()[0].split("|"))


def test_two_d_only_has_no_3d_figures(root, tmp_path):
    write_checkpoint(tmp_path / "ckpt", "2d-only")
    rep = diagnose(str(tmp_path / "ckpt"), str(root), "test", max_rows=12)
    assert rep["rows"] == 12 and "tar_3d" not in rep and "attention" not in rep
    table = diagnostics_table({"2d-only": [rep]})
    assert table.splitlines()[2].count("n/a") >= 5
    assert len(table.splitlines()[2].split("|")) == len(table.splitlines()[0].split("|"))


def test_load_model_round_trip(tmp_path):
    model = write_checkpoint(tmp_path / "ckpt", "jam", gamma=0.5)
    loaded, meta = load_model(str(tmp_path / "ckpt"))
    assert meta["num_classes"] == 6 and not loaded.training
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with pytest.raises(FileNotFoundError, match="not a checkpoint"):
        load_model(str(tmp_path))


def test_bad_image_names_file_row_and_field(root, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(root, bad)
    rel = S.read_manifest(str(bad))["splits"]["test"]["shards"][0]["path"]
    rewrite_shard(bad, rel, lambda t: set_cell(t, "image", 2, b"not an image"))
    with pytest.raises(S.ShardError) as e:
        read_split_arrays(str(bad), "test")
    msg = str(e.value)
    assert rel in msg and "image" in msg and "2" in msg


def test_yaw_bins_follow_the_report_names():
    bins = _bin_of(np.array([0.0, -29.9, 30.0, 75.0, -90.0, 120.0, np.nan], np.float32), [0, 30, 60, 90])
    assert bins.tolist() == ["0-30", "0-30", "30-60", "60-90", "90+", "90+", "unknown-pose"]


def test_checkpoint_from_before_the_bounded_attention_loads_as_it_was_trained(tmp_path):
    """A meta.json without attn_spectral_norm / splat (older checkpoints) rebuilds the old model."""
    import dataclasses

    from safetensors.torch import save_file

    mc = ModelConfig(variant="jam", encoder_2d="ir_tiny", encoder_3d="pointnet2_tiny", embedding_dim=32,
                     attn_spectral_norm=False, splat="frontal")
    torch.manual_seed(0)
    model = build_model(mc, LossConfig(), num_classes=6, image_size=64, num_points=128)
    folder = tmp_path / "old"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS))
    old = {k: v for k, v in dataclasses.asdict(mc).items() if k not in ("attn_spectral_norm", "splat")}
    meta = {"config": {"model": old, "loss": dataclasses.asdict(LossConfig())}, "num_classes": 6,
            "image_size": 64, "num_points": 128, "epoch": 0}
    (folder / META).write_text(json.dumps(meta))
    loaded, _ = load_model(str(folder))
    assert loaded.model_cfg.splat == "frontal" and not loaded.model_cfg.attn_spectral_norm
