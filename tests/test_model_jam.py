"""Bounded attention energies: spectral norm and domain norm of the joint attention (model.jam)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from posefr_dist.model import JointAttention, create_model
from posefr_dist.model.jam import SNConv2d, instance_norm

torch.set_num_threads(1)

C, RED, S = 16, 4, 4  # 16 channels, Q/K width 4, a 4 x 4 map (HW = 16)


def _unit_positions(seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """A [2, C, S, S] map whose feature vector at every position has norm ``scale``."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(2, C, S, S, generator=g), dim=1) * scale


def _row_entropy(a: torch.Tensor) -> torch.Tensor:
    return -(a * a.clamp_min(1e-30).log()).sum(-1).mean()


@torch.no_grad()
def _energies(jam: JointAttention, z: torch.Tensor) -> torch.Tensor:
    """q_i . k_j as the block computes them (eval mode: no power-iteration step)."""
    was = jam.training
    jam.eval()
    e = jam.query(z).flatten(2).transpose(1, 2) @ jam.key(z).flatten(2)
    jam.train(was)
    return e


def _sharpen(spectral_norm: bool, steps: int = 30) -> tuple[JointAttention, list[float]]:
    """Q/K weights blown up 100x, then Adam on the mean row entropy of A (rewards sharp rows)."""
    torch.manual_seed(0)
    jam = JointAttention(C, RED, spectral_norm=spectral_norm)
    with torch.no_grad():
        jam.query.weight.mul_(100)
        jam.key.weight.mul_(100)
    opt = torch.optim.Adam(jam.parameters(), lr=0.5)
    z = _unit_positions()
    hist = []
    for _ in range(steps):
        _, a = jam(z, "2d")
        loss = _row_entropy(a)
        opt.zero_grad()
        loss.backward()
        opt.step()
        hist.append(float(loss.detach()))
    with torch.no_grad():
        hist.append(float(_row_entropy(jam.eval()(z, "2d")[1])))
    return jam, hist


def _min_vertex_entropy(n: int, bound: float) -> float:
    """Smallest row entropy of a softmax whose n logits are +-bound (k at +bound, the rest at -bound)."""
    out = []
    for k in range(1, n):
        p = torch.tensor([math.exp(bound)] * k + [math.exp(-bound)] * (n - k), dtype=torch.float64)
        p = p / p.sum()
        out.append(float(-(p * p.log()).sum()))
    return min(out)


def test_spectral_normalised_attention_energies_stay_bounded():
    hw = S * S
    jam, hist = _sharpen(spectral_norm=True)
    free, free_hist = _sharpen(spectral_norm=False)
    # the normalised Q/K/V weights have spectral norm <= 1 (up to the power-iteration error)
    assert jam.query.bias is None and jam.key.bias is None  # a query bias would be an unbounded energy term
    for conv in (jam.query, jam.key, jam.value["2d"]):
        assert isinstance(conv, SNConv2d)
        w = conv.normalised_weight(update=False).detach().reshape(conv.weight.shape[0], -1)
        assert float(torch.linalg.matrix_norm(w, ord=2)) <= 1.02
    # |q_i . k_j| <= ||z_i|| ||z_j||, for the unit map and for one 100x larger
    for scale in (1.0, 100.0):
        z = _unit_positions(seed=1, scale=scale)
        e = _energies(jam, z)
        n = z.flatten(2).norm(dim=1)  # [B, HW]
        assert (e.abs() <= 1.02 * n[:, :, None] * n[:, None, :]).all(), float((e.abs() / (n[:, :, None] * n[:, None, :])).max())
    # with |energies| <= ~1 the row entropy cannot fall far below the box bound; without SN it collapses
    floor = _min_vertex_entropy(hw, 1.02)
    assert 2.0 < floor < math.log(hw)
    assert min(hist) >= 0.95 * floor, (min(hist), floor)
    assert free_hist[-1] < 0.05, free_hist[-5:]
    assert float(_energies(free, _unit_positions(seed=1)).abs().max()) > 10


def test_spectral_norm_ignores_the_scale_of_the_weights():
    torch.manual_seed(0)
    jam = JointAttention(C, RED).eval()
    z = torch.randn(2, C, S, S)
    _, a = jam(z, "2d")
    with torch.no_grad():
        jam.query.weight.mul_(100)
        jam.key.weight.mul_(0.01)
    _, a_scaled = jam(z, "2d")
    assert torch.allclose(a, a_scaled, atol=1e-6)


