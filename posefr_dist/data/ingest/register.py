"""Registration of a canonical face model to a multi-view reconstruction (similarity: s, R, t).

Used by the FaceScape ingester when no ``Rt_scale_dict.json`` alignment is given. The source is
the multi-view mesh (world frame of the cameras, unknown units, usually only the front of the
head), the target the canonical model (millimetres, face towards +Z, top of the head +Y); the
result maps world to canonical, v_can = R (s v) + t, the form of FaceScape's alignment file.

Method (coarse to fine, open3d point-to-point ICP with scale estimation):

1. Initial frame from the cameras: the rig looks at the face, so the mean direction from the
   mesh centroid to the camera centres approximates the face's frontal axis, and the cameras'
   image-up directions its up axis.
2. Candidates: that frame turned about the up axis in 30° steps (all the way round, so a rig
   that sees the face only from one side still contains a good start) and tilted by ±25°; for
   each, the scale is initialised from the ratio of robust widths and heights, the translation
   from the centroids.
3. Coarse ICP (with scaling) from every candidate on a few hundred points, scored by the mean
   truncated nearest-neighbour distance; the best three are refined by ICP with shrinking
   correspondence distances on denser samples, and the best refined result wins.

Its accuracy on synthetic heads is measured in ``tests/test_ingest_facescape.py`` and reported in
``docs/ingest.md``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from posefr_dist.data import o3d as o3d_loader
from posefr_dist.data.ingest.geometry import Similarity

YAW_STEPS_DEG = tuple(range(0, 360, 30))
TILTS_DEG = (-25.0, 0.0, 25.0)


@dataclass
class Registration:
    """Result: the world→canonical similarity and figures of merit (canonical units)."""

    transform: Similarity
    score: float
    fitness: float
    rmse: float
    candidates: int
    notes: list[str] = field(default_factory=list)


def _rot_y(deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])


def _rot_x(deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def camera_frame(source: np.ndarray, centres: np.ndarray, ups: np.ndarray) -> np.ndarray:
    """World→canonical rotation whose +Z is the mean direction to the cameras and +Y their up."""
    c = source.mean(0)
    dirs = centres - c
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    f = dirs.mean(0)
    if np.linalg.norm(f) < 1e-6:
        f = dirs[0]
    f = f / np.linalg.norm(f)
    u = ups.mean(0)
    u = u - (u @ f) * f
    if np.linalg.norm(u) < 1e-6:  # degenerate: any axis orthogonal to f
        u = np.cross(f, [1.0, 0.0, 0.0]) if abs(f[0]) < 0.9 else np.cross(f, [0.0, 1.0, 0.0])
    u = u / np.linalg.norm(u)
    x = np.cross(u, f)
    return np.stack([x, u, f])


def _extent(pts: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(pts, [2, 98], axis=0)
    return hi - lo


def _cloud(pts: np.ndarray):
    o3d = o3d_loader.open3d()
    pcd = o3d.geometry.PointCloud()
    pcd.points = o3d.utility.Vector3dVector(np.ascontiguousarray(pts, dtype=np.float64))
    return pcd


def _subsample(pts: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    if len(pts) <= n:
        return pts
    return pts[rng.choice(len(pts), n, replace=False)]


def _score(src: np.ndarray, M: np.ndarray, tree, tau: float) -> tuple[float, float, float]:
    """(mean truncated distance, fitness, inlier RMSE) of ``src`` moved by ``M``."""
    moved = src @ M[:3, :3].T + M[:3, 3]
    d, _ = tree.query(moved)
    inl = d < tau
    rmse = float(np.sqrt(np.mean(d[inl] ** 2))) if inl.any() else float("inf")
    return float(np.minimum(d, tau).mean()), float(inl.mean()), rmse


def register_similarity(source: np.ndarray, target: np.ndarray, camera_centres: np.ndarray,
                        camera_ups: np.ndarray, seed: int = 0, coarse_points: int = 400,
                        fine_points: int = 3000, refine_best: int = 3) -> Registration:
    """Similarity mapping ``source`` (world) onto ``target`` (canonical); see the module doc."""
    from scipy.spatial import cKDTree

    o3d = o3d_loader.open3d()
    reg = o3d.pipelines.registration
    est = reg.TransformationEstimationPointToPoint(with_scaling=True)
    rng = np.random.default_rng(seed)
    source = np.asarray(source, np.float64)
    target = np.asarray(target, np.float64)
    ct = target.mean(0)
    radius = float(np.percentile(np.linalg.norm(target - ct, axis=1), 95))
    ext_t = _extent(target - ct)
    cs = source.mean(0)

    src_c = _subsample(source, coarse_points, rng)
    tgt_c = _subsample(target, coarse_points * 4, rng)
    src_f = _subsample(source, fine_points, rng)
    tgt_f = _subsample(target, fine_points * 2, rng)
    pcd_src_c, pcd_tgt_c = _cloud(src_c), _cloud(tgt_c)
    pcd_src_f, pcd_tgt_f = _cloud(src_f), _cloud(tgt_f)
    tree_c, tree_f = cKDTree(tgt_c), cKDTree(tgt_f)

    base = camera_frame(source, np.asarray(camera_centres, np.float64), np.asarray(camera_ups, np.float64))
    coarse = []
    for tilt in TILTS_DEG:
        for yaw in YAW_STEPS_DEG:
            R0 = _rot_x(tilt) @ _rot_y(yaw) @ base
            ext_s = _extent((source - cs) @ R0.T)
            s0 = float(np.mean(ext_t[:2] / np.maximum(ext_s[:2], 1e-12)))
            M0 = np.eye(4)
            M0[:3, :3] = s0 * R0
            M0[:3, 3] = ct - s0 * R0 @ cs
            res = reg.registration_icp(pcd_src_c, pcd_tgt_c, 0.5 * radius, M0, est,
                                       reg.ICPConvergenceCriteria(max_iteration=30))
            M = np.asarray(res.transformation)
            score = _score(src_c, M, tree_c, 0.1 * radius)[0]
            coarse.append((score, M))
    coarse.sort(key=lambda sm: sm[0])
    best = None
    for _, M in coarse[:refine_best]:
        for frac in (0.2, 0.08, 0.03):
            res = reg.registration_icp(pcd_src_f, pcd_tgt_f, frac * radius, M, est,
                                       reg.ICPConvergenceCriteria(max_iteration=50, relative_rmse=1e-7,
                                                                  relative_fitness=1e-7))
            M = np.asarray(res.transformation)
        score, fitness, rmse = _score(src_f, M, tree_f, 0.03 * radius)
        if best is None or score < best[0]:
            best = (score, fitness, rmse, M)
    score, fitness, rmse, M = best
    out = Registration(Similarity.from_matrix(M), score=score, fitness=fitness, rmse=rmse,
                       candidates=len(coarse))
    if fitness < 0.5:
        out.notes.append(f"low fitness {fitness:.2f}: less than half the multi-view points lie within "
                         f"{0.03 * radius:.1f} (canonical units) of the canonical model")
    return out
