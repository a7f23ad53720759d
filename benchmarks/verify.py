"""Verification benchmark: exactness and cost of the streaming two-pass TAR@FAR. Prints figures only.

    .venv/bin/python benchmarks/verify.py                     # (a) and (b) at their default sizes
    .venv/bin/python benchmarks/verify.py --part a --pairs-a 1e7
    .venv/bin/python benchmarks/verify.py --part b --gallery 10000 --probes 100000 --dim 512
    .venv/bin/python benchmarks/verify.py --part b --ray      # scoring as Ray tasks (local Ray)

(a) Against scikit-learn on about ``--pairs-a`` pairs: all scores in memory + ``roc_curve
    (drop_intermediate=False)``, TAR = largest TPR with FPR <= FAR, per pose bin; the streaming
    computation must give the identical TAR values. Wall time and peak memory of each, each in a
    fresh process (peak = sampled RSS of the process tree above its level before the run).
(b) At scale: ``--gallery`` x ``--probes`` pairs of ``--dim``-d embeddings. Wall time, peak RSS
    of the whole process tree, and pairs/s as a fraction of the rate of a plain ``torch.matmul``
    of the same blocks against the gallery, measured in the same run.

Data: random subject centres with noise growing with |yaw|, one gallery row per subject (so
genuine pairs are few and impostor pairs are nearly all); generated in the measuring process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.common import PeakRSS  # noqa: E402

FARS = (0.1, 0.01, 0.001, 0.0001)


def make_data(gallery: int, probes: int, dim: int, seed: int = 0):
    """(emb float32, subject codes, yaw, enrollment): ``gallery`` subjects with one gallery row
    each and ``probes`` probes spread over them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((gallery, dim), dtype=np.float32)
    subj = np.concatenate([np.arange(gallery), rng.integers(0, gallery, probes)])
    yaw = np.concatenate([rng.uniform(-15, 15, gallery), rng.uniform(-110, 110, probes)])
    n = gallery + probes
    emb = np.empty((n, dim), dtype=np.float32)
    step = 1 << 14
    for i in range(0, n, step):
        s = slice(i, min(n, i + step))
        noise = rng.standard_normal((s.stop - s.start, dim), dtype=np.float32)
        # harder with |yaw|: near-frontal probes are easy, profile ones much less so
        noise *= (1.0 + np.abs(yaw[s]) / 30.0).astype(np.float32)[:, None]
        emb[s] = centres[subj[s]] + noise
    enr = np.zeros(n, dtype=bool)
    enr[:gallery] = True
    return emb, subj, yaw, enr


def child_a(args) -> dict:
    """One side of (a) in this process; returns TARs, seconds and memory."""
    from posefr_dist.eval import VerifyOptions, build_report, from_arrays, pair_scores, verify_embeddings

    emb, subj, yaw, enr = make_data(args.gallery_a, args.probes_a, args.dim_a, seed=1)
    es = from_arrays(emb, subj, yaw, enr)
    del emb
    __import__("torch")  # imported before the measurement, on both sides

    with PeakRSS() as mem:
        t0 = time.perf_counter()
        if args.child == "stream":
            rep = build_report(verify_embeddings(es, FARS, options=VerifyOptions(speculate=args.speculate)))
            tars = {b: v["tar_at_far"] for b, v in rep["bins"].items()}
            passes = rep["protocol"]["passes"]
        else:
            from sklearn.metrics import roc_curve

            tars, passes = {}, 0
            scores = pair_scores(es)
            score_seconds = time.perf_counter() - t0
            for name, (g, i) in scores.items():
                y = np.r_[np.ones(g.size, dtype=np.int8), np.zeros(i.size, dtype=np.int8)]
                fpr, tpr, _ = roc_curve(y, np.r_[g, i], drop_intermediate=False)
                tars[name] = {}
                for far in FARS:
                    ok = fpr <= far
                    # FAR below 1/N: only FPR = 0 is admissible; the streaming report gives null
                    tars[name][repr(far)] = float(tpr[ok].max()) if far * i.size >= 1 else None
        seconds = time.perf_counter() - t0
    return {"tars": tars, "seconds": seconds, "peak_gib": mem.peak_gib, "base_gib": mem.base / 2**30,
            "passes": passes, "score_seconds": score_seconds if args.child == "sklearn" else None}


