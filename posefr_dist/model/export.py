"""Inference export: the 2D path only (IResNet trunk, 2D half of the joint attention, embedding head).

``export_2d(model, out_dir)`` writes two files into a local folder:

* ``model.safetensors``: weights and batch-norm statistics of :class:`Face2DEmbedder`, keys
  ``encoder.*`` (IResNet trunk: ``input_layer``, ``body``), ``attention.*`` (``query``, ``key``,
  ``value``, ``gamma``; absent for ``2d-only``) and ``head.*`` (the embedding head, AdaFace's
  ``output_layer`` layout);
* ``config.json``: ``format`` (``"posefr-2d"``), ``version`` (1), ``encoder_2d``, ``image_size``,
  ``embedding_dim``, ``attention``, ``attn_reduction``, ``attn_domain_norm`` (instance norm before
  Q and K; absent in older exports, read as false), ``embedding`` (``"unnormalised"``) and
  ``source`` (the joint model's variant, classes and configs, for the record).

The attention is stored as plain 1x1 convs: a spectrally normalised conv of the joint model is
written as W / sigma computed in eval mode (no power-iteration step) and a query/key without bias
gets a zero bias, so the export reproduces the joint model's eval-mode 2D path exactly and needs no
spectral-norm code (see ``jam``).

``load_2d(path)`` rebuilds the module from those two files. It imports only this module, the
IResNet and the attention code (no 3D encoder, heads, losses or training code) and reads the
weights with safetensors, so nothing is unpickled.

Both files are written under temporary names and renamed into place (weights first, config last),
so a crash never leaves a folder that looks like a finished export.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .iresnet import IR_SPECS, EmbeddingHead, IResNet, create_encoder_2d
from .jam import SelfAttention2d

__all__ = ["Face2DEmbedder", "export_2d", "load_2d", "EXPORT_FORMAT", "EXPORT_VERSION",
           "WEIGHTS_NAME", "CONFIG_NAME"]

EXPORT_FORMAT = "posefr-2d"
EXPORT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class Face2DEmbedder(nn.Module):
    """The exported 2D model: images ``[B, 3, S, S]`` in [-1, 1] -> embeddings ``[B, D]``.

    Embeddings are unnormalised, exactly as ``PoseFRModel.embed_2d``; compare them by cosine.

    Attributes:
        image_size: the input side S the model was trained at.
        embedding_dim: D.
    """

    def __init__(self, encoder_2d: str, image_size: int, embedding_dim: int, attention: bool,
                 attn_reduction: int = 8, attn_domain_norm: bool = False) -> None:
        super().__init__()
        self.encoder_name = encoder_2d
        self.image_size = image_size
        self.embedding_dim = embedding_dim
        self.attn_reduction = attn_reduction
        self.encoder: IResNet = create_encoder_2d(encoder_2d, image_size, embedding_dim=None)
        c, s = self.encoder.out_channels, self.encoder.map_size
        self.attention = SelfAttention2d(c, attn_reduction, attn_domain_norm) if attention else None
        self.head = EmbeddingHead(c, s, embedding_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        z = self.encoder.forward_features(images)
        if self.attention is not None:
            z, _ = self.attention(z)
        return self.head(z)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` in [-1, 1] -> ``[B, D]`` (unnormalised). Call ``.eval()`` first for inference."""
        return self.forward(images)

    def config(self) -> dict[str, Any]:
        return {
            "format": EXPORT_FORMAT,
            "version": EXPORT_VERSION,
            "encoder_2d": self.encoder_name,
            "image_size": self.image_size,
            "embedding_dim": self.embedding_dim,
            "attention": self.attention is not None,
            "attn_reduction": self.attn_reduction,
            "attn_domain_norm": self.attention is not None and self.attention.domain_norm,
            "embedding": "unnormalised",
            "input": "RGB [B, 3, S, S] float32 in [-1, 1]",
        }


def _from_joint(model: nn.Module) -> Face2DEmbedder:
    """Copy the 2D path of a joint model (duck-typed: ``encoder_2d``, ``jam``, ``embed``)."""
    enc: IResNet = model.encoder_2d
    jam = getattr(model, "jam", None)
    head: EmbeddingHead = model.embed
    reduction = getattr(jam, "reduction", 8)
    if enc.spec_name not in IR_SPECS:
        raise ValueError("the 2D encoder was not built by name (create_encoder_2d); its export cannot be rebuilt")
    out = Face2DEmbedder(enc.spec_name, enc.image_size, head.embedding_dim, jam is not None, reduction,
                         bool(getattr(jam, "domain_norm", False)))
    out.encoder.load_state_dict(enc.state_dict())
    out.head.load_state_dict(head.state_dict())
    if jam is not None:
        assert out.attention is not None
        out.attention.copy_from_joint(jam, "2d")
    return out.eval()


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def export_2d(model: nn.Module, out_dir: str | os.PathLike[str]) -> None:
    """Write the 2D inference model of a joint model (or a :class:`Face2DEmbedder`) to ``out_dir``.

    Args:
        model: a ``PoseFRModel`` (any variant) or a ``Face2DEmbedder``.
        out_dir: a local folder (created if missing); ``model.safetensors`` and ``config.json``
            inside it are replaced.
    """
    from safetensors.torch import save_file

    emb = model if isinstance(model, Face2DEmbedder) else _from_joint(model)
    cfg = emb.config()
    describe = getattr(model, "describe", None)
    if callable(describe):
        cfg["source"] = describe()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in emb.state_dict().items()}
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": EXPORT_FORMAT}))
    text = json.dumps(cfg, indent=2, sort_keys=True) + "\n"
    _atomic_write(out / CONFIG_NAME, lambda p: p.write_text(text))


def load_2d(path: str | os.PathLike[str]) -> Face2DEmbedder:
    """Load an exported 2D model (a folder with ``model.safetensors`` and ``config.json``).

    Returns:
        A :class:`Face2DEmbedder` in eval mode with ``.embed(images)``, ``.image_size`` and
        ``.embedding_dim``.

    Raises:
        FileNotFoundError: a file is missing.
        ValueError: the config is not a version-1 ``posefr-2d`` export or the weights do not fit it.
    """
    from safetensors.torch import load_file

    root = Path(path)
    if root.is_file():
        root = root.parent
    cfg_path, w_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise FileNotFoundError(f"exported model {root}: {p.name} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: invalid JSON: {e}") from e
    if cfg.get("format") != EXPORT_FORMAT or cfg.get("version") != EXPORT_VERSION:
        raise ValueError(f"{cfg_path}: not a {EXPORT_FORMAT} version {EXPORT_VERSION} export "
                         f"(format={cfg.get('format')!r}, version={cfg.get('version')!r})")
    for key in ("encoder_2d", "image_size", "embedding_dim", "attention"):
        if key not in cfg:
            raise ValueError(f"{cfg_path}: field {key!r} is missing")
    if cfg["encoder_2d"] not in IR_SPECS:
        raise ValueError(f"{cfg_path}: encoder_2d {cfg['encoder_2d']!r} unknown; known: {', '.join(IR_SPECS)}")
    model = Face2DEmbedder(cfg["encoder_2d"], int(cfg["image_size"]), int(cfg["embedding_dim"]),
                           bool(cfg["attention"]), int(cfg.get("attn_reduction", 8)),
                           bool(cfg.get("attn_domain_norm", False)))
    tensors = load_file(str(w_path), device="cpu")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{w_path}: weights do not fit {cfg_path.name}: {e}") from e
    return model.eval()
