"""``posefr ingest arl-vtf`` against an ARL-VTF-layout tree built here (visible and 16-bit thermal
frames, face boxes, dev/test split files, per-subject point clouds and a few broken inputs)."""

from __future__ import annotations

import csv
import json

import pytest

from posefr_dist.data.ingest import ArlVtfOptions, ingest_arl_vtf
from posefr_dist.data.ingest import fixtures as F
from posefr_dist.data.ingest.arl_vtf import is_pose_frame
from posefr_dist.data.ingest.cli import main as ingest_main
from posefr_dist.data.shards import decode_image, read_manifest, read_shard_bytes, shard_uris, validate

SMALL = ["--image-size", "40", "--points", "96", "--no-ray"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("arl")
    t = F.make_arl_vtf_tree(root)
    odin = root / "Odin3"
    rows = t.rows

    def find(sub, cam, cond, frame=None):
        return next(i for i, r in enumerate(rows) if r["subid"] == sub and r["camera"] == cam
                    and r["condition"] == cond and (frame is None or r["filepath"].endswith(f"_{frame:03d}.png")))

    t.missing_row = find("0001", "BAS_RGB2", "pose", 4)          # metadata row pointing nowhere
    (odin / rows[t.missing_row]["filepath"]).unlink()
    t.corrupt_row = find("0005", "BAS_RGB2", "pose", 3)          # a probe frame that does not decode
    (odin / rows[t.corrupt_row]["filepath"]).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    t.bad_box_row = find("0002", "BAS_RGB2", "expression")       # a row with an empty face box
    rows[t.bad_box_row]["bottom_rightX"] = ""
    with open(odin / "metadata.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(F.ARL_COLUMNS))
        w.writeheader()
        w.writerows(rows)
    t.bad_index_file = root / "splits" / "test" / "probes_VP0-.txt"
    with open(t.bad_index_file, "a") as f:
        f.write("9999\n")
    t.lost = {t.missing_row, t.corrupt_row, t.bad_box_row}
    return t


def _rows(root) -> dict[str, dict]:
    out = {}
    for split in ("train", "val", "test"):
        for uri in shard_uris(str(root), split):
            for r in read_shard_bytes(uri).to_pylist():
                r["split"] = split
                out[r["sample_id"]] = r
    return out


def _sid(tree, i: int) -> str:
    return "arl-vtf/" + tree.rows[i]["filepath"]


def test_pose_frames_are_recognised():
    assert is_pose_frame("0001/visible/pose/x_001.png", "")
    assert is_pose_frame("0001/visible/sequences/a.png", "pose")
    assert not is_pose_frame("0001/visible/exposure/a.png", "baseline")


def test_visible_ingest(tree, tmp_path, capsys):
    out = tmp_path / "shards"
    rc = ingest_main(["ingest", "arl-vtf", "--root", str(tree.root), "--out", str(out),
                      "--points-dir", str(tree.points_dir), *SMALL])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    problems, summary = validate(str(out))
    assert problems == [], [str(p) for p in problems]
    rows = _rows(out)
    visible = {i for i, r in enumerate(tree.rows) if r["camera"] == "BAS_RGB2"}
    assert set(rows) == {_sid(tree, i) for i in visible - tree.lost}
    # splits and roles: dev subjects whole, test subjects through the protocol files
    for i in visible - tree.lost:
        r, meta = rows[_sid(tree, i)], tree.rows[i]
        assert r["subject_id"] == meta["subid"]
        if meta["subid"] in tree.train:
            assert (r["split"], r["expression"]) == ("train", "dev")
        elif meta["subid"] in tree.val:
            assert (r["split"], r["expression"]) == ("val", "dev")
        else:
            assert r["split"] == "test"
            assert r["expression"] == ("gallery" if i in tree.gallery_rows else "probe")
        # no pose file: frontal sequences yaw 0, pose sequences null (the unknown-pose bin)
        if meta["condition"] == "pose":
            assert r["yaw_deg"] is None and r["pitch_deg"] is None
        else:
            assert r["yaw_deg"] == 0.0
        assert (r["points"] is None) == (meta["subid"] == "0006")
        assert decode_image(r["image"]).shape == (40, 40, 3)
    assert summary["splits"]["test"]["identities"] == 3 and summary["splits"]["train"]["identities"] == 2
    # enrollment: the gallery sample ids in the manifest
    man = read_manifest(str(out))
    gallery = {_sid(tree, i) for i in tree.gallery_rows if tree.rows[i]["camera"] == "BAS_RGB2"}
    assert set(man["enrollment"]["test"]) == gallery
    assert all(rows[s]["expression"] == "gallery" for s in gallery)
    # every broken input reported with its path; the other rows written
    report = json.loads((out / "ingest_report.json").read_text())
    paths = {p["path"]: p["reason"] for p in report["problems"]}
    odin = tree.root / "Odin3"
    assert "image not found" in paths[str(odin / tree.rows[tree.missing_row]["filepath"])]
    assert f"row {tree.missing_row}" in paths[str(odin / tree.rows[tree.missing_row]["filepath"])]
    assert "does not decode" in paths[str(odin / tree.rows[tree.corrupt_row]["filepath"])]
    assert f"row {tree.bad_box_row}" in paths[str(odin / "metadata.csv")]
    assert "out of range" in paths[f"{tree.bad_index_file}:{len(tree.probe_rows) // 2 + 1}"]
    assert report["counts"]["skipped_bad_row"] == 3 and report["counts"]["skipped_modality"] == len(visible)
    assert str(odin / tree.rows[tree.missing_row]["filepath"]) in captured.err
    assert any("0006.ply" in w["path"] for w in report["warnings"])


def test_both_modalities_with_pose_file(tree, tmp_path):
    out = tmp_path / "shards"
    res = ingest_arl_vtf(ArlVtfOptions(root=str(tree.root), out=str(out), modality="both",
                                       pose_csv=str(tree.pose_csv), use_ray=False, image_size=40, points=96))
    assert validate(str(out))[0] == []
    rows = _rows(out)
    thermal = [r for s, r in rows.items() if "FLIR_USB" in s]
    assert thermal and len(thermal) + res.counts["rows_BAS_RGB2"] == len(rows)
    img = decode_image(thermal[0]["image"])
    assert (img[..., 0] == img[..., 1]).all() and img.std() > 10  # gray, stretched from 16 bits
    # yaw from the pose file where it has the frame
    for s, r in rows.items():
        fp = s[len("arl-vtf/"):]
        want = tree.poses[fp]
        assert r["yaw_deg"] == pytest.approx(want[0]) and r["pitch_deg"] == pytest.approx(want[1])
        assert r["points"] is None
    man = read_manifest(str(out))
    assert {s.split("_")[1] for s in man["enrollment"]["test"]} == {"BAS", "FLIR"}
    assert res.counts["rows_pose_from_csv"] > 0


def test_thermal_only_and_strict(tree, tmp_path, capsys):
    out = tmp_path / "thermal"
    assert ingest_main(["ingest", "arl-vtf", "--root", str(tree.root), "--out", str(out),
                        "--modality", "thermal", "--image-format", "jpeg", *SMALL]) == 0
    rows = _rows(out)
    assert rows and all("FLIR_USB" in s for s in rows)
    capsys.readouterr()
    strict = tmp_path / "strict"
    assert ingest_main(["ingest", "arl-vtf", "--root", str(tree.root), "--out", str(strict), "--strict", *SMALL]) == 1
    err = capsys.readouterr().err
    assert "--strict" in err and str(tree.bad_index_file) in err
    assert not (strict / "manifest.json").exists()


def test_missing_layout_is_an_error(tmp_path, capsys):
    assert ingest_main(["ingest", "arl-vtf", "--root", str(tmp_path), "--out", str(tmp_path / "o"), *SMALL]) == 1
    assert "metadata.csv not found" in capsys.readouterr().err
    (tmp_path / "Odin3").mkdir()
    (tmp_path / "Odin3" / "metadata.csv").write_text("camera,subid\n")
    assert ingest_main(["ingest", "arl-vtf", "--root", str(tmp_path), "--out", str(tmp_path / "o"), *SMALL]) == 1
    assert "missing column" in capsys.readouterr().err
