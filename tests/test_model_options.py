"""Options beyond the method's letter: one identity head for both branches, the MI form of L_JE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from posefr_dist.config import LossConfig, ModelConfig
from posefr_dist.model import build_model
from posefr_dist.model.entropy import joint_entropy_loss, mutual_information

torch.set_num_threads(1)


def _batch(b: int = 6, size: int = 32, n: int = 128, classes: int = 5) -> dict:
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(b, n, 3, generator=g)
    return {"image": torch.rand(b, 3, size, size, generator=g) * 2 - 1,
            "points": pts / pts.norm(dim=-1).amax(dim=1)[:, None, None],
            "has_points": torch.ones(b, dtype=torch.bool),
            "label": torch.randint(0, classes, (b,), generator=g),
            "yaw_deg": torch.linspace(-90, 90, b), "pitch_deg": torch.zeros(b)}


def _model(shared: bool = False, form: str = "joint"):
    torch.manual_seed(0)
    mc = ModelConfig(variant="jam-je", encoder_2d="ir_tiny", encoder_3d="pointnet2_tiny", embedding_dim=24,
                     shared_head=shared)
    return build_model(mc, LossConfig(lambda_je=0.5, je_bins=8, je_form=form), num_classes=5, image_size=32,
                       num_points=128)


def test_shared_head_classifies_3d_with_the_2d_centres():
    m = _model(shared=True)
    assert m.head_3d is None and not any(k.startswith("head_3d.") for k in m.state_dict())
    batch = _batch()
    # AdaFace's norm statistics move with every call in training mode: compare in eval mode
    m.eval()
    out = m(batch)
    expected = F.cross_entropy(m.head_2d(out["emb_3d"], batch["label"]), batch["label"])
    assert torch.allclose(out["loss_3d"], expected, atol=1e-6)
    assert torch.allclose(out["loss"], out["loss_2d"] + m.w_3d * out["loss_3d"] + m.lambda_je * out["loss_je"],
                          atol=1e-5)
    sep = _model(shared=False)
    assert sep.head_3d is not None and sum(p.numel() for p in sep.parameters()) > sum(
        p.numel() for p in m.parameters())


def test_mi_form_is_minus_the_mutual_information():
    m = _model(form="mi")
    m.eval()
    out = m(_batch(), return_attention=True)
    a2, a3 = out["attn_2d"].index_select(0, out["index_3d"]), out["attn_3d"]
    mi = mutual_information(a2, a3, bins=8).mean()
    assert torch.allclose(out["loss_je"], -mi, atol=1e-5)
    joint = _model(form="joint")
    joint.eval()
    out_j = joint(_batch(), return_attention=True)
    assert torch.allclose(out_j["loss_je"], joint_entropy_loss(
        out_j["attn_2d"].index_select(0, out_j["index_3d"]), out_j["attn_3d"], bins=8), atol=1e-5)
    assert not torch.allclose(out_j["loss_je"], out["loss_je"])
