"""The joint 2D-3D model and its factory.

Variants (``ModelConfig.variant``):

| variant   | 3D branch | JAM | JE loss | total loss                                  |
|-----------|-----------|-----|---------|---------------------------------------------|
| ``2d-only`` | no      | no  | no      | L_2D (IR + AdaFace: the baseline)           |
| ``jam``     | yes     | yes | no      | L_2D + w_3d L_3D (lambda_JE forced to 0)    |
| ``jam-je``  | yes     | yes | yes     | L_2D + w_3d L_3D + lambda_JE L_JE           |

Data flow (training)::

    image  -> IResNet trunk -> z_2D [B,C,S,S] -> JAM(2d) -> J_2D, A_2D -> embed        -> head_2D
    points -> PointNet++ + reshaping -> z_3D  -> JAM(3d) -> J_3D, A_3D -> embed (3D BN) -> head_3D
                                                         A_2D, A_3D -> joint-entropy loss

The embedding head's Linear (the compression of the C x S x S map to D) is shared by both domains;
its BatchNorm layers are per domain (``embed`` holds the 2D ones, ``embed_norm_3d`` the 3D ones), so
the 2D path's running statistics are those of images only and the exported 2D model is exact.

Only rows with ``has_points`` feed the 3D branch and the JE loss. A batch with fewer than two such
rows skips the 3D branch (batch norm needs two rows); its 3D loss is then a zero that still touches
every 3D-only parameter, so data-parallel engines see a gradient for every parameter every step.

Example:
    >>> from posefr_dist.config import ModelConfig, LossConfig
    >>> m = build_model(ModelConfig(encoder_2d="ir_tiny", encoder_3d="pointnet2_tiny", embedding_dim=64),
    ...                 LossConfig(), num_classes=10, image_size=64, num_points=256)
    >>> out = m({"image": torch.zeros(4, 3, 64, 64), "points": torch.randn(4, 256, 3),
    ...          "has_points": torch.ones(4, dtype=torch.bool), "label": torch.arange(4)})
    >>> sorted(k for k in out if k.startswith("loss"))
    ['loss', 'loss_2d', 'loss_3d', 'loss_je']
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from posefr_dist.config import LossConfig, ModelConfig

from .entropy import joint_entropy_loss, mutual_information
from .heads import build_head
from .iresnet import IR_SPECS, EmbeddingHead, IResNet, create_encoder_2d
from .jam import JointAttention
from .pointnet2 import POINTNET2_SPECS, create_encoder_3d

__all__ = ["PoseFRModel", "VariantSpec", "VARIANTS", "build_model", "create_model", "list_models",
           "parse_model_name"]


@dataclass(frozen=True)
class VariantSpec:
    use_3d: bool
    use_je: bool


#: the variant registry (names as in ``ModelConfig.variant``)
VARIANTS: dict[str, VariantSpec] = {
    "2d-only": VariantSpec(use_3d=False, use_je=False),
    "jam": VariantSpec(use_3d=True, use_je=False),
    "jam-je": VariantSpec(use_3d=True, use_je=True),
}


class DomainNorm3d(nn.Module):
    """The 3D branch's own batch norms around the shared Linear of :class:`EmbeddingHead`."""

    def __init__(self, channels: int, embedding_dim: int) -> None:
        super().__init__()
        self.pre = nn.BatchNorm2d(channels)
        self.post = nn.BatchNorm1d(embedding_dim, affine=False)


