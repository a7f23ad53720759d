"""Reading embeddings for verification (tables, Parquet files and folders, S3), clear errors on
malformed input, and the report files."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posefr_dist.data.schema import embedding_schema
from posefr_dist.eval import (ALL, EmbeddingsError, load_embeddings, run_verify, verify_arrays,
                              verify_source, write_report)

FARS = (0.1, 0.01, 0.001)


def make_arrays(seed=0, subjects=40, per=6, dim=16):
    rng = np.random.default_rng(seed)
    n = subjects * per
    subj = np.repeat(np.arange(subjects), per)
    emb = (rng.normal(size=(subjects, dim))[subj] + rng.normal(size=(n, dim))).astype(np.float32)
    yaw = rng.uniform(-110, 110, n).astype(np.float32)
    enr = np.zeros(n, dtype=bool)
    enr[::per] = True
    yaw[enr] = 0.0
    return emb, np.array([f"id{i:03d}" for i in subj]), yaw, enr


def make_table(emb, subj, yaw, enr, null_yaw=()) -> pa.Table:
    n, dim = emb.shape
    yaw_list = [None if i in null_yaw else float(y) for i, y in enumerate(yaw)]
    return pa.table({
        "sample_id": pa.array([f"x{i:05d}" for i in range(n)], pa.string()),
        "subject_id": pa.array(subj.tolist(), pa.string()),
        "yaw_deg": pa.array(yaw_list, pa.float32()),
        "enrollment": pa.array(enr.tolist(), pa.bool_()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float32()), dim),
    }, schema=embedding_schema(dim))


def bins_only(report):
    return report["bins"]


def test_table_file_and_folder_give_the_arrays_result(tmp_path):
    emb, subj, yaw, enr = make_arrays()
    table = make_table(emb, subj, yaw, enr, null_yaw={7, 8})
    yaw_nan = yaw.astype(np.float64)
    yaw_nan[[7, 8]] = np.nan
    want = bins_only(verify_arrays(emb, subj, yaw_nan, enr, FARS))
    assert "unknown-pose" in want

    assert bins_only(verify_source(table, FARS)) == want
    one = tmp_path / "emb.parquet"
    pq.write_table(table, one)
    assert bins_only(verify_source(str(one), FARS)) == want
    folder = tmp_path / "embeddings"
    (folder / "sub").mkdir(parents=True)
    pq.write_table(table.slice(0, 100), folder / "part-00000.parquet")
    pq.write_table(table.slice(100, 50), folder / "part-00001.parquet")
    pq.write_table(table.slice(150), folder / "sub" / "part-00002.parquet")
    (folder / "_SUCCESS").write_text("")
    pq.write_table(table.slice(0, 3), folder / ".part-00003.parquet.tmp.parquet")  # hidden: skipped
    assert bins_only(verify_source(str(folder), FARS)) == want
    assert bins_only(verify_source(f"file://{folder}", FARS)) == want


def test_variable_length_lists_are_accepted_when_consistent():
    emb, subj, yaw, enr = make_arrays(dim=8)
    t = make_table(emb, subj, yaw, enr)
    t = t.set_column(4, "embedding", pa.array(emb.tolist(), pa.list_(pa.float64())))
    assert load_embeddings(t).dim == 8


def _write(tmp_path, table, name="bad.parquet"):
    path = tmp_path / name
    pq.write_table(table, path)
    return str(path)


def test_missing_column_names_file_and_column(tmp_path):
    emb, subj, yaw, enr = make_arrays()
    path = _write(tmp_path, make_table(emb, subj, yaw, enr).drop_columns(["enrollment"]))
    with pytest.raises(EmbeddingsError, match=r"bad\.parquet: missing column\(s\) \['enrollment'\]"):
        load_embeddings(path)


def test_wrong_dimension_names_row(tmp_path):
    emb, subj, yaw, enr = make_arrays(dim=8)
    rows = emb.tolist()
    rows[13] = rows[13][:7]
    t = make_table(emb, subj, yaw, enr).set_column(4, "embedding", pa.array(rows, pa.list_(pa.float32())))
    path = _write(tmp_path, t)
    with pytest.raises(EmbeddingsError, match=r"bad\.parquet: row 13: field 'embedding': 7 values, expected 8"):
        load_embeddings(path)


def test_dimension_differs_between_files(tmp_path):
    a = make_arrays(dim=8)
    b = make_arrays(seed=1, dim=12)
    folder = tmp_path / "f"
    folder.mkdir()
    pq.write_table(make_table(*a), folder / "part-00000.parquet")
    t = make_table(*b)
    t = t.set_column(0, "sample_id", pa.array([f"y{i}" for i in range(t.num_rows)], pa.string()))
    pq.write_table(t, folder / "part-00001.parquet")
    with pytest.raises(EmbeddingsError, match=r"part-00001\.parquet: row 0: field 'embedding': 12 values, expected 8"):
        load_embeddings(str(folder))


def test_nan_and_inf_and_zero_name_row(tmp_path):
    emb, subj, yaw, enr = make_arrays()
    bad = emb.copy()
    bad[21, 3] = np.nan
    with pytest.raises(EmbeddingsError, match=r"bad\.parquet: row 21: field 'embedding': value nan at index 3"):
        load_embeddings(_write(tmp_path, make_table(bad, subj, yaw, enr)))
    bad = emb.copy()
    bad[5, 0] = np.inf
    with pytest.raises(EmbeddingsError, match=r"row 5: field 'embedding': value inf"):
        load_embeddings(make_table(bad, subj, yaw, enr))
    bad = emb.copy()
    bad[9] = 0
    with pytest.raises(EmbeddingsError, match=r"row 9: field 'embedding': all-zero"):
        load_embeddings(make_table(bad, subj, yaw, enr))


def test_nulls_name_row_and_field(tmp_path):
    emb, subj, yaw, enr = make_arrays()
    t = make_table(emb, subj, yaw, enr)
    s = subj.tolist()
    s[17] = None
    t2 = t.set_column(1, pa.field("subject_id", pa.string()), pa.array(s, pa.string()))
    with pytest.raises(EmbeddingsError, match=r"bad\.parquet: row 17: field 'subject_id': null"):
        load_embeddings(_write(tmp_path, t2))
    rows = emb.tolist()
    rows[4] = None
    t3 = t.set_column(4, pa.field("embedding", pa.list_(pa.float32(), emb.shape[1])),
                      pa.array(rows, pa.list_(pa.float32(), emb.shape[1])))
    with pytest.raises(EmbeddingsError, match=r"row 4: field 'embedding': null"):
        load_embeddings(t3)
    y = yaw.astype(np.float64).tolist()
    y[2] = float("nan")
    t4 = t.set_column(2, pa.field("yaw_deg", pa.float32()), pa.array(y, pa.float32()))
    with pytest.raises(EmbeddingsError, match=r"row 2: field 'yaw_deg'.*null for an unknown pose"):
        load_embeddings(t4)


def test_duplicate_sample_id_and_missing_split(tmp_path):
    emb, subj, yaw, enr = make_arrays()
    t = make_table(emb, subj, yaw, enr)
    ids = t.column("sample_id").to_pylist()
    ids[30] = ids[2]
    with pytest.raises(EmbeddingsError, match=r"duplicate sample_id 'x00002' at <table> row 2 and <table> row 30"):
        load_embeddings(t.set_column(0, pa.field("sample_id", pa.string()), pa.array(ids, pa.string())))
    with pytest.raises(EmbeddingsError, match="no gallery rows"):
        load_embeddings(make_table(emb, subj, yaw, np.zeros_like(enr)))
    with pytest.raises(EmbeddingsError, match="no probe rows"):
        load_embeddings(make_table(emb, subj, yaw, np.ones_like(enr)))
    with pytest.raises(EmbeddingsError, match="no such file"):
        load_embeddings(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmbeddingsError, match="no Parquet files"):
        load_embeddings(str(tmp_path / "empty"))


def test_wrong_types_are_named():
    emb, subj, yaw, enr = make_arrays()
    t = make_table(emb, subj, yaw, enr)
    t2 = t.set_column(3, pa.field("enrollment", pa.int8()), pa.array(enr.astype(np.int8)))
    with pytest.raises(EmbeddingsError, match=r"field 'enrollment': type int8, expected bool"):
        load_embeddings(t2)
    t3 = t.set_column(4, pa.field("embedding", pa.string()), pa.array(["x"] * t.num_rows))
    with pytest.raises(EmbeddingsError, match=r"field 'embedding': type string"):
        load_embeddings(t3)


def test_run_verify_writes_a_parseable_report(tmp_path):
    emb, subj, yaw, enr = make_arrays(subjects=60)
    src = tmp_path / "emb.parquet"
    pq.write_table(make_table(emb, subj, yaw, enr, null_yaw={3}), src)
    out = tmp_path / "out" / "verify"
    report = run_verify(str(src), str(out), fars=FARS, yaw_edges=(0, 30, 60, 90), block_size=16,
                        use_ray=False)
    assert sorted(os.listdir(out)) == ["report.json", "report.md", "roc.png", "tar_vs_yaw.png"]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert set(on_disk) == {"protocol", "bins"}
    assert list(on_disk["bins"]) == ["0-30", "30-60", "60-90", "90+", "unknown-pose", ALL]
    for b in on_disk["bins"].values():
        for field in ("probes", "genuine", "impostor", "tar_at_far", "threshold_at_far", "achieved_far",
                      "eer", "auc", "tar_at_global_threshold", "far_below_resolution"):
            assert field in b
        assert list(b["tar_at_far"]) == ["0.1", "0.01", "0.001"]
    p = on_disk["protocol"]
    assert p["fars"] == list(FARS) and p["yaw_edges"] == [0, 30, 60, 90] and p["block_size"] == 16
    md = (out / "report.md").read_text()
    assert "| bin | probes |" in md and "TAR@0.01" in md and "| all |" in md
    for png in ("roc.png", "tar_vs_yaw.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # rewriting replaces the files in place and leaves no temporary file behind
    write_report(report, str(out))
    assert sorted(os.listdir(out)) == ["report.json", "report.md", "roc.png", "tar_vs_yaw.png"]


def test_report_with_empty_bins_renders(tmp_path):
    emb, subj, yaw, enr = make_arrays()
    report = verify_arrays(emb, subj, np.clip(yaw, -20, 20), enr, (0.1, 1e-6))
    paths = write_report(report, str(tmp_path))
    md = open(paths["report.md"]).read()
    assert "n/a (FAR < 1/N)" in md and "| 90+ | 0 | 0 | 0 |" in md
    json.loads(open(paths["report.json"]).read())


def test_reads_from_s3(s3_uri):
    from posefr_dist import storage

    emb, subj, yaw, enr = make_arrays(seed=4)
    table = make_table(emb, subj, yaw, enr)
    buf = io.BytesIO()
    pq.write_table(table.slice(0, 120), buf)
    storage.write_bytes(storage.join(s3_uri, "part-00000.parquet"), buf.getvalue())
    buf = io.BytesIO()
    pq.write_table(table.slice(120), buf)
    storage.write_bytes(storage.join(s3_uri, "part-00001.parquet"), buf.getvalue())
    got = verify_source(s3_uri, FARS)
    assert got["bins"] == verify_source(table, FARS)["bins"]
    assert got["protocol"]["source"] == s3_uri
