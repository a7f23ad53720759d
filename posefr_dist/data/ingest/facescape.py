"""``posefr ingest facescape``: FaceScape multi-view data → shards.

Release layout (roots may coincide; by default the mesh and TU roots are the images root)::

    <images>/<id>/<k>_<expr>/{0.jpg … N.jpg, params.json}     multi-view images + cameras
    <meshes>/<id>/<k>_<expr>.ply                               multi-view mesh (camera world frame)
    <tu>/<id>/models_reg/<k>_<expr>.obj                        canonical model (mm, face +Z, up +Y)
    Rt_scale_dict.json (optional)                              {id: {k: [s, Rt]}}: v_can = R (s v) + t

One Ray task per subject. For each tuple (subject, expression) the world→canonical similarity
comes from the alignment file, or else from registering the canonical model to the multi-view
mesh (:mod:`posefr_dist.data.ingest.register`). For each valid view:

- pose: d = the camera centre in the canonical frame minus the face centre (the centre of the
  canonical model's bounding box); yaw = atan2(d_x, d_z), pitch = asin(d_y / |d|);
- image: the square around the projection of the multi-view mesh (its vertices within 1.15 head
  radii of the face centre, 0.5-99.5 percentile extent, times ``margin``), sampled from the
  distorted photo through the Brown-Conrady model (undistortion by inverse mapping, bilinear),
  at up to 4× the output size, then downsampled (Lanczos) to ``image_size``; large JPEGs are
  decoded at 1/2, 1/4 or 1/8 scale when the crop still has ≥ 2× the output resolution;
- points: ``points`` samples of the canonical model (open3d ``sample_points_uniformly``, seeded
  per tuple), centred and scaled to unit radius; shared by the tuple's views.

``sample_id`` = ``facescape/<id>/<k>_<expr>/<view>``, ``subject_id`` = the FaceScape id,
``expression`` = the expression name (``neutral``, ``smile``, ...).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from posefr_dist.data.ingest import common as C
from posefr_dist.data.ingest.geometry import (Camera, Similarity, crop_grid, sample_undistorted, square_around,
                                              view_angles)
from posefr_dist.data.schema import SPLITS

DATASET = "facescape"
GENERATOR = "posefr-ingest-facescape"
GENERATOR_VERSION = 1
DEFAULT_SPLITS = "train=1-300,test=301-359"  # also the command line's default (cli.py)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".JPG", ".png")
#: vertices of the multi-view mesh farther than this many canonical-model radii from the face
#: centre (shoulders, backdrop) are left out of the crop
CROP_RADIUS = 1.15
REGISTRATION_POINTS = (5000, 8000)  # samples of the multi-view mesh and of the canonical model

_TUPLE_RE = re.compile(r"^(\d+)_(.+)$")
_VIEW_K_RE = re.compile(r"^(\d+)_K$")


@dataclass
class FaceScapeOptions:
    """Options of one FaceScape ingest (validated on construction)."""

    images: str
    out: str
    meshes: str | None = None
    tu_models: str | None = None
    align: str | None = None
    splits: str = DEFAULT_SPLITS
    val_fraction: float = 0.1
    expressions: tuple[str, ...] = ()
    subjects: tuple[int, ...] = ()
    max_yaw: float | None = None
    image_size: int = 112
    points: int = 1024
    margin: float = 1.1
    image_format: str = "png"
    rows_per_shard: int = 1000
    workers: int | None = None
    use_ray: bool = True
    strict: bool = False
    split_ids: dict[str, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.meshes = self.meshes or self.images
        self.tu_models = self.tu_models or self.images
        self.expressions = tuple(str(e) for e in self.expressions)
        self.subjects = tuple(int(s) for s in self.subjects)
        if self.image_size < 8:
            raise ValueError(f"image_size {self.image_size}: must be >= 8")
        if self.points < 1:
            raise ValueError(f"points {self.points}: must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction {self.val_fraction}: must be in [0, 1)")
        if self.max_yaw is not None and self.max_yaw < 0:
            raise ValueError(f"max_yaw {self.max_yaw}: must be >= 0")
        if self.margin <= 0:
            raise ValueError(f"margin {self.margin}: must be > 0")
        if self.image_format not in C.IMAGE_FORMATS:
            raise ValueError(f"image_format {self.image_format!r}: one of {C.IMAGE_FORMATS}")
        if self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard {self.rows_per_shard}: must be >= 1")
        if not self.split_ids:
            self.split_ids = {k: sorted(v) for k, v in parse_splits(self.splits, self.val_fraction).items()}


# --------------------------------------------------------------------------------------------
# splits
# --------------------------------------------------------------------------------------------


def parse_ids(text: str) -> set[int]:
    """``"1-300,305"`` → {1, …, 300, 305}."""
    out: set[int] = set()
    for tok in text.split(","):
        tok = tok.strip()
        if not tok:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", tok)
        if m:
            a, b = int(m.group(1)), int(m.group(2))
            if b < a:
                raise ValueError(f"id range {tok!r}: end before start")
            out.update(range(a, b + 1))
        elif tok.isdigit():
            out.add(int(tok))
        else:
            raise ValueError(f"id {tok!r}: expected a number or a range like 1-300")
    return out


def parse_splits(text: str, val_fraction: float = 0.1) -> dict[str, set[int]]:
    """``"train=1-300,test=301-359"`` (optionally ``val=…``) → ids per split. Without an explicit
    ``val``, the last ``round(val_fraction · |train|)`` train ids (at least one when the fraction
    is positive and train has two or more ids) become val: ids 271-300 by default."""
    splits: dict[str, set[int]] = {}
    current = None
    for tok in text.split(","):
        tok = tok.strip()
        if not tok:
            continue
        if "=" in tok:
            current, _, tok = tok.partition("=")
            current = current.strip()
            if current not in SPLITS:
                raise ValueError(f"splits {text!r}: unknown split {current!r} (use {', '.join(SPLITS)})")
            if current in splits:
                raise ValueError(f"splits {text!r}: {current} given twice")
            splits[current] = set()
        if current is None:
            raise ValueError(f"splits {text!r}: start with a split name, e.g. train=1-300")
        splits[current] |= parse_ids(tok)
    if "train" not in splits:
        raise ValueError(f"splits {text!r}: no train ids")
    if "val" not in splits and val_fraction > 0:
        train = sorted(splits["train"])
        n_val = int(round(val_fraction * len(train)))
        if n_val == 0 and len(train) >= 2:
            n_val = 1
        splits["val"] = set(train[len(train) - n_val:]) if n_val else set()
        splits["train"] = set(train[:len(train) - n_val])
    names = sorted(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            both = splits[a] & splits[b]
            if both:
                raise ValueError(f"splits {text!r}: {a} and {b} share ids {sorted(both)[:5]}")
    return {s: splits.get(s, set()) for s in SPLITS}


def split_of(split_ids: dict[str, list[int]], sid: int) -> str | None:
    for split, ids in split_ids.items():
        if sid in ids:
            return split
    return None


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def parse_camera(params: dict[str, Any], v: int) -> Camera:
    """Camera ``v`` of a ``params.json`` (raises KeyError / ValueError naming the field)."""

    def arr(key: str) -> np.ndarray:
        if key not in params:
            raise KeyError(f"{key} missing")
        try:
            a = np.asarray(params[key], dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{key} is not numeric") from None
        if not np.isfinite(a).all():
            raise ValueError(f"{key} has non-finite values")
        return a

    K = arr(f"{v}_K")
    if K.shape not in ((3, 3), (4, 4)):
        raise ValueError(f"{v}_K has shape {K.shape}, expected 3x3 (or 4x4)")
    K = K[:3, :3]
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f"{v}_K has a non-positive focal length")
    Rt = arr(f"{v}_Rt")
    if Rt.shape not in ((3, 4), (4, 4)):
        raise ValueError(f"{v}_Rt has shape {Rt.shape}, expected 3x4")
    R, t = Rt[:3, :3], Rt[:3, 3]
    if np.abs(R @ R.T - np.eye(3)).max() > 1e-3 or np.linalg.det(R) < 0:
        raise ValueError(f"{v}_Rt: the 3x3 part is not a rotation")
    dist = arr(f"{v}_distortion").ravel() if f"{v}_distortion" in params else np.zeros(5)
    if dist.size > 5 and np.any(dist[5:] != 0):
        raise ValueError(f"{v}_distortion has {dist.size} coefficients; only k1 k2 p1 p2 k3 are supported")
    dist = np.concatenate([dist[:5], np.zeros(max(0, 5 - dist.size))])
    try:
        width, height = int(params[f"{v}_width"]), int(params[f"{v}_height"])
    except KeyError as e:
        raise KeyError(f"{e.args[0]} missing") from None
    except (TypeError, ValueError):
        raise ValueError(f"{v}_width/{v}_height are not integers") from None
    if width <= 0 or height <= 0:
        raise ValueError(f"{v}_width/{v}_height must be positive")
    return Camera(K, R, t, dist, width, height)


def parse_alignment(entry: Any) -> Similarity:
    """``[scale, Rt]`` → the similarity v_can = R (s v) + t."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 2:
        raise ValueError("expected [scale, Rt]")
    s = float(entry[0])
    Rt = np.asarray(entry[1], dtype=np.float64)
    if Rt.shape not in ((3, 4), (4, 4)) or not np.isfinite(Rt).all() or not (s > 0 and math.isfinite(s)):
        raise ValueError("expected a positive scale and a 3x4 Rt")
    R = Rt[:3, :3]
    if np.abs(R @ R.T - np.eye(3)).max() > 1e-3:
        raise ValueError("the 3x3 part of Rt is not a rotation")
    return Similarity(s, R, Rt[:3, 3].copy())


