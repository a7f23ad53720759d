"""The pose-aware splat of the 3D reshaping block agrees with the synthetic renderer's crop.

A landmark of a synthetic head (nose tip, an eye, an ear) is painted as a small marker and
rendered; the cell of the feature map that holds the marker in the image must be the cell where
``PointSetToMap`` (``splat: posed``) places that landmark of the normalised point cloud.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from posefr_dist.config import AugmentConfig, DataConfig, SynthConfig
from posefr_dist.data import pipeline as P
from posefr_dist.data import render as R
from posefr_dist.data import shards as S
from posefr_dist.data.synth import synthesize
from posefr_dist.model.pointnet2 import PointNet2Encoder, PointSetToMap, POINTNET2_SPECS, project_points_to_image

MARKER = np.array([1.0, 0.0, 1.0], np.float32)  # magenta albedo; everything else black
TOL_PX = 2.0


@pytest.fixture(scope="module")
def head():
    ident = R.sample_identity(np.random.default_rng([0, 2, 7]))
    return R.HeadSurface(ident)


def _landmarks(surf: R.HeadSurface) -> dict[str, np.ndarray]:
    """Head-frame positions of a few landmarks, taken from the render grid itself."""
    pos, dirs = surf.table[:, 0:3], surf.table[:, 9:12]
    f = R._features(surf.ident, surf.expression)

    def along(lat: float, lon: float) -> np.ndarray:
        d = np.array([math.cos(lat) * math.sin(lon), math.sin(lat), math.cos(lat) * math.cos(lon)])
        return pos[np.argmax(dirs @ d)]

    out = {"nose": pos[np.argmax(pos[:, 2])]}
    for side, name in ((1.0, "+"), (-1.0, "-")):
        out["eye" + name] = along(f["eye"], side * surf.ident.eye_sep)
        out["ear" + name] = along(f["eye"] - 0.05, side * 1.72)
    return out


def _render_marker(surf: R.HeadSurface, p: np.ndarray, yaw: float, pitch: float, size: int,
                   monkeypatch) -> np.ndarray:
    """``surf`` rendered black on black with a magenta marker (radius 0.04) around the head point ``p``."""
    table = surf.table.copy()
    near = np.linalg.norm(table[:, 0:3] - p, axis=1) < 0.04
    table[:, 6:9] = 0.0
    table[near, 6:9] = MARKER
    marked = R.HeadSurface.__new__(R.HeadSurface)
    marked.__dict__.update(surf.__dict__)
    marked.table = table
    monkeypatch.setattr(R, "_background", lambda rng, n: np.zeros((n, n, 3), np.float32))
    return R.render(marked, yaw, pitch, np.random.default_rng(0), size=size, noise=0)


def _marker_at(img_hwc: np.ndarray) -> tuple[float, float, int]:
    """Continuous (x, y) of the marker (mean of its pixels + 1/2) and its pixel count."""
    img = img_hwc.astype(np.int32)
    # the marker is magenta (red minus green = its shading); black albedo gives equal red and green
    ys, xs = np.nonzero(img[..., 0] - img[..., 1] > 30)
    if len(xs) == 0:
        return math.nan, math.nan, 0
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5), len(xs)


def _marker_pixel(surf, p, yaw, pitch, size, monkeypatch) -> tuple[float, float, int]:
    return _marker_at(_render_marker(surf, p, yaw, pitch, size, monkeypatch))


def _model_cell(module: PointSetToMap, q: np.ndarray, yaw: float, pitch: float) -> int:
    """The cell (row-major index) whose splat kernel peaks at the normalised point ``q``."""
    xyz = torch.as_tensor(q, dtype=torch.float32).reshape(1, 1, 3)
    pos, _ = module.place(xyz, torch.tensor([yaw]), torch.tensor([pitch]))
    d2 = ((module.cells[:, None, :] - pos[0][None]) ** 2).sum(-1)  # [H*W, 1]
    return int(d2[:, 0].argmin())


def _cases():
    for yaw in (0.0, 30.0, -30.0, 60.0, -60.0, 90.0, -90.0):
        for pitch in (0.0, 15.0, -15.0):
            near = "+" if yaw >= 0 else "-"
            names = ["nose"]
            if abs(yaw) <= 60:
                names.append("eye" + near)
            if abs(yaw) >= 60:
                names.append("ear" + near)
            for name in names:
                yield yaw, pitch, name


@pytest.mark.parametrize("size, map_size", [(64, 4), (112, 7), (112, 4)])
def test_posed_splat_puts_landmarks_where_the_renderer_draws_them(head, size, map_size, monkeypatch):
    centre, radius = head.frame
    cloud = R.sample_face_points(head.ident, head.expression, 2048, seed=1)
    module = PointSetToMap(8, 8, 8, map_size, splat="posed")
    cell_px = size / map_size
    checked = 0
    for (yaw, pitch, name), p in ((c, _landmarks(head)[c[2]]) for c in _cases()):
        q = ((p - centre) / radius).astype(np.float32)
        # the landmark is a point of the normalised cloud (same frame as the sampled points)
        assert np.linalg.norm(cloud - q, axis=1).min() < 0.05, name
        mx, my, count = _marker_pixel(head, p, yaw, pitch, size, monkeypatch)
        assert count >= 2, f"{name} not visible at yaw {yaw} pitch {pitch}"
        # the renderer draws the marker where project_to_image says (up to TOL_PX: at the silhouette
        # only part of the marker is visible, which moves its centre by up to its radius, ~2 px)
        px, py = R.project_to_image(q, yaw, pitch, size)
        assert abs(px - mx) < TOL_PX and abs(py - my) < TOL_PX, (name, yaw, pitch, (px, py), (mx, my))
        # ... and the model's splat peaks in the cell that holds the marker
        got = divmod(_model_cell(module, q, yaw, pitch), map_size)
        want = (int(my // cell_px), int(mx // cell_px))
        if min(abs(mx / cell_px - round(mx / cell_px)), abs(my / cell_px - round(my / cell_px))) * cell_px > TOL_PX:
            assert got == want, (name, yaw, pitch, got, want)
            checked += 1
        else:  # the marker sits on a cell border: either side will do
            assert abs(got[0] - want[0]) <= 1 and abs(got[1] - want[1]) <= 1, (name, yaw, pitch, got, want)
    assert checked >= 20


def test_frontal_splat_misplaces_a_profile_landmark(head, monkeypatch):
    """The ablation (canonical x-y plane) puts the nose tip and the near eye elsewhere at yaw 60."""
    centre, radius = head.frame
    size, map_size = 112, 7
    frontal = PointSetToMap(8, 8, 8, map_size, splat="frontal")
    posed = PointSetToMap(8, 8, 8, map_size, splat="posed")
    marks = _landmarks(head)
    for name in ("nose", "eye+"):
        q = ((marks[name] - centre) / radius).astype(np.float32)
        mx, my, count = _marker_pixel(head, marks[name], 60.0, 0.0, size, monkeypatch)
        assert count >= 2
        want = (int(my // (size / map_size)), int(mx // (size / map_size)))
        assert divmod(_model_cell(posed, q, 60.0, 0.0), map_size) == want
        assert divmod(_model_cell(frontal, q, 60.0, 0.0), map_size) != want


def test_project_points_to_image_matches_the_renderer():
    rng = np.random.default_rng(0)
    q = rng.uniform(-1, 1, (3, 50, 3)).astype(np.float32)
    poses = [(0.0, 0.0), (73.0, -12.0), (-95.0, 15.0)]
    px, py = project_points_to_image(torch.from_numpy(q), torch.tensor([p[0] for p in poses]),
                                     torch.tensor([p[1] for p in poses]), size=112)
    for b, (yaw, pitch) in enumerate(poses):
        ex, ey = R.project_to_image(q[b], yaw, pitch, 112)
        np.testing.assert_allclose(px[b].numpy(), ex, atol=1e-3)
        np.testing.assert_allclose(py[b].numpy(), ey, atol=1e-3)


def test_unknown_pose_is_frontal():
    torch.manual_seed(0)
    enc = PointNet2Encoder(POINTNET2_SPECS["pointnet2_tiny"], 16, 4, splat="posed").eval()
    pts = torch.randn(3, 128, 3) * 0.4
    nan = torch.full((3,), float("nan"))
    with torch.no_grad():
        at0 = enc(pts, yaw_deg=torch.zeros(3), pitch_deg=torch.zeros(3))
        assert torch.equal(enc(pts, yaw_deg=nan, pitch_deg=nan), at0)
        assert torch.equal(enc(pts), at0)
        # per row: a NaN row is the frontal row, a posed row differs
        mixed = enc(pts, yaw_deg=torch.tensor([float("nan"), 60.0, 0.0]),
                    pitch_deg=torch.tensor([0.0, 10.0, float("nan")]))
        assert torch.equal(mixed[0], at0[0]) and torch.equal(mixed[2], at0[2])
        assert not torch.allclose(mixed[1], at0[1])
        # frontal ignores the pose
        fr = PointNet2Encoder(POINTNET2_SPECS["pointnet2_tiny"], 16, 4, splat="frontal").eval()
        assert torch.equal(fr(pts, yaw_deg=torch.full((3,), 60.0)), fr(pts))


def test_front_only_masks_the_far_side():
    module = PointSetToMap(8, 8, 8, 4, splat="posed", front_only=True)
    # camera depths at yaw 0: 0.5, 0.4, 0.3 (the median), -0.5, -0.4
    xyz = torch.tensor([[[0.0, 0.0, 0.5], [0.0, 0.1, 0.4], [0.1, 0.0, 0.3], [0.5, 0.0, -0.5], [-0.5, 0.0, -0.4]]])
    w = module.cell_weights(xyz, torch.tensor([0.0]), torch.tensor([0.0]))
    assert torch.allclose(w.sum(-1), torch.ones(1, 16))
    assert (w[0, :, 3:] == 0).all() and (w[0, :, :3] > 0).all()
    # seen from behind, the other side (and the median point)
    w = module.cell_weights(xyz, torch.tensor([180.0]), torch.tensor([0.0]))
    assert (w[0, :, :2] == 0).all() and (w[0, :, 2:] > 0).all()
    # without front_only every point contributes
    assert (PointSetToMap(8, 8, 8, 4, splat="posed").cell_weights(xyz, None, None) > 0).all()


def test_flip_of_image_yaw_and_points_is_consistent_with_the_projection(head, monkeypatch):
    """augment_batch's flip (image mirrored, yaw negated, x of the points negated) keeps every point
    where the image shows it: the mirrored cloud at -yaw projects to the mirrored pixels."""
    size = 64
    centre, radius = head.frame
    q = R.sample_face_points(head.ident, head.expression, 256, seed=3)
    yaw, pitch = 50.0, -10.0
    img = _render_marker(head, _landmarks(head)["eye+"], yaw, pitch, size, monkeypatch)
    mx, my, count = _marker_at(img)
    assert count >= 2
    eye = ((_landmarks(head)["eye+"] - centre) / radius).astype(np.float32)
    pts = np.concatenate([q, eye[None]], 0)
    batch = {"sample_id": np.array(["x"]), "image": img.transpose(2, 0, 1)[None].copy(),
             "yaw_deg": np.array([yaw], np.float32), "pitch_deg": np.array([pitch], np.float32),
             "points": pts[None]}
    cfg = AugmentConfig(hflip_prob=1.0, color_jitter=0.0, scale=0.0, shift=0.0)
    out = P.augment_batch(batch, np.random.default_rng(0), cfg)
    assert out["yaw_deg"][0] == -yaw and out["pitch_deg"][0] == pitch
    px0, py0 = project_points_to_image(torch.from_numpy(pts[None]), torch.tensor([yaw]), torch.tensor([pitch]), size)
    px1, py1 = project_points_to_image(torch.from_numpy(np.ascontiguousarray(out["points"])),
                                       torch.from_numpy(out["yaw_deg"]), torch.tensor([pitch]), size)
    np.testing.assert_allclose(px1.numpy(), size - px0.numpy(), atol=1e-3)
    np.testing.assert_allclose(py1.numpy(), py0.numpy(), atol=1e-3)
    # the marker in the flipped image sits where the flipped eye point projects
    fx, fy, _ = _marker_at(((out["image"][0] + 1.0) * 127.5).round().transpose(1, 2, 0))
    assert abs(fx - (size - mx)) < 0.6 and abs(fy - my) < 0.6
    assert abs(fx - float(px1[0, -1])) < TOL_PX and abs(fy - float(py1[0, -1])) < TOL_PX
    # and the splat of the flipped sample is the mirrored splat
    module = PointSetToMap(8, 8, 8, 4, splat="posed")
    w0 = module.cell_weights(torch.from_numpy(pts[None]), torch.tensor([yaw]), torch.tensor([pitch]))
    w1 = module.cell_weights(torch.from_numpy(np.ascontiguousarray(out["points"])), torch.tensor([-yaw]),
                             torch.tensor([pitch]))
    torch.testing.assert_close(w1.reshape(4, 4, -1), w0.reshape(4, 4, -1).flip(1), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# pitch in the batch
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("splat") / "shards"
    synthesize(SynthConfig(identities=3, views_per_identity=3, image_size=32, points=32, rows_per_shard=16,
                           val_fraction=0.3, test_fraction=0.3), str(root), use_ray=False)
    return root


def _raw_table(root, split="train"):
    path = sorted((root / split).glob("*.parquet"))[0]
    return pq.read_table(path, columns=P.READ_COLUMNS), path


def test_decode_reads_pitch_and_checks_it(small_root):
    from posefr_dist.data.decode import decode_table

    table, path = _raw_table(small_root)
    n = table.num_rows
    kw = dict(files=[str(path)], file_idx=np.zeros(n, np.int64), row_idx=np.arange(n), gid=np.arange(n),
              expected_points=32, image_size=32, on_bad_row="error")
    out, bad = decode_table(table, **kw)
    want = np.asarray(table.column("pitch_deg").to_pylist(), np.float32)
    assert out["pitch_deg"].dtype == np.float32 and not bad
    np.testing.assert_array_equal(out["pitch_deg"], want)
    assert set(P.BATCH_COLUMNS) <= set(out)

    def with_pitch(i, value):
        vals = table.column("pitch_deg").to_pylist()
        vals[i] = value
        return table.set_column(table.column_names.index("pitch_deg"), "pitch_deg", pa.array(vals, pa.float32()))

    # null -> NaN (unknown)
    assert np.isnan(decode_table(with_pitch(1, None), **kw)[0]["pitch_deg"][1])
    # out of range -> an error naming file, row and field
    with pytest.raises(S.ShardError) as ei:
        decode_table(with_pitch(2, 120.0), **kw)
    msg = str(ei.value)
    assert str(path) in msg and "row 2 " in msg and "field pitch_deg" in msg


def test_pitch_reaches_the_torch_batch(small_root, ray_local):
    sd = P.build_dataset(str(small_root), "train", DataConfig(), training=False)
    want = {r["sample_id"]: r["pitch_deg"] for r in pq.read_table(sorted((small_root / "train").glob("*.parquet")))
            .select(["sample_id", "pitch_deg"]).to_pylist()}
    seen = 0
    for b in P.iter_epoch(sd.dataset, 4):
        assert isinstance(b["pitch_deg"], torch.Tensor) and b["pitch_deg"].dtype == torch.float32
        for sid, p in zip(b["sample_id"], b["pitch_deg"].tolist()):
            assert p == pytest.approx(want[sid]) and abs(p) <= 15.0
            seen += 1
    assert seen == len(want) > 0


def test_model_forward_lays_out_the_3d_rows_at_their_pose():
    from posefr_dist.model import create_model

    torch.manual_seed(0)
    model = create_model("jam-je/ir_tiny/pointnet2_tiny", num_classes=4, image_size=32, num_points=64,
                         embedding_dim=16).eval()
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.arange(4), "points": torch.randn(4, 64, 3) * 0.4,
             "has_points": torch.tensor([True, False, True, True]),
             "yaw_deg": torch.tensor([0.0, 45.0, -70.0, float("nan")]),
             "pitch_deg": torch.tensor([5.0, 0.0, -10.0, 0.0])}
    with torch.no_grad():
        out = model(batch)
        rows = torch.tensor([0, 2, 3])
        torch.testing.assert_close(out["emb_3d"], model.embed_3d(batch["points"][rows], batch["yaw_deg"][rows],
                                                                 batch["pitch_deg"][rows]))
        # the pose of a row without points plays no part; the pose of a 3D row does
        other = dict(batch, yaw_deg=torch.tensor([0.0, -20.0, -70.0, float("nan")]))
        torch.testing.assert_close(model(other)["emb_3d"], out["emb_3d"])
        moved = model(dict(batch, yaw_deg=torch.tensor([0.0, 45.0, 80.0, float("nan")])))["emb_3d"]
        torch.testing.assert_close(moved[[0, 2]], out["emb_3d"][[0, 2]])
        assert not torch.allclose(moved[1], out["emb_3d"][1])
        # without a pose (as eval/diagnose.py calls it) the 3D path is laid out frontally
        torch.testing.assert_close(model.embed_3d(batch["points"][rows]),
                                   model.embed_3d(batch["points"][rows], torch.zeros(3), torch.zeros(3)))
