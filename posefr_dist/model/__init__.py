"""The model library: encoders, joint attention, joint-entropy loss, identity heads, export.

Public names are imported lazily, so ``from posefr_dist.model import load_2d`` loads only the 2D
modules (``export``, ``iresnet``, ``jam``) and never the 3D encoder, the heads or the losses.

| name | module |
|---|---|
| build_model, create_model, list_models, PoseFRModel, VARIANTS | posefr |
| export_2d, load_2d, Face2DEmbedder | export |
| IResNet, create_encoder_2d, load_adaface_backbone, adaface_key_map, EmbeddingHead | iresnet |
| PointNet2Encoder, create_encoder_3d, farthest_point_sample, ball_query | pointnet2 |
| JointAttention, SelfAttention2d | jam |
| joint_entropy_loss, joint_histogram, normalise_attention, mutual_information | entropy |
| AdaFaceHead, ArcFaceHead, CosFaceHead, build_head | heads |
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    # posefr
    "build_model": "posefr",
    "create_model": "posefr",
    "list_models": "posefr",
    "parse_model_name": "posefr",
    "PoseFRModel": "posefr",
    "VARIANTS": "posefr",
    # export
    "export_2d": "export",
    "load_2d": "export",
    "Face2DEmbedder": "export",
    # iresnet
    "IResNet": "iresnet",
    "IR_SPECS": "iresnet",
    "EmbeddingHead": "iresnet",
    "create_encoder_2d": "iresnet",
    "list_encoders_2d": "iresnet",
    "load_adaface_backbone": "iresnet",
    "adaface_key_map": "iresnet",
    # pointnet2
    "PointNet2Encoder": "pointnet2",
    "PointNet2SSG": "pointnet2",
    "POINTNET2_SPECS": "pointnet2",
    "create_encoder_3d": "pointnet2",
    "list_encoders_3d": "pointnet2",
    "farthest_point_sample": "pointnet2",
    "ball_query": "pointnet2",
    # jam
    "JointAttention": "jam",
    "SelfAttention2d": "jam",
    # entropy
    "joint_entropy_loss": "entropy",
    "joint_histogram": "entropy",
    "joint_entropy": "entropy",
    "normalise_attention": "entropy",
    "mutual_information": "entropy",
    # heads
    "AdaFaceHead": "heads",
    "ArcFaceHead": "heads",
    "CosFaceHead": "heads",
    "MarginHead": "heads",
    "build_head": "heads",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'posefr_dist.model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # static analysers see the eager imports
    from .entropy import joint_entropy, joint_entropy_loss, joint_histogram, mutual_information, normalise_attention
    from .export import Face2DEmbedder, export_2d, load_2d
    from .heads import AdaFaceHead, ArcFaceHead, CosFaceHead, MarginHead, build_head
    from .iresnet import (IR_SPECS, EmbeddingHead, IResNet, adaface_key_map, create_encoder_2d,
                          list_encoders_2d, load_adaface_backbone)
    from .jam import JointAttention, SelfAttention2d
    from .pointnet2 import (POINTNET2_SPECS, PointNet2Encoder, PointNet2SSG, ball_query,
                            create_encoder_3d, farthest_point_sample, list_encoders_3d)
    from .posefr import VARIANTS, PoseFRModel, build_model, create_model, list_models, parse_model_name
