"""A pretrained 2D encoder: web-pose and 2D-only synthetic sets, the project's own export as
``model.pretrained_2d``, pretrained parameter groups (lr multiplier, freeze), ``posefr pretrain``."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from posefr_dist.config import ConfigError, LossConfig, ModelConfig, TrainConfig, load_config
from posefr_dist.data import shards as S
from posefr_dist.data.synth import synthesize, view_plan
from posefr_dist.model import build_model, export_2d, load_2d
from posefr_dist.train.checkpoint import load_pretrained_2d
from tests.data_utils import tiny_cfg

REPO = Path(__file__).resolve().parents[1]
SIZE = 32  # image side of the model tests: a 2x2 feature map


# --------------------------------------------------------------------------------------------
# synthetic sets: web pose mix, no points
# --------------------------------------------------------------------------------------------


def test_web_pose_mix_is_mostly_frontal_and_keeps_enrollment_views():
    web = tiny_cfg(pose_mix="web", identities=40, views_per_identity=12)
    strat = tiny_cfg(identities=40, views_per_identity=12)
    probes = []
    for ident in range(web.identities):
        a, b = view_plan(web, ident), view_plan(strat, ident)
        assert a == view_plan(web, ident)  # deterministic in the seed
        assert a[:web.enrollment_views] == b[:web.enrollment_views]  # enrollment views unchanged
        probes += [abs(v["yaw"]) for v in a[web.enrollment_views:]]
        assert all(abs(v["pitch"]) <= web.max_pitch for v in a)
    probes = np.asarray(probes)
    assert probes.max() <= web.max_yaw
    assert (probes < 45).mean() > 0.85, (probes < 45).mean()  # half-normal, sigma 25: ~93%
    assert (probes > 45).any() and (np.sign([v["yaw"] for i in range(5) for v in view_plan(web, i)]) < 0).any()
    strat_probes = [abs(v["yaw"]) for i in range(web.identities) for v in view_plan(strat, i)[2:]]
    assert (np.asarray(strat_probes) < 45).mean() < 0.6  # the stratified mix is not


def test_no_points_set_has_null_points_validates_and_samples_no_cloud(tmp_path, monkeypatch):
    from posefr_dist.data import render as R

    def no_sampling(*a, **k):
        raise AssertionError("with_points=false must not sample point clouds")

    monkeypatch.setattr(R, "sample_face_points", no_sampling)
    cfg = tiny_cfg(with_points=False, pose_mix="web", identities=6, views_per_identity=4)
    root = tmp_path / "shards"
    man = synthesize(cfg, str(root), use_ray=False)
    assert man["num_points"] == cfg.points
    assert man["generator"]["params"]["with_points"] is False and man["generator"]["params"]["pose_mix"] == "web"
    for split in man["splits"].values():
        for s in split["shards"]:
            t = pq.read_table(root / s["path"])
            assert t.column("points").null_count == t.num_rows
            assert set(t.column("num_points").to_pylist()) == {cfg.points}
    problems, summary = S.validate(str(root))
    assert problems == [], problems
    assert sum(s["rows"] for s in summary["splits"].values()) == cfg.identities * cfg.views_per_identity


def test_default_manifest_does_not_record_the_new_defaults(tmp_path):
    man = synthesize(tiny_cfg(identities=3, views_per_identity=3), str(tmp_path / "s"), use_ray=False)
    assert "pose_mix" not in man["generator"]["params"] and "with_points" not in man["generator"]["params"]


def test_synth_cli_web_no_points_then_validate_cli(tmp_path, capsys):
    from posefr_dist.cli import main

    root = str(tmp_path / "cli")
    assert main(["synth", root, "--identities", "4", "--views-per-identity", "4", "--image-size", "32",
                 "--points", "16", "--pose-mix", "web", "--no-points", "--no-ray"]) == 0
    man = json.loads(Path(root, "manifest.json").read_text())
    assert man["generator"]["params"]["pose_mix"] == "web" and man["generator"]["params"]["with_points"] is False
    assert main(["shards", "validate", root]) == 0
    assert "OK" in capsys.readouterr().out


def test_pipeline_decodes_null_points_as_has_points_false(tmp_path, ray_local):
    from posefr_dist.config import DataConfig
    from posefr_dist.data.pipeline import build_dataset, iter_epoch

    cfg = tiny_cfg(with_points=False, identities=4, views_per_identity=4, points=16)
    root = str(tmp_path / "shards")
    synthesize(cfg, root, use_ray=False)
    ds = build_dataset(root, "train", DataConfig(uri=root), training=False)
    batches = list(iter_epoch(ds.dataset, 8))
    n = sum(len(b["label"]) for b in batches)
    assert n == ds.manifest["splits"]["train"]["rows"]
    for b in batches:
        assert not b["has_points"].any()
        assert tuple(b["points"].shape[1:]) == (cfg.points, 3) and not b["points"].any()
    assert ds.skipped() == 0


# --------------------------------------------------------------------------------------------
# the project's own 2D export as model.pretrained_2d
# --------------------------------------------------------------------------------------------


def _model(variant: str, image_size: int = SIZE, embedding_dim: int = 32, classes: int = 5) -> nn.Module:
    mc = ModelConfig(variant=variant, encoder_2d="ir_tiny", encoder_3d="pointnet2_tiny", embedding_dim=embedding_dim)
    return build_model(mc, LossConfig(), num_classes=classes, image_size=image_size, num_points=64)


def _perturb(model: nn.Module, seed: int = 3) -> nn.Module:
    """Move weights and batch-norm statistics away from the initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


