"""PointNet++ (single-scale grouping) 3D face encoder in plain PyTorch, and its reshaping block.

The encoder follows Qi et al. 2017 (SSG classification net): set-abstraction levels of farthest
point sampling (FPS), ball query, grouping (neighbours' xyz relative to their centroid,
concatenated with their features) and a shared MLP with max-pooling, then one ``group_all``
level that gives a global feature. Everything is tensor code, so it runs on the CPU (no CUDA ops).

Two choices make the output invariant to the order of the input points (exactly, up to float
rounding, barring exact distance ties):

* FPS starts at the point farthest from the centroid instead of at index 0;
* the ball query keeps the ``nsample`` *nearest* points within the radius (padding with the
  nearest, i.e. the centroid itself) instead of the first ``nsample`` in index order.

The reshaping block turns the last local set (M centroids with features) into the same
``[B, C_F, H_F, W_F]`` layout as the 2D feature map: each centroid's feature goes through a
shared linear layer and is splatted onto an H_F x W_F grid with Gaussian weights normalised per
cell over the points; the global feature is added to every cell. Where the grid lies
(``splat``):

* ``posed`` (default): each centroid is projected at the sample's yaw and pitch with the image
  crop's own projection (:func:`project_points_to_image`, the torch twin of
  ``posefr_dist.data.render.project_to_image``) and divided by the image side, so cell (i, j)
  covers image rows ``i*S/H..(i+1)*S/H`` and columns ``j*S/W..(j+1)*S/W``: the same face region as
  cell (i, j) of the 2D map whatever the pose, which is what makes the position-wise joint
  histogram of the two attention maps mean something. An unknown (NaN or absent) pose is
  frontal (yaw = pitch = 0).
* ``frontal``: the canonical face frame's x-y plane (frontal orthographic view, +Y up, +X toward
  the subject's left = image right) over [-1, 1]^2 whatever the pose (the ablation).

Example:
    >>> enc = create_encoder_3d("pointnet2_tiny", out_channels=128, map_size=4)
    >>> enc(torch.randn(2, 256, 3), yaw_deg=torch.tensor([0.0, 60.0])).shape
    torch.Size([2, 128, 4, 4])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from posefr_dist.data.render import CROP_SCALE

__all__ = [
    "SALevel",
    "PointNet2Spec",
    "POINTNET2_SPECS",
    "PointNet2SSG",
    "PointSetToMap",
    "PointNet2Encoder",
    "SPLAT_MODES",
    "project_points_to_image",
    "farthest_point_sample",
    "ball_query",
    "gather_points",
    "create_encoder_3d",
    "list_encoders_3d",
]


@dataclass(frozen=True)
class SALevel:
    """One set-abstraction level: ``npoint`` centroids, ball radius, group size, MLP widths."""

    npoint: int
    radius: float
    nsample: int
    mlp: tuple[int, ...]


@dataclass(frozen=True)
class PointNet2Spec:
    levels: tuple[SALevel, ...]
    #: MLP widths of the final group-all level (its last width is the global feature size)
    global_mlp: tuple[int, ...]


#: the registry of 3D encoders (names as in ``ModelConfig.encoder_3d``)
POINTNET2_SPECS: dict[str, PointNet2Spec] = {
    # the SSG classification network of the PointNet++ paper
    "pointnet2_ssg": PointNet2Spec(
        levels=(SALevel(512, 0.2, 32, (64, 64, 128)), SALevel(128, 0.4, 64, (128, 128, 256))),
        global_mlp=(256, 512, 1024),
    ),
    # CPU tests and demos
    "pointnet2_tiny": PointNet2Spec(
        levels=(SALevel(64, 0.25, 16, (16, 16, 32)), SALevel(32, 0.5, 16, (32, 32, 64))),
        global_mlp=(64, 128),
    ),
}


def list_encoders_3d() -> list[str]:
    return sorted(POINTNET2_SPECS)


# --------------------------------------------------------------------------------------------
# Sampling and grouping
# --------------------------------------------------------------------------------------------


def gather_points(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x [B, N, C]``, ``idx [B, *S]`` (long) -> ``[B, *S, C]``."""
    b = x.shape[0]
    flat = idx.reshape(b, -1)
    out = torch.gather(x, 1, flat.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return out.reshape(*idx.shape, x.shape[-1])


@torch.no_grad()
def farthest_point_sample(xyz: torch.Tensor, npoint: int) -> torch.Tensor:
    """Indices ``[B, npoint]`` of a farthest point sampling of ``xyz [B, N, 3]``.

    The first point is the one farthest from the centroid, so the chosen *points* (not their
    indices) do not depend on the input order.
    """
    b, n, _ = xyz.shape
    npoint = min(npoint, n)
    centroid = xyz.mean(dim=1, keepdim=True)
    far = ((xyz - centroid) ** 2).sum(-1).argmax(dim=1)  # [B]
    idx = torch.empty(b, npoint, dtype=torch.long, device=xyz.device)
    dist = torch.full((b, n), float("inf"), dtype=xyz.dtype, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    for i in range(npoint):
        idx[:, i] = far
        last = xyz[rows, far].unsqueeze(1)  # [B, 1, 3]
        dist = torch.minimum(dist, ((xyz - last) ** 2).sum(-1))
        far = dist.argmax(dim=1)
    return idx


@torch.no_grad()
def ball_query(xyz: torch.Tensor, centroids: torch.Tensor, radius: float, nsample: int) -> torch.Tensor:
    """Indices ``[B, S, nsample]`` of up to ``nsample`` nearest points within ``radius``.

    Slots beyond the points found in the ball repeat the nearest point (the centroid itself when
    the centroid is one of the points), as in the reference implementation's padding.
    """
    d2 = torch.cdist(centroids, xyz).pow(2)  # [B, S, N]
    k = min(nsample, xyz.shape[1])
    near_d2, near = d2.topk(k, dim=-1, largest=False, sorted=True)
    outside = near_d2 > radius * radius
    return torch.where(outside, near[..., :1].expand_as(near), near)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


def shared_mlp(in_c: int, widths: tuple[int, ...]) -> nn.Sequential:
    """1x1 conv + BN + ReLU per width, applied to ``[B, C, S, K]`` grouped features."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_c, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_c = w
    return nn.Sequential(*layers)


class SetAbstraction(nn.Module):
    """Sample, group, shared MLP, max-pool. ``level=None`` groups all points into one set."""

    def __init__(self, level: SALevel | None, in_c: int, mlp: tuple[int, ...]) -> None:
        super().__init__()
        self.level = level
        self.mlp = shared_mlp(in_c + 3, mlp)
        self.out_channels = mlp[-1]

    def forward(self, xyz: torch.Tensor, feats: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``xyz [B, N, 3]``, ``feats [B, N, C] | None`` -> ``(new_xyz [B, S, 3], [B, S, C'])``."""
        if self.level is None:
            new_xyz = xyz.mean(dim=1, keepdim=True)
            grouped_xyz = (xyz - new_xyz).unsqueeze(1)  # [B, 1, N, 3]
            grouped = grouped_xyz if feats is None else torch.cat([grouped_xyz, feats.unsqueeze(1)], -1)
        else:
            lv = self.level
            new_xyz = gather_points(xyz, farthest_point_sample(xyz, lv.npoint))
            idx = ball_query(xyz, new_xyz, lv.radius, lv.nsample)  # [B, S, K]
            grouped_xyz = gather_points(xyz, idx) - new_xyz.unsqueeze(2)
            grouped = grouped_xyz if feats is None else torch.cat([grouped_xyz, gather_points(feats, idx)], -1)
        x = self.mlp(grouped.permute(0, 3, 1, 2))  # [B, C', S, K]
        return new_xyz, x.amax(dim=-1).transpose(1, 2)


class PointNet2SSG(nn.Module):
    """PointNet++ SSG trunk: returns the last local set and the global feature."""

    def __init__(self, spec: PointNet2Spec) -> None:
        super().__init__()
        self.spec = spec
        levels = []
        in_c = 0
        for lv in spec.levels:
            levels.append(SetAbstraction(lv, in_c, lv.mlp))
            in_c = lv.mlp[-1]
        self.levels = nn.ModuleList(levels)
        self.local_channels = in_c
        self.global_level = SetAbstraction(None, in_c, spec.global_mlp)
        self.global_channels = spec.global_mlp[-1]

    def forward(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[B, N, 3]`` -> ``(xyz [B, M, 3], local [B, M, C_l], global [B, C_g])``."""
        xyz, feats = points, None
        for sa in self.levels:
            xyz, feats = sa(xyz, feats)
        _, g = self.global_level(xyz, feats)
        return xyz, feats, g.squeeze(1)


#: where the reshaping block places the points (``ModelConfig.splat``)
SPLAT_MODES = ("posed", "frontal")


def _pose(angle: torch.Tensor | None, b: int, device: torch.device) -> torch.Tensor:
    """``[B]`` float32 radians; None or NaN -> 0 (frontal)."""
    if angle is None:
        return torch.zeros(b, dtype=torch.float32, device=device)
    a = torch.as_tensor(angle, device=device).to(torch.float32).reshape(-1)
    if a.shape[0] != b:
        raise ValueError(f"pose has {a.shape[0]} rows, the point batch has {b}")
    return torch.deg2rad(torch.nan_to_num(a, nan=0.0))


def camera_basis(yaw_deg: torch.Tensor | None, pitch_deg: torch.Tensor | None, b: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(right, up, d)``, each ``[B, 3]`` float32, as ``posefr_dist.data.render.camera_basis``:
    d = (sin y cos p, sin p, cos y cos p), right = cross(+Y, d) / |.|, up = cross(d, right).
    A NaN or absent angle counts as 0; |pitch| is capped just below 90 degrees, where right is
    undefined."""
    y, p = _pose(yaw_deg, b, device), _pose(pitch_deg, b, device).clamp(-1.5690, 1.5690)
    d = torch.stack([torch.sin(y) * torch.cos(p), torch.sin(p), torch.cos(y) * torch.cos(p)], -1)
    up0 = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float32, device=device).expand_as(d)
    right = torch.linalg.cross(up0, d, dim=-1)
    right = right / right.norm(dim=-1, keepdim=True)
    return right, torch.linalg.cross(d, right, dim=-1), d


def project_points_to_image(xyz: torch.Tensor, yaw_deg: torch.Tensor | None, pitch_deg: torch.Tensor | None,
                            size: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous image coordinates ``(px, py)`` ``[B, M]`` of face-frame points ``xyz [B, M, 3]``
    seen from (yaw, pitch) ``[B]`` degrees: the renderer's crop (``render.project_to_image``),
    ``px = size/2 + CROP_SCALE*size*(q . right)``, ``py = size/2 - CROP_SCALE*size*(q . up)``.
    ``size=1`` gives coordinates as a share of the image side. NaN/absent angles count as 0."""
    right, up, _ = camera_basis(yaw_deg, pitch_deg, xyz.shape[0], xyz.device)
    q = xyz.to(torch.float32)
    half, scale = 0.5 * size, CROP_SCALE * size
    px = half + scale * (q * right.unsqueeze(1)).sum(-1)
    py = half - scale * (q * up.unsqueeze(1)).sum(-1)
    return px, py


class PointSetToMap(nn.Module):
    """The reshaping block: a point set with features -> ``[B, C_F, H_F, W_F]``.

    Args:
        local_channels, global_channels: input widths.
        out_channels: C_F (the 2D map's channels).
        map_size: H_F = W_F.
        extent: ``frontal`` only: half-width of the frontal window in the canonical frame
            (unit-scale faces: 1).
        sigma_cells: Gaussian splat width, in grid cells.
        splat: ``posed`` (the points at the sample's pose, where the image crop shows them) or
            ``frontal`` (the canonical x-y plane whatever the pose); see the module docstring.
        front_only: ``posed`` only: just the centroids on the camera's side of the face place
            features (camera depth ``q . d`` at or above the cloud's median depth: a simple proxy
            for "the surface faces the camera"); the others are hidden in the image too.
    """

    def __init__(self, local_channels: int, global_channels: int, out_channels: int, map_size: int,
                 extent: float = 1.0, sigma_cells: float = 1.0, splat: str = "posed",
                 front_only: bool = False) -> None:
        super().__init__()
        if splat not in SPLAT_MODES:
            raise ValueError(f"splat must be one of {SPLAT_MODES}, got {splat!r}")
        self.map_size = map_size
        self.splat = splat
        self.front_only = bool(front_only) and splat == "posed"
        self.extent = float(extent)
        self.point_proj = nn.Linear(local_channels, out_channels, bias=False)
        self.global_proj = nn.Linear(global_channels, out_channels)
        self.norm = nn.BatchNorm2d(out_channels)
        self.act = nn.PReLU(out_channels)
        step = 2.0 * extent / map_size
        centres = -extent + step * (torch.arange(map_size, dtype=torch.float32) + 0.5)
        # row i runs top (+Y) to bottom; column j runs image-left (-X) to image-right (+X)
        gy, gx = torch.meshgrid(centres.flip(0), centres, indexing="ij")
        self.register_buffer("cells", torch.stack([gx, gy], -1).reshape(-1, 2), persistent=False)
        self.inv_two_sigma2 = 1.0 / (2.0 * (sigma_cells * step) ** 2)

    def place(self, xyz: torch.Tensor, yaw_deg: torch.Tensor | None = None,
              pitch_deg: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Where each point goes, in the window units of ``cells`` (``[B, M, 2]``: x right, y up;
        the window [-extent, extent]^2 is the whole map), and the mask ``[B, M]`` of the points that
        may contribute (None = all)."""
        if self.splat == "frontal":
            return xyz[..., :2], None
        # image coordinates as a share of the side: cell (i, j) covers [j/W, (j+1)/W) x [i/H, (i+1)/H)
        u, v = project_points_to_image(xyz, yaw_deg, pitch_deg, size=1.0)
        pos = torch.stack([(2.0 * u - 1.0) * self.extent, (1.0 - 2.0 * v) * self.extent], -1).to(xyz.dtype)
        mask = None
        if self.front_only:
            _, _, d = camera_basis(yaw_deg, pitch_deg, xyz.shape[0], xyz.device)
            depth = (xyz.to(torch.float32) * d.unsqueeze(1)).sum(-1)  # toward the camera
            mask = depth >= depth.median(dim=1, keepdim=True).values
        return pos, mask

    def forward(self, xyz: torch.Tensor, local: torch.Tensor, glob: torch.Tensor,
                yaw_deg: torch.Tensor | None = None, pitch_deg: torch.Tensor | None = None) -> torch.Tensor:
        """``xyz [B, M, 3]`` (normalised face frame), ``local [B, M, C_l]``, ``glob [B, C_g]``,
        optional ``yaw_deg``/``pitch_deg`` ``[B]`` (``posed``; NaN = unknown = frontal)."""
        b = xyz.shape[0]
        w = self.cell_weights(xyz, yaw_deg, pitch_deg)  # [B, H*W, M], rows sum to 1
        cells = w @ self.point_proj(local)  # [B, H*W, C_F]
        cells = cells + self.global_proj(glob).unsqueeze(1)
        x = cells.transpose(1, 2).reshape(b, -1, self.map_size, self.map_size)
        return self.act(self.norm(x))

    def cell_weights(self, xyz: torch.Tensor, yaw_deg: torch.Tensor | None = None,
                     pitch_deg: torch.Tensor | None = None) -> torch.Tensor:
        """Splat weights ``[B, H*W, M]``: cell (row-major) x point, each cell's row sums to 1."""
        b = xyz.shape[0]
        pos, mask = self.place(xyz, yaw_deg, pitch_deg)
        d2 = torch.cdist(self.cells.to(pos.dtype).unsqueeze(0).expand(b, -1, -1), pos).pow(2)
        logits = -d2 * self.inv_two_sigma2
        if mask is not None:
            logits = logits.masked_fill(~mask.unsqueeze(1), float("-inf"))
        return torch.softmax(logits, dim=-1)


class PointNet2Encoder(nn.Module):
    """PointNet++ trunk + reshaping block: ``[B, N, 3]`` -> ``[B, C_F, H_F, W_F]``."""

    def __init__(self, spec: PointNet2Spec, out_channels: int, map_size: int, splat: str = "posed",
                 splat_front_only: bool = False) -> None:
        super().__init__()
        self.trunk = PointNet2SSG(spec)
        self.reshape = PointSetToMap(self.trunk.local_channels, self.trunk.global_channels,
                                     out_channels, map_size, splat=splat, front_only=splat_front_only)
        self.out_channels = out_channels
        self.map_size = map_size

    def forward(self, points: torch.Tensor, yaw_deg: torch.Tensor | None = None,
                pitch_deg: torch.Tensor | None = None) -> torch.Tensor:
        """``points [B, N, 3]`` in the normalised face frame; ``yaw_deg``, ``pitch_deg`` ``[B]``: the
        pose of the paired image (``splat: posed``; None or NaN = frontal)."""
        if points.dim() != 3 or points.shape[-1] != 3:
            raise ValueError(f"points must be [B, N, 3], got {tuple(points.shape)}")
        return self.reshape(*self.trunk(points), yaw_deg=yaw_deg, pitch_deg=pitch_deg)


def create_encoder_3d(name: str, out_channels: int, map_size: int, splat: str = "posed",
                      splat_front_only: bool = False) -> PointNet2Encoder:
    """Build a 3D encoder by registry name.

    Args:
        name: ``pointnet2_ssg`` or ``pointnet2_tiny``.
        out_channels, map_size: the 2D feature map's C_F and H_F (= W_F) to match.
        splat, splat_front_only: where the reshaping block places the points
            (``ModelConfig.splat``, ``ModelConfig.splat_front_only``; see :class:`PointSetToMap`).

    Returns:
        A :class:`PointNet2Encoder`. A level asks for at most as many centroids as there are
        points, so any N >= 1 works (at the cost of fewer centroids).
    """
    if name not in POINTNET2_SPECS:
        raise ValueError(f"unknown 3D encoder {name!r}; available: {', '.join(list_encoders_3d())}")
    return PointNet2Encoder(POINTNET2_SPECS[name], out_channels, map_size, splat=splat,
                            splat_front_only=splat_front_only)
