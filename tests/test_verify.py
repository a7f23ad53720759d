"""Exact pose-binned verification: the in-memory rule against scikit-learn, the streaming
two-pass computation against the in-memory rule (in-process and on a real local Ray)."""

from __future__ import annotations


import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from posefr_dist.eval import (ALL, UNKNOWN_POSE, VerifyError, VerifyOptions, build_report, far_rank,
                              from_arrays, pair_scores, tar_at_far, verify_arrays, verify_embeddings)
from posefr_dist.eval import scoring
from posefr_dist.eval.exact import far_key

FARS = (0.3, 0.29, 0.1, 0.01, 0.001, 0.0001)


def sklearn_point(gen: np.ndarray, imp: np.ndarray, far: float):
    """TAR = max TPR among ROC points with FPR <= FAR; that point's FPR; the threshold t is the
    next lower ROC threshold (the largest score that is rejected)."""
    y = np.r_[np.ones(gen.size), np.zeros(imp.size)]
    s = np.r_[gen, imp].astype(np.float64)
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    j = int(np.flatnonzero(fpr <= far)[-1])  # fpr is non-decreasing: the last one has max TPR
    t = thr[j + 1] if j + 1 < thr.size else None
    return float(tpr[j]), float(fpr[j]), t


def assert_matches_sklearn(gen, imp, fars=FARS):
    points = tar_at_far(gen, imp, fars)
    for far, p in zip(fars, points):
        k = far_rank(far, imp.size)
        assert p.k == k
        if k == 0:
            assert p.below_resolution and p.tar is None and p.threshold is None and p.achieved_far is None
            continue
        tar, fpr, t = sklearn_point(gen, imp, far)
        assert p.tar == tar, (far, p, tar)
        assert p.achieved_far == fpr <= far
        assert p.threshold == t
        # the rule itself, spelled out
        assert p.threshold == np.sort(imp)[::-1][k]


# --------------------------------------------------------------------------------------------
# The in-memory rule
# --------------------------------------------------------------------------------------------