@pytest.fixture
def export_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    src = _perturb(_model("2d-only"))
    out = tmp_path / "encoder"
    export_2d(src, out)
    return out


def test_adaface_checkpoint_loads_into_the_trunk_and_the_output_layer(tmp_path):
    """An AdaFace-layout file as ``model.pretrained_2d``, loaded as the training loop loads it (the
    seeded joint model, then load_pretrained_2d): the IR trunk and the shared output layer become
    the file's, the 3D branch keeps the run's own seeded initial weights. (The loop's call of it is
    test_pretrain's end-to-end fine-tune and the demo's, from the project's own export.)"""
    from posefr_dist.model import create_encoder_2d

    torch.manual_seed(7)
    src = create_encoder_2d("ir_tiny", image_size=64, embedding_dim=32)
    path = tmp_path / "adaface_ir_tiny.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}}, path)
    ref = src.state_dict()

    torch.manual_seed(0)  # the loop: torch.manual_seed(train.seed), then build_model
    model = _model("jam-je", image_size=64)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = load_pretrained_2d(model, str(path))
    w = model.state_dict()
    assert loaded["format"] == "adaface" and loaded["params"]
    for key, file_key in (("encoder_2d.input_layer.0.weight", "input_layer.0.weight"),
                          ("encoder_2d.body.0.res_layer.1.weight", "body.0.res_layer.1.weight"),
                          ("embed.3.weight", "output_layer.3.weight")):
        assert torch.equal(w[key], ref[file_key]), key
        assert not torch.allclose(fresh[key], ref[file_key], atol=1e-3), key  # the check can tell
    k3d = [k for k, v in fresh.items() if k.startswith("encoder_3d.") and v.dim() >= 2]
    assert k3d and all(torch.equal(w[k], fresh[k]) for k in k3d)