@pytest.mark.parametrize("spectral_norm", [True, False])
def test_domain_norm_makes_attention_scale_free(spectral_norm):
    torch.manual_seed(0)
    jam = JointAttention(C, RED, spectral_norm=spectral_norm, domain_norm=True).eval()
    plain = JointAttention(C, RED, spectral_norm=spectral_norm, domain_norm=False).eval()
    plain.load_state_dict(jam.state_dict())
    with torch.no_grad():
        jam.gamma.fill_(0.5)
    z = torch.randn(2, C, S, S) * 2 + 0.5
    j, a = jam(z, "3d")
    for c in (0.5, 3.0, 100.0, 1e4):
        _, a_c = jam(z * c, "3d")
        assert torch.allclose(a_c, a, atol=2e-5), c  # equal up to the norm's eps (1e-5 against var ~1)
        # without the domain norm the same block's attention changes with the scale
        assert not torch.allclose(plain(z * c, "3d")[1], plain(z, "3d")[1], atol=1e-3)
    # reference: InstanceNorm2d(affine=False) before the shared Q and K only; V and the residual see z
    n = torch.nn.InstanceNorm2d(C, affine=False)(z)
    assert torch.allclose(instance_norm(z), n, atol=1e-6)
    with torch.no_grad():
        q = jam.query(n).flatten(2).transpose(1, 2)
        k = jam.key(n).flatten(2)
        ref_a = torch.softmax(q @ k, -1)
        ref_j = 0.5 * (jam.value["3d"](z).flatten(2) @ ref_a.transpose(1, 2)).reshape(z.shape) + z
    assert torch.allclose(a, ref_a, atol=1e-6) and torch.allclose(j, ref_j, atol=1e-5)
    # the norm adds no parameters
    assert sum(p.numel() for p in jam.parameters()) == sum(p.numel() for p in plain.parameters())


def test_power_iteration_once_per_step_and_shared_by_both_domains():
    torch.manual_seed(0)
    jam = JointAttention(C, RED)
    z = torch.randn(2, C, S, S)
    u = jam.query.weight_u.clone()
    with torch.no_grad():
        jam.query.weight.add_(0.3 * torch.randn_like(jam.query.weight))
    _, a2 = jam(z, "2d")  # the 2D pass refreshes Q/K ...
    assert not torch.equal(jam.query.weight_u, u)
    u2 = jam.query.weight_u.clone()
    _, a3 = jam(z, "3d")  # ... the 3D pass of the same step uses them as they are
    assert torch.equal(jam.query.weight_u, u2) and torch.equal(a2, a3)
    jam.eval()
    jam(z, "2d")
    assert torch.equal(jam.query.weight_u, u2)  # eval mode never updates


def test_state_dict_round_trip_strict_and_buffers_sync(tmp_path):
    from safetensors.torch import load_file, save_file

    def build():
        return create_model("jam-je/ir_tiny/pointnet2_tiny", num_classes=4, image_size=32, num_points=64,
                            embedding_dim=16)

    torch.manual_seed(0)
    model = build()
    assert model.model_cfg.attn_spectral_norm and isinstance(model.jam.query, SNConv2d)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(4, 3, 32, 32, generator=g) * 2 - 1, "points": torch.randn(4, 64, 3, generator=g),
             "label": torch.arange(4)}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):  # moves the weights and the power-iteration vectors
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
    model(batch)
    sd = model.state_dict()
    names = set(sd)
    assert {"jam.query.weight", "jam.query.weight_u", "jam.query.weight_v", "jam.value.3d.weight_u",
            "jam.value.2d.bias"} <= names
    assert "jam.query.bias" not in names and not any("parametrizations" in k for k in names)
    # the vectors are buffers, so the trainer's rank-0 broadcast (sync_buffers) includes them
    bufs = {n for n, _ in model.named_buffers()}
    assert {"jam.query.weight_u", "jam.key.weight_v", "jam.value.2d.weight_u"} <= bufs
    assert {n for n, _ in model.named_parameters()} >= {"jam.query.weight", "jam.key.weight"}
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    torch.manual_seed(1)
    fresh = build()
    fresh.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=True)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh.embed_2d(batch["image"]), model.embed_2d(batch["image"]))
        assert torch.equal(fresh.embed_3d(batch["points"]), model.embed_3d(batch["points"]))
    # the options are threaded from the config
    off = create_model("jam/ir_tiny/pointnet2_tiny", num_classes=4, image_size=32, embedding_dim=16,
                       attn_spectral_norm=False, attn_domain_norm=True)
    assert type(off.jam.query) is torch.nn.Conv2d and off.jam.query.bias is not None and off.jam.domain_norm