def run_child(which: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", which,
           "--gallery-a", str(args.gallery_a), "--probes-a", str(args.probes_a), "--dim-a", str(args.dim_a)]
    if args.speculate is not None:
        cmd += ["--speculate", str(args.speculate).lower()]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_a(args) -> None:
    pairs = args.gallery_a * args.probes_a
    print(f"(a) streaming vs scikit-learn roc_curve: {args.gallery_a} gallery x {args.probes_a} probes "
          f"= {pairs:.3g} pairs, dim {args.dim_a}")
    sk = run_child("sklearn", args)
    st = run_child("stream", args)
    same = sk["tars"] == st["tars"]
    n_values = sum(v is not None for b in sk["tars"].values() for v in b.values())
    print(f"    identical TAR values: {same} ({n_values} bin x FAR values compared)")
    if not same:
        for b in sk["tars"]:
            print(f"      {b}: sklearn {sk['tars'][b]} stream {st['tars'][b]}")
    for name, r in (("scikit-learn (scores in memory + roc_curve)", sk), ("streaming two-pass", st)):
        extra = f", {r['passes']} scoring pass(es)" if r["passes"] else ""
        print(f"    {name:44s} {r['seconds']:7.2f} s, peak RSS {r['peak_gib']:.2f} GiB "
              f"(+{r['peak_gib'] - r['base_gib']:.2f} over the process before the run){extra}")
    print(f"    (of which scikit-learn's roc_curve and the TAR look-up alone: "
          f"{sk['seconds'] - sk['score_seconds']:.2f} s; scoring into memory: {sk['score_seconds']:.2f} s)")
    print(f"    speed-up {sk['seconds'] / st['seconds']:.1f}x; extra-memory ratio (sklearn / streaming) "
          f"{(sk['peak_gib'] - sk['base_gib']) / max(1e-9, st['peak_gib'] - st['base_gib']):.1f}x")


def _matmul_loop(g_t, p, block: int, seconds: float) -> int:
    import torch

    out = torch.empty(block, g_t.shape[1])
    torch.matmul(p[:block], g_t, out=out)
    done, t0, i = 0, time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a = (i * block) % max(1, p.shape[0] - block)
        torch.matmul(p[a:a + block], g_t, out=out)
        done += block * g_t.shape[1]
        i += 1
    return done


def matmul_rate(emb_g: np.ndarray, emb_p: np.ndarray, block: int, seconds: float = 3.0) -> tuple[float, float]:
    """(pairs per wall second, pairs per CPU second of this process) of
    torch.matmul(probe block, gallery.T, out=buffer), the floor of any scorer: the better of one
    multi-threaded matmul stream and one single-threaded stream per torch thread."""
    import concurrent.futures as cf

    import torch

    g_t = torch.from_numpy(emb_g).T
    p = torch.from_numpy(emb_p)
    best = (0.0, 0.0)
    workers = torch.get_num_threads()
    for threads in sorted({1, workers}):
        t0, c0 = time.perf_counter(), time.process_time()
        if threads == 1:
            done = _matmul_loop(g_t, p, block, seconds)
        else:
            with cf.ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as ex:
                done = sum(ex.map(lambda _: _matmul_loop(g_t, p, block, seconds), range(workers)))
        rate = (done / (time.perf_counter() - t0), done / (time.process_time() - c0))
        best = max(best, rate)
    return best