@pytest.mark.parametrize("name", ["folder", "model.safetensors"])
def test_own_export_loads_with_identical_2d_embeddings(export_dir, name):
    torch.manual_seed(1)
    dst = _model("jam-je", classes=7)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    uri = str(export_dir if name == "folder" else export_dir / name)
    out = load_pretrained_2d(dst, uri)
    assert out["format"] == "posefr-2d" and out["skipped"] == [] and out["missing"] == []
    assert {k.split(".")[0] for k in out["loaded"]} == {"encoder_2d", "embed"}
    assert "encoder_2d.input_layer.0.weight" in out["params"] and "embed.3.weight" in out["params"]
    assert "embed.0.running_mean" in out["loaded"] and "embed.0.running_mean" not in out["params"]
    names = dict(dst.named_parameters())
    assert set(out["params"]) == {n for n in names if n.startswith(("encoder_2d.", "embed."))}
    for k, v in dst.state_dict().items():  # the new modules are untouched
        if not k.startswith(("encoder_2d.", "embed.")):
            assert torch.equal(v, before[k]), k
    ref = load_2d(export_dir)
    dst.eval()
    assert dst.jam.gamma.detach().abs().max().item() == 0.0
    x = torch.rand(4, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(dst.embed_2d(x), ref(x), atol=1e-5)


def test_export_with_attention_skips_it_and_loads_from_s3(tmp_path, s3_uri):
    from posefr_dist import storage

    torch.manual_seed(2)
    joint = _perturb(_model("jam-je"))
    with torch.no_grad():
        joint.jam.gamma.fill_(0.5)
    local = tmp_path / "joint"
    export_2d(joint, local)
    storage.upload_dir(str(local), s3_uri)
    dst = _model("2d-only")
    out = load_pretrained_2d(dst, s3_uri)
    assert out["skipped"] and all(k.startswith("attention.") for k in out["skipped"])
    assert torch.equal(dst.state_dict()["encoder_2d.body.0.res_layer.1.weight"],
                       joint.state_dict()["encoder_2d.body.0.res_layer.1.weight"])
    # the file alone, on S3 too
    dst2 = _model("2d-only")
    load_pretrained_2d(dst2, storage.join(s3_uri, "model.safetensors"))
    assert torch.equal(dst2.state_dict()["embed.3.weight"], joint.state_dict()["embed.3.weight"])


def test_shape_mismatch_names_file_and_key(export_dir):
    with pytest.raises(ValueError) as e:
        load_pretrained_2d(_model("jam-je", image_size=64), str(export_dir))
    msg = str(e.value)
    assert "model.safetensors" in msg and "head.3.weight" in msg and "does not fit" in msg
    assert "64x64" in msg  # says why: the export was made at another image size
    with pytest.raises(ValueError, match=r"head\.3\.weight"):
        load_pretrained_2d(_model("2d-only", embedding_dim=16), str(export_dir / "model.safetensors"))
    with pytest.raises(FileNotFoundError):
        load_pretrained_2d(_model("2d-only"), str(export_dir / "missing"))


def test_trainer_upfront_check_accepts_export_and_rejects_mismatch(export_dir, tmp_path):
    from posefr_dist.train.trainer import check_pretrained_2d

    base = ["model.encoder_2d=ir_tiny", "model.embedding_dim=32"]
    ok = load_config(None, base + [f"model.pretrained_2d={export_dir}"])
    check_pretrained_2d(ok, {"image_size": SIZE})
    check_pretrained_2d(load_config(None, base + [f"model.pretrained_2d={export_dir / 'model.safetensors'}"]),
                        {"image_size": SIZE})
    with pytest.raises(ConfigError, match="model.pretrained_2d.*image_size"):
        check_pretrained_2d(ok, {"image_size": 64})
    with pytest.raises(ConfigError, match="model.pretrained_2d.*embedding_dim"):
        check_pretrained_2d(load_config(None, ["model.encoder_2d=ir_tiny", f"model.pretrained_2d={export_dir}"]),
                            {"image_size": SIZE})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model.pretrained_2d.*config.json"):
        check_pretrained_2d(load_config(None, base + [f"model.pretrained_2d={tmp_path / 'empty'}"]),
                            {"image_size": SIZE})
    with pytest.raises(ConfigError, match="train.freeze_pretrained_epochs"):
        check_pretrained_2d(load_config(None, ["train.epochs=3", "train.freeze_pretrained_epochs=1"]),
                            {"image_size": SIZE})


# --------------------------------------------------------------------------------------------
# optimizer groups: lr multiplier and freeze; lambda_JE warm-up
# --------------------------------------------------------------------------------------------


def _batch(n: int = 6, classes: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {"image": torch.rand(n, 3, SIZE, SIZE, generator=g) * 2 - 1,
            "label": torch.arange(n) % classes,
            "points": torch.randn(n, 64, 3, generator=g),
            "has_points": torch.ones(n, dtype=torch.bool)}


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_pretrained_groups_get_the_lr_multiplier(export_dir):
    from posefr_dist.train.loop import build_optimizer
    from posefr_dist.train.reference import make_optimizer

    model = _model("jam-je", classes=7)
    loaded = load_pretrained_2d(model, str(export_dir))
    tc = TrainConfig(optimizer="adamw", lr=0.01, warmup_steps=0, pretrained_lr_mult=0.1)
    opt, sched, freeze = build_optimizer(model, tc, total_steps=10, pretrained=loaded)
    named = dict(model.named_parameters())
    pre = _ids(named[n] for n in loaded["params"])
    assert len(opt.param_groups) == 4
    for g in opt.param_groups:
        ids = _ids(g["params"])
        if g["pretrained"]:
            assert ids <= pre and g["lr"] == pytest.approx(0.001)
        else:
            assert not (ids & pre) and g["lr"] == pytest.approx(0.01)
        assert g["weight_decay"] == (tc.weight_decay if all(p.dim() >= 2 for p in g["params"]) else 0.0)
    assert set().union(*(_ids(g["params"]) for g in opt.param_groups)) == _ids(named.values())
    assert not freeze.active
    # without pretrained parameters: the two plain groups, as before
    assert len(make_optimizer(model, "adamw", 0.01).param_groups) == 2
    _, _, _ = build_optimizer(model, TrainConfig(optimizer="adamw"), 10, pretrained=loaded)  # mult 1: no split


def test_freeze_keeps_pretrained_weights_and_bn_stats_then_releases(export_dir):
    from posefr_dist.train.loop import build_optimizer

    torch.manual_seed(4)
    model = _model("jam-je", classes=7)
    loaded = load_pretrained_2d(model, str(export_dir))
    tc = TrainConfig(optimizer="adamw", lr=0.01, warmup_steps=0, weight_decay=0.05, epochs=3,
                     freeze_pretrained_epochs=1, pretrained_lr_mult=0.5)
    opt, sched, freeze = build_optimizer(model, tc, total_steps=9, pretrained=loaded)
    frozen_keys = list(loaded["loaded"])
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def steps(n: int) -> None:
        for _ in range(n):
            model.train()
            freeze.apply_eval()
            opt.zero_grad()
            model(_batch())["loss"].backward()
            opt.step()
            sched.step()

    freeze.set_epoch(0, sched)
    assert all(g["lr"] == 0.0 for g in opt.param_groups if g["pretrained"])
    steps(3)
    now = model.state_dict()
    for k in frozen_keys:  # weights and batch-norm statistics of the frozen trunk
        assert torch.equal(now[k], start[k]), k
    moved = [k for k in now if not torch.equal(now[k], start[k])]
    assert any(k.startswith("head_2d.") for k in moved) and any(k.startswith("jam.") for k in moved), moved
    freeze.set_epoch(1, sched)
    assert not freeze.active
    assert all(g["lr"] > 0 for g in opt.param_groups)
    steps(1)
    assert not torch.equal(model.state_dict()["encoder_2d.input_layer.0.weight"],
                           start["encoder_2d.input_layer.0.weight"])
    assert not torch.equal(model.state_dict()["encoder_2d.input_layer.1.running_mean"],
                           start["encoder_2d.input_layer.1.running_mean"])


def test_reference_loop_freezes_pretrained_parameters(export_dir):
    from posefr_dist.train.reference import train_reference

    torch.manual_seed(6)
    model = _model("2d-only", classes=7)
    loaded = load_pretrained_2d(model, str(export_dir))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def check(summary):
        if summary["epoch"] == 0:
            now = model.state_dict()
            seen.append(all(torch.equal(now[k], start[k]) for k in loaded["loaded"]))

    train_reference(model, lambda e: [_batch()] * 2, epochs=2, lr=0.01, optimizer="adamw", log=check,
                    pretrained=loaded, pretrained_lr_mult=0.1, freeze_pretrained_epochs=1)
    assert seen == [True]
    assert not torch.equal(model.state_dict()["embed.3.weight"], start["embed.3.weight"])


def test_je_warmup_weight():
    from posefr_dist.train.loop import je_weight

    assert [je_weight(0.3, e, 2) for e in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.3])
    assert je_weight(0.3, 0, 0) == 0.3 and je_weight(0.0, 0, 3) == 0.0


# --------------------------------------------------------------------------------------------
# posefr pretrain, end to end
# --------------------------------------------------------------------------------------------


def test_pretrain_preset_loads():
    cfg = load_config(REPO / "jobs" / "configs" / "pretrain-cpu.yaml")
    s = cfg.synth
    assert (s.identities, s.views_per_identity, s.pose_mix, s.with_points, s.seed) == (1000, 8, "web", False, 2000)
    assert cfg.model.variant == "2d-only" and cfg.model.embedding_dim == 128
    paired = load_config(REPO / "jobs" / "configs" / "reproduce-cpu.yaml")
    assert paired.synth.seed != s.seed and paired.synth.image_size == s.image_size
    assert (paired.model.encoder_2d, paired.model.embedding_dim) == (cfg.model.encoder_2d, cfg.model.embedding_dim)


@pytest.mark.slow
def test_pretrain_end_to_end_resumes_and_feeds_a_fine_tune(tiny_pretrain, tmp_path, ray_local, capsys):
    """``posefr pretrain`` (the session's tiny run of the demo's pretraining preset, conftest's
    ``tiny_pretrain``): its export, its 2D-only set, resuming it (on a copy), and a fine-tune from it."""
    from posefr_dist.cli import main
    from posefr_dist.train.checkpoint import load_weights
    from posefr_dist.train.trainer import check_config, train
    from tests.data_utils import TINY_PRETRAIN_CONFIG, TINY_PRETRAIN_SETS

    session = tiny_pretrain["out"]
    assert f"model.pretrained_2d={session / 'encoder'}" in tiny_pretrain["stdout"]
    assert "reused" not in tiny_pretrain["stdout"], tiny_pretrain["stdout"]  # it trained
    conf = json.loads((session / "encoder" / "config.json").read_text())
    assert (conf["encoder_2d"], conf["image_size"], conf["embedding_dim"]) == ("ir_tiny", 64, 128)
    man = json.loads((session / "shards" / "manifest.json").read_text())
    assert man["generator"]["params"]["with_points"] is False
    assert json.loads((session / "pretrain.json").read_text())["best_checkpoint"]

    out = tmp_path / "pre"  # the session's run stays as it is: the rest changes a copy
    shutil.copytree(session, out)
    enc = out / "encoder"
    args = ["pretrain", "--config", str(TINY_PRETRAIN_CONFIG), "--out", str(out), *TINY_PRETRAIN_SETS]
    # a second call reuses everything at once
    t0 = time.monotonic()
    assert main(args) == 0
    assert "reused: shards, train, export" in capsys.readouterr().out
    assert time.monotonic() - t0 < 10
    # without the export, the finished run is reused and only the export is redone
    (enc / "config.json").unlink()
    assert main(args) == 0
    assert "reused: shards, train" in capsys.readouterr().out and (enc / "config.json").exists()

    # a jam-je fine-tune on paired data starts from it: the upfront check passes, and with the
    # trunk frozen for the first epoch (ZeRO-2) its first checkpoint still holds the export's weights
    paired = tmp_path / "paired"
    synthesize(tiny_cfg(image_size=64, identities=8, views_per_identity=6), str(paired), use_ray=False)
    cfg = load_config(REPO / "jobs" / "configs" / "tiny-cpu.yaml", [
        f"data.uri={paired}", f"train.storage_path={tmp_path / 'runs'}", "train.run_name=finetune",
        f"model.pretrained_2d={enc}", "model.embedding_dim=128", "train.epochs=2", "train.zero_stage=2",
        "train.freeze_pretrained_epochs=1", "train.pretrained_lr_mult=0.5", "train.optimizer=adamw",
        "train.lr=0.01", "train.keep_checkpoints=2", "train.max_steps_per_epoch=2", "train.num_workers=1",
        "train.checkpoint_metric=val/tar@far=0.1/all", "loss.je_warmup_epochs=1"])
    check_config(cfg)
    outcome = train(cfg)
    ckpts = [h["checkpoint"] for h in outcome.history if h.get("end_of_epoch")]
    assert len(ckpts) == 2
    ref = load_2d(enc).state_dict()
    first, second = load_weights(ckpts[0]), load_weights(ckpts[1])
    for k, v in ref.items():
        if k.startswith("encoder."):
            assert torch.equal(first["encoder_2d." + k[len("encoder."):]], v), k
        elif k.startswith("head."):
            assert torch.equal(first["embed." + k[len("head."):]], v), k
    assert not torch.equal(second["encoder_2d.input_layer.0.weight"], ref["encoder.input_layer.0.weight"])


def test_workers_get_absolute_local_paths(tmp_path, monkeypatch):
    """A relative model.pretrained_2d / train.resume_from is the driver's: workers run elsewhere."""
    from posefr_dist.train.trainer import worker_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["model.pretrained_2d=out/pre/encoder", "train.resume_from=runs/x/ckpt"])
    tree = worker_config(cfg)
    assert tree["model"]["pretrained_2d"] == str(tmp_path / "out" / "pre" / "encoder")
    assert tree["train"]["resume_from"] == str(tmp_path / "runs" / "x" / "ckpt")
    remote = worker_config(load_config(None, ["model.pretrained_2d=s3://b/enc"]))
    assert remote["model"]["pretrained_2d"] == "s3://b/enc"
    assert cfg.model.pretrained_2d == "out/pre/encoder"  # the driver's config is left as it was


def test_upload_dir_writes_the_marker_last(tmp_path, monkeypatch):
    from posefr_dist import storage

    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "training.json", "sub/a.bin"):
        (src / name).write_text(name)
    order: list[str] = []
    real = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda uri, data: (order.append(uri.rsplit("/dst/", 1)[1]),
                                                                     real(uri, data)))
    storage.upload_dir(str(src), str(tmp_path / "dst"), last=("config.json",))
    assert order[-1] == "config.json" and sorted(order) == ["config.json", "model.safetensors", "sub/a.bin",
                                                            "training.json"]
    assert (tmp_path / "dst" / "sub" / "a.bin").read_text() == "sub/a.bin"
