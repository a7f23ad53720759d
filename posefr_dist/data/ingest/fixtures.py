"""Small FaceScape- and ARL-VTF-layout trees built from the procedural heads, with known poses.

Tests and smoke runs of ``posefr ingest`` use them: nothing is downloaded. The faces come from
``posefr_dist.data.render`` (ellipsoidal heads with nose, brows, lips, ears), so the orientation of
a model is recoverable from its shape.

FaceScape tree: per tuple a canonical model (mm, face +Z, up +Y, not centred at the origin), a
multi-view mesh that covers the front of the head with a different tessellation and a little
noise, in a world frame with its own rotation, translation and scale, cameras at known yaw and
pitch around the face (with roll and Brown-Conrady distortion), images rendered through the
distortion, ``params.json`` in the release's format and an ``Rt_scale_dict.json``.

ARL-VTF tree: ``Odin3/metadata.csv`` with visible and thermal frames of baseline, expression and
pose sequences, face boxes, dev/test split files and per-subject point clouds.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from posefr_dist.data import o3d as o3d_loader
from posefr_dist.data import render as R
from posefr_dist.data.ingest.geometry import Camera, Similarity, distort, look_at, normalized_to_pixel, view_direction
from posefr_dist.data.ingest.meshes import bbox_centre_radius

#: head radius of the procedural heads in millimetres
HEAD_MM = 90.0
DEFAULT_VIEWS = ((-80.0, 5.0), (-45.0, -8.0), (-15.0, 0.0), (0.0, 10.0), (20.0, -5.0), (50.0, 8.0), (85.0, -3.0))


@dataclass
class FaceScapeTree:
    images: Path
    meshes: Path
    tu_models: Path
    align: Path
    #: sample_id -> (yaw, pitch) of every valid view
    truth: dict[str, tuple[float, float]] = field(default_factory=dict)
    #: sample ids of views marked invalid in params.json
    invalid: set[str] = field(default_factory=set)
    #: (id, "k_expr") -> world→canonical similarity
    transforms: dict[tuple[int, str], Similarity] = field(default_factory=dict)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _mesh(verts: np.ndarray, tris: np.ndarray):
    o3d = o3d_loader.open3d()
    m = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(np.ascontiguousarray(verts, np.float64)),
                                  o3d.utility.Vector3iVector(np.ascontiguousarray(tris, np.int32)))
    return m


def render_view(pos: np.ndarray, normal: np.ndarray, albedo: np.ndarray, cam: Camera,
                rng: np.random.Generator, background: float = 0.45, splat: int = 2) -> np.ndarray:
    """Render surface points (world frame) through ``cam`` including its lens distortion."""
    W, H = cam.width, cam.height
    xc = cam.to_camera(pos)
    z = xc[:, 2]
    to_cam = cam.centre - pos
    to_cam /= np.linalg.norm(to_cam, axis=1, keepdims=True)
    lam = np.einsum("ij,ij->i", normal, to_cam)
    keep = (z > 1e-6) & (lam > 0)
    xn = xc[keep, :2] / z[keep, None]
    uv = normalized_to_pixel(distort(xn, cam.dist), cam.K)
    col = albedo[keep] * (0.35 + 0.65 * lam[keep])[:, None]
    order = np.argsort(-z[keep])  # far first: nearer points overwrite
    px = np.round(uv[order, 0]).astype(np.int64)
    py = np.round(uv[order, 1]).astype(np.int64)
    col = col[order]
    img = np.full((H + splat, W + splat, 3), background, np.float32)
    ok = (px >= 0) & (px < W) & (py >= 0) & (py < H)
    px, py, col = px[ok], py[ok], col[ok]
    flat = img.reshape(-1, 3)
    for dy in range(splat):
        for dx in range(splat):
            flat[(py + dy) * (W + splat) + px + dx] = col
    img = img[:H, :W] * 255.0 + rng.normal(0, 3.0, (H, W, 3))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def _jpeg(img: np.ndarray, quality: int = 92) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_facescape_tree(root: str | os.PathLike, subjects: tuple[int, ...] = (1, 2, 3),
                        expressions: tuple[str, ...] = ("1_neutral", "2_smile"),
                        views: tuple[tuple[float, float], ...] = DEFAULT_VIEWS, invalid_views: int = 1,
                        layout: str = "merged", image_size: tuple[int, int] = (200, 240),
                        distance_mm: float = 700.0, seed: int = 0) -> FaceScapeTree:
    """Write a FaceScape multi-view tree under ``root``.

    ``layout="merged"``: images, meshes and TU models under one root (``1/1_neutral/``,
    ``1/1_neutral.ply``, ``1/models_reg/1_neutral.obj``); ``"separate"``: ``images/``, ``meshes/``
    and ``tu/`` roots as in the release downloads. The last ``invalid_views`` views of every tuple
    are marked invalid (with a wrong Rt, as unreliable calibrations are).
    """
    o3d = o3d_loader.open3d()
    root = Path(root)
    if layout == "merged":
        images = meshes = tu = root
    elif layout == "separate":
        images, meshes, tu = root / "images", root / "meshes", root / "tu"
    else:
        raise ValueError(f"layout {layout!r}: use 'merged' or 'separate'")
    tree = FaceScapeTree(images, meshes, tu, root / "Rt_scale_dict.json")
    align: dict[str, dict[str, list]] = {}
    W, H = image_size
    for sid in subjects:
        ident = R.sample_identity(np.random.default_rng([seed, 11, sid]))
        for tup in expressions:
            k, expr_name = tup.split("_", 1)
            expr = expr_name if expr_name in R.EXPRESSIONS else "neutral"
            rng = np.random.default_rng([seed, 12, sid, int(k)])
            offset = rng.uniform(-15, 15, 3) + np.array([0.0, 20.0, 5.0])  # canonical models are not centred
            # canonical (TU) model
            tu_mesh = R.face_mesh(ident, expr)
            tu_v = np.asarray(tu_mesh.vertices) * HEAD_MM + offset
            tu_mesh = _mesh(tu_v, np.asarray(tu_mesh.triangles))
            (tu / str(sid) / "models_reg").mkdir(parents=True, exist_ok=True)
            o3d.io.write_triangle_mesh(str(tu / str(sid) / "models_reg" / f"{tup}.obj"), tu_mesh)
            centre, _ = bbox_centre_radius(tu_v)
            # world frame: v_can = s R v + t
            T = Similarity(float(np.exp(rng.uniform(math.log(2.0), math.log(20.0)))), _random_rotation(rng),
                           rng.uniform(-100, 100, 3))
            Tinv = T.inverse()
            tree.transforms[(sid, tup)] = T
            align.setdefault(str(sid), {})[k] = [T.s, np.concatenate([T.R, T.t[:, None]], 1).tolist()]
            # multi-view mesh: another tessellation of the same head, front part only, some noise
            mv = R.face_mesh(ident, expr, grid=(40, 80))
            mv_v = np.asarray(mv.vertices)
            lon = np.degrees(np.arctan2(mv_v[:, 0], mv_v[:, 2]))
            mv_v = mv_v * HEAD_MM + offset + rng.normal(0, 0.3, mv_v.shape)
            mv = _mesh(Tinv.apply(mv_v), np.asarray(mv.triangles))
            mv.remove_vertices_by_mask(np.abs(lon) > 95.0)
            meshes.joinpath(str(sid)).mkdir(parents=True, exist_ok=True)
            o3d.io.write_triangle_mesh(str(meshes / str(sid) / f"{tup}.ply"), mv)
            # surface to render, in the world frame
            surf = R.HeadSurface(ident, expr, grid=(128, 256))
            pos_w = Tinv.apply(surf.pos * HEAD_MM + offset)
            nrm_w = surf.normal @ T.R  # rotate normals canonical -> world (R^T n, as rows)
            params: dict[str, object] = {}
            tdir = images / str(sid) / tup
            tdir.mkdir(parents=True, exist_ok=True)
            K = np.array([[560.0, 0.0, W / 2 + 1.3], [0.0, 560.0, H / 2 - 1.8], [0.0, 0.0, 1.0]])
            dist = np.array([-0.25, 0.10, 0.0008, -0.0012, 0.0])
            n_views = len(views) + invalid_views
            for v in range(n_views):
                yaw, pitch = views[v % len(views)]
                C_can = centre + distance_mm * view_direction(yaw, pitch)
                R_can, t_can = look_at(C_can, centre, np.array([0.0, 1.0, 0.0]), roll_deg=rng.uniform(-6, 6))
                Rw = R_can @ T.R
                tw = (R_can @ T.t + t_can) / T.s
                cam = Camera(K, Rw, tw, dist, W, H)
                img = render_view(pos_w, nrm_w, surf.albedo, cam, rng)
                valid = v < len(views)
                if not valid:  # an unreliable calibration: the stored Rt is off
                    Rw = _random_rotation(rng)
                sample_id = f"facescape/{sid}/{tup}/{v}"
                if valid:
                    tree.truth[sample_id] = (yaw, pitch)
                else:
                    tree.invalid.add(sample_id)
                (tdir / f"{v}.jpg").write_bytes(_jpeg(img))
                Kout = np.eye(4)
                Kout[:3, :3] = K  # the release stores K as 4x4
                params.update({
                    f"{v}_K": Kout.tolist(), f"{v}_Rt": np.concatenate([Rw, tw[:, None]], 1).tolist(),
                    f"{v}_distortion": dist.tolist(), f"{v}_width": W, f"{v}_height": H,
                    f"{v}_matches": 1000, f"{v}_valid": bool(valid), f"{v}_sn": f"cam{v:02d}",
                    f"{v}_ori": f"IMG_{v:04d}.JPG",
                })
            (tdir / "params.json").write_text(json.dumps(params))
    tree.align.write_text(json.dumps(align))
    return tree


# --------------------------------------------------------------------------------------------
# ARL-VTF
# --------------------------------------------------------------------------------------------

ARL_COLUMNS = ("timestamp", "camera", "condition", "eyewear", "subid", "filepath",
               "top_leftX", "top_leftY", "bottom_rightX", "bottom_rightY")


@dataclass
class ArlVtfTree:
    root: Path
    #: metadata row index -> row dict (as written)
    rows: list[dict[str, str]] = field(default_factory=list)
    gallery_rows: set[int] = field(default_factory=set)
    probe_rows: set[int] = field(default_factory=set)
    #: filepath -> (yaw, pitch) of the rendered face
    poses: dict[str, tuple[float, float]] = field(default_factory=dict)
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    points_dir: Path | None = None
    pose_csv: Path | None = None


def _face_on_canvas(surface: R.HeadSurface, yaw: float, pitch: float, rng: np.random.Generator,
                    canvas: tuple[int, int], box: tuple[int, int, int, int]) -> np.ndarray:
    from PIL import Image

    x0, y0, x1, y1 = box
    face = R.render(surface, yaw, pitch, rng, size=64, noise=2.0)
    face = np.asarray(Image.fromarray(face).resize((x1 - x0, y1 - y0)))
    img = np.full((canvas[1], canvas[0], 3), 90, np.uint8)
    img[y0:y1, x0:x1] = face
    return img


def make_arl_vtf_tree(root: str | os.PathLike,
                      subjects: tuple[str, ...] = ("0001", "0002", "0003", "0004", "0005", "0006"),
                      train: int = 2, val: int = 1, seed: int = 0) -> ArlVtfTree:
    """Write an ARL-VTF tree under ``root``: the first ``train`` subjects are dev/train, the next
    ``val`` dev/val, the rest test. Per subject and camera: 2 baseline, 1 expression and 3 pose
    frames; thermal frames are 16-bit grayscale PNG. Gallery: the first visible and the first
    thermal baseline frame of each test subject; probes: the other frames of test subjects."""
    from PIL import Image

    o3d = o3d_loader.open3d()
    root = Path(root)
    odin = root / "Odin3"
    tree = ArlVtfTree(root)
    tree.train = list(subjects[:train])
    tree.val = list(subjects[train:train + val])
    tree.test = list(subjects[train + val:])
    canvas, box = (96, 112), (20, 26, 76, 90)
    frames = [("baseline", 0.0, 0.0), ("baseline", 0.0, 0.0), ("expression", 0.0, 0.0),
              ("pose", -40.0, 5.0), ("pose", 25.0, -5.0), ("pose", 70.0, 0.0)]
    pose_lines = []
    for si, sub in enumerate(subjects):
        ident = R.sample_identity(np.random.default_rng([seed, 21, si]))
        surface = R.HeadSurface(ident, "neutral")
        for camera in ("BAS_RGB2", "FLIR_USB"):
            for fi, (cond, yaw, pitch) in enumerate(frames):
                rng = np.random.default_rng([seed, 22, si, fi, camera == "FLIR_USB"])
                surf = surface.for_expression("smile") if cond == "expression" else surface
                img = _face_on_canvas(surf, yaw, pitch, rng, canvas, box)
                modality = "visible" if camera == "BAS_RGB2" else "thermal"
                rel = f"{sub}/{modality}/{cond}/{sub}_{camera}_{cond}_{fi:03d}.png"
                path = odin / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                if camera == "FLIR_USB":  # thermal: 16-bit grayscale
                    gray = (img.astype(np.float32).mean(-1) * 40 + 20000).astype(np.uint16)
                    Image.fromarray(gray).save(path)
                else:
                    Image.fromarray(img).save(path)
                idx = len(tree.rows)
                jitter = rng.integers(-2, 3, 4)
                tree.rows.append({
                    "timestamp": f"{1600000000 + idx}.0", "camera": camera, "condition": cond, "eyewear": "none",
                    "subid": sub, "filepath": rel,
                    "top_leftX": str(box[0] + jitter[0]), "top_leftY": str(box[1] + jitter[1]),
                    "bottom_rightX": str(box[2] + jitter[2]), "bottom_rightY": str(box[3] + jitter[3]),
                })
                tree.poses[rel] = (yaw, pitch)
                if cond == "pose":
                    pose_lines.append((rel, yaw, pitch))
                if sub in tree.test:
                    (tree.gallery_rows if fi == 0 else tree.probe_rows).add(idx)
    with open(odin / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(ARL_COLUMNS))
        w.writeheader()
        w.writerows(tree.rows)
    splits = root / "splits"
    (splits / "dev").mkdir(parents=True, exist_ok=True)
    (splits / "test").mkdir(parents=True, exist_ok=True)
    (splits / "dev" / "train.txt").write_text("".join(f"{s}\n" for s in tree.train))
    (splits / "dev" / "val.txt").write_text("".join(f"{s}\n" for s in tree.val))
    by_cam = {"V": "BAS_RGB2", "T": "FLIR_USB"}
    for tag, cam in by_cam.items():
        gal = sorted(i for i in tree.gallery_rows if tree.rows[i]["camera"] == cam)
        prb = sorted(i for i in tree.probe_rows if tree.rows[i]["camera"] == cam)
        (splits / "test" / f"gallery_{tag}B0-.txt").write_text("".join(f"{i}\n" for i in gal))
        (splits / "test" / f"probes_{tag}P0-.txt").write_text("".join(f"{i}\n" for i in prb))
    # per-subject point clouds (the last subject has none)
    tree.points_dir = root / "points"
    tree.points_dir.mkdir(exist_ok=True)
    for si, sub in enumerate(subjects[:-1]):
        ident = R.sample_identity(np.random.default_rng([seed, 21, si]))
        o3d.io.write_triangle_mesh(str(tree.points_dir / f"{sub}.ply"), R.face_mesh(ident, "neutral"))
    tree.pose_csv = root / "poses.csv"
    with open(tree.pose_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "yaw", "pitch"])
        w.writerows(pose_lines)
    return tree
