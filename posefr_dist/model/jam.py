"""Joint attention mapping (JAM).

For a domain d in {2D, 3D} with feature map z_d of shape [B, C, H, W]:

    A_d = softmax(Q(z_d)^T K(z_d))          # [B, HW, HW], row i = where position i attends
    J_d = gamma * V_d(z_d) A_d^T + z_d      # [B, C, H, W]

Q and K are 1x1 convolutions *shared* by both domains (so the two attention maps are computed by
the same similarity function and are comparable position by position), V_d is a 1x1 convolution
per domain, and gamma is one learnable scalar that starts at 0, so the block starts as the
identity and an encoder initialised from a pretrained face model keeps its embedding at step 0.
The energies are not scaled by 1/sqrt(d) (the formula of the method, as in SAGAN).

After the attention, the compression + FC head (``iresnet.EmbeddingHead``, AdaFace's
``output_layer`` layout, re-exported here) maps J_d to the D-dimensional embedding; its Linear is
shared by both domains (see ``posefr.PoseFRModel``).

This module needs only torch and the IResNet module: the exported 2D model uses it without any
3D code.
"""

from __future__ import annotations

import torch
from torch import nn

from .iresnet import EmbeddingHead

__all__ = ["attend", "JointAttention", "SelfAttention2d", "EmbeddingHead", "DOMAINS"]

DOMAINS = ("2d", "3d")


def attend(z: torch.Tensor, query: nn.Module, key: nn.Module, value: nn.Module,
           gamma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One self-attention pass: ``z [B, C, H, W]`` -> ``(J [B, C, H, W], A [B, HW, HW])``.

    A is float32 (float64 for float64 input) whatever the dtype of z; J has z's dtype.
    """
    b, c, h, w = z.shape
    q = query(z).flatten(2).transpose(1, 2)  # [B, HW, C']
    k = key(z).flatten(2)  # [B, C', HW]
    # energies and softmax in float32 even under bf16 (HW x HW is small): the map feeds the
    # joint histogram, which needs more than bf16's 3 significant digits
    with torch.autocast(device_type=z.device.type, enabled=False):
        work = torch.float64 if q.dtype == torch.float64 else torch.float32
        attn = torch.softmax(q.to(work) @ k.to(work), dim=-1)  # [B, HW, HW]
    v = value(z).flatten(2)  # [B, C, HW]
    out = (v @ attn.to(v.dtype).transpose(1, 2)).reshape(b, c, h, w)
    return gamma.to(out.dtype) * out + z, attn


def _qk_channels(channels: int, reduction: int) -> int:
    return max(1, channels // reduction)


class JointAttention(nn.Module):
    """JAM: shared query/key 1x1 convs, one value conv per domain, one learnable gamma (init 0).

    Args:
        channels: C of both feature maps.
        reduction: query/key width is ``channels // reduction`` (SAGAN uses 8).
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        c_qk = _qk_channels(channels, reduction)
        self.channels = channels
        self.reduction = reduction
        self.query = nn.Conv2d(channels, c_qk, 1)
        self.key = nn.Conv2d(channels, c_qk, 1)
        self.value = nn.ModuleDict({d: nn.Conv2d(channels, channels, 1) for d in DOMAINS})
        # shape [1], not a 0-d scalar: DeepSpeed's gradient clipping scales grads in place by a [1] tensor
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, z: torch.Tensor, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``z [B, C, H, W]`` of ``domain`` (``"2d"`` or ``"3d"``) -> ``(J_d, A_d)``."""
        if domain not in self.value:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
        return attend(z, self.query, self.key, self.value[domain], self.gamma)


class SelfAttention2d(nn.Module):
    """The 2D half of :class:`JointAttention` (what the exported 2D model carries)."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        c_qk = _qk_channels(channels, reduction)
        self.channels = channels
        self.reduction = reduction
        self.query = nn.Conv2d(channels, c_qk, 1)
        self.key = nn.Conv2d(channels, c_qk, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        # shape [1], not a 0-d scalar: DeepSpeed's gradient clipping scales grads in place by a [1] tensor
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attend(z, self.query, self.key, self.value, self.gamma)

    @torch.no_grad()
    def copy_from_joint(self, jam: JointAttention, domain: str = "2d") -> None:
        self.query.load_state_dict(jam.query.state_dict())
        self.key.load_state_dict(jam.key.state_dict())
        self.value.load_state_dict(jam.value[domain].state_dict())
        self.gamma.copy_(jam.gamma)
