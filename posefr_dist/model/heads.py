"""Margin-based identity heads: AdaFace (default), ArcFace, CosFace.

Each head holds one class-centre matrix ``kernel [D, num_classes]`` (AdaFace's layout), takes
*unnormalised* embeddings and integer labels, and returns scaled logits for cross-entropy:

* AdaFace (Kim et al. 2022), as in the published ``head.py``: cos = <x/|x|, w_c/|w_c|> clamped to
  [-1 + eps, 1 - eps] (eps = 1e-3); the feature norms clipped to [0.001, 100] (no gradient) give a
  batch mean and std (unbiased) that update EMAs with rate ``t_alpha`` (initial mean 20, std 100);
  ``margin_scaler = clip((norm - ema_mean) / (ema_std + eps) * h, -1, 1)``;
  on the target class only, ``g_angular = -m * margin_scaler`` is added to the angle
  (clipped to [eps, pi - eps]) and ``g_additive = m + m * margin_scaler`` is subtracted from the
  cosine; everything is multiplied by ``s``.
* ArcFace: target logit ``s * cos(clip(theta + m, eps, pi - eps))``.
* CosFace: target logit ``s * (cos - m)``.

Two departures from the published AdaFace code, neither of which changes a training step: the
EMA is updated only in training mode (so a validation forward leaves it alone), and only for
batches of two or more rows (the std of one value is undefined and would poison the EMA).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MarginHead", "AdaFaceHead", "ArcFaceHead", "CosFaceHead", "build_head", "HEADS"]


class MarginHead(nn.Module):
    """Shared parts: the class centres and the clamped cosine."""

    eps = 1e-3

    def __init__(self, embedding_dim: int, num_classes: int, s: float) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.embedding_dim = embedding_dim
        self.num_classes = num_classes
        self.s = s
        self.kernel = nn.Parameter(torch.empty(embedding_dim, num_classes))
        # AdaFace's initialisation: uniform, then every column renormalised to unit length
        with torch.no_grad():
            self.kernel.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def cosine(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``emb [B, D]`` -> (clamped cosines ``[B, C]``, norms ``[B, 1]``), in float32.

        The head always computes in float32 (float64 if given), also under autocast: in bfloat16,
        1 - 1e-3 rounds to 1 and acos' gradient at 1 is infinite. The rest of the head is
        elementwise, which autocast leaves in float32.
        """
        dt = torch.float64 if emb.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=emb.device.type, enabled=False):
            emb = emb.to(dt)
            norms = emb.norm(p=2, dim=1, keepdim=True)
            unit = emb / norms.clamp_min(1e-12)
            cos = unit @ F.normalize(self.kernel.to(dt), dim=0)
        return cos.clamp(-1 + self.eps, 1 - self.eps), norms

    def _one_hot(self, labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(like).scatter_(1, labels.reshape(-1, 1), 1.0)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class AdaFaceHead(MarginHead):
    """AdaFace: a margin that adapts to image quality, proxied by the feature norm."""

    def __init__(self, embedding_dim: int, num_classes: int, m: float = 0.4, h: float = 0.333,
                 s: float = 64.0, t_alpha: float = 0.01) -> None:
        super().__init__(embedding_dim, num_classes, s)
        self.m = m
        self.h = h
        self.t_alpha = t_alpha
        self.register_buffer("batch_mean", torch.ones(1) * 20)
        self.register_buffer("batch_std", torch.ones(1) * 100)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos, norms = self.cosine(emb)
        safe_norms = norms.clip(min=0.001, max=100).detach()
        if self.training and safe_norms.shape[0] > 1:
            with torch.no_grad():
                mean = safe_norms.mean()
                std = safe_norms.std()
                self.batch_mean.copy_(mean * self.t_alpha + (1 - self.t_alpha) * self.batch_mean.to(mean.dtype))
                self.batch_std.copy_(std * self.t_alpha + (1 - self.t_alpha) * self.batch_std.to(std.dtype))
        ema_mean = self.batch_mean.to(safe_norms.dtype)
        ema_std = self.batch_std.to(safe_norms.dtype)
        margin_scaler = (safe_norms - ema_mean) / (ema_std + self.eps)
        margin_scaler = (margin_scaler * self.h).clip(-1, 1)  # [B, 1]
        one_hot = self._one_hot(labels, cos)
        g_angular = -self.m * margin_scaler
        theta = cos.acos()
        theta_m = (theta + one_hot * g_angular).clip(min=self.eps, max=math.pi - self.eps)
        cos_m = theta_m.cos()
        g_additive = self.m + self.m * margin_scaler
        cos_m = cos_m - one_hot * g_additive
        return cos_m * self.s


class ArcFaceHead(MarginHead):
    """ArcFace: additive angular margin on the target class."""

    def __init__(self, embedding_dim: int, num_classes: int, m: float = 0.5, s: float = 64.0) -> None:
        super().__init__(embedding_dim, num_classes, s)
        self.m = m

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos, _ = self.cosine(emb)
        one_hot = self._one_hot(labels, cos)
        theta_m = (cos.acos() + one_hot * self.m).clip(min=self.eps, max=math.pi - self.eps)
        return theta_m.cos() * self.s


class CosFaceHead(MarginHead):
    """CosFace: additive cosine margin on the target class."""

    def __init__(self, embedding_dim: int, num_classes: int, m: float = 0.35, s: float = 64.0) -> None:
        super().__init__(embedding_dim, num_classes, s)
        self.m = m

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos, _ = self.cosine(emb)
        return (cos - self._one_hot(labels, cos) * self.m) * self.s


HEADS = {"adaface": AdaFaceHead, "arcface": ArcFaceHead, "cosface": CosFaceHead}


def build_head(name: str, embedding_dim: int, num_classes: int, m: float, s: float,
               h: float = 0.333, t_alpha: float = 0.01) -> MarginHead:
    """A head by name (``adaface``, ``arcface``, ``cosface``); ``h`` and ``t_alpha`` are AdaFace's."""
    if name == "adaface":
        return AdaFaceHead(embedding_dim, num_classes, m=m, h=h, s=s, t_alpha=t_alpha)
    if name == "arcface":
        return ArcFaceHead(embedding_dim, num_classes, m=m, s=s)
    if name == "cosface":
        return CosFaceHead(embedding_dim, num_classes, m=m, s=s)
    raise ValueError(f"unknown head {name!r}; available: {', '.join(HEADS)}")
