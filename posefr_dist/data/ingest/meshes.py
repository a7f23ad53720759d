"""Meshes and point clouds for ingestion (open3d, imported through ``posefr_dist.data.o3d``)."""

from __future__ import annotations

import os
import zlib

import numpy as np

from posefr_dist.data import o3d as o3d_loader
from posefr_dist.data.render import normalize_points


class MeshError(ValueError):
    """A mesh or point cloud is missing, unreadable or empty (the message names the file)."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason

    def __reduce__(self):
        return (MeshError, (self.path, self.reason))


def stable_seed(*parts: object) -> int:
    """A seed that depends only on ``parts`` (not on Python's hash randomisation)."""
    return zlib.crc32("/".join(str(p) for p in parts).encode()) & 0x7FFFFFFF


def read_mesh(path: str):
    """An open3d TriangleMesh (triangles may be empty for a point-only PLY)."""
    o3d = o3d_loader.open3d()
    if not os.path.isfile(path):
        raise MeshError(path, "no such file")
    mesh = o3d.io.read_triangle_mesh(path)
    if len(mesh.vertices) == 0:
        # a PLY of points only reads as an empty mesh on some builds: try it as a cloud
        pcd = o3d.io.read_point_cloud(path)
        if len(pcd.points) == 0:
            raise MeshError(path, "unreadable or empty mesh")
        mesh = o3d.geometry.TriangleMesh()
        mesh.vertices = pcd.points
    verts = np.asarray(mesh.vertices)
    if not np.isfinite(verts).all():
        raise MeshError(path, "non-finite vertex coordinates")
    return mesh


def vertices(mesh) -> np.ndarray:
    return np.asarray(mesh.vertices, dtype=np.float64)


def sample_surface(mesh, n: int, seed: int) -> np.ndarray:
    """``n`` points uniformly on the surface (open3d ``sample_points_uniformly``, seeded with
    ``o3d.utility.random.seed``); a mesh without triangles gives ``n`` of its vertices."""
    o3d = o3d_loader.open3d()
    if len(mesh.triangles) == 0:
        verts = vertices(mesh)
        rng = np.random.default_rng(seed)
        return verts[rng.choice(len(verts), n, replace=len(verts) < n)]
    o3d.utility.random.seed(int(seed) % (2**31))
    return np.asarray(mesh.sample_points_uniformly(number_of_points=int(n)).points, dtype=np.float64)


def shard_points(mesh, n: int, seed: int) -> np.ndarray:
    """The ``points`` value of a shard row: ``n`` surface samples, centred, unit radius."""
    return normalize_points(sample_surface(mesh, n, seed).astype(np.float64))


def bbox_centre_radius(pts: np.ndarray) -> tuple[np.ndarray, float]:
    """Centre of the axis-aligned bounding box and the largest distance from it."""
    c = (pts.min(0) + pts.max(0)) / 2.0
    return c, float(np.linalg.norm(pts - c, axis=1).max())
