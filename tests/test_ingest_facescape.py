"""``posefr ingest facescape`` against a FaceScape-layout tree built here (procedural heads, known
camera poses, lens distortion, an invalid view per tuple and a few broken files)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from posefr_dist.data.ingest import FaceScapeOptions, IngestError, ingest_facescape
from posefr_dist.data.ingest import fixtures as F
from posefr_dist.data.ingest.cli import DEFAULT_FACESCAPE_SPLITS
from posefr_dist.data.ingest.cli import main as ingest_main
from posefr_dist.data.ingest.facescape import DEFAULT_SPLITS, parse_splits
from posefr_dist.data.ingest.geometry import distort_pixels, undistort_image, undistort_pixels
from posefr_dist.data.shards import decode_image, read_manifest, read_shard_bytes, shard_uris, validate

SPLITS = "train=1-2,val=3,test=4"
SMALL = dict(image_size=48, points=128)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("facescape")
    t = F.make_facescape_tree(root, subjects=(1, 2, 3, 4), expressions=("1_neutral", "2_smile"))
    broken = {}
    # a tuple without its camera parameters
    p = t.images / "4" / "2_smile" / "params.json"
    p.unlink()
    broken["missing_params"] = p
    # a tuple whose params.json is not JSON
    p = t.images / "1" / "2_smile" / "params.json"
    p.write_text(p.read_text()[:-40])
    broken["bad_json"] = p
    # one view with a malformed intrinsic matrix
    p = t.images / "2" / "2_smile" / "params.json"
    params = json.loads(p.read_text())
    params["5_K"] = "oops"
    p.write_text(json.dumps(params))
    broken["bad_view"] = p
    # a JPEG that is not one, and a truncated one
    p = t.images / "3" / "1_neutral" / "2.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG" * 10)
    broken["corrupt_jpeg"] = p
    p = t.images / "3" / "2_smile" / "4.jpg"
    p.write_bytes(p.read_bytes()[:600])
    broken["truncated_jpeg"] = p
    t.broken = broken
    t.lost = {"facescape/3/1_neutral/2", "facescape/3/2_smile/4", "facescape/2/2_smile/5"}
    t.lost |= {s for s in t.truth if s.startswith(("facescape/4/2_smile/", "facescape/1/2_smile/"))}
    return t


def _rows(root: str) -> dict[str, dict]:
    out = {}
    for split in ("train", "val", "test"):
        for uri in shard_uris(root, split):
            t = read_shard_bytes(uri).to_pylist()
            for r in t:
                r["split"] = split
                out[r["sample_id"]] = r
    return out


def _angle_errors(rows: dict[str, dict], truth: dict[str, tuple[float, float]]) -> tuple[float, float]:
    yaw = [abs((r["yaw_deg"] - truth[s][0] + 180) % 360 - 180) for s, r in rows.items()]
    pitch = [abs(r["pitch_deg"] - truth[s][1]) for s, r in rows.items()]
    return max(yaw), max(pitch)


def _face_offset(img: np.ndarray) -> float:
    """Distance of the face's centroid from the crop centre, as a fraction of the side."""
    bg = np.array([115.0, 115.0, 115.0])
    mask = np.abs(img.astype(np.float32) - bg).sum(-1) > 45
    ys, xs = np.nonzero(mask)
    c = (img.shape[0] - 1) / 2
    return float(math.hypot(xs.mean() - c, ys.mean() - c) / img.shape[0])


