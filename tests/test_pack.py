"""The raw shard form (decoded CHW uint8 images) and ``posefr shards pack``."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posefr_dist.cli import main
from posefr_dist.data import shards as S
from posefr_dist.data.pack import encode_raw_table, pack
from posefr_dist.data.schema import SHARD_COLUMNS
from posefr_dist.data.synth import synthesize
from tests.data_utils import copy_root, nan_points, rewrite_shard, set_cell, tiny_cfg

SIZE = 32


def small_cfg(**kw):
    return tiny_cfg(**{**dict(identities=4, views_per_identity=4, image_size=SIZE, points=16, rows_per_shard=4), **kw})


@pytest.fixture(scope="module")
def src_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pack-src") / "shards"
    synthesize(small_cfg(), str(root), use_ray=False)
    return root


@pytest.fixture(scope="module")
def packed(src_root, tmp_path_factory) -> tuple[Path, dict]:
    dst = tmp_path_factory.mktemp("pack-dst") / "raw"
    return dst, pack(str(src_root), str(dst))


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _first_train(root: Path) -> str:
    return _manifest(root)["splits"]["train"]["shards"][0]["path"]


def test_round_trip_images_columns_and_manifest(src_root, packed):
    dst, summary = packed
    src_man, man = _manifest(src_root), _manifest(dst)
    assert man["image_format"] == S.IMAGE_FORMAT_RAW and man["packed_from"] == str(src_root)
    assert S.image_format(man) == S.IMAGE_FORMAT_RAW and S.image_format(src_man) == S.IMAGE_FORMAT_ENCODED
    for key in ("schema_version", "dataset", "generator", "num_points", "image_size"):
        assert man[key] == src_man[key]
    assert summary["skipped"] == 0 and summary["skipped_rows"] == []
    assert summary["rows"] == sum(s["rows"] for s in src_man["splits"].values())
    assert summary["bytes_before"] > 0 and summary["bytes_after"] > 0
    rows_checked = 0
    for split, info in src_man["splits"].items():
        out = man["splits"][split]
        assert out["rows"] == info["rows"] == summary["splits"][split]["rows"]
        assert out["identities"] == info["identities"]
        assert [e["path"] for e in out["shards"]] == [e["path"] for e in info["shards"]]
        for se, de in zip(info["shards"], out["shards"]):
            data = (dst / de["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == de["sha256"] and len(data) == de["bytes"]
            src, raw = pq.read_table(src_root / se["path"]), pq.read_table(dst / de["path"])
            assert de["rows"] == raw.num_rows == src.num_rows
            assert raw.schema.names == list(SHARD_COLUMNS)
            assert raw.schema.field("image").type == pa.binary(3 * SIZE * SIZE) == S.raw_image_type(SIZE)
            assert pa.types.is_fixed_size_binary(raw.schema.field("image").type)
            for c in SHARD_COLUMNS:
                if c != "image":
                    assert raw.column(c).equals(src.column(c)), c
                    assert raw.schema.field(c) == src.schema.field(c), c
            for i in range(raw.num_rows):
                want = S.decode_image(src.column("image")[i].as_py())
                got = np.frombuffer(raw.column("image")[i].as_py(), np.uint8)
                np.testing.assert_array_equal(got, want.transpose(2, 0, 1).reshape(-1))
                np.testing.assert_array_equal(S.image_hwc(raw.column("image")[i], SIZE, raw=True), want)
                rows_checked += 1
            # zstd on every column (nested ones included), row groups of 64; the image is one
            # FIXED_LEN_BYTE_ARRAY value per row (not a list of 3*H*W uint8 leaves)
            md = pq.ParquetFile(dst / de["path"]).metadata
            leaf = md.schema.column(md.schema.names.index("image"))
            assert leaf.physical_type == "FIXED_LEN_BYTE_ARRAY" and leaf.max_repetition_level == 0
            assert {md.row_group(0).column(j).compression for j in range(md.num_columns)} == {"ZSTD"}
            assert md.row_group(0).num_rows == min(64, raw.num_rows)
    assert rows_checked == summary["rows"]


def test_pack_is_deterministic(src_root, packed, tmp_path):
    again = tmp_path / "again"
    pack(str(src_root), str(again))
    assert _manifest(again) == _manifest(packed[0])
    for p in packed[0].rglob("*.parquet"):
        assert (again / p.relative_to(packed[0])).read_bytes() == p.read_bytes()
    big = pa.concat_tables([pq.read_table(p) for p in sorted(packed[0].rglob("*.parquet"))] * 5)  # > 64 rows
    md = pq.ParquetFile(pa.BufferReader(encode_raw_table(big))).metadata
    assert md.num_row_groups == -(-big.num_rows // 64) and md.row_group(0).num_rows == 64


def test_packed_root_validates_and_inspects(packed, tmp_path):
    dst, _ = packed
    problems, summary = S.validate(str(dst))
    assert problems == []
    assert summary["image_format"] == S.IMAGE_FORMAT_RAW
    sheet = tmp_path / "sheet.png"
    out = S.inspect(str(dst), str(sheet))
    assert out["image_format"] == S.IMAGE_FORMAT_RAW
    from PIL import Image

    assert Image.open(sheet).size[1] == 4 * SIZE


def test_image_hwc_both_forms():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    np.testing.assert_array_equal(S.image_hwc(buf.getvalue()), img)
    np.testing.assert_array_equal(S.image_hwc(pa.scalar(buf.getvalue(), pa.binary())), img)
    chw = img.transpose(2, 0, 1).reshape(-1)
    np.testing.assert_array_equal(S.image_hwc(chw, SIZE, raw=True), img)
    np.testing.assert_array_equal(S.image_hwc(chw.tolist(), SIZE, raw=True), img)
    # a raw cell is bytes too (fixed_size_binary): the flag, not the Python type, says which form
    np.testing.assert_array_equal(S.image_hwc(chw.tobytes(), SIZE, raw=True), img)
    np.testing.assert_array_equal(S.image_hwc(pa.scalar(chw.tobytes(), S.raw_image_type(SIZE)), SIZE, raw=True), img)
    with pytest.raises(ValueError, match="does not decode"):
        S.image_hwc(chw.tobytes(), SIZE)  # raw bytes read as PNG
    with pytest.raises(ValueError, match=f"{3 * SIZE * SIZE - 1} values, expected 3"):
        S.image_hwc(chw[:-1], SIZE, raw=True)
    with pytest.raises(ValueError, match=f"{3 * SIZE * SIZE - 1} bytes, expected 3\\*{SIZE}\\*{SIZE} = {3 * SIZE * SIZE}"):
        S.image_hwc(chw[:-1].tobytes(), SIZE, raw=True)
    with pytest.raises(ValueError, match="image size"):
        S.image_hwc(chw.tobytes(), raw=True)
    with pytest.raises(ValueError, match="missing"):
        S.image_hwc(None, SIZE, raw=True)
    with pytest.raises(ValueError, match="missing"):
        S.image_hwc(pa.scalar(None, S.raw_image_type(SIZE)), SIZE, raw=True)


# a bad row in the source: (edit, row, field, reason)
BAD = {
    "image": (lambda t: set_cell(t, "image", 2, b"\x89PNG\r\n\x1a\nnot really"), 2, "image", "does not decode"),
    "nan": (lambda t: nan_points(t, 1), 1, "points", "non-finite"),
    "yaw": (lambda t: set_cell(t, "yaw_deg", 3, 400.0), 3, "yaw_deg", "out of range"),
    "label": (lambda t: set_cell(t, "label", 0, -1), 0, "label", "negative"),
    "size": (lambda t: set_cell(t, "image", 1, _png(SIZE + 8)), 1, "image", f"expected {SIZE}x{SIZE}"),
}


def _png(size: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_row_error_names_file_row_field(src_root, tmp_path, name):
    edit, row, field, reason = BAD[name]
    root = copy_root(src_root, tmp_path / "src")
    rel = _first_train(root)
    rewrite_shard(root, rel, edit)
    with pytest.raises(S.ShardError) as ei:
        pack(str(root), str(tmp_path / "dst"), on_bad_row="error")
    e = ei.value
    assert e.file == str(root / rel) and e.row == row and e.field == field and reason in e.reason
    assert rel in str(e) and f"row {row}" in str(e) and field in str(e)
    assert not (tmp_path / "dst" / "manifest.json").exists()


@pytest.mark.parametrize("name", ["image", "nan", "yaw"])
def test_bad_row_skip_drops_and_counts(src_root, tmp_path, name):
    edit, row, field, reason = BAD[name]
    root = copy_root(src_root, tmp_path / "src")
    rel = _first_train(root)
    rewrite_shard(root, rel, edit)
    dst = tmp_path / "dst"
    summary = pack(str(root), str(dst), on_bad_row="skip")
    src_man, man = _manifest(root), _manifest(dst)
    assert summary["skipped"] == 1 and summary["splits"]["train"]["skipped"] == 1
    assert summary["splits"]["val"]["skipped"] == summary["splits"]["test"]["skipped"] == 0
    (rec,) = summary["skipped_rows"]
    assert rec["split"] == "train" and rec["file"] == str(root / rel) and rec["row"] == row
    assert rec["field"] == field and reason in rec["reason"]
    assert man["splits"]["train"]["rows"] == src_man["splits"]["train"]["rows"] - 1
    entry = man["splits"]["train"]["shards"][0]
    assert entry["path"] == rel and entry["rows"] == src_man["splits"]["train"]["shards"][0]["rows"] - 1
    assert hashlib.sha256((dst / rel).read_bytes()).hexdigest() == entry["sha256"]
    dropped = pq.read_table(root / rel).column("sample_id")[row].as_py()
    assert dropped not in pq.read_table(dst / rel).column("sample_id").to_pylist()
    problems, _ = S.validate(str(dst))
    assert problems == []


def test_rows_per_shard_recuts(src_root, tmp_path):
    dst = tmp_path / "dst"
    summary = pack(str(src_root), str(dst), rows_per_shard=5)
    src_man, man = _manifest(src_root), _manifest(dst)
    for split, info in man["splits"].items():
        assert info["rows"] == src_man["splits"][split]["rows"]
        sizes = [e["rows"] for e in info["shards"]]
        assert all(n == 5 for n in sizes[:-1]) and 0 < sizes[-1] <= 5
        assert [e["path"] for e in info["shards"]] == [f"{split}/part-{k:05d}.parquet" for k in range(len(sizes))]
    want = pq.read_table(sorted((src_root / "train").glob("*.parquet"))).column("sample_id").to_pylist()
    got = pq.read_table(sorted((dst / "train").glob("*.parquet"))).column("sample_id").to_pylist()
    assert got == want and summary["skipped"] == 0
    assert S.validate(str(dst))[0] == []


def _schema_problem(root: Path, rel: str) -> S.Problem:
    problems, _ = S.validate(str(root))
    # (the file's rows are not read, so the split's labels also look non-dense in manifest.json)
    mine = [p for p in problems if p.file != str(root / "manifest.json")]
    assert len(mine) == 1, problems
    p = mine[0]
    assert p.file == str(root / rel) and p.field == "image" and p.row is None
    return p


def test_validate_raw_wrong_width(packed, tmp_path):
    """A fixed_size_binary of another width (another image size) is a schema problem."""
    root = copy_root(packed[0], tmp_path / "raw")
    rel = _first_train(root)
    n = 3 * (SIZE - 1) * (SIZE - 1)

    def shorten(t: pa.Table) -> pa.Table:
        col = pa.array([t.column("image")[i].as_py()[:n] for i in range(t.num_rows)], pa.binary(n))
        i = t.column_names.index("image")
        return t.set_column(i, pa.field("image", col.type, nullable=False), col)

    rewrite_shard(root, rel, shorten)
    p = _schema_problem(root, rel)
    assert f"type fixed_size_binary[{n}]" in p.reason
    assert f"expected fixed_size_binary[{3 * SIZE * SIZE}]" in p.reason and "raw-chw-uint8" in p.reason


def test_validate_raw_old_list_form(packed, tmp_path):
    """The fixed_size_list<uint8> column of an older pack is a schema problem that says so."""
    root = copy_root(packed[0], tmp_path / "raw")
    rel = _first_train(root)

    def to_list(t: pa.Table) -> pa.Table:
        flat = np.frombuffer(b"".join(t.column("image").to_pylist()), np.uint8)
        col = pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.uint8()), 3 * SIZE * SIZE)
        i = t.column_names.index("image")
        return t.set_column(i, pa.field("image", col.type, nullable=False), col)

    rewrite_shard(root, rel, to_list)
    p = _schema_problem(root, rel)
    assert f"expected fixed_size_binary[{3 * SIZE * SIZE}]" in p.reason and "pack the source again" in p.reason


def test_validate_raw_null_image_row(packed, tmp_path):
    root = copy_root(packed[0], tmp_path / "raw")
    rel = _first_train(root)
    # a nullable raw column with two null rows (the writer never makes one; a foreign tool might)
    def nulls(t: pa.Table) -> pa.Table:
        rows = t.column("image").to_pylist()
        rows[2] = rows[3] = None
        i = t.column_names.index("image")
        typ = S.raw_image_type(SIZE)
        return t.set_column(i, pa.field("image", typ, nullable=True), pa.array(rows, typ))

    rewrite_shard(root, rel, nulls)
    problems, _ = S.validate(str(root))
    assert [(p.file, p.row, p.field, p.reason) for p in problems] == [
        (str(root / rel), 2, "image", "null"), (str(root / rel), 3, "image", "null")]


def test_validate_encoded_manifest_with_raw_shard(packed, tmp_path):
    """A raw shard under a manifest without image_format (the encoded form) is a schema problem."""
    root = copy_root(packed[0], tmp_path / "raw")
    man = _manifest(root)
    del man["image_format"]
    (root / "manifest.json").write_text(json.dumps(man))
    problems, _ = S.validate(str(root))
    assert problems and all(p.field == "image" and p.row is None for p in problems)
    assert "a raw shard?" in problems[0].reason and f"fixed_size_binary[{3 * SIZE * SIZE}]" in problems[0].reason


def _decode_raw(t: pa.Table):
    from posefr_dist.data.decode import RAW, decode_table

    n = t.num_rows
    return decode_table(t, files=["f.parquet"], file_idx=np.zeros(n, np.int64), row_idx=np.arange(n),
                        gid=np.arange(n), expected_points=16, image_size=SIZE, image_format=RAW, on_bad_row="skip")


def test_decode_table_raw_images(packed, src_root):
    """The raw branch of decode_table: CHW images from the fixed_size_binary buffer, at any offset
    (a slice, several chunks); null rows and a column of another type are flagged."""
    rel = _first_train(packed[0])
    raw, src = pq.read_table(packed[0] / rel), pq.read_table(src_root / rel)
    want = np.stack([S.decode_image(v).transpose(2, 0, 1) for v in src.column("image").to_pylist()])
    out, bad = _decode_raw(raw)
    assert bad == [] and out["valid"].all()
    assert out["image"].dtype == np.uint8 and out["image"].shape == (raw.num_rows, 3, SIZE, SIZE)
    np.testing.assert_array_equal(out["image"], want)
    # a slice (non-zero offset) and a multi-chunk column (combined into one array) read the right rows
    out, bad = _decode_raw(raw.slice(1, 2))
    assert bad == [] and out["valid"].all()
    np.testing.assert_array_equal(out["image"], want[1:3])
    batch = raw.combine_chunks().to_batches()[0].slice(1, 2)  # a RecordBatch keeps the offset
    assert batch.column(raw.column_names.index("image")).offset == 1
    out, bad = _decode_raw(batch)
    assert bad == [] and out["valid"].all()
    np.testing.assert_array_equal(out["image"], want[1:3])
    out, bad = _decode_raw(pa.concat_tables([raw.slice(2), raw.slice(0, 2)]))
    assert bad == []
    np.testing.assert_array_equal(out["image"], np.concatenate([want[2:], want[:2]]))
    # null rows: flagged "missing image" and zero-filled, the others intact
    rows = raw.column("image").to_pylist()
    rows[1] = None
    i = raw.column_names.index("image")
    typ = S.raw_image_type(SIZE)
    nulls = raw.set_column(i, pa.field("image", typ, nullable=True), pa.array(rows, typ))
    out, bad = _decode_raw(nulls)
    assert [(b[2], b[3]) for b in bad] == [("image", "missing image")] and bad[0][1].startswith("1 ")
    assert out["valid"].tolist() == [j != 1 for j in range(raw.num_rows)]
    assert not out["image"][1].any()
    np.testing.assert_array_equal(out["image"][out["valid"]], want[out["valid"]])
    # another width: every row flagged, naming the expected type
    m = 3 * (SIZE - 1) * (SIZE - 1)
    col = pa.array([r[:m] for r in raw.column("image").to_pylist()], pa.binary(m))
    out, bad = _decode_raw(raw.set_column(i, pa.field("image", col.type), col))
    assert len(bad) == raw.num_rows and not out["valid"].any()
    assert all(b[2] == "image" and f"expected fixed_size_binary[{3 * SIZE * SIZE}]" in b[3] for b in bad)


def test_unknown_image_format_rejected(packed, tmp_path):
    root = copy_root(packed[0], tmp_path / "raw")
    man = _manifest(root)
    man["image_format"] = "raw-hwc-float16"
    (root / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(S.ShardError) as ei:
        S.image_format(man)
    assert ei.value.field == "image_format" and ei.value.file == "manifest.json"
    with pytest.raises(S.ShardError) as ei:
        S.read_manifest(str(root))
    assert ei.value.file == str(root / "manifest.json") and "raw-hwc-float16" in str(ei.value)
    problems, _ = S.validate(str(root))
    assert [(p.file, p.field) for p in problems] == [(str(root / "manifest.json"), "image_format")]
    with pytest.raises(S.ShardError, match="image_format"):
        pack(str(root), str(tmp_path / "again"))


def test_pack_refuses_raw_source_and_same_root(packed, src_root, tmp_path):
    with pytest.raises(S.ShardError, match="already raw-chw-uint8"):
        pack(str(packed[0]), str(tmp_path / "again"))
    with pytest.raises(ValueError, match="same root"):
        pack(str(src_root), str(src_root))
    with pytest.raises(ValueError, match="on_bad_row"):
        pack(str(src_root), str(tmp_path / "x"), on_bad_row="ignore")


def test_cli_pack(src_root, tmp_path, capsys):
    root = copy_root(src_root, tmp_path / "src")
    rel = _first_train(root)
    rewrite_shard(root, rel, BAD["nan"][0])
    dst = tmp_path / "dst"
    assert main(["shards", "pack", str(root), str(dst)]) == 1
    err = capsys.readouterr().err
    assert rel in err and "row 1" in err and "points" in err
    assert main(["shards", "pack", str(root), str(dst), "--on-bad-row", "skip"]) == 0
    out, err = capsys.readouterr()
    total = sum(s["rows"] for s in _manifest(root)["splits"].values())
    assert f"packed {total - 1} rows" in out and "skipped 1" in out and "MB ->" in out
    assert f"{root / rel}\trow 1\tpoints\t" in err
    assert main(["shards", "validate", str(dst)]) == 0


def test_pack_s3_to_s3(src_root, s3_uri):
    from posefr_dist import storage

    src, dst = storage.join(s3_uri, "src"), storage.join(s3_uri, "raw")
    storage.upload_dir(str(src_root), src)
    summary = pack(src, dst)
    assert summary["rows"] == sum(s["rows"] for s in _manifest(src_root)["splits"].values())
    man = S.read_manifest(dst)
    assert S.image_format(man) == S.IMAGE_FORMAT_RAW and man["packed_from"] == src
    assert S.validate(dst)[0] == []