def part_b(args) -> None:
    import torch

    from posefr_dist.eval import VerifyOptions, build_report, from_arrays, verify_embeddings
    from posefr_dist.eval.verify import BLOCK_PAIRS

    pairs = args.gallery * args.probes
    print(f"(b) scale: {args.gallery} gallery x {args.probes} probes = {pairs:.3g} pairs, dim {args.dim}, "
          f"torch threads {torch.get_num_threads()}, {'Ray tasks' if args.ray else 'in-process'}")
    t0 = time.perf_counter()
    emb, subj, yaw, enr = make_data(args.gallery, args.probes, args.dim, seed=2)
    es = from_arrays(emb, subj, yaw, enr)
    del emb
    print(f"    data: {time.perf_counter() - t0:.1f} s to generate and validate")
    block = args.block_size or max(1, BLOCK_PAIRS // args.gallery)
    rate, cpu_rate = matmul_rate(es.emb[:args.gallery], es.emb[args.gallery:], block)
    if args.ray:
        import ray

        ray_tmp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING", _temp_dir=ray_tmp)
        # start the workers and import torch there before the timed run
        n = min(len(es), args.gallery + 2000)
        small = from_arrays(es.emb[:n], es.codes[:n], es.yaw[:n], es.enrollment[:n])
        t0 = time.perf_counter()
        verify_embeddings(small, FARS, options=VerifyOptions(blocks_per_task=1), use_ray=True)
        print(f"    Ray warm-up (workers start, small run): {time.perf_counter() - t0:.1f} s")
    opts = VerifyOptions(block_size=args.block_size, speculate=args.speculate)  # threads: torch's
    with PeakRSS() as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        res = verify_embeddings(es, FARS, options=opts, use_ray=args.ray)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    rep = build_report(res)
    # the matmul rate before and after the run; the faster one is the baseline (other people's
    # work on the same CPUs slows both, so the ratio uses the more demanding figure)
    rate2, cpu_rate2 = matmul_rate(es.emb[:args.gallery], es.emb[args.gallery:], block)
    print(f"    plain torch.matmul: {rate:.3g} / {rate2:.3g} pairs/s before / after the run "
          f"({cpu_rate:.3g} / {cpu_rate2:.3g} pairs per CPU-second), {block}-probe blocks")
    rate, cpu_rate = max(rate, rate2), max(cpu_rate, cpu_rate2)
    print(f"    verify: {wall:.1f} s wall, {res.passes} scoring pass(es) ({res.pass2_cells} cells left to "
          f"pass 2) + pilot of {res.pilot_probes} probes, block {res.block_size} probes")
    print(f"    peak RSS (process tree) {mem.peak_gib:.2f} GiB (before the run {mem.base / 2**30:.2f} GiB)")
    print(f"    {pairs / wall:.3g} pairs/s = {100 * pairs / wall / rate:.0f} % of the plain matmul rate")
    if not args.ray:
        print(f"    {pairs / cpu:.3g} pairs per CPU-second = {100 * pairs / cpu / cpu_rate:.0f} % of matmul's")
    a = rep["bins"]["all"]
    print("    all-bin TAR@FAR: " + ", ".join(f"{k}: {v if v is None else round(100 * v, 2)}"
                                              for k, v in a["tar_at_far"].items()))
    if args.ray:
        import ray

        ray.shutdown()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["a", "b", "both"], default="both")
    ap.add_argument("--gallery-a", type=int, default=2000)
    ap.add_argument("--probes-a", type=int, default=5000)
    ap.add_argument("--dim-a", type=int, default=128)
    ap.add_argument("--pairs-a", type=float, default=None,
                    help="(a) total pairs; sets --probes-a to pairs / gallery")
    ap.add_argument("--gallery", type=int, default=10_000)
    ap.add_argument("--probes", type=int, default=10_000, help="100000 for the full 1e9 pairs")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--speculate", type=lambda s: s.lower() == "true", default=None,
                    help="true/false: force speculation on or off (default: automatic)")
    ap.add_argument("--ray", action="store_true", help="(b) with Ray tasks on a local Ray")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--child", choices=["sklearn", "stream"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.pairs_a:
        args.probes_a = max(1, int(args.pairs_a) // args.gallery_a)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child_a(args)))
        return
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    if args.part in ("a", "both"):
        part_a(args)
    if args.part in ("b", "both"):
        part_b(args)


if __name__ == "__main__":
    main()