def test_undistortion_inverts_the_lens_model():
    K = np.array([[300.0, 0, 161.0], [0, 300.0, 119.0], [0, 0, 1]])
    dist = np.array([-0.3, 0.12, 0.001, -0.002, 0.01])
    gu, gv = np.meshgrid(np.linspace(30, 290, 6), np.linspace(30, 210, 5))
    ideal = np.stack([gu.ravel(), gv.ravel()], 1)
    np.testing.assert_allclose(undistort_pixels(distort_pixels(ideal, K, dist), K, dist), ideal, atol=1e-6)
    # a distorted photo of dots (Gaussian blobs where the lens puts them) ...
    seen = distort_pixels(ideal, K, dist)
    assert np.abs(seen - ideal).max() > 5  # the lens moves them by pixels
    v, u = np.mgrid[0:240, 0:320].astype(np.float64)
    img = np.zeros((240, 320), np.float64)
    for x, y in seen:
        img += 255 * np.exp(-((u - x) ** 2 + (v - y) ** 2) / (2 * 1.5 ** 2))
    und = undistort_image(np.clip(img, 0, 255).astype(np.uint8)[..., None].repeat(3, 2), K, dist)[..., 0]
    # ... undistorted: every dot is back where the pinhole camera puts it
    for x, y in ideal:
        x0, y0 = int(round(x)), int(round(y))
        win = und[y0 - 6:y0 + 7, x0 - 6:x0 + 7].astype(np.float64)
        wy, wx = np.mgrid[y0 - 6:y0 + 7, x0 - 6:x0 + 7]
        cx, cy = (win * wx).sum() / win.sum(), (win * wy).sum() / win.sum()
        assert math.hypot(cx - x, cy - y) < 0.3, (x, y, cx, cy)


def test_default_identity_split():
    assert DEFAULT_SPLITS == DEFAULT_FACESCAPE_SPLITS == "train=1-300,test=301-359"
    s = parse_splits(DEFAULT_SPLITS, 0.1)
    assert s["train"] == set(range(1, 271)) and s["val"] == set(range(271, 301))
    assert s["test"] == set(range(301, 360))
    assert parse_splits("train=1-3,5,val=4,test=6-7")["train"] == {1, 2, 3, 5}
    with pytest.raises(ValueError, match="share"):
        parse_splits("train=1-5,test=5-9")


def test_ingest_with_alignment(tree, tmp_path):
    out = str(tmp_path / "shards")
    res = ingest_facescape(FaceScapeOptions(images=str(tree.images), out=out, align=str(tree.align),
                                            splits=SPLITS, use_ray=False, rows_per_shard=16, **SMALL))
    problems, summary = validate(out)
    assert problems == [], [str(p) for p in problems]
    rows = _rows(out)
    expected = set(tree.truth) - tree.lost
    assert set(rows) == expected
    assert not set(rows) & tree.invalid
    # poses from the alignment: within 2° of the cameras' known poses (measured: < 0.01°)
    yaw_err, pitch_err = _angle_errors(rows, tree.truth)
    print(f"\nyaw error with the alignment file: max {yaw_err:.4f} deg; pitch {pitch_err:.4f} deg")
    assert yaw_err < 2.0 and pitch_err < 2.0
    # invalid views skipped and counted; broken inputs reported with their paths, rest written
    c = res.counts
    assert c["skipped_invalid_view"] == 6  # one per tuple that has readable cameras
    assert c["skipped_bad_view"] == 3 and c["tuples_skipped"] == 2 and c["tuples_aligned"] == 6
    assert c["rows"] == len(expected) == 39
    paths = {p.path: p.reason for p in res.problems}
    for key in ("missing_params", "bad_json", "bad_view", "corrupt_jpeg", "truncated_jpeg"):
        assert str(tree.broken[key]) in paths, (key, paths)
    assert "view 5" in paths[str(tree.broken["bad_view"])]
    assert {r["subject_id"] for r in rows.values()} == {"1", "2", "3", "4"}
    # splits, labels, identities
    assert summary["splits"]["train"]["identities"] == 2 and summary["splits"]["test"]["identities"] == 1
    assert {r["split"] for r in rows.values() if r["subject_id"] == "3"} == {"val"}
    # rows: ids, expression, crops, points
    r = rows["facescape/2/1_neutral/3"]
    assert r["expression"] == "neutral" and r["dataset"] == "facescape" and r["num_points"] == 128
    pts = np.asarray(r["points"], np.float32).reshape(-1, 3)
    assert np.abs(pts.mean(0)).max() < 1e-4 and abs(np.linalg.norm(pts, axis=1).max() - 1) < 1e-4
    assert rows["facescape/2/1_neutral/0"]["points"] == r["points"]  # one sample per tuple
    img = decode_image(r["image"])
    assert img.shape == (48, 48, 3)
    assert _face_offset(img) < 0.08  # frontal crop centred on the face
    # report, metrics, manifest
    man = read_manifest(out)
    assert man["dataset"] == "facescape" and man["ingest"]["counts"]["problems"] == len(res.problems)
    report = json.loads((Path(out) / "ingest_report.json").read_text())
    assert {p["path"] for p in report["problems"]} == set(paths)
    assert 'posefr_ingest_skipped{dataset="facescape",reason="invalid_view"} 6.0' in \
        (Path(out) / "ingest_metrics.prom").read_text()