def test_far_rank_reads_the_decimal():
    assert far_rank(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996 in floating point
    assert far_rank(0.1, 30) == 3
    assert far_rank(0.0001, 9999) == 0
    assert far_rank(0.0001, 10000) == 1
    assert far_key(0.01) == "0.01" and far_key(1e-4) == "0.0001"


def test_reference_matches_sklearn_random():
    rng = np.random.default_rng(1)
    gen = rng.normal(0.5, 0.2, 3000).astype(np.float32)
    imp = rng.normal(0.0, 0.2, 40000).astype(np.float32)
    assert_matches_sklearn(gen, imp)
    assert_matches_sklearn(gen, imp[:200])  # FAR 0.001 and 0.0001 below resolution
    assert_matches_sklearn(gen, imp[:100])  # 0.29 * 100: the decimal rule


def test_reference_matches_sklearn_with_heavy_ties():
    rng = np.random.default_rng(2)
    gen = np.round(rng.normal(0.4, 0.2, 2000), 1).astype(np.float32)
    imp = np.round(rng.normal(0.0, 0.2, 30000), 1).astype(np.float32)
    assert np.unique(np.r_[gen, imp]).size <= 21
    assert_matches_sklearn(gen, imp)
    # a block of equal scores straddling the threshold: none of them is accepted
    imp2 = np.r_[np.full(50, 0.5), np.full(50, 0.2)].astype(np.float32)
    gen2 = np.array([0.5, 0.5, 0.6, 0.2], dtype=np.float32)
    p = tar_at_far(gen2, imp2, [0.1])[0]
    assert p.threshold == np.float32(0.5) and p.tar == 0.25 and p.achieved_far == 0.0
    assert_matches_sklearn(gen2, imp2, [0.1, 0.5, 0.6])


def test_reference_edge_cases():
    p = tar_at_far([], [0.1, 0.2], [0.5])[0]
    assert p.threshold == pytest.approx(0.1) and p.tar is None and p.achieved_far == 0.5
    p = tar_at_far([0.3], [], [0.5])[0]
    assert p.below_resolution and p.tar is None


# --------------------------------------------------------------------------------------------
# Streaming two-pass computation against the reference
# --------------------------------------------------------------------------------------------


def synthetic(seed=0, subjects=80, per=12, dim=24, noise=1.2, unknown=3, gallery_per=1):
    rng = np.random.default_rng(seed)
    n = subjects * per
    subj = np.repeat(np.arange(subjects), per)
    emb = rng.normal(size=(subjects, dim))[subj] + noise * rng.normal(size=(n, dim))
    # unbalanced bins: most probes near-frontal, few in profile
    yaw = np.abs(rng.normal(0, 35, n)) * rng.choice([-1, 1], n)
    enr = np.zeros(n, dtype=bool)
    for g in range(gallery_per):
        enr[g::per] = True
    yaw[enr] = rng.uniform(-15, 15, enr.sum())
    probes = np.flatnonzero(~enr)
    yaw[rng.choice(probes, unknown, replace=False)] = np.nan
    return emb.astype(np.float32), np.array([f"s{i:04d}" for i in subj]), yaw, enr


def tie_heavy(seed=3, subjects=40, per=8, dim=16):
    """Embeddings of +-1 entries: every cosine is a multiple of 1/16, exact in any order."""
    rng = np.random.default_rng(seed)
    n = subjects * per
    subj = np.repeat(np.arange(subjects), per)
    base = rng.choice([-1.0, 1.0], size=(subjects, dim))[subj]
    flip = rng.random((n, dim)) < 0.3
    emb = np.where(flip, -base, base).astype(np.float32)
    yaw = rng.uniform(-120, 120, n)
    enr = np.zeros(n, dtype=bool)
    enr[::per] = True
    return emb, subj, yaw, enr


def reference_report_bins(es, fars, yaw_edges=(0, 30, 60, 90), block_size=None):
    scores = pair_scores(es, yaw_edges, block_size=block_size)
    out = {}
    for name, (g, i) in scores.items():
        out[name] = (g, i, tar_at_far(g, i, fars))
    return out


def assert_report_equals_reference(report, ref, fars):
    keys = [far_key(f) for f in fars]
    assert set(report["bins"]) == set(ref)
    all_t = {k: report["bins"][ALL]["threshold_at_far"][k] for k in keys}
    for name, (g, i, points) in ref.items():
        b = report["bins"][name]
        assert (b["genuine"], b["impostor"]) == (g.size, i.size), name
        for k, p in zip(keys, points):
            assert b["tar_at_far"][k] == p.tar, (name, k)
            assert b["threshold_at_far"][k] == p.threshold, (name, k)
            assert b["achieved_far"][k] == p.achieved_far, (name, k)
            assert (k in b["far_below_resolution"]) == p.below_resolution
            t = all_t[k]
            if t is None:
                assert b["tar_at_global_threshold"][k] is None
            else:
                want = float(np.count_nonzero(g > np.float32(t)) / g.size) if g.size else None
                assert b["tar_at_global_threshold"][k] == want, (name, k)
                assert b["far_at_global_threshold"][k] == (
                    float(np.count_nonzero(i > np.float32(t)) / i.size) if i.size else None)
        if g.size and i.size:
            y = np.r_[np.ones(g.size), np.zeros(i.size)]
            auc = roc_auc_score(y, np.r_[g, i])
            assert abs(b["auc"] - auc) <= b["auc_max_error"] + 1e-12
            assert 0.0 <= b["eer"] <= 1.0


@pytest.mark.parametrize("speculate", [False, True])
@pytest.mark.parametrize("cells", [1 << 16, 1 << 6])
def test_streaming_equals_reference(speculate, cells):
    emb, subj, yaw, enr = synthetic()
    es = from_arrays(emb, subj, yaw, enr)
    opts = VerifyOptions(cells=cells, block_size=37, blocks_per_task=3, speculate=speculate,
                         pilot_fraction=0.2)
    report = build_report(verify_embeddings(es, FARS, options=opts))
    assert UNKNOWN_POSE in report["bins"]
    assert list(report["bins"])[-1] == ALL
    assert_report_equals_reference(report, reference_report_bins(es, FARS, block_size=37), FARS)
    assert report["protocol"]["passes"] == (2 if not speculate else report["protocol"]["passes"])


def test_streaming_equals_reference_tie_heavy():
    emb, subj, yaw, enr = tie_heavy()
    es = from_arrays(emb, subj, yaw, enr)
    ref = reference_report_bins(es, FARS)
    assert np.unique(ref[ALL][1]).size <= 33
    for speculate in (False, True):
        report = build_report(verify_embeddings(es, FARS, options=VerifyOptions(speculate=speculate)))
        assert_report_equals_reference(report, ref, FARS)
        for name, (g, i, _) in ref.items():
            assert_matches_sklearn(g, i)


def test_several_gallery_rows_per_subject_and_open_set_probes():
    emb, subj, yaw, enr = synthetic(seed=5, gallery_per=3)
    enr[subj == "s0001"] = False  # a subject with no gallery row: its probes only make impostors
    es = from_arrays(emb, subj, yaw, enr)
    report = verify_arrays(emb, subj, yaw, enr, FARS, options=VerifyOptions(block_size=50))
    assert_report_equals_reference(report, reference_report_bins(es, FARS, block_size=50), FARS)


def test_speculation_miss_falls_back_to_pass_two(monkeypatch):
    import importlib

    vmod = importlib.import_module("posefr_dist.eval.verify")
    emb, subj, yaw, enr = synthetic(seed=7)
    es = from_arrays(emb, subj, yaw, enr)
    cells = 1 << 12

    def wrong_windows(prep, fars, opts, executor, cells_):
        t = np.zeros(cells_, dtype=np.uint8)
        t[:10] = 1  # far from every threshold
        return {b: t.copy() for b in range(len(prep.pbin_names))}, 0

    monkeypatch.setattr(vmod, "_pilot_windows", wrong_windows)
    res = verify_embeddings(es, FARS, options=VerifyOptions(cells=cells, speculate=True, block_size=64))
    assert res.passes == 2
    assert_report_equals_reference(build_report(res), reference_report_bins(es, FARS, block_size=64), FARS)


def test_pass_two_that_does_not_reproduce_scores_is_an_error(monkeypatch):
    import importlib

    vmod = importlib.import_module("posefr_dist.eval.verify")
    emb, subj, yaw, enr = synthetic(seed=8)
    real = vmod.score_chunk

    def drifting(gallery, chunk, plan):
        if not plan.histograms:  # pass 2 sees slightly different scores
            gallery = scoring.Gallery(gallery.emb * np.float32(0.999), gallery.codes_sorted, gallery.order)
        return real(gallery, chunk, plan)

    monkeypatch.setattr(vmod, "score_chunk", drifting)
    with pytest.raises(VerifyError, match="not reproduced"):
        verify_arrays(emb, subj, yaw, enr, FARS, options=VerifyOptions(speculate=False, cells=1 << 8))


def test_empty_bins_and_below_resolution():
    emb, subj, yaw, enr = synthetic(seed=9, unknown=0)
    yaw = np.where(enr, yaw, np.clip(yaw, -59, 59))  # nothing at 60 degrees or more
    report = verify_arrays(emb, subj, yaw, enr, (0.1, 1e-6), yaw_edges=(0, 30, 60, 90))
    assert list(report["bins"]) == ["0-30", "30-60", "60-90", "90+", ALL]
    for name in ("60-90", "90+"):
        b = report["bins"][name]
        assert (b["probes"], b["genuine"], b["impostor"]) == (0, 0, 0)
        assert set(b["tar_at_far"].values()) == {None}
        assert set(b["threshold_at_far"].values()) == {None}
        assert b["eer"] is None and b["auc"] is None
        assert b["far_below_resolution"] == ["0.1", "1e-06"]
    a = report["bins"][ALL]
    assert a["far_below_resolution"] == ["1e-06"] and a["tar_at_far"]["1e-06"] is None
    assert a["tar_at_far"]["0.1"] is not None


def test_single_subject_gallery():
    rng = np.random.default_rng(11)
    emb = rng.normal(size=(30, 8)).astype(np.float32)
    subj = np.array(["a"] * 10 + ["b"] * 20)
    enr = np.zeros(30, dtype=bool)
    enr[0] = True
    yaw = np.linspace(0, 100, 30)
    # probes of "a" are genuine, probes of "b" impostor-only
    report = verify_arrays(emb, subj, yaw, enr, (0.1,))
    a = report["bins"][ALL]
    assert (a["genuine"], a["impostor"]) == (9, 20)
    es = from_arrays(emb, subj, yaw, enr)
    assert_report_equals_reference(report, reference_report_bins(es, (0.1,)), (0.1,))
    # only the gallery's subject among the probes: no impostors, every FAR below resolution
    report = verify_arrays(emb[:10], subj[:10], yaw[:10], enr[:10], (0.1,))
    a = report["bins"][ALL]
    assert a["impostor"] == 0 and a["tar_at_far"]["0.1"] is None and a["far_below_resolution"] == ["0.1"]
    assert a["eer"] is None and a["auc"] is None


def test_cell_index_numpy_and_torch_agree_at_edges():
    import torch

    cells = 1 << 16
    edges = scoring.cell_edges(cells).astype(np.float32)
    s = np.concatenate([edges, np.nextafter(edges, np.float32(-2)), np.nextafter(edges, np.float32(2)),
                        np.array([-1.0000001, 1.0000001, 0.0, -0.0, 1e-30, -1e-30], np.float32)])
    a = scoring.cell_index_np(s, cells)
    b = scoring.cell_index_torch(torch.from_numpy(s), cells).numpy()
    assert np.array_equal(a, b)
    assert a.min() == 0 and a.max() == cells - 1
    inside = (s >= -1) & (s < 1)
    e64 = scoring.cell_edges(cells)
    assert np.all(e64[a[inside]] <= s[inside]) and np.all(s[inside] < e64[a[inside] + 1])
    order = np.argsort(s, kind="stable")
    assert np.all(np.diff(a[order]) >= 0)  # non-decreasing in the score


def test_options_and_inputs_are_validated():
    emb, subj, yaw, enr = synthetic(seed=12)
    with pytest.raises(ValueError, match="fars"):
        verify_arrays(emb, subj, yaw, enr, (0.0,))
    with pytest.raises(ValueError, match="fars"):
        verify_arrays(emb, subj, yaw, enr, (1.5,))
    with pytest.raises(ValueError, match="yaw_edges"):
        verify_arrays(emb, subj, yaw, enr, yaw_edges=(10, 30))
    with pytest.raises(ValueError, match="cells"):
        VerifyOptions(cells=1000)
    with pytest.raises(ValueError, match="row 4: field 'embedding'"):
        bad = emb.copy()
        bad[4, 2] = np.nan
        verify_arrays(bad, subj, yaw, enr)
    with pytest.raises(ValueError, match="no gallery rows"):
        verify_arrays(emb, subj, yaw, np.zeros_like(enr))
    with pytest.raises(ValueError, match="no probe rows"):
        verify_arrays(emb, subj, yaw, np.ones_like(enr))


def test_use_ray_without_ray_is_a_clear_error():
    """use_ray=True in a process where Ray was never started: a clear error, and the library does
    not start Ray itself. Run in a fresh interpreter: the suite's own Ray (ray_local, session
    scoped) is up whenever an earlier test used it, which used to make this test skip."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = """
import numpy as np, pyarrow as pa, ray
from posefr_dist.eval import from_arrays, verify_embeddings, verify_source
assert not ray.is_initialized()
rng = np.random.default_rng(13)
emb = rng.normal(size=(20, 4)).astype(np.float32)
subj = np.repeat(np.arange(5), 4).astype(str)
enr = np.zeros(20, dtype=bool)
enr[::4] = True
for call in (lambda: verify_embeddings(from_arrays(emb, subj, np.zeros(20), enr), use_ray=True),
             lambda: verify_source(pa.table({}), use_ray=True)):
    try:
        call()
    except RuntimeError as e:
        print("error:", e)
    else:
        print("no error")
print("ray started:", ray.is_initialized())
"""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 3, r.stdout
    for line in lines[:2]:
        assert line.startswith("error: use_ray=True but Ray is not initialised: call ray.init()"), line
    assert lines[2] == "ray started: False"


# --------------------------------------------------------------------------------------------
# On a real local Ray
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("speculate", [False, True])
def test_ray_tasks_equal_reference_and_in_process(ray_local, speculate):
    emb, subj, yaw, enr = synthetic(seed=21, subjects=100)
    es = from_arrays(emb, subj, yaw, enr)
    opts = VerifyOptions(block_size=40, blocks_per_task=4, speculate=speculate, pilot_fraction=0.2)
    on_ray = build_report(verify_embeddings(es, FARS, options=opts, use_ray=True))
    local = build_report(verify_embeddings(es, FARS, options=opts, use_ray=False))
    assert on_ray == local
    assert_report_equals_reference(on_ray, reference_report_bins(es, FARS, block_size=40), FARS)


def test_histogram_figures_on_known_cases():
    from posefr_dist.eval.exact import auc_from_hist, eer_from_hist, roc_points

    cells = 1 << 8
    gen = np.zeros(cells, np.int64)
    imp = np.zeros(cells, np.int64)
    gen[200], imp[50] = 10, 1000  # separated: EER 0, AUC 1
    assert eer_from_hist(gen, imp) == 0.0 and auc_from_hist(gen, imp) == (1.0, 0.0)
    gen[:], imp[:] = 0, 0
    gen[100:110] = 7
    imp[100:110] = 70  # the same distribution: EER 1/2, AUC 1/2 (ties within cells)
    assert eer_from_hist(gen, imp) == pytest.approx(0.5)
    auc, err = auc_from_hist(gen, imp)
    assert auc == pytest.approx(0.5) and err == pytest.approx(0.05)
    far, tar = roc_points(gen, imp)
    assert far == sorted(far) and tar == sorted(tar) and min(far) > 0 and far[-1] == 1.0
    assert all(t <= f + 1e-12 for f, t in zip(far, tar))  # identical distributions: on the diagonal


def test_speculation_that_collects_too_much_gives_up_and_passes_two(monkeypatch):
    import importlib

    vmod = importlib.import_module("posefr_dist.eval.verify")
    emb, subj, yaw, enr = synthetic(seed=14)
    es = from_arrays(emb, subj, yaw, enr)

    def everything(prep, fars, opts, executor, cells_):
        return {b: np.ones(cells_, dtype=np.uint8) for b in range(len(prep.pbin_names))}, 0

    monkeypatch.setattr(vmod, "_pilot_windows", everything)
    opts = VerifyOptions(speculate=True, speculation_budget=100, block_size=64)
    res = verify_embeddings(es, FARS, options=opts)
    assert res.passes == 2 and res.pass2_cells > 0
    assert_report_equals_reference(build_report(res), reference_report_bins(es, FARS, block_size=64), FARS)
