"""Encoders (IResNet, PointNet++), the joint attention block and AdaFace checkpoint loading."""

from __future__ import annotations

import argparse

import pytest
import torch

from posefr_dist.model import (JointAttention, SelfAttention2d, adaface_key_map, ball_query, create_encoder_2d,
                               create_encoder_3d, create_model, farthest_point_sample, load_adaface_backbone)

torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# 2D
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,size,channels", [
    ("ir_tiny", 32, 128), ("ir_tiny", 64, 128), ("ir_tiny", 112, 128),
    ("ir18", 64, 512), ("ir18", 112, 512), ("ir50", 64, 512),
])
def test_iresnet_feature_map_shapes(name, size, channels):
    torch.manual_seed(0)
    enc = create_encoder_2d(name, image_size=size, embedding_dim=None).eval()
    with torch.no_grad():
        z = enc.forward_features(torch.rand(1, 3, size, size) * 2 - 1)
    assert z.shape == (1, channels, size // 16, size // 16)
    assert torch.isfinite(z).all()


def test_ir18_standalone_is_adaface_shaped():
    enc = create_encoder_2d("ir18", image_size=112, embedding_dim=512).eval()
    n_params = sum(p.numel() for p in enc.parameters())
    assert 23_000_000 < n_params < 25_000_000  # AdaFace's IR-18: about 24.0 M
    with torch.no_grad():
        assert enc(torch.zeros(2, 3, 112, 112)).shape == (2, 512)
    keys = set(enc.state_dict())
    assert {"input_layer.0.weight", "body.0.res_layer.1.weight", "body.2.shortcut_layer.0.weight",
            "output_layer.3.weight", "output_layer.4.running_var"} <= keys


@pytest.mark.parametrize("bad", [50, 8, 100])
def test_iresnet_rejects_sizes_not_multiple_of_16(bad):
    with pytest.raises(ValueError, match="multiple of 16"):
        create_encoder_2d("ir_tiny", image_size=bad)


def test_unknown_encoders():
    with pytest.raises(ValueError, match="unknown 2D encoder"):
        create_encoder_2d("ir1000")
    with pytest.raises(ValueError, match="unknown 3D encoder"):
        create_encoder_3d("dgcnn", 8, 2)


# --------------------------------------------------------------------------------------------
# 3D
# --------------------------------------------------------------------------------------------


def _cloud(b: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 3, generator=g) * torch.tensor([0.7, 0.9, 0.4])
    x = x - x.mean(dim=1, keepdim=True)
    return x / x.norm(dim=-1).amax(dim=1)[:, None, None]


@pytest.mark.parametrize("name,n,channels,size", [
    ("pointnet2_tiny", 64, 128, 2), ("pointnet2_tiny", 256, 128, 4), ("pointnet2_ssg", 1024, 512, 7),
    ("pointnet2_tiny", 20, 32, 4),  # fewer points than the first level's centroids
])
def test_pointnet2_shapes(name, n, channels, size):
    torch.manual_seed(0)
    enc = create_encoder_3d(name, channels, size)
    z = enc(_cloud(2, n, 0))
    assert z.shape == (2, channels, size, size) and torch.isfinite(z).all()


@pytest.mark.parametrize("name,n", [("pointnet2_tiny", 256), ("pointnet2_ssg", 512)])
@pytest.mark.parametrize("train", [False, True])
def test_pointnet2_is_invariant_to_point_order(name, n, train):
    torch.manual_seed(0)
    enc = create_encoder_3d(name, 64, 4).train(train)
    x = _cloud(3, n, 1)
    perm = torch.randperm(n)
    with torch.no_grad():
        a, b = enc(x), enc(x[:, perm])
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)


def test_fps_starts_far_from_centroid_and_is_spread():
    x = _cloud(2, 200, 2)
    idx = farthest_point_sample(x, 16)
    assert idx.shape == (2, 16)
    far = (x - x.mean(1, keepdim=True)).norm(dim=-1).argmax(dim=1)
    assert torch.equal(idx[:, 0], far)
    for row in idx:
        assert len(set(row.tolist())) == 16  # no repeats
    assert farthest_point_sample(x, 500).shape == (2, 200)  # capped at N


def test_ball_query_stays_in_radius_and_pads_with_nearest():
    x = _cloud(1, 100, 3)
    centres = x[:, :5]
    idx = ball_query(x, centres, radius=0.3, nsample=8)
    assert idx.shape == (1, 5, 8)
    d = (x[0][idx[0]] - centres[0][:, None]).norm(dim=-1)
    assert (d <= 0.3 + 1e-6).all()
    # the nearest point of a centre that is itself a point is the centre
    assert torch.equal(idx[0, :, 0], torch.arange(5))


# --------------------------------------------------------------------------------------------
# JAM
# --------------------------------------------------------------------------------------------


