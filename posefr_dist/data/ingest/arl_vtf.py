"""``posefr ingest arl-vtf``: the ARL Visible-Thermal Face data set → shards.

Release layout::

    <root>/Odin3/metadata.csv     timestamp, camera, condition, eyewear, subid, filepath,
                                  top_leftX, top_leftY, bottom_rightX, bottom_rightY
    <root>/Odin3/<filepath>       frames; camera BAS_RGB2 = visible, FLIR_USB = thermal
    <root>/splits/dev/train*.txt  subject ids, one per line          → split train
    <root>/splits/dev/val*.txt    subject ids, one per line          → split val
    <root>/splits/test/gallery_*.txt, probes_*.txt
                                  row indices into metadata.csv      → split test

Row indices count the data rows of metadata.csv from 0 (the header is not a row; index i is on
line i + 2 of the file). Every frame of a dev subject (train/val) is a row with ``expression``
``dev``; a test subject contributes the frames its gallery and probe files list, with
``expression`` ``gallery`` or ``probe``. The shard format has no enrollment column, so the
gallery sample ids are also written to the manifest: ``manifest["enrollment"]["test"]``.

Images: the bounding box made square (side = max(w, h) · ``margin``, same centre), cropped
(black outside the frame), resized to ``image_size``. Thermal frames (16-bit) are stretched to
8 bits between the 1st and 99th percentile of the crop and stored as gray RGB.

Pose: the release has no per-image yaw. With ``pose_csv`` (columns filepath, yaw, pitch) those
values are used; otherwise frames of pose sequences (``pose`` as a word in the path, or condition
``pose``) get a null yaw and pitch (the verification report bins them as ``unknown-pose``) and
all other frames (baseline, expression), which face the camera, get 0.

Points: null, unless ``points_dir`` holds ``<subid>.ply`` per subject (a mesh, sampled uniformly
with open3d, or a point cloud, sub-sampled; seeded per subject; centred, unit radius), which
should be in the canonical face frame.

``sample_id`` = ``arl-vtf/<filepath>``, ``subject_id`` = ``subid``.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from posefr_dist.data.ingest import common as C

DATASET = "arl-vtf"
GENERATOR = "posefr-ingest-arl-vtf"
GENERATOR_VERSION = 1
CAMERAS = {"visible": ("BAS_RGB2",), "thermal": ("FLIR_USB",), "both": ("BAS_RGB2", "FLIR_USB")}
REQUIRED_COLUMNS = ("camera", "subid", "filepath", "top_leftX", "top_leftY", "bottom_rightX", "bottom_rightY")
_POSE_RE = re.compile(r"(^|[^a-z])pose($|[^a-z])")


@dataclass
class ArlVtfOptions:
    """Options of one ARL-VTF ingest (validated on construction)."""

    root: str
    out: str
    modality: str = "visible"
    pose_csv: str | None = None
    points_dir: str | None = None
    splits_dir: str | None = None
    gallery_glob: str = "gallery_*.txt"
    probe_glob: str = "probes_*.txt"
    image_size: int = 112
    points: int = 1024
    margin: float = 1.0
    image_format: str = "png"
    rows_per_shard: int = 1000
    workers: int | None = None
    use_ray: bool = True
    strict: bool = False

    def __post_init__(self) -> None:
        self.splits_dir = self.splits_dir or os.path.join(self.root, "splits")
        if self.modality not in CAMERAS:
            raise ValueError(f"modality {self.modality!r}: one of {', '.join(CAMERAS)}")
        if self.image_size < 8:
            raise ValueError(f"image_size {self.image_size}: must be >= 8")
        if self.points < 1:
            raise ValueError(f"points {self.points}: must be >= 1")
        if self.margin <= 0:
            raise ValueError(f"margin {self.margin}: must be > 0")
        if self.image_format not in C.IMAGE_FORMATS:
            raise ValueError(f"image_format {self.image_format!r}: one of {C.IMAGE_FORMATS}")
        if self.rows_per_shard < 1:
            raise ValueError(f"rows_per_shard {self.rows_per_shard}: must be >= 1")


def is_pose_frame(filepath: str, condition: str) -> bool:
    return condition.strip().lower() == "pose" or bool(_POSE_RE.search(filepath.lower()))


def subject_key(subid: str) -> str:
    """Subject ids match as text, or as numbers when both are numeric ("7" = "0007")."""
    s = subid.strip()
    return str(int(s)) if s.isdigit() else s


def sample_id(filepath: str) -> str:
    rel = filepath.replace("\\", "/").lstrip("/")
    return f"{DATASET}/{rel}"


# --------------------------------------------------------------------------------------------
# driver-side parsing
# --------------------------------------------------------------------------------------------


def read_metadata(path: str) -> list[dict[str, str]]:
    if not os.path.isfile(path):
        raise C.IngestError(f"{path}: metadata.csv not found (expected <root>/Odin3/metadata.csv)")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, skipinitialspace=True)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise C.IngestError(f"{path}: empty file") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise C.IngestError(f"{path}: missing column(s) {missing}; found {header}")
        rows = []
        for rec in reader:
            rows.append({h: (rec[i].strip() if i < len(rec) else "") for i, h in enumerate(header)})
    return rows


def _lines(path: str) -> list[tuple[int, str]]:
    with open(path, encoding="utf-8-sig") as f:
        return [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip() and not line.startswith("#")]


def read_subject_lists(files: list[str]) -> dict[str, str]:
    """subject id → the split file that names it."""
    out: dict[str, str] = {}
    for path in files:
        for _, line in _lines(path):
            out.setdefault(subject_key(line.split(",")[0].split()[0]), path)
    return out


def read_index_lists(files: list[str], n_rows: int, col: C.Collector) -> dict[int, str]:
    """metadata row index → the protocol file that lists it; bad lines are problems."""
    out: dict[int, str] = {}
    for path in files:
        for n, line in _lines(path):
            tok = line.split(",")[0].split()[0]
            try:
                idx = int(tok)
            except ValueError:
                col.problem(f"{path}:{n}", f"{tok!r} is not a row index of metadata.csv; line skipped")
                continue
            if not 0 <= idx < n_rows:
                col.problem(f"{path}:{n}", f"row index {idx} out of range: metadata.csv has {n_rows} data rows "
                                           f"(0..{n_rows - 1}); line skipped")
                continue
            out.setdefault(idx, path)
    return out


def read_pose_csv(path: str, col: C.Collector) -> dict[str, tuple[float | None, float | None]]:
    if not os.path.isfile(path):
        raise C.IngestError(f"{path}: pose file not found")
    out: dict[str, tuple[float | None, float | None]] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, skipinitialspace=True)
        fields = [h.strip() for h in (reader.fieldnames or [])]
        if "filepath" not in fields or "yaw" not in fields:
            raise C.IngestError(f"{path}: expected columns filepath, yaw[, pitch]; found {fields}")
        reader.fieldnames = fields
        for n, rec in enumerate(reader, 2):
            fp = (rec.get("filepath") or "").strip()
            try:
                yaw = float(rec["yaw"])
                pitch_s = (rec.get("pitch") or "").strip()
                pitch = float(pitch_s) if pitch_s else None
                if not (math.isfinite(yaw) and -180 <= yaw <= 180):
                    raise ValueError(f"yaw {yaw} outside [-180, 180]")
                if pitch is not None and not (math.isfinite(pitch) and -90 <= pitch <= 90):
                    raise ValueError(f"pitch {pitch} outside [-90, 90]")
            except (TypeError, ValueError) as e:
                col.problem(f"{path}:{n}", f"bad pose ({e}); the frame keeps the default pose")
                continue
            out[fp] = (yaw, pitch)
    return out


# --------------------------------------------------------------------------------------------
# one subject (a Ray task)
# --------------------------------------------------------------------------------------------


def _box(r: dict[str, str]) -> tuple[float, float, float, float]:
    try:
        x0, y0, x1, y1 = (float(r[k]) for k in ("top_leftX", "top_leftY", "bottom_rightX", "bottom_rightY"))
    except (TypeError, ValueError):
        raise ValueError("bounding box is not numeric") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ValueError("bounding box has non-finite values")
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty bounding box ({x0}, {y0}, {x1}, {y1})")
    return x0, y0, x1, y1


def crop_face(im, box: tuple[float, float, float, float], margin: float, size: int) -> np.ndarray:
    """Square crop around ``box`` (black outside the frame) as RGB uint8 ``size``²."""
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = max(1, int(round(max(x1 - x0, y1 - y0) * margin)))
    left, top = int(round(cx - side / 2)), int(round(cy - side / 2))
    W, H = im.size
    il, it, ir, ib = max(left, 0), max(top, 0), min(left + side, W), min(top + side, H)
    canvas = np.zeros((side, side, 3), np.uint8)
    if ir > il and ib > it:
        part = im.crop((il, it, ir, ib))
        if part.mode in ("RGB", "L") or part.mode.startswith(("I", "F")):
            arr = C.to_uint8_rgb(np.asarray(part))
        else:
            arr = np.asarray(part.convert("RGB"))
        canvas[it - top:ib - top, il - left:ir - left] = arr
    return C.resize_square(canvas, size)


def _subject_points(col: C.Collector, opts: ArlVtfOptions, subid: str) -> np.ndarray | None:
    from posefr_dist.data.ingest import meshes as M

    if not opts.points_dir:
        return None
    path = os.path.join(opts.points_dir, f"{subid}.ply")
    if not os.path.isfile(path):
        col.warn(path, f"no point cloud for subject {subid}: its rows have null points")
        return None
    try:
        return M.shard_points(M.read_mesh(path), opts.points, M.stable_seed(DATASET, subid))
    except M.MeshError as e:
        col.problem(e.path, f"{e.reason}; subject {subid} gets null points")
        return None


def process_subject(payload: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The selected frames of one subject → (summary, row table or None)."""
    from PIL import Image, UnidentifiedImageError

    opts = ArlVtfOptions(**payload["opts"])
    subid, split = payload["subject"], payload["split"]
    col = C.Collector(opts.strict)
    col.counts["subjects"] += 1
    odin = os.path.join(opts.root, "Odin3")
    points = _subject_points(col, opts, subid)
    rows: list[dict[str, Any]] = []
    gallery: list[str] = []
    for r in payload["rows"]:
        idx = r["index"]
        where = f"metadata.csv row {idx} (line {idx + 2})"
        path = os.path.join(odin, r["filepath"])
        if not os.path.isfile(path):
            col.counts["skipped_bad_row"] += 1
            col.problem(path, f"image not found ({where}); row skipped")
            continue
        try:
            box = _box(r)
        except ValueError as e:
            col.counts["skipped_bad_row"] += 1
            col.problem(os.path.join(odin, "metadata.csv"), f"{where}: {e}; row skipped")
            continue
        try:
            with Image.open(path) as im:
                im.load()
                img = crop_face(im, box, opts.margin, opts.image_size)
        except (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            col.counts["skipped_bad_row"] += 1
            col.problem(path, f"image does not decode ({where}): {e}; row skipped")
            continue
        yaw, pitch = r["yaw"], r["pitch"]
        if yaw is None:
            col.counts["rows_unknown_pose"] += 1
        if points is None:
            col.counts["rows_without_points"] += 1
        sid = sample_id(r["filepath"])
        rows.append({
            "sample_id": sid, "subject_id": subid, "dataset": DATASET,
            "image": C.encode_image(img, opts.image_format), "yaw_deg": yaw, "pitch_deg": pitch,
            "expression": r["role"], "points": points,
        })
        col.counts[f"rows_{r['camera']}"] += 1
        if r["role"] == "gallery":
            gallery.append(sid)
    col.counts["rows"] += len(rows)
    summary = {"subject_id": subid, "split": split, "rows": len(rows), "gallery": gallery, **col.summary()}
    return summary, (C.build_rows_table(rows, opts.points) if rows else None)


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


def plan(opts: ArlVtfOptions, driver: C.Collector) -> list[dict[str, Any]]:
    """Read metadata, split files and poses; the rows of every subject with their split and role."""
    meta_path = os.path.join(opts.root, "Odin3", "metadata.csv")
    meta = read_metadata(meta_path)
    sd = opts.splits_dir
    train_files = sorted(glob.glob(os.path.join(sd, "dev", "train*.txt")))
    val_files = sorted(glob.glob(os.path.join(sd, "dev", "val*.txt")))
    gal_files = sorted(glob.glob(os.path.join(sd, "test", opts.gallery_glob)))
    prb_files = sorted(glob.glob(os.path.join(sd, "test", opts.probe_glob)))
    if not (train_files or val_files or gal_files or prb_files):
        raise C.IngestError(f"{sd}: no split files (expected dev/train*.txt, dev/val*.txt, "
                            f"test/{opts.gallery_glob}, test/{opts.probe_glob})")
    train = read_subject_lists(train_files)
    val = read_subject_lists(val_files)
    gallery = read_index_lists(gal_files, len(meta), driver)
    probes = read_index_lists(prb_files, len(meta), driver)
    for idx in sorted(set(gallery) & set(probes)):
        driver.warn(probes[idx], f"metadata row {idx} is also in {gallery[idx]}: kept as gallery")
    test_subjects = {subject_key(meta[i]["subid"]) for i in set(gallery) | set(probes)}
    for s in sorted(set(train) & set(val), key=C.natural_key):
        driver.problem(val[s], f"subject {s} is also in {train[s]}: kept in train")
        del val[s]
    for lst in (train, val):
        for s in sorted(set(lst) & test_subjects, key=C.natural_key):
            driver.problem(lst[s], f"subject {s} also has frames in the test protocol: kept in test")
            del lst[s]
    poses = read_pose_csv(opts.pose_csv, driver) if opts.pose_csv else {}
    cameras = CAMERAS[opts.modality]
    by_subject: dict[str, dict[str, Any]] = {}
    seen: dict[str, int] = {}
    for idx, r in enumerate(meta):
        driver.counts["metadata_rows"] += 1
        sub, cam, fp = r["subid"], r["camera"], r["filepath"].replace("\\", "/")
        key = subject_key(sub)
        if cam not in cameras:
            driver.counts["skipped_modality"] += 1
            continue
        if not sub or not fp:
            driver.counts["skipped_bad_row"] += 1
            driver.problem(meta_path, f"row {idx} (line {idx + 2}): empty subid or filepath; row skipped")
            continue
        if key in test_subjects:
            split = "test"
            role = "gallery" if idx in gallery else "probe" if idx in probes else None
            if role is None:
                driver.counts["skipped_not_in_protocol"] += 1
                continue
        elif key in train or key in val:
            split, role = ("train" if key in train else "val"), "dev"
        else:
            driver.counts["skipped_unassigned_subject"] += 1
            continue
        if fp in seen:
            driver.counts["skipped_bad_row"] += 1
            driver.problem(meta_path, f"row {idx} (line {idx + 2}): filepath {fp} already on row {seen[fp]}; "
                                      f"row skipped")
            continue
        seen[fp] = idx
        if fp in poses:
            yaw, pitch = poses[fp]
            driver.counts["rows_pose_from_csv"] += 1
        elif is_pose_frame(fp, r.get("condition", "")):
            yaw, pitch = None, None
        else:
            yaw, pitch = 0.0, 0.0
        entry = by_subject.setdefault(sub, {"subject": sub, "split": split, "rows": []})
        entry["rows"].append({"index": idx, "filepath": fp, "camera": cam, "role": role, "yaw": yaw, "pitch": pitch,
                              **{k: r[k] for k in REQUIRED_COLUMNS[3:]}})
    present = {subject_key(s) for s in by_subject}
    for s, path in sorted({**train, **val}.items()):
        if s not in present:
            driver.warn(path, f"subject {s} has no {opts.modality} frames in metadata.csv")
    return [by_subject[s] for s in sorted(by_subject, key=C.natural_key)]


def ingest_arl_vtf(opts: ArlVtfOptions) -> C.IngestResult:
    """Ingest an ARL-VTF release (see the module doc); returns what was written."""
    t0 = time.perf_counter()
    driver = C.Collector(opts.strict)
    subjects = plan(opts, driver)
    if not subjects:
        raise C.IngestError(f"{opts.root}: no frames selected (modality {opts.modality}); "
                            f"counts {dict(driver.counts)}", driver.problems)
    base = asdict(opts)
    payloads = [{"opts": base, **s} for s in subjects]
    results = C.run_subjects(process_subject, payloads, opts.use_ray, opts.workers)
    gallery = sorted(sid for summary, _ in results for sid in summary.get("gallery", []))
    generator = {"name": GENERATOR, "version": GENERATOR_VERSION, "source": "ARL-VTF (Odin3)", "params": base}
    extra = {"enrollment": {"test": gallery},
             "enrollment_note": "test rows whose sample_id is listed here are the gallery (expression 'gallery'); "
                                "all other test rows are probes"}
    return C.write_dataset(opts.out, DATASET, generator, results, driver, opts.points, opts.image_size,
                           opts.rows_per_shard, opts.use_ray, manifest_extra=extra, t0=t0)