class PoseFRModel(nn.Module):
    """The joint attention face model (see the module docstring). Build it with :func:`build_model`."""

    def __init__(self, model_cfg: ModelConfig, loss_cfg: LossConfig, num_classes: int,
                 image_size: int = 112, num_points: int = 1024) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {num_points}")
        spec = VARIANTS[model_cfg.variant]
        self.model_cfg = dataclasses.replace(model_cfg)
        self.loss_cfg = dataclasses.replace(loss_cfg)
        self.variant = model_cfg.variant
        self.num_classes = num_classes
        self.image_size = image_size
        self.num_points = num_points
        self.embedding_dim = model_cfg.embedding_dim
        self.w_3d = float(loss_cfg.w_3d) if spec.use_3d else 0.0
        # the jam variant ignores loss.lambda_je by definition
        self.lambda_je = float(loss_cfg.lambda_je) if spec.use_je else 0.0

        self.encoder_2d: IResNet = create_encoder_2d(model_cfg.encoder_2d, image_size, embedding_dim=None)
        c, s = self.encoder_2d.out_channels, self.encoder_2d.map_size
        self.embed = EmbeddingHead(c, s, model_cfg.embedding_dim, model_cfg.dropout)
        head_kw = dict(m=model_cfg.head_margin, s=model_cfg.head_scale, h=model_cfg.head_h,
                       t_alpha=model_cfg.head_t_alpha)
        self.head_2d = build_head(model_cfg.head, model_cfg.embedding_dim, num_classes, **head_kw)
        self.jam: JointAttention | None = None
        self.encoder_3d: nn.Module | None = None
        self.embed_norm_3d: DomainNorm3d | None = None
        self.head_3d: nn.Module | None = None
        if spec.use_3d:
            self.jam = JointAttention(c, model_cfg.attn_reduction, spectral_norm=model_cfg.attn_spectral_norm,
                                      domain_norm=model_cfg.attn_domain_norm)
            self.encoder_3d = create_encoder_3d(model_cfg.encoder_3d, c, s, splat=model_cfg.splat,
                                                splat_front_only=model_cfg.splat_front_only)
            self.embed_norm_3d = DomainNorm3d(c, model_cfg.embedding_dim)
            # model.shared_head: the 3D embeddings are classified by the 2D head's class centres
            # (one head, beyond the method's one head per branch), which ties the two spaces together
            self.head_3d = (None if model_cfg.shared_head else
                            build_head(model_cfg.head, model_cfg.embedding_dim, num_classes, **head_kw))

    # ----------------------------------------------------------------------------------------
    # paths
    # ----------------------------------------------------------------------------------------

    def _features_2d(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = self.encoder_2d.forward_features(images)
        if self.jam is None:
            return z, None
        return self.jam(z, "2d")

    def _embed_3d(self, j3: torch.Tensor) -> torch.Tensor:
        assert self.embed_norm_3d is not None
        x = self.embed_norm_3d.pre(j3)
        x = self.embed[1](x)  # dropout
        x = self.embed[2](x)  # flatten
        x = self.embed[3](x)  # the shared Linear
        return self.embed_norm_3d.post(x)

    def embed_2d(self, images: torch.Tensor, return_attention: bool = False
                 ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
        """The 2D path: ``[B, 3, S, S]`` in [-1, 1] -> ``[B, D]`` embeddings, *unnormalised*.

        The norm carries AdaFace's quality signal; verification uses cosine similarity, so callers
        normalise (``F.normalize(e, dim=1)``). With ``return_attention`` also returns A_2D
        ``[B, HW, HW]`` (None for ``2d-only``).
        """
        j2, a2 = self._features_2d(images)
        e = self.embed(j2)
        return (e, a2) if return_attention else e

    def embed_3d(self, points: torch.Tensor, yaw_deg: torch.Tensor | None = None,
                 pitch_deg: torch.Tensor | None = None) -> torch.Tensor:
        """The 3D path: ``[B, N, 3]`` -> ``[B, D]`` (unnormalised); needs a 3D branch.

        ``yaw_deg``/``pitch_deg`` ``[B]``: the pose the 3D map is laid out at (``model.splat: posed``);
        None or NaN = frontal."""
        if self.encoder_3d is None or self.jam is None:
            raise RuntimeError(f"variant {self.variant!r} has no 3D branch")
        j3, _ = self.jam(self.encoder_3d(points, yaw_deg=yaw_deg, pitch_deg=pitch_deg), "3d")
        return self._embed_3d(j3)

    def parameters_3d_only(self) -> list[nn.Parameter]:
        """Parameters used only by the 3D branch (empty for ``2d-only``)."""
        if self.jam is None:
            return []
        mods = [self.encoder_3d, self.embed_norm_3d, self.head_3d, self.jam.value["3d"]]
        return [p for m in mods if m is not None for p in m.parameters()]

    # ----------------------------------------------------------------------------------------
    # training forward
    # ----------------------------------------------------------------------------------------

    def forward(self, batch: Mapping[str, torch.Tensor], return_attention: bool = False) -> dict[str, Any]:
        """Losses and 2D embeddings of one batch.

        Args:
            batch: ``image`` float [B,3,S,S] in [-1,1]; ``label`` int64 [B]; for 3D variants
                ``points`` float [B,N,3] and ``has_points`` bool [B] (all True when absent and
                ``points`` is given); optional ``yaw_deg``, ``pitch_deg`` float [B] (NaN = unknown):
                the image's pose, at which the 3D map is laid out (``model.splat: posed``).
            return_attention: also return ``attn_2d`` [B,HW,HW], ``attn_3d`` [B3,HW,HW] and
                ``index_3d`` [B3] (the batch rows of ``attn_3d``).

        Returns:
            ``loss``, ``loss_2d``, ``loss_3d``, ``loss_je`` (scalar float32 tensors; a term that does
            not apply is 0), ``emb_2d`` [B,D] (unnormalised), ``n_3d`` (rows used by the 3D branch),
            ``emb_3d`` [B3,D] when the 3D branch ran, and the attention maps on request.
        """
        images, labels = batch["image"], batch["label"]
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"batch['image'] must be [B, 3, H, W], got {tuple(images.shape)}")
        labels = labels.long()
        j2, a2 = self._features_2d(images)
        emb_2d = self.embed(j2)
        loss_2d = F.cross_entropy(self.head_2d(emb_2d, labels), labels)
        zero = loss_2d.new_zeros(())
        loss_3d, loss_je = zero, zero
        out: dict[str, Any] = {"emb_2d": emb_2d}
        idx = self._rows_3d(batch, images.shape[0], images.device)
        if self.encoder_3d is not None:
            assert self.jam is not None
            head_3d = self.head_2d if self.head_3d is None else self.head_3d
            if idx.numel() >= 2:
                points = batch["points"].index_select(0, idx).to(images.dtype)
                pose = {k: batch[k].to(idx.device).index_select(0, idx) for k in ("yaw_deg", "pitch_deg")
                        if isinstance(batch.get(k), torch.Tensor)}
                j3, a3 = self.jam(self.encoder_3d(points, **pose), "3d")
                emb_3d = self._embed_3d(j3)
                lab3 = labels.index_select(0, idx)
                loss_3d = F.cross_entropy(head_3d(emb_3d, lab3), lab3)
                out["emb_3d"] = emb_3d
                if self.lambda_je > 0:
                    assert a2 is not None
                    lc = self.loss_cfg
                    a2_3 = a2.index_select(0, idx)
                    if lc.je_form == "mi":  # -MI(A2; A3): no credit for sharpening either map alone
                        loss_je = -mutual_information(a2_3, a3, bins=lc.je_bins, bandwidth=lc.je_bandwidth,
                                                      norm=lc.je_norm).mean()
                    else:
                        loss_je = joint_entropy_loss(a2_3, a3, bins=lc.je_bins, bandwidth=lc.je_bandwidth,
                                                     norm=lc.je_norm)
                if return_attention:
                    out["attn_3d"] = a3
            else:
                idx = idx[:0]
                # keep every parameter in the graph (zero gradient) for data-parallel engines
                loss_3d = sum((p.sum() for p in self.parameters_3d_only()), zero) * 0.0
        else:
            idx = idx[:0]
        loss = loss_2d + self.w_3d * loss_3d + self.lambda_je * loss_je
        out.update(loss=loss, loss_2d=loss_2d.detach(), loss_3d=loss_3d.detach(), loss_je=loss_je.detach(),
                   n_3d=torch.tensor(idx.numel()))
        if return_attention:
            out["attn_2d"] = a2
            out["index_3d"] = idx
            out.setdefault("attn_3d", None)
        return out

    @staticmethod
    def _rows_3d(batch: Mapping[str, torch.Tensor], b: int, device: torch.device) -> torch.Tensor:
        if "points" not in batch:
            return torch.zeros(0, dtype=torch.long, device=device)
        has = batch.get("has_points")
        if has is None:
            return torch.arange(b, device=device)
        has = torch.as_tensor(has, device=device).to(torch.bool).reshape(-1)
        if has.shape[0] != b:
            raise ValueError(f"batch['has_points'] has {has.shape[0]} rows, batch has {b}")
        return has.nonzero().reshape(-1)

    def describe(self) -> dict[str, Any]:
        """The arguments that rebuild this model (written next to checkpoints and exports)."""
        return {
            "model": dataclasses.asdict(self.model_cfg),
            "loss": dataclasses.asdict(self.loss_cfg),
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "num_points": self.num_points,
        }


def build_model(model_cfg: ModelConfig, loss_cfg: LossConfig, num_classes: int, image_size: int = 112,
                num_points: int = 1024) -> PoseFRModel:
    """Build the model for a variant and pair of encoders named in the config.

    Args:
        model_cfg: variant (``2d-only``, ``jam``, ``jam-je``), encoders (``ir18``/``ir50``/``ir_tiny``,
            ``pointnet2_ssg``/``pointnet2_tiny``), embedding size, head and its margins.
        loss_cfg: loss weights and the joint-entropy histogram settings.
        num_classes: training identities (dense labels 0..num_classes-1).
        image_size: input side, a multiple of 16 (112 -> 7x7 feature map, 64 -> 4x4).
        num_points: points per cloud the data carry (for the record; the encoder adapts).

    Returns:
        A :class:`PoseFRModel` in training mode.

    Example:
        >>> from posefr_dist.config import ModelConfig, LossConfig
        >>> build_model(ModelConfig(variant="2d-only"), LossConfig(), num_classes=100).encoder_3d is None
        True
    """
    if image_size % 16 != 0 or image_size < 16:
        raise ValueError(f"image_size must be a positive multiple of 16, got {image_size}")
    return PoseFRModel(model_cfg, loss_cfg, num_classes, image_size, num_points)


# --------------------------------------------------------------------------------------------
# Names, timm style: "<variant>/<encoder_2d>[/<encoder_3d>]"
# --------------------------------------------------------------------------------------------


def list_models(filter: str = "") -> list[str]:
    """All model names (``"jam-je/ir18/pointnet2_ssg"``, ``"2d-only/ir_tiny"``, ...) containing ``filter``."""
    names = []
    for v, spec in VARIANTS.items():
        for e2 in IR_SPECS:
            if spec.use_3d:
                names += [f"{v}/{e2}/{e3}" for e3 in POINTNET2_SPECS]
            else:
                names.append(f"{v}/{e2}")
    return sorted(n for n in names if filter in n)


def parse_model_name(name: str) -> dict[str, str]:
    """``"jam/ir18/pointnet2_tiny"`` -> ``{"variant": "jam", "encoder_2d": "ir18", "encoder_3d": ...}``."""
    parts = name.split("/")
    if len(parts) not in (2, 3) or parts[0] not in VARIANTS:
        raise ValueError(f"model name {name!r}: expected <variant>/<encoder_2d>[/<encoder_3d>]; "
                         f"variants: {', '.join(VARIANTS)}")
    out = {"variant": parts[0], "encoder_2d": parts[1]}
    if len(parts) == 3:
        out["encoder_3d"] = parts[2]
    return out


def create_model(name: str, num_classes: int, image_size: int = 112, num_points: int = 1024,
                 loss_cfg: LossConfig | None = None, **model_overrides: Any) -> PoseFRModel:
    """Build a model by name (see :func:`list_models`), other ``ModelConfig`` fields as keywords.

    Example:
        >>> m = create_model("jam-je/ir_tiny/pointnet2_tiny", num_classes=8, image_size=32, embedding_dim=32)
        >>> m.variant, m.embedding_dim
        ('jam-je', 32)
    """
    cfg = ModelConfig(**{**model_overrides, **parse_model_name(name)})
    return build_model(cfg, loss_cfg or LossConfig(), num_classes, image_size, num_points)