def test_jam_with_zero_gamma_returns_its_input():
    torch.manual_seed(0)
    jam = JointAttention(32, reduction=8)
    z = torch.randn(2, 32, 4, 4)
    for d in ("2d", "3d"):
        j, a = jam(z, d)
        assert torch.equal(j, z)
        assert a.shape == (2, 16, 16)
        assert torch.allclose(a.sum(-1), torch.ones(2, 16))


def test_jam_shares_query_key_and_not_value():
    torch.manual_seed(0)
    jam = JointAttention(16, reduction=4)
    with torch.no_grad():
        jam.gamma.fill_(0.7)
    z = torch.randn(1, 16, 3, 3)
    j2, a2 = jam(z, "2d")
    j3, a3 = jam(z, "3d")
    assert torch.equal(a2, a3)  # same query/key: same attention for the same input
    assert not torch.allclose(j2, j3)  # different values
    names = {n for n, _ in jam.named_parameters()}
    assert {"query.weight", "key.weight", "value.2d.weight", "value.3d.weight", "gamma"} <= names
    (j2.sum() + j3.sum()).backward()
    assert jam.gamma.grad is not None
    single = SelfAttention2d(16, reduction=4)
    single.copy_from_joint(jam, "2d")
    js, as_ = single(z)
    assert torch.allclose(js, j2) and torch.allclose(as_, a2)
    with pytest.raises(ValueError, match="domain"):
        jam(z, "depth")


# --------------------------------------------------------------------------------------------
# AdaFace checkpoints
# --------------------------------------------------------------------------------------------


def _adaface_checkpoint(tmp_path, name="ir_tiny", size=32, dim=16):
    """An AdaFace-style Lightning checkpoint of a randomly initialised backbone."""
    torch.manual_seed(1)
    src = create_encoder_2d(name, image_size=size, embedding_dim=dim)
    with torch.no_grad():  # non-trivial batch-norm statistics
        for m in src.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    sd = {f"model.{k}": v for k, v in src.state_dict().items()}
    sd["head.kernel"] = torch.randn(dim, 10)
    sd["head.batch_mean"] = torch.ones(1)
    path = tmp_path / "adaface_ir.ckpt"
    torch.save({"state_dict": sd, "epoch": 3, "hyper_parameters": argparse.Namespace(arch="ir_18", m=0.4)}, path)
    return src.eval(), path


def test_adaface_key_map():
    assert adaface_key_map("model.body.3.res_layer.1.weight") == "body.3.res_layer.1.weight"
    assert adaface_key_map("model.output_layer.3.weight") == "output_layer.3.weight"
    assert adaface_key_map("input_layer.0.weight") == "input_layer.0.weight"
    assert adaface_key_map("head.kernel") is None


@pytest.mark.parametrize("variant", ["2d-only/ir_tiny", "jam-je/ir_tiny/pointnet2_tiny"])
def test_load_adaface_checkpoint_into_joint_model(tmp_path, variant):
    src, path = _adaface_checkpoint(tmp_path)
    model = create_model(variant, num_classes=4, image_size=32, num_points=64, embedding_dim=16)
    report = load_adaface_backbone(model, path)
    assert "head.kernel" in report["skipped"] and not report["missing"]
    assert "embed.3.weight" in report["loaded"] and "encoder_2d.body.0.res_layer.1.weight" in report["loaded"]
    model.eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        # gamma starts at 0, so the joint model starts as the pretrained face model
        assert torch.allclose(model.embed_2d(x), src(x), rtol=1e-4, atol=1e-5)


def test_load_adaface_safetensors_into_iresnet_and_mismatch(tmp_path):
    from safetensors.torch import save_file

    src, _ = _adaface_checkpoint(tmp_path)
    path = tmp_path / "backbone.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = create_encoder_2d("ir_tiny", image_size=32, embedding_dim=16).eval()
    load_adaface_backbone(dst, path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(dst(x), src(x))
    # a different feature-map size: trunk loads, output layer is skipped
    other = create_encoder_2d("ir_tiny", image_size=64, embedding_dim=16)
    report = load_adaface_backbone(other, path)
    assert "model.output_layer.3.weight" in report["skipped"]
    # a different architecture does not fit
    with pytest.raises(ValueError, match="does not fit"):
        load_adaface_backbone(create_encoder_2d("ir18", image_size=32), path)


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled code ran",))


def test_checkpoint_loading_refuses_pickled_code(tmp_path, capsys):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": _Payload()}, path)
    enc = create_encoder_2d("ir_tiny", image_size=32)
    with pytest.raises(ValueError, match="weights_only"):
        load_adaface_backbone(enc, path)
    assert "unpickled code ran" not in capsys.readouterr().out
    with pytest.raises(FileNotFoundError):
        load_adaface_backbone(enc, tmp_path / "missing.ckpt")
