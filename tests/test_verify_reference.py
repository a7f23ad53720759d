"""``posefr verify`` against an independent reference written from DESIGN.md ("Verification
protocol (exact)") with plain NumPy on the raw embedding vectors: no posefr_dist scoring, binning
or threshold code is used to compute the expected figures.

The protocol, as the reference spells it out:

- gallery = rows with ``enrollment = true``, probes = the others; every probe against every
  gallery row; score = cosine similarity; genuine iff the subject ids are equal;
- bins by the probe's |yaw|, left-closed on the edges 0, 30, 60, 90 (``0-30``, ``30-60``,
  ``60-90``, ``90+``); a null yaw goes to ``unknown-pose``; ``all`` holds every probe;
- per bin and target FAR: N impostor scores, k = floor(FAR * N); the threshold t is the (k+1)-th
  largest impostor score; TAR = share of genuine scores > t (strictly); achieved FAR = share of
  impostor scores > t; k = 0 (FAR < 1/N) is "below resolution": TAR, t and achieved FAR null;
- the ``all`` bin's threshold applied to each bin gives ``tar_at_global_threshold`` and
  ``far_at_global_threshold``.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posefr_dist.cli import main as posefr_main
from posefr_dist.data.schema import embedding_schema

EDGES = (0.0, 30.0, 60.0, 90.0)
BIN_NAMES = ("0-30", "30-60", "60-90", "90+")
FARS = (0.5, 0.3, 0.1, 0.05, 0.02)


# --------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------


def ref_bin(abs_yaw: float) -> str:
    """The bin of one probe: the last edge at or below |yaw| (left-closed); NaN: unknown-pose."""
    if math.isnan(abs_yaw):
        return "unknown-pose"
    name = None
    for lo, n in zip(EDGES, BIN_NAMES):
        if abs_yaw >= lo:
            name = n
    return name


def ref_point(gen: np.ndarray, imp: np.ndarray, far: float) -> dict:
    """TAR at FAR on scores, by the protocol's rule (FAR read as the decimal it is written as)."""
    n = imp.size
    k = math.floor(Fraction(repr(far)) * n)
    if n == 0 or k == 0:
        return {"k": k, "t": None, "tar": None, "achieved": None, "below": True}
    desc = sorted(imp.tolist(), reverse=True)
    t = desc[k]  # the (k+1)-th largest
    tar = sum(1 for g in gen.tolist() if g > t) / gen.size if gen.size else None
    achieved = sum(1 for i in imp.tolist() if i > t) / n
    return {"k": k, "t": t, "tar": tar, "achieved": achieved, "below": False}


def reference(emb: np.ndarray, subj: np.ndarray, yaw: np.ndarray, enr: np.ndarray, fars=FARS) -> dict:
    """Expected figures per bin, from the raw (unnormalised) vectors, in float64."""
    x = emb.astype(np.float64)
    unit = x / np.sqrt((x * x).sum(axis=1, keepdims=True))
    gallery = [j for j in range(len(x)) if enr[j]]
    probes = [i for i in range(len(x)) if not enr[i]]
    per_bin: dict[str, tuple[list, list, int]] = {}
    for i in probes:
        b = ref_bin(abs(float(yaw[i])))
        gen, imp, n = per_bin.setdefault(b, ([], [], 0))
        for j in gallery:
            s = float(unit[i] @ unit[j])
            (gen if subj[i] == subj[j] else imp).append(s)
        per_bin[b] = (gen, imp, n + 1)
    names = list(BIN_NAMES) + (["unknown-pose"] if "unknown-pose" in per_bin else [])
    out = {}
    for name in names:
        gen, imp, n = per_bin.get(name, ([], [], 0))
        out[name] = {"probes": n, "gen": np.array(gen), "imp": np.array(imp)}
    out["all"] = {"probes": len(probes),
                  "gen": np.concatenate([out[n]["gen"] for n in names]),
                  "imp": np.concatenate([out[n]["imp"] for n in names])}
    for b in out.values():
        b["points"] = [ref_point(b["gen"], b["imp"], f) for f in fars]
    for b in out.values():  # the all bin's threshold applied to every bin
        b["global"] = []
        for p in out["all"]["points"]:
            t = p["t"]
            b["global"].append((
                None if t is None or not b["gen"].size else float(np.mean(b["gen"] > t)),
                None if t is None or not b["imp"].size else float(np.mean(b["imp"] > t))))
    return out