def load_alignment(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise C.IngestError(f"{path}: alignment file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise C.IngestError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise C.IngestError(f"{path}: expected a mapping {{id: {{expression: [scale, Rt]}}}}")
    return data


def discover_subjects(images: str) -> list[int]:
    if not os.path.isdir(images):
        raise C.IngestError(f"{images}: images root not found (expected <root>/<id>/<k>_<expr>/)")
    return sorted(int(n) for n in os.listdir(images) if n.isdigit() and os.path.isdir(os.path.join(images, n)))


def discover_tuples(subject_dir: str) -> list[tuple[int, str]]:
    """(k, expression name) of the tuple folders of a subject, by k."""
    out = []
    for name in os.listdir(subject_dir):
        m = _TUPLE_RE.match(name)
        if m and os.path.isdir(os.path.join(subject_dir, name)):
            out.append((int(m.group(1)), m.group(2)))
    return sorted(out)


def expression_selected(selected: tuple[str, ...], k: int, name: str) -> bool:
    return not selected or any(s in (str(k), name, f"{k}_{name}") for s in selected)


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


class ImageError(ValueError):
    pass


def _find_image(tdir: str, v: int) -> str | None:
    for suf in IMAGE_SUFFIXES:
        p = os.path.join(tdir, f"{v}{suf}")
        if os.path.isfile(p):
            return p
    return None


def undistorted_crop(im, cam: Camera, cx: float, cy: float, side: float, out_size: int) -> np.ndarray:
    """The undistorted square (cx, cy, side) of the opened PIL image ``im`` at ``out_size``²."""
    W0, H0 = im.size
    factor = 1
    for f in (8, 4, 2):
        if side / f >= 2 * out_size:
            factor = f
            break
    if factor > 1 and im.format == "JPEG":
        im.draft("RGB", (math.ceil(W0 / factor), math.ceil(H0 / factor)))
    arr = np.asarray(im.convert("RGB"))
    sx, sy = W0 / arr.shape[1], H0 / arr.shape[0]
    m = int(np.clip(round(side / sx), out_size, 4 * out_size))
    u, v = crop_grid(cx, cy, side, m)
    vals = sample_undistorted(arr, cam.K, cam.dist, u, v, (sx, sy))
    return C.resize_square(np.clip(vals + 0.5, 0, 255).astype(np.uint8), out_size)


# --------------------------------------------------------------------------------------------
# one subject (a Ray task)
# --------------------------------------------------------------------------------------------


def _tuple_transform(col: C.Collector, opts: FaceScapeOptions, sid: int, k: int, tag: str,
                     align: dict[str, Any] | None, mv, tu, cams: dict[int, Camera], mesh_path: str) -> Similarity:
    from posefr_dist.data.ingest import meshes as M
    from posefr_dist.data.ingest.register import register_similarity

    if align is not None:
        entry = align.get(str(k), align.get(tag))
        if entry is not None:
            try:
                T = parse_alignment(entry)
                col.counts["tuples_aligned"] += 1
                return T
            except (TypeError, ValueError) as e:
                col.warn(str(opts.align), f"entry {sid}/{k}: {e}; registered instead")
        else:
            col.warn(str(opts.align), f"no entry for {sid}/{k}; registered instead")
    seed = M.stable_seed(DATASET, sid, tag, "registration")
    src = M.sample_surface(mv, REGISTRATION_POINTS[0], seed)
    tgt = M.sample_surface(tu, REGISTRATION_POINTS[1], seed + 1)
    reg = register_similarity(src, tgt, np.array([c.centre for c in cams.values()]),
                              np.array([c.up for c in cams.values()]), seed=seed)
    for note in reg.notes:
        col.warn(mesh_path, f"registration: {note}")
    col.counts["tuples_registered"] += 1
    return reg.transform


def _process_tuple(col: C.Collector, opts: FaceScapeOptions, sid: int, k: int, name: str,
                   align: dict[str, Any] | None, rows: list[dict[str, Any]]) -> None:
    from PIL import Image, UnidentifiedImageError

    from posefr_dist.data.ingest import meshes as M

    tag = f"{k}_{name}"
    tdir = os.path.join(opts.images, str(sid), tag)
    col.counts["tuples"] += 1
    params_path = os.path.join(tdir, "params.json")
    if not os.path.isfile(params_path):
        col.counts["tuples_skipped"] += 1
        col.problem(params_path, "missing (the tuple's camera parameters); tuple skipped")
        return
    try:
        with open(params_path, encoding="utf-8") as f:
            params = json.load(f)
        if not isinstance(params, dict):
            raise ValueError("expected a JSON object")
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        col.counts["tuples_skipped"] += 1
        col.problem(params_path, f"malformed: {e}; tuple skipped")
        return
    views = sorted(int(m.group(1)) for key in params if (m := _VIEW_K_RE.match(key)))
    if not views:
        col.counts["tuples_skipped"] += 1
        col.problem(params_path, "no '<view>_K' entries; tuple skipped")
        return
    col.counts["views"] += len(views)
    cams: dict[int, Camera] = {}
    for v in views:
        if not _truthy(params.get(f"{v}_valid", True)):
            col.counts["skipped_invalid_view"] += 1
            continue
        try:
            cams[v] = parse_camera(params, v)
        except (KeyError, ValueError) as e:
            col.counts["skipped_bad_view"] += 1
            col.problem(params_path, f"view {v}: {e.args[0] if e.args else e}; view skipped")
    if not cams:
        return
    mesh_path = os.path.join(opts.meshes, str(sid), f"{tag}.ply")
    tu_path = os.path.join(opts.tu_models, str(sid), "models_reg", f"{tag}.obj")
    try:
        mv = M.read_mesh(mesh_path)
        tu = M.read_mesh(tu_path)
    except M.MeshError as e:
        col.counts["tuples_skipped"] += 1
        col.counts["skipped_no_geometry"] += len(cams)
        col.problem(e.path, f"{e.reason} (needed for crops, pose and points); tuple skipped")
        return
    T = _tuple_transform(col, opts, sid, k, tag, align, mv, tu, cams, mesh_path)
    tu_v = M.vertices(tu)
    centre, radius = M.bbox_centre_radius(tu_v)
    points = M.shard_points(tu, opts.points, M.stable_seed(DATASET, sid, tag))
    mv_v = M.vertices(mv)
    rng = np.random.default_rng(M.stable_seed(DATASET, sid, tag, "crop"))
    if len(mv_v) > 20000:
        mv_v = mv_v[rng.choice(len(mv_v), 20000, replace=False)]
    near = np.linalg.norm(T.apply(mv_v) - centre, axis=1) <= CROP_RADIUS * radius
    crop_pts = mv_v[near] if near.sum() >= 10 else mv_v
    for v, cam in cams.items():
        sample_id = f"{DATASET}/{sid}/{tag}/{v}"
        c_can = T.apply(cam.centre[None])[0]
        yaw, pitch = view_angles(c_can - centre)
        if opts.max_yaw is not None and abs(yaw) > opts.max_yaw:
            col.counts["skipped_max_yaw"] += 1
            continue
        img_path = _find_image(tdir, v)
        if img_path is None:
            col.counts["skipped_bad_view"] += 1
            col.problem(os.path.join(tdir, f"{v}.jpg"), "image missing; view skipped")
            continue
        try:
            with Image.open(img_path) as im:
                W0, H0 = im.size
        except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            col.counts["skipped_bad_view"] += 1
            col.problem(img_path, f"not a readable image: {e}; view skipped")
            continue
        if (W0, H0) != (cam.width, cam.height):
            col.counts["views_rescaled_intrinsics"] += 1
            cam = cam.scaled(W0 / cam.width, H0 / cam.height)
        uv, z = cam.project(crop_pts)
        front = z > 0
        if front.mean() < 0.5:
            col.counts["skipped_out_of_frame"] += 1
            continue
        cx, cy, side = square_around(uv[front], opts.margin)
        if not (0 <= cx < cam.width and 0 <= cy < cam.height) or side < 4:
            col.counts["skipped_out_of_frame"] += 1
            continue
        try:
            with Image.open(img_path) as im:
                crop = undistorted_crop(im, cam, cx, cy, side, opts.image_size)
        except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            col.counts["skipped_bad_view"] += 1
            col.problem(img_path, f"image does not decode: {e}; view skipped")
            continue
        rows.append({
            "sample_id": sample_id, "subject_id": str(sid), "dataset": DATASET,
            "image": C.encode_image(crop, opts.image_format), "yaw_deg": float(yaw), "pitch_deg": float(pitch),
            "expression": name, "points": points,
        })


def process_subject(payload: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """All tuples of one subject → (summary, row table or None)."""
    opts = FaceScapeOptions(**payload["opts"])
    sid, split, align = payload["sid"], payload["split"], payload.get("align")
    col = C.Collector(opts.strict)
    rows: list[dict[str, Any]] = []
    sdir = os.path.join(opts.images, str(sid))
    col.counts["subjects"] += 1
    for k, name in discover_tuples(sdir):
        if not expression_selected(opts.expressions, k, name):
            continue
        try:
            _process_tuple(col, opts, sid, k, name, align, rows)
        except C.IngestError:
            raise
        except Exception as e:  # bad data must not take the other tuples down
            col.counts["tuples_skipped"] += 1
            col.problem(os.path.join(sdir, f"{k}_{name}"), f"unexpected error: {type(e).__name__}: {e}; tuple skipped")
    col.counts["rows"] += len(rows)
    summary = {"subject_id": str(sid), "split": split, "rows": len(rows), **col.summary()}
    return summary, (C.build_rows_table(rows, opts.points) if rows else None)


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def ingest_facescape(opts: FaceScapeOptions) -> C.IngestResult:
    """Ingest a FaceScape multi-view release (see the module doc); returns what was written."""
    t0 = time.perf_counter()
    driver = C.Collector(opts.strict)
    align_all = load_alignment(opts.align) if opts.align else None
    subjects = discover_subjects(opts.images)
    if opts.subjects:
        subjects = [s for s in subjects if s in set(opts.subjects)]
    if not subjects:
        raise C.IngestError(f"{opts.images}: no subject folders (<id>/) found")
    payloads = []
    base = asdict(opts)
    for sid in subjects:
        split = split_of(opts.split_ids, sid)
        if split is None:
            driver.counts["skipped_subject_not_in_split"] += 1
            continue
        align = None
        if align_all is not None:
            align = align_all.get(str(sid))
            if not isinstance(align, dict):
                align = {}
        payloads.append({"opts": base, "sid": sid, "split": split, "align": align})
    if not payloads:
        raise C.IngestError(f"{opts.images}: none of the {len(subjects)} subject(s) is in a split "
                            f"({opts.splits!r})")
    results = C.run_subjects(process_subject, payloads, opts.use_ray, opts.workers)
    params = {k: v for k, v in base.items() if k not in ("split_ids",)}
    params["split_ids"] = {s: _ranges(v) for s, v in opts.split_ids.items()}
    generator = {"name": GENERATOR, "version": GENERATOR_VERSION, "source": "FaceScape multi-view", "params": params}
    return C.write_dataset(opts.out, DATASET, generator, results, driver, opts.points, opts.image_size,
                           opts.rows_per_shard, opts.use_ray, t0=t0)


def _ranges(ids: list[int]) -> str:
    """[1, 2, 3, 7] → "1-3,7"."""
    out, ids = [], sorted(ids)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)
