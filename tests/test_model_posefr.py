"""The joint model: every variant and size, loss terms, 3D masking, the factory."""

from __future__ import annotations

import pytest
import torch

from posefr_dist.config import ConfigError, LossConfig, ModelConfig, load_config
from posefr_dist.model import build_model, create_model, list_models, parse_model_name

torch.set_num_threads(1)

LOSS_KEYS = ("loss", "loss_2d", "loss_3d", "loss_je")


def _batch(b: int, size: int, n: int, classes: int = 5, has=None, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    pts = torch.randn(b, n, 3, generator=g)
    return {
        "image": torch.rand(b, 3, size, size, generator=g) * 2 - 1,
        "points": pts / pts.norm(dim=-1).amax(dim=1)[:, None, None],
        "has_points": torch.ones(b, dtype=torch.bool) if has is None else torch.tensor(has, dtype=torch.bool),
        "label": torch.randint(0, classes, (b,), generator=g),
        "yaw_deg": torch.zeros(b),
    }


def _check_output(out, b, d):
    for k in LOSS_KEYS:
        assert out[k].shape == () and torch.isfinite(out[k]), k
    assert out["emb_2d"].shape == (b, d) and torch.isfinite(out["emb_2d"]).all()


@pytest.mark.parametrize("name", list_models("ir_tiny/pointnet2_tiny") + ["2d-only/ir_tiny"])
@pytest.mark.parametrize("size", [32, 64])
def test_tiny_variants_shapes_and_finiteness(name, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, image_size=size, num_points=128, embedding_dim=24)
    out = model(_batch(4, size, 128), return_attention=True)
    _check_output(out, 4, 24)
    out["loss"].backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    hw = (size // 16) ** 2
    if name.startswith("2d-only"):
        assert model.encoder_3d is None and model.jam is None
        assert out["attn_2d"] is None and float(out["loss_3d"]) == 0 and float(out["loss_je"]) == 0
    else:
        assert out["attn_2d"].shape == (4, hw, hw) and out["attn_3d"].shape == (4, hw, hw)
        assert float(out["loss_3d"]) > 0
        assert (float(out["loss_je"]) > 0) == name.startswith("jam-je")
    expected = out["loss_2d"] + model.w_3d * out["loss_3d"] + model.lambda_je * out["loss_je"]
    assert torch.allclose(out["loss"].detach(), expected)


def test_ir18_full_size_jam_je():
    torch.manual_seed(0)
    model = create_model("jam-je/ir18/pointnet2_ssg", num_classes=7, image_size=112, num_points=1024)
    out = model(_batch(2, 112, 1024, classes=7), return_attention=True)
    _check_output(out, 2, 512)
    assert out["attn_2d"].shape == (2, 49, 49)
    assert model.encoder_2d.forward_features(torch.zeros(1, 3, 112, 112)).shape == (1, 512, 7, 7)


def test_jam_variant_forces_lambda_zero_and_2d_only_has_no_3d():
    cfg = ModelConfig(variant="jam", encoder_2d="ir_tiny", encoder_3d="pointnet2_tiny", embedding_dim=16)
    model = build_model(cfg, LossConfig(lambda_je=5.0, w_3d=0.5), num_classes=3, image_size=32, num_points=64)
    assert model.lambda_je == 0.0 and model.w_3d == 0.5
    out = model(_batch(4, 32, 64, classes=3))
    assert float(out["loss_je"]) == 0.0
    base = build_model(ModelConfig(variant="2d-only", encoder_2d="ir_tiny", embedding_dim=16),
                       LossConfig(w_3d=3.0), num_classes=3, image_size=32)
    assert base.w_3d == 0.0 and base.encoder_3d is None and base.head_3d is None
    assert not any("3d" in n for n, _ in base.named_parameters())


def test_rows_without_points_do_not_reach_3d_or_je_losses():
    torch.manual_seed(0)
    model = create_model("jam-je/ir_tiny/pointnet2_tiny", num_classes=5, image_size=32, num_points=64,
                         embedding_dim=16).eval()  # eval: batch statistics would couple the rows
    batch = _batch(5, 32, 64, has=[True, False, True, True, False])
    out1 = model(batch, return_attention=True)
    assert int(out1["n_3d"]) == 3 and out1["index_3d"].tolist() == [0, 2, 3]
    batch2 = dict(batch, points=batch["points"].clone())
    batch2["points"][[1, 4]] = torch.randn(2, 64, 3) * 5  # garbage where there is no 3D
    out2 = model(batch2)
    for k in ("loss_3d", "loss_je"):
        assert torch.allclose(out1[k], out2[k]), k


@pytest.mark.parametrize("has", [[False, False, False], [False, True, False]])
def test_too_few_3d_rows_give_zero_terms_but_every_parameter_a_gradient(has):
    torch.manual_seed(0)
    model = create_model("jam-je/ir_tiny/pointnet2_tiny", num_classes=5, image_size=32, num_points=64,
                         embedding_dim=16)
    out = model(_batch(3, 32, 64, has=has))
    assert float(out["loss_3d"]) == 0 and float(out["loss_je"]) == 0 and int(out["n_3d"]) == 0
    assert torch.allclose(out["loss"].detach(), out["loss_2d"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(float(p.grad.abs().sum()) == 0 for p in model.parameters_3d_only())


def test_batch_without_points_key():
    model = create_model("jam/ir_tiny/pointnet2_tiny", num_classes=5, image_size=32, embedding_dim=16)
    b = _batch(3, 32, 8)
    del b["points"], b["has_points"]
    out = model(b)
    assert int(out["n_3d"]) == 0 and torch.isfinite(out["loss"])


def test_embed_2d_matches_forward_in_eval():
    torch.manual_seed(0)
    model = create_model("jam-je/ir_tiny/pointnet2_tiny", num_classes=5, image_size=32, embedding_dim=16).eval()
    with torch.no_grad():
        model.jam.gamma.fill_(0.5)
        b = _batch(4, 32, 64)
        assert torch.allclose(model(b)["emb_2d"], model.embed_2d(b["image"]))
        assert model.embed_3d(b["points"]).shape == (4, 16)


@pytest.mark.parametrize("head", ["adaface", "arcface", "cosface"])
def test_heads_by_config(head):
    model = create_model("jam-je/ir_tiny/pointnet2_tiny", num_classes=5, image_size=32, embedding_dim=16,
                         head=head, head_margin=0.3)
    assert type(model.head_2d).__name__.lower().startswith(head)
    assert type(model.head_3d) is type(model.head_2d) and model.head_3d is not model.head_2d
    assert torch.isfinite(model(_batch(4, 32, 32))["loss"])


def test_factory_names_and_errors():
    names = list_models()
    assert "jam-je/ir18/pointnet2_ssg" in names and "2d-only/ir18" in names
    assert parse_model_name("jam/ir50/pointnet2_tiny") == {"variant": "jam", "encoder_2d": "ir50",
                                                           "encoder_3d": "pointnet2_tiny"}
    with pytest.raises(ValueError, match="expected"):
        parse_model_name("ir18")
    with pytest.raises(ConfigError, match="model.encoder_2d"):
        create_model("jam/resnet50/pointnet2_tiny", num_classes=3)
    with pytest.raises(ValueError, match="multiple of 16"):
        create_model("2d-only/ir_tiny", num_classes=3, image_size=40)


def test_config_fields_added_for_the_model():
    cfg = load_config(None, ["loss.je_norm=hw", "model.attn_reduction=4"])
    assert cfg.loss.je_norm == "hw" and cfg.model.attn_reduction == 4
    with pytest.raises(ConfigError, match="loss.je_norm"):
        load_config(None, ["loss.je_norm=zscore"])
    with pytest.raises(ConfigError, match="model.attn_reduction"):
        load_config(None, ["model.attn_reduction=0"])


@pytest.mark.parametrize("mode", ["bf16-weights", "autocast"])
def test_low_precision_step_is_finite_with_float32_attention(mode):
    torch.manual_seed(0)
    model = create_model("jam-je/ir_tiny/pointnet2_tiny", num_classes=5, image_size=32, num_points=64,
                         embedding_dim=16)
    batch = _batch(4, 32, 64)
    if mode == "bf16-weights":  # as DeepSpeed's bf16 mode runs it
        model = model.to(torch.bfloat16)
        batch = dict(batch, image=batch["image"].bfloat16(), points=batch["points"].bfloat16())
        out = model(batch, return_attention=True)
    else:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch, return_attention=True)
    for k in LOSS_KEYS:
        assert out[k].dtype == torch.float32 and torch.isfinite(out[k]), k
    # the maps behind the joint histogram keep float32 resolution
    assert out["attn_2d"].dtype == torch.float32 and out["attn_3d"].dtype == torch.float32
    out["loss"].backward()
    assert all(torch.isfinite(p.grad.float()).all() for p in model.parameters())