# --------------------------------------------------------------------------------------------
# Data and the CLI
# --------------------------------------------------------------------------------------------

#: probe yaws: on every edge (both signs), inside every bin, and null (None)
PROBE_YAWS = [0.0, 12.5, -29.5, 30.0, -30.0, 45.0, 59.5, -60.0, 60.0, 75.5, -90.0, 90.0, 120.0, -150.0,
              -0.5, 15.0, None]


def lattice_data(seed: int, subjects: int = 6, probes: int = 68, dim: int = 16, flip: float = 0.3):
    """Rows of +-1 entries times a random positive scale: every cosine is a multiple of 1/dim,
    exact in float32 and float64 alike, so scores tie often (within and across genuine and
    impostor) and the reference can be compared for equality.

    Gallery: one row per subject except the last (none: its probes only make impostors) and the
    second (two rows), one gallery row with a null yaw. Probes: PROBE_YAWS in turn, random
    subjects."""
    rng = np.random.default_rng(seed)
    base = rng.choice([-1.0, 1.0], size=(subjects, dim))
    gal_subj = [s for s in range(subjects - 1)] + [1]
    subj = np.array(gal_subj + list(rng.integers(0, subjects, probes)))
    n = subj.size
    emb = np.where(rng.random((n, dim)) < flip, -base[subj], base[subj])
    emb *= rng.uniform(0.25, 4.0, size=(n, 1))
    enr = np.zeros(n, dtype=bool)
    enr[: len(gal_subj)] = True
    yaw = [5.0, -10.0, None, 0.0, 14.0, 3.0][: len(gal_subj)] + [PROBE_YAWS[i % len(PROBE_YAWS)] for i in range(probes)]
    return emb.astype(np.float32), np.array([f"s{s}" for s in subj]), yaw, enr


