"""Inference export of the 2D path: same embeddings, safe loading, no 3D code needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from posefr_dist.model import create_model, export_2d, load_2d
from posefr_dist.train import make_optimizer, train_step

torch.set_num_threads(1)


def _trained(name: str, size: int = 32, dim: int = 16):
    """A model after two steps (non-trivial BN statistics) with a non-zero gamma."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, image_size=size, num_points=64, embedding_dim=dim)
    opt = make_optimizer(model, "adamw", lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        batch = {"image": torch.rand(6, 3, size, size, generator=g) * 2 - 1,
                 "points": torch.randn(6, 64, 3, generator=g) * 0.5,
                 "has_points": torch.ones(6, dtype=torch.bool),
                 "label": torch.randint(0, 4, (6,), generator=g)}
        train_step(model, opt, batch)
    if model.jam is not None:
        with torch.no_grad():
            model.jam.gamma.fill_(0.8)
    return model.eval()


@pytest.mark.parametrize("name", ["2d-only/ir_tiny", "jam/ir_tiny/pointnet2_tiny", "jam-je/ir_tiny/pointnet2_tiny"])
def test_export_reproduces_the_2d_path(tmp_path, name):
    model = _trained(name)
    export_2d(model, str(tmp_path / "exp"))
    assert sorted(os.listdir(tmp_path / "exp")) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert cfg["format"] == "posefr-2d" and cfg["embedding_dim"] == 16 and cfg["image_size"] == 32
    assert cfg["attention"] == (model.jam is not None) and cfg["source"]["model"]["variant"] == name.split("/")[0]
    loaded = load_2d(str(tmp_path / "exp"))
    assert loaded.image_size == 32 and loaded.embedding_dim == 16 and not loaded.training
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded.embed(x), model.embed_2d(x), rtol=1e-4, atol=1e-5)
    # no 3D weights travel with the export
    from safetensors import safe_open

    with safe_open(str(tmp_path / "exp" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not any("3d" in k or "encoder_3d" in k or k.startswith("head_") for k in keys)
    assert any(k.startswith("attention.") for k in keys) == (model.jam is not None)


def test_export_overwrites_and_ir18_size(tmp_path):
    torch.manual_seed(0)
    model = create_model("jam-je/ir18/pointnet2_tiny", num_classes=3, image_size=64).eval()
    with torch.no_grad():
        model.jam.gamma.fill_(0.3)
    export_2d(model, tmp_path)
    export_2d(model, tmp_path)  # replaced atomically, no temporaries left
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    loaded = load_2d(tmp_path)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(loaded.embed(x), model.embed_2d(x), rtol=1e-4, atol=1e-5)


def test_loader_imports_only_2d_modules(tmp_path):
    export_2d(_trained("jam-je/ir_tiny/pointnet2_tiny"), tmp_path)
    code = textwrap.dedent(f"""
        import sys, torch
        from posefr_dist.model import load_2d
        m = load_2d({str(tmp_path)!r})
        assert m.embed(torch.zeros(1, 3, 32, 32)).shape == (1, 16)
        banned = ("posefr_dist.model.pointnet2", "posefr_dist.model.heads", "posefr_dist.model.entropy",
                  "posefr_dist.model.posefr", "posefr_dist.train", "posefr_dist.config")
        print(sorted(n for n in sys.modules if n.startswith(banned)))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "[]"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_2d(tmp_path)
    export_2d(_trained("2d-only/ir_tiny"), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "version": 99}))
    with pytest.raises(ValueError, match="version"):
        load_2d(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "embedding_dim": 32}))
    with pytest.raises(ValueError, match="do not fit"):
        load_2d(tmp_path)


@pytest.mark.parametrize("sn,dn", [(True, False), (True, True), (False, True), (False, False)])
def test_export_is_exact_with_spectral_and_domain_norm(tmp_path, sn, dn):
    torch.manual_seed(0)
    model = create_model("jam-je/ir_tiny/pointnet2_tiny", num_classes=4, image_size=32, num_points=64,
                         embedding_dim=16, attn_spectral_norm=sn, attn_domain_norm=dn)
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(6, 3, 32, 32, generator=g) * 2 - 1, "points": torch.randn(6, 64, 3, generator=g),
             "label": torch.randint(0, 4, (6,), generator=g)}
    opt = make_optimizer(model, "adamw", lr=1e-2)
    for _ in range(2):  # the power-iteration vectors lag the weights by one step: W / sigma is not W
        train_step(model, opt, batch)
    with torch.no_grad():
        model.jam.gamma.fill_(0.8)
    model.eval()
    export_2d(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["attn_domain_norm"] is dn and cfg["source"]["model"]["attn_spectral_norm"] is sn
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # plain convs: the spectral norm is folded into the weights, Q/K without bias get a zero bias
    assert {"attention.query.weight", "attention.query.bias", "attention.value.bias"} <= keys
    assert not any(k.endswith(("weight_u", "weight_v")) for k in keys)
    loaded = load_2d(tmp_path)
    assert all(type(m) is torch.nn.Conv2d for m in (loaded.attention.query, loaded.attention.key,
                                                     loaded.attention.value))
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.embed(x), model.embed_2d(x))
        if sn:  # the fold is needed: the raw weights would give other embeddings
            raw = load_2d(tmp_path)
            raw.attention.query.weight.copy_(model.jam.query.weight)
            raw.attention.key.weight.copy_(model.jam.key.weight)
            assert not torch.allclose(raw.embed(x), model.embed_2d(x), atol=1e-4)


def test_exports_without_the_domain_norm_field_still_load(tmp_path):
    model = _trained("jam-je/ir_tiny/pointnet2_tiny")
    export_2d(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["attn_domain_norm"]  # as written before the field existed
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = load_2d(tmp_path)
    assert not loaded.attention.domain_norm
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.embed(x), model.embed_2d(x))
