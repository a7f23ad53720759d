"""Joint attention mapping (JAM).

For a domain d in {2D, 3D} with feature map z_d of shape [B, C, H, W]:

    A_d = softmax(Q(n(z_d))^T K(n(z_d)))    # [B, HW, HW], row i = where position i attends
    J_d = gamma * V_d(z_d) A_d^T + z_d      # [B, C, H, W]

Q and K are 1x1 convolutions *shared* by both domains (so the two attention maps are computed by
the same similarity function and are comparable position by position), V_d is a 1x1 convolution
per domain, and gamma is one learnable scalar that starts at 0, so the block starts as the
identity and an encoder initialised from a pretrained face model keeps its embedding at step 0.

Bounded energies. The joint-entropy loss JE = H(A_2D) + H(A_3D) - MI can fall by sharpening both
softmaxes to near one-hot rows, which unbounded energies q_i . k_j allow. Two options bound them:

* ``spectral_norm`` (default on, ``model.attn_spectral_norm``): Q, K and every V_d are
  :class:`SNConv2d`, whose weight is divided by an estimate of its largest singular value (SAGAN;
  one power-iteration step per training step: Q/K on the 2D pass, so A_2D and A_3D of a step
  share the very same Q/K, V_d on its own pass; persistent ``weight_u`` / ``weight_v`` *buffers*, so
  they are saved in checkpoints and broadcast with the other buffers; the weight stays a plain
  ``Parameter`` under its usual name, so ZeRO, parameter groups and state-dict keys see an
  ordinary conv). With spectral norm, Q and K have **no bias**: a key bias adds a per-row constant
  that the softmax removes, and a query bias b_q adds the energy term b_q . K z_j, which grows
  without bound with ||b_q||. So |q_i . k_j| <= ||z_i|| ||z_j|| (up to the power-iteration error).
  V_d keeps its bias (it does not enter the energies).
* ``domain_norm`` (default off, ``model.attn_domain_norm``): n(z_d) is a non-affine instance norm
  of each domain's map (per sample and channel over the H x W positions, eps 1e-5, as
  ``InstanceNorm2d(affine=False)``) applied before the shared Q and K only; V_d and the residual
  keep the raw map. Then A does not depend on the scale of z_d (up to eps), and with spectral
  norm the energies are bounded by a constant of the block (sum_i ||n(z)_i||^2 = C * HW).

Scaling. The energies are not scaled by 1/sqrt(d) (the formula of the method, as in SAGAN). With
the bounds above the softmax temperature is fixed by the normalised weights and the scale of the
(normalised) features, and a 1/sqrt(d) factor would only change that fixed temperature, so the
method's formula is kept.

Inference. The exported 2D model (:class:`SelfAttention2d`) carries plain convs whose weights are
W / sigma as computed in eval mode (no power-iteration step), a zero bias where Q/K have none, and
the domain-norm flag, so it reproduces the joint model's 2D path in eval mode exactly and needs no
spectral-norm code.

After the attention, the compression + FC head (``iresnet.EmbeddingHead``, AdaFace's
``output_layer`` layout, re-exported here) maps J_d to the D-dimensional embedding; its Linear is
shared by both domains (see ``posefr.PoseFRModel``).

This module needs only torch and the IResNet module: the exported 2D model uses it without any
3D code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .iresnet import EmbeddingHead

__all__ = ["attend", "instance_norm", "SNConv2d", "JointAttention", "SelfAttention2d", "EmbeddingHead",
           "DOMAINS"]

DOMAINS = ("2d", "3d")
#: eps of the domain norm (that of ``nn.InstanceNorm2d``)
DOMAIN_NORM_EPS = 1e-5


def instance_norm(z: torch.Tensor, eps: float = DOMAIN_NORM_EPS) -> torch.Tensor:
    """Non-affine instance norm of ``[B, C, H, W]`` (as ``InstanceNorm2d(affine=False)``), in float32.

    Written out (not ``F.instance_norm``) so that a 1 x 1 map is allowed (it maps to 0).
    """
    work = torch.float64 if z.dtype == torch.float64 else torch.float32
    x = z.to(work)
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = x.var(dim=(2, 3), unbiased=False, keepdim=True)
    return ((x - mean) * torch.rsqrt(var + eps)).to(z.dtype)


class SNConv2d(nn.Conv2d):
    """A ``Conv2d`` whose weight W is used as W / sigma(W), sigma the largest singular value of W
    reshaped to ``[out, in * k * k]``, estimated by power iteration (Miyato et al. 2018).

    ``weight`` stays an ordinary ``Parameter``; the singular-vector estimates ``weight_u [out]`` and
    ``weight_v [in * k * k]`` are persistent buffers. With ``auto_update`` (default) every
    training-mode forward first does ``n_power_iterations`` steps (under no_grad); otherwise only the
    next training-mode forward after :meth:`request_update` does (``JointAttention`` asks once per
    training step for the shared Q/K). The update runs inside ``forward``, where ZeRO-3 has gathered
    the weight. In eval mode the vectors are used as they are, so an eval forward is a pure function
    of the state dict. sigma = u^T W v is computed in float32 and differentiated through W only (u, v are
    constants), as in ``torch.nn.utils.parametrizations.spectral_norm``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, bias: bool = True,
                 n_power_iterations: int = 1, eps: float = 1e-12, auto_update: bool = True) -> None:
        super().__init__(in_channels, out_channels, kernel_size, bias=bias)
        if n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be >= 1, got {n_power_iterations}")
        self.n_power_iterations = n_power_iterations
        self.eps = eps
        self.auto_update = auto_update
        self._update_requested = False
        rows, cols = self.weight.shape[0], self.weight[0].numel()
        # a private generator: building the block does not move the global RNG (other modules'
        # initial weights stay what they were) and every rank starts from the same vectors
        g = torch.Generator().manual_seed(0)
        self.register_buffer("weight_u", F.normalize(torch.randn(rows, generator=g), dim=0, eps=eps))
        self.register_buffer("weight_v", F.normalize(torch.randn(cols, generator=g), dim=0, eps=eps))
        self.power_iteration(15)  # start converged, as torch's spectral_norm does

    @torch.no_grad()
    def power_iteration(self, steps: int = 1) -> None:
        """Refine ``weight_u`` / ``weight_v`` in place by ``steps`` power-iteration steps."""
        w = self.weight.detach().float().reshape(self.weight.shape[0], -1)
        u, v = self.weight_u.float(), self.weight_v.float()
        with torch.autocast(device_type=w.device.type, enabled=False):  # float32 under autocast too
            for _ in range(steps):
                v = F.normalize(w.t() @ u, dim=0, eps=self.eps)
                u = F.normalize(w @ v, dim=0, eps=self.eps)
        self.weight_u.copy_(u)
        self.weight_v.copy_(v)

    def sigma(self) -> torch.Tensor:
        """The current estimate u^T W v (float32 scalar, differentiable through W)."""
        w = self.weight.float().reshape(self.weight.shape[0], -1)
        # clones: a later training forward before this one's backward updates the buffers in
        # place, which must not touch what autograd saved for this one
        u, v = self.weight_u.float().clone(), self.weight_v.float().clone()
        with torch.autocast(device_type=w.device.type, enabled=False):
            return torch.dot(u, w @ v)

    def normalised_weight(self, update: bool | None = None) -> torch.Tensor:
        """W / sigma; ``update`` (default: training mode and ``auto_update``) first runs the power
        iteration."""
        if (self.training and self.auto_update) if update is None else update:
            self.power_iteration(self.n_power_iterations)
        return self.weight / self.sigma().to(self.weight.dtype)

    def request_update(self) -> None:
        """Make the next training-mode forward run the power iteration (with ``auto_update`` off)."""
        self._update_requested = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.training and (self.auto_update or self._update_requested)
        self._update_requested = False
        return self._conv_forward(x, self.normalised_weight(update=update), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", spectral_norm=True"


def _conv(cin: int, cout: int, spectral_norm: bool, bias: bool = True) -> nn.Conv2d:
    if spectral_norm:
        return SNConv2d(cin, cout, 1, bias=bias, auto_update=False)
    return nn.Conv2d(cin, cout, 1, bias=bias)


def plain_weight_and_bias(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias an ordinary ``Conv2d`` needs to compute ``conv`` in eval mode
    (W / sigma without a power-iteration step for :class:`SNConv2d`; a zero bias for none)."""
    with torch.no_grad():
        w = conv.normalised_weight(update=False) if isinstance(conv, SNConv2d) else conv.weight
        b = conv.bias if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        return w.detach().clone(), b.detach().clone()


def attend(z: torch.Tensor, query: nn.Module, key: nn.Module, value: nn.Module,
           gamma: torch.Tensor, domain_norm: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One self-attention pass: ``z [B, C, H, W]`` -> ``(J [B, C, H, W], A [B, HW, HW])``.

    With ``domain_norm`` Q and K see the instance-normalised map, V and the residual the raw one.
    A is float32 (float64 for float64 input) whatever the dtype of z; J has z's dtype.
    """
    b, c, h, w = z.shape
    zqk = instance_norm(z) if domain_norm else z
    q = query(zqk).flatten(2).transpose(1, 2)  # [B, HW, C']
    k = key(zqk).flatten(2)  # [B, C', HW]
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
        spectral_norm: spectrally normalised Q, K (without bias) and V_d (module docstring).
        domain_norm: instance-normalise each domain's map before Q and K (module docstring).
    """

    def __init__(self, channels: int, reduction: int = 8, spectral_norm: bool = True,
                 domain_norm: bool = False) -> None:
        super().__init__()
        c_qk = _qk_channels(channels, reduction)
        self.channels = channels
        self.reduction = reduction
        self.spectral_norm = spectral_norm
        self.domain_norm = domain_norm
        self.query = _conv(channels, c_qk, spectral_norm, bias=not spectral_norm)
        self.key = _conv(channels, c_qk, spectral_norm, bias=not spectral_norm)
        self.value = nn.ModuleDict({d: _conv(channels, channels, spectral_norm) for d in DOMAINS})
        # shape [1], not a 0-d scalar: DeepSpeed's gradient clipping scales grads in place by a [1] tensor
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, z: torch.Tensor, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``z [B, C, H, W]`` of ``domain`` (``"2d"`` or ``"3d"``) -> ``(J_d, A_d)``."""
        if domain not in self.value:
            raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
        if self.spectral_norm and self.training:
            # one power-iteration step per training step: the shared Q/K on the 2D pass (which
            # every step makes, first), so A_2D and A_3D of a step use the very same Q/K; V_d on
            # its own pass
            if domain == DOMAINS[0]:
                self.query.request_update()
                self.key.request_update()
            self.value[domain].request_update()
        return attend(z, self.query, self.key, self.value[domain], self.gamma, self.domain_norm)

    def extra_repr(self) -> str:
        return f"spectral_norm={self.spectral_norm}, domain_norm={self.domain_norm}"


class SelfAttention2d(nn.Module):
    """The 2D half of :class:`JointAttention` (what the exported 2D model carries).

    Plain biased convs only: :meth:`copy_from_joint` folds a spectral norm into the weights.
    """

    def __init__(self, channels: int, reduction: int = 8, domain_norm: bool = False) -> None:
        super().__init__()
        c_qk = _qk_channels(channels, reduction)
        self.channels = channels
        self.reduction = reduction
        self.domain_norm = domain_norm
        self.query = nn.Conv2d(channels, c_qk, 1)
        self.key = nn.Conv2d(channels, c_qk, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        # shape [1], not a 0-d scalar: DeepSpeed's gradient clipping scales grads in place by a [1] tensor
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return attend(z, self.query, self.key, self.value, self.gamma, self.domain_norm)

    @torch.no_grad()
    def copy_from_joint(self, jam: JointAttention, domain: str = "2d") -> None:
        """Copy ``domain``'s path of ``jam`` as it computes in eval mode (spectral norms folded)."""
        if bool(getattr(jam, "domain_norm", False)) != self.domain_norm:
            raise ValueError(f"domain_norm differs: joint attention {getattr(jam, 'domain_norm', False)}, "
                             f"this block {self.domain_norm}")
        for dst, src in ((self.query, jam.query), (self.key, jam.key), (self.value, jam.value[domain])):
            w, b = plain_weight_and_bias(src)
            dst.weight.copy_(w)
            dst.bias.copy_(b)
        self.gamma.copy_(jam.gamma)

    def extra_repr(self) -> str:
        return f"domain_norm={self.domain_norm}"