def gaussian_data(seed: int, subjects: int = 8, probes: int = 60, dim: int = 8):
    """Continuous scores (no ties): one gallery row per subject, yaws as in lattice_data."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(subjects, dim))
    subj = np.array(list(range(subjects)) + list(rng.integers(0, subjects, probes)))
    emb = centres[subj] + 0.9 * rng.normal(size=(subj.size, dim))
    enr = np.zeros(subj.size, dtype=bool)
    enr[:subjects] = True
    yaw = [0.0] * subjects + [PROBE_YAWS[i % len(PROBE_YAWS)] for i in range(probes)]
    return emb.astype(np.float32), np.array([f"id{s}" for s in subj]), yaw, enr


def write_embeddings(path, emb, subj, yaw, enr) -> None:
    n, dim = emb.shape
    table = pa.table({
        "sample_id": pa.array([f"r{i:04d}" for i in range(n)], pa.string()),
        "subject_id": pa.array(subj.tolist(), pa.string()),
        "yaw_deg": pa.array(yaw, pa.float32()),
        "enrollment": pa.array(enr.tolist(), pa.bool_()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel(), pa.float32()), dim),
    }, schema=embedding_schema(dim))
    pq.write_table(table, path)


def cli_report(tmp_path, emb, subj, yaw, enr, fars=FARS, ray: bool = False) -> dict:
    src = tmp_path / "embeddings.parquet"
    write_embeddings(src, emb, subj, yaw, enr)
    out = tmp_path / "report"
    argv = ["verify", str(src), "--out", str(out), "--far", ",".join(repr(f) for f in fars),
            "--yaw-edges", "0,30,60,90"] + ([] if ray else ["--no-ray"])
    assert posefr_main(argv) == 0
    return json.loads((out / "report.json").read_text())


def as_yaw_array(yaw) -> np.ndarray:
    """The yaws as the table stores them (float32; None -> NaN)."""
    return np.array([np.nan if y is None else np.float32(y) for y in yaw], dtype=np.float64)


def compare(report: dict, ref: dict, fars=FARS, threshold_tol: float = 0.0) -> None:
    keys = [repr(f) for f in fars]
    assert list(report["bins"]) == list(ref)  # yaw bins, unknown-pose, all: in this order
    for name, r in ref.items():
        b = report["bins"][name]
        assert (b["probes"], b["genuine"], b["impostor"]) == (r["probes"], r["gen"].size, r["imp"].size), name
        assert b["far_below_resolution"] == [k for k, p in zip(keys, r["points"]) if p["below"]], name
        for key, p, (g_tar, g_far) in zip(keys, r["points"], r["global"]):
            where = (name, key)
            assert b["tar_at_far"][key] == p["tar"], where
            assert b["achieved_far"][key] == p["achieved"], where
            if p["t"] is None:
                assert b["threshold_at_far"][key] is None, where
            else:
                assert abs(b["threshold_at_far"][key] - p["t"]) <= threshold_tol, where
            assert b["tar_at_global_threshold"][key] == g_tar, where
            assert b["far_at_global_threshold"][key] == g_far, where


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1])
def test_cli_report_equals_reference_with_ties(tmp_path, seed):
    emb, subj, yaw, enr = lattice_data(seed)
    ref = reference(emb, subj, as_yaw_array(yaw), enr)

    # the data exercise what the rule is about (else a wrong rule could pass)
    assert "unknown-pose" in ref and all(ref[n]["probes"] > 0 for n in BIN_NAMES)
    assert ref["all"]["probes"] == sum(ref[n]["probes"] for n in ref if n != "all")
    on_threshold = [(n, p["t"]) for n, r in ref.items() for p in r["points"]
                    if p["t"] is not None and np.any(r["gen"] == p["t"])]
    assert on_threshold, "no genuine score equal to a threshold: '>' and '>=' would agree"
    assert any(not p["below"] and np.sort(r["imp"])[::-1][p["k"] - 1] != np.sort(r["imp"])[::-1][p["k"]]
               for r in ref.values() for p in r["points"]), "the k-th and (k+1)-th largest always tie"
    assert any(p["below"] for r in ref.values() for p in r["points"])  # some FAR below resolution
    assert np.unique(ref["all"]["imp"]).size < ref["all"]["imp"].size / 4  # heavy ties

    report = cli_report(tmp_path, emb, subj, yaw, enr)
    compare(report, ref)
    p = report["protocol"]
    assert (p["gallery_rows"], p["probe_rows"]) == (int(enr.sum()), int((~enr).sum()))


def test_cli_report_equals_reference_continuous_scores(tmp_path):
    emb, subj, yaw, enr = gaussian_data(3)
    ref = reference(emb, subj, as_yaw_array(yaw), enr)
    # float32 scoring moves a score by ~1e-7; no other score may lie that close to a threshold
    for r in ref.values():
        scores = np.concatenate([r["gen"], r["imp"]])
        for p in r["points"]:
            if p["t"] is not None:
                gap = np.abs(scores - p["t"])
                assert np.count_nonzero(gap < 1e-5) == 1, "a score too close to a threshold"
    assert np.unique(ref["all"]["imp"]).size == ref["all"]["imp"].size  # no ties here

    report = cli_report(tmp_path, emb, subj, yaw, enr)
    compare(report, ref, threshold_tol=1e-6)


def test_cli_on_ray_equals_reference(tmp_path, ray_local):
    """The CLI's default path: the scoring tasks run on Ray."""
    emb, subj, yaw, enr = lattice_data(2)
    ref = reference(emb, subj, as_yaw_array(yaw), enr)
    compare(cli_report(tmp_path, emb, subj, yaw, enr, ray=True), ref)


def test_reference_rule_on_a_hand_example():
    """The reference itself on numbers worked by hand (DESIGN.md's rule)."""
    imp = np.array([0.9, 0.7, 0.7, 0.5, 0.5, 0.5, 0.3, 0.2, 0.1, 0.0])  # N = 10
    gen = np.array([0.95, 0.7, 0.6, 0.5, 0.2])
    p = ref_point(gen, imp, 0.3)  # k = 3: t = 4th largest = 0.5; > 0.5: 0.95, 0.7, 0.6
    assert (p["k"], p["t"], p["tar"], p["achieved"]) == (3, 0.5, 0.6, 0.3)
    p = ref_point(gen, imp, 0.2)  # k = 2: t = 3rd largest = 0.7; ties at t are rejected
    assert (p["k"], p["t"], p["tar"], p["achieved"]) == (2, 0.7, 0.2, 0.1)
    p = ref_point(gen, imp, 0.05)  # k = 0: below resolution
    assert p["below"] and p["t"] is None and p["tar"] is None
    assert ref_point(gen, np.full(100, 0.1), 0.29)["k"] == 29  # 0.29 * 100 is 28.999... in binary
    assert [ref_bin(y) for y in (0.0, 29.9, 30.0, 59.99, 60.0, 90.0, 180.0, float("nan"))] == \
        ["0-30", "0-30", "30-60", "30-60", "60-90", "90+", "90+", "unknown-pose"]