def test_ingest_by_registration(tree, tmp_path):
    out = str(tmp_path / "shards")
    res = ingest_facescape(FaceScapeOptions(images=str(tree.images), meshes=str(tree.meshes),
                                            tu_models=str(tree.tu_models), out=out, splits=SPLITS,
                                            use_ray=False, **SMALL))
    assert validate(out)[0] == []
    assert res.counts["tuples_registered"] == 6 and "tuples_aligned" not in res.counts
    rows = _rows(out)
    assert set(rows) == set(tree.truth) - tree.lost
    yaw_err, pitch_err = _angle_errors(rows, tree.truth)
    print(f"\nyaw error by registration: max {yaw_err:.2f} deg; pitch {pitch_err:.2f} deg "
          f"over {len(rows)} views")
    assert yaw_err < 5.0 and pitch_err < 5.0


@pytest.mark.slow  # the whole CLI on Ray, writing its shards to S3
def test_cli_on_ray_to_s3(tree, ray_local, s3_uri, capsys):
    rc = ingest_main(["ingest", "facescape", "--images", str(tree.images), "--align", str(tree.align),
                      "--out", s3_uri, "--splits", "train=1-3,test=4", "--val-fraction", "0",
                      "--expressions", "neutral", "--max-yaw", "60", "--image-size", "32", "--points", "64",
                      "--workers", "2", "--image-format", "jpeg"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "problem(s)" in captured.err and str(tree.broken["corrupt_jpeg"]) in captured.err
    problems, summary = validate(s3_uri)
    assert problems == [], [str(p) for p in problems]
    rows = _rows(s3_uri)
    assert rows and all(r["expression"] == "neutral" and abs(r["yaw_deg"]) <= 60 for r in rows.values())
    man = read_manifest(s3_uri)
    # |yaw| 80 and 85 are over the limit: two views per tuple, four neutral tuples
    assert man["ingest"]["counts"]["skipped_max_yaw"] == 8
    assert summary["splits"]["train"]["identities"] == 3 and summary["splits"]["val"]["rows"] == 0


def test_strict_stops_at_the_first_problem(tree, tmp_path, capsys):
    out = tmp_path / "shards"
    rc = ingest_main(["ingest", "facescape", "--images", str(tree.images), "--align", str(tree.align),
                      "--out", str(out), "--splits", SPLITS, "--no-ray", "--strict", "--image-size", "32",
                      "--points", "64"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "--strict" in err and str(tree.images) in err
    assert not (out / "manifest.json").exists()
    with pytest.raises(IngestError):
        ingest_facescape(FaceScapeOptions(images=str(tree.images), out=str(out), align=str(tree.align),
                                          splits="train=1,test=4", val_fraction=0, use_ray=False, strict=True,
                                          **SMALL))


def test_bad_options_and_roots(tmp_path, capsys):
    assert ingest_main(["ingest", "facescape", "--images", str(tmp_path / "nowhere"), "--out",
                        str(tmp_path / "o"), "--no-ray"]) == 1
    assert "images root not found" in capsys.readouterr().err
    assert ingest_main(["ingest", "facescape", "--images", str(tmp_path), "--out", str(tmp_path / "o"),
                        "--splits", "train=1-5,test=4-9"]) == 1
    assert "share" in capsys.readouterr().err
