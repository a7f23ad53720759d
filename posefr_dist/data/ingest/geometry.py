"""Camera geometry for ingestion: OpenCV pinhole cameras with Brown-Conrady distortion,
undistorted square crops sampled straight from the distorted image, similarity transforms and
view angles in the shard pose convention.

Pixel coordinates follow OpenCV: the centre of pixel (i, j) is at (u, v) = (j, i). The camera maps
a world point X to X_c = R X + t, projects x = X_c / z and distorts it with

    r² = x² + y²,  radial = 1 + k1 r² + k2 r⁴ + k3 r⁶
    x_d = x radial + 2 p1 x y + p2 (r² + 2 x²)
    y_d = y radial + p1 (r² + 2 y²) + 2 p2 x y,     (u, v) = K (x_d, y_d, 1)

Undistortion is an inverse mapping: every pixel of the undistorted output (same K, no distortion)
is sent through the forward model above to its place in the distorted image and sampled there
bilinearly, which is what ``cv2.undistort`` does; no iteration is needed for images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Camera:
    """An OpenCV camera: intrinsics ``K`` (3×3), world→camera ``R`` (3×3) and ``t`` (3),
    distortion ``dist`` = (k1, k2, p1, p2, k3), image size in pixels."""

    K: np.ndarray
    R: np.ndarray
    t: np.ndarray
    dist: np.ndarray
    width: int
    height: int

    @property
    def centre(self) -> np.ndarray:
        """Camera centre in world coordinates."""
        return -self.R.T @ self.t

    @property
    def up(self) -> np.ndarray:
        """The image's up direction in world coordinates (OpenCV's y axis points down)."""
        return -self.R[1]

    def to_camera(self, pts: np.ndarray) -> np.ndarray:
        return pts @ self.R.T + self.t

    def project(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pinhole projection (undistorted image) of world points: ``(uv (n, 2), depth (n,))``."""
        xc = self.to_camera(np.asarray(pts, np.float64))
        z = xc[:, 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            xn = xc[:, :2] / z[:, None]
        return normalized_to_pixel(xn, self.K), z

    def scaled(self, sx: float, sy: float) -> "Camera":
        """The same camera for an image resized by (sx, sy)."""
        S = np.diag([sx, sy, 1.0])
        K = S @ self.K
        # pixel centres: u' = sx (u + 0.5) - 0.5
        K[0, 2] += 0.5 * sx - 0.5
        K[1, 2] += 0.5 * sy - 0.5
        return Camera(K, self.R, self.t, self.dist, int(round(self.width * sx)), int(round(self.height * sy)))


def distort(xn: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Brown-Conrady distortion of normalized image coordinates ``(..., 2)``."""
    k1, k2, p1, p2, k3 = (float(d) for d in dist)
    x, y = xn[..., 0], xn[..., 1]
    r2 = x * x + y * y
    radial = 1.0 + r2 * (k1 + r2 * (k2 + r2 * k3))
    xd = x * radial + 2.0 * p1 * x * y + p2 * (r2 + 2.0 * x * x)
    yd = y * radial + p1 * (r2 + 2.0 * y * y) + 2.0 * p2 * x * y
    return np.stack([xd, yd], axis=-1)


def undistort_normalized(xd: np.ndarray, dist: np.ndarray, iterations: int = 30) -> np.ndarray:
    """Inverse of :func:`distort` by fixed-point iteration (as ``cv2.undistortPoints``)."""
    k1, k2, p1, p2, k3 = (float(d) for d in dist)
    x, y = xd[..., 0].copy(), xd[..., 1].copy()
    for _ in range(iterations):
        r2 = x * x + y * y
        radial = 1.0 + r2 * (k1 + r2 * (k2 + r2 * k3))
        dx = 2.0 * p1 * x * y + p2 * (r2 + 2.0 * x * x)
        dy = p1 * (r2 + 2.0 * y * y) + 2.0 * p2 * x * y
        x = (xd[..., 0] - dx) / radial
        y = (xd[..., 1] - dy) / radial
    return np.stack([x, y], axis=-1)


def pixel_to_normalized(uv: np.ndarray, K: np.ndarray) -> np.ndarray:
    h = np.concatenate([uv, np.ones(uv.shape[:-1] + (1,))], axis=-1) @ np.linalg.inv(K).T
    return h[..., :2] / h[..., 2:3]


def normalized_to_pixel(xn: np.ndarray, K: np.ndarray) -> np.ndarray:
    h = np.concatenate([xn, np.ones(xn.shape[:-1] + (1,))], axis=-1) @ np.asarray(K, np.float64).T
    return h[..., :2] / h[..., 2:3]


def distort_pixels(uv: np.ndarray, K: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Where undistorted pixel coordinates lie in the distorted image."""
    return normalized_to_pixel(distort(pixel_to_normalized(uv, K), dist), K)


def undistort_pixels(uv: np.ndarray, K: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """Where distorted pixel coordinates lie in the undistorted image."""
    return normalized_to_pixel(undistort_normalized(pixel_to_normalized(uv, K), dist), K)


def bilinear(img: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``img`` (H, W, C) at pixel-centre coordinates; black outside."""
    H, W = img.shape[:2]
    u = np.asarray(u, np.float64)
    v = np.asarray(v, np.float64)
    inside = (u >= -0.5) & (u <= W - 0.5) & (v >= -0.5) & (v <= H - 0.5)
    uc = np.clip(u, 0.0, W - 1.0)
    vc = np.clip(v, 0.0, H - 1.0)
    x0 = np.floor(uc).astype(np.int64)
    y0 = np.floor(vc).astype(np.int64)
    x1 = np.minimum(x0 + 1, W - 1)
    y1 = np.minimum(y0 + 1, H - 1)
    wx = (uc - x0)[..., None]
    wy = (vc - y0)[..., None]
    src = img.astype(np.float32, copy=False)
    top = src[y0, x0] * (1 - wx) + src[y0, x1] * wx
    bot = src[y1, x0] * (1 - wx) + src[y1, x1] * wx
    out = top * (1 - wy) + bot * wy
    return np.where(inside[..., None], out, 0.0).astype(np.float32)


def sample_undistorted(img: np.ndarray, K: np.ndarray, dist: np.ndarray, u: np.ndarray, v: np.ndarray,
                       scale: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """Values of the undistorted image (camera ``K``, no distortion) at full-resolution pixel
    coordinates ``(u, v)``, sampled from the distorted image ``img``, which may have been decoded
    at a reduced resolution: ``scale`` = (full width / decoded width, full height / decoded height)."""
    uv = np.stack([u, v], axis=-1)
    ud = distort_pixels(uv, K, dist)
    us = (ud[..., 0] + 0.5) / scale[0] - 0.5
    vs = (ud[..., 1] + 0.5) / scale[1] - 0.5
    return bilinear(img, us, vs)


def undistort_image(img: np.ndarray, K: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """The whole image undistorted (same K), as ``cv2.undistort(img, K, dist)``."""
    H, W = img.shape[:2]
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    out = sample_undistorted(img if img.ndim == 3 else img[..., None], K, dist, u, v)
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8) if img.dtype == np.uint8 else out
    return out if img.ndim == 3 else out[..., 0]


def crop_grid(cx: float, cy: float, side: float, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of an m×m grid covering the square of side ``side`` centred at
    (cx, cy)."""
    offs = (np.arange(m) + 0.5) * (side / m) - side / 2.0
    v, u = np.meshgrid(cy + offs, cx + offs, indexing="ij")
    return u, v


def square_around(uv: np.ndarray, margin: float = 1.0, lo: float = 0.5, hi: float = 99.5) -> tuple[float, float, float]:
    """(cx, cy, side) of the square around projected points (robust extent: percentiles)."""
    a = np.percentile(uv, [lo, hi], axis=0)
    (u0, v0), (u1, v1) = a
    return float((u0 + u1) / 2), float((v0 + v1) / 2), float(max(u1 - u0, v1 - v0) * margin)


@dataclass(frozen=True)
class Similarity:
    """x' = s R x + t: the FaceScape ``Rt_scale`` form v_can = R (s v) + t."""

    s: float
    R: np.ndarray
    t: np.ndarray

    def apply(self, pts: np.ndarray) -> np.ndarray:
        return self.s * (np.asarray(pts, np.float64) @ self.R.T) + self.t

    def matrix(self) -> np.ndarray:
        M = np.eye(4)
        M[:3, :3] = self.s * self.R
        M[:3, 3] = self.t
        return M

    def inverse(self) -> "Similarity":
        return Similarity(1.0 / self.s, self.R.T, -(self.R.T @ self.t) / self.s)

    @staticmethod
    def from_matrix(M: np.ndarray) -> "Similarity":
        A = np.asarray(M, np.float64)[:3, :3]
        s = float(np.cbrt(np.linalg.det(A)))
        return Similarity(s, A / s, np.asarray(M, np.float64)[:3, 3].copy())


def rotation_angle_deg(Ra: np.ndarray, Rb: np.ndarray) -> float:
    """Angle of the rotation Ra Rbᵀ, degrees."""
    c = (np.trace(Ra @ Rb.T) - 1.0) / 2.0
    return math.degrees(math.acos(float(np.clip(c, -1.0, 1.0))))


def view_angles(direction: np.ndarray) -> tuple[float, float]:
    """(yaw, pitch) in degrees of the direction from the face centre to the camera, canonical
    face frame (+Z out of the face, +Y up, +X toward the subject's left):
    yaw = atan2(d_x, d_z), pitch = asin(d_y)."""
    d = np.asarray(direction, np.float64)
    d = d / np.linalg.norm(d)
    return math.degrees(math.atan2(d[0], d[2])), math.degrees(math.asin(float(np.clip(d[1], -1.0, 1.0))))


def view_direction(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """Unit vector with the given (yaw, pitch): the inverse of :func:`view_angles`."""
    y, p = math.radians(yaw_deg), math.radians(pitch_deg)
    return np.array([math.sin(y) * math.cos(p), math.sin(p), math.cos(y) * math.cos(p)])


def look_at(centre: np.ndarray, target: np.ndarray, up: np.ndarray,
            roll_deg: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """World→camera (R, t) of an OpenCV camera at ``centre`` looking at ``target`` with the image
    up along ``up`` (rolled by ``roll_deg`` about the optical axis)."""
    z = np.asarray(target, np.float64) - centre
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    if roll_deg:
        a = math.radians(roll_deg)
        x, y = math.cos(a) * x + math.sin(a) * y, -math.sin(a) * x + math.cos(a) * y
    R = np.stack([x, y, z])
    return R, -R @ centre
