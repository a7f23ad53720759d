"""Training and verification across real hosts: a Ray head and three worker hosts, each in its own
network namespace (cluster/testbed.sh), shards and checkpoints on the head's S3 server.

Every run is a real `posefr` command on the head host. The failures are real too: a host's
processes killed, its link cut, a spot-style SIGTERM with a grace period. Each test leaves all
hosts up for the next, and the module's testbed is taken down (no namespace or process left)
also when a test fails.
"""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest

from posefr_dist.data.synth import synthesize
from tests import multihost as mh
from tests.data_utils import tiny_cfg
from tests.multihost import BUCKET, POSEFR, WORKERS
from tests.testbed import testbed_fixture

pytestmark = [pytest.mark.slow, pytest.mark.testbed]

# head + three worker hosts of 2 CPUs and one train slot each: a 2-worker group has a spare host
bed = testbed_fixture("pfrmh", workers=len(WORKERS), worker_cpus=2, grace=6,
                      worker_resources={"train_slot": 1},
                      extra_env={"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
                                 "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"})


@pytest.fixture(scope="module")
def shards(bed, tmp_path_factory):
    root = tmp_path_factory.mktemp("mh") / "shards"
    synthesize(tiny_cfg(identities=24, views_per_identity=8, rows_per_shard=32), str(root), use_ray=False)
    return mh.upload(bed, root, "mh/shards")


@pytest.fixture(scope="module")
def reference(bed, shards, tmp_path_factory):
    """An uninterrupted 2-host run: the weights every interrupted run must end with."""
    tmp = tmp_path_factory.mktemp("ref")
    config, trace = mh.config(tmp, shards, "reference")
    mh.finish(mh.train(bed, config))
    hosts = {mh.host_of(bed, trace, r) for r in (0, 1)}
    assert len(hosts) == 2, f"both workers ran on one host: {hosts}"
    return mh.final_weights(bed, "reference", tmp), mh.steps(trace), trace


def test_two_hosts_train_from_s3_one_worker_each(bed, reference):
    weights, steps, trace = reference
    starts = mh.starts(trace)
    assert sorted(s["rank"] for s in starts) == [0, 1] and {s["world"] for s in starts} == {2}
    assert {s["node_ip"] for s in starts} <= {bed.ip(h) for h in WORKERS}
    assert mh.epochs_reported(bed, "reference") == [0, 1]
    assert steps and weights


def test_host_killed_then_host_cut_mid_epoch_resume_to_the_same_weights(bed, shards, reference, tmp_path):
    """A host's processes killed mid-epoch 0, then another host's link cut mid-epoch 1: each time
    the group restarts on the hosts left from the last checkpoint, no epoch is reported twice, and
    the final weights equal the uninterrupted run's."""
    config, trace = mh.config(tmp_path, shards, "killcut")
    proc = mh.train(bed, config)
    touched: list[str] = []
    try:
        mh.wait(mh.reached(trace, 0, 4), proc, 240, "epoch 0 batch 4")  # past the checkpoint at step 2
        victim = mh.host_of(bed, trace, 1)
        t_kill = time.time()
        bed.kill(victim)
        touched.append(victim)
        # the restarted group: both ranks started again after the kill, on the two other hosts
        mh.wait(lambda: len([s for s in mh.starts(trace) if s["time"] > t_kill]) >= 2, proc, 240, "a restart")
        assert victim not in {mh.host_of(bed, trace, r, after=t_kill) for r in (0, 1)}
        bed.restart(victim)  # capacity for the second failure
        mh.wait(mh.reached(trace, 1, 4), proc, 240, "epoch 1 batch 4")
        cut = mh.host_of(bed, trace, 0, after=t_kill)
        t_cut = time.time()
        bed.cut(cut)
        touched.append(cut)
        mh.wait(lambda: len([s for s in mh.starts(trace) if s["time"] > t_cut]) >= 2, proc, 240, "a restart after the cut")
        mh.finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        mh.restore(bed, *touched)
    assert mh.epochs_reported(bed, "killcut") == [0, 1]
    resumed = [s for s in mh.starts(trace) if s["time"] > t_kill]
    assert all(s["world"] == 2 for s in resumed)
    # each restart resumed mid-epoch at a checkpoint's batch, not at an epoch start
    assert any(s["epoch"] == 0 and s["batch"] > 0 for s in resumed), resumed
    assert any(s["epoch"] == 1 and s["batch"] > 0 for s in resumed), resumed
    mh.assert_same_weights(reference[0], mh.final_weights(bed, "killcut", tmp_path))


def test_preempted_host_saves_a_checkpoint_before_it_goes(bed, shards, tmp_path):
    """SIGTERM with a grace period to a host of the group: the workers save a checkpoint at the
    notice (mid-epoch: the run has no step checkpoints), and the restarted group resumes from it
    or a newer one, so at most the steps trained after it are lost."""
    # long enough to outlast the node's drain deadline (a run that ends first is not restarted)
    config, trace = mh.config(tmp_path, shards, "preempt", epochs=6, val_every_steps=0)
    proc = mh.train(bed, config)
    victim = None
    try:
        mh.wait(mh.reached(trace, 0, 1), proc, 240, "epoch 0 batch 1")
        victim = mh.host_of(bed, trace, 1)
        t_notice = time.time()
        bed.preempt(victim)
        mh.wait(lambda: len([s for s in mh.starts(trace) if s["time"] > t_notice]) >= 2, proc, 240,
                "a restart after the preemption")
        mh.finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        if victim:
            mh.restore(bed, victim)
    hist = mh.history(bed, "preempt")
    saved = [h for h in hist if h.get("preemption_checkpoint")]
    assert len(saved) == 1, hist
    jit = saved[0]
    assert jit["time"] > t_notice and jit.get("checkpoint") and not jit["end_of_epoch"]
    resumed = [s for s in mh.starts(trace) if s["time"] > t_notice]
    t_resumed = min(r["time"] for r in resumed)
    # the restarted group resumed from the newest checkpoint saved before it: the notice's, or one
    # the run saved after it while the node drained; never an older one
    newest = max((h for h in hist if h.get("checkpoint") and h["time"] < t_resumed), key=lambda h: h["step"])
    assert newest["step"] >= jit["step"]
    assert {s["global_step"] for s in resumed} == {newest["step"]}, (resumed, newest)
    # lost: what the first attempt trained after that checkpoint, at most the steps since the notice's
    first_attempt = [s for s in mh.steps(trace) if s["time"] < t_resumed]
    lost = len(first_attempt) - newest["step"]
    assert 0 <= lost <= len(first_attempt) - jit["step"]
    assert mh.epochs_reported(bed, "preempt") == list(range(6))


def test_elastic_group_shrinks_on_host_loss_and_grows_back(bed, shards, tmp_path):
    """train.min_workers=1: with the spare host and then a host of the group lost, the group goes on
    with one worker from the last checkpoint (at the same share of its epoch), and grows back to
    two once the hosts return; the run reports every epoch once."""
    config, trace = mh.config(tmp_path, shards, "elastic", epochs=3, min_workers=1, elastic_resize_interval_s=2)
    proc = mh.train(bed, config)
    lost: list[str] = []
    try:
        mh.wait(mh.reached(trace, 0, 3), proc, 240, "epoch 0 batch 3")
        group = {mh.host_of(bed, trace, r) for r in (0, 1)}
        spare = next(h for h in WORKERS if h not in group)
        bed.kill(spare)
        lost.append(spare)
        bed.wait_node(spare, alive=False)  # else the group restarts at 2 and waits for a host that is gone
        victim = mh.host_of(bed, trace, 1)
        t_loss = time.time()
        bed.kill(victim)
        lost.append(victim)
        mh.wait(lambda: any(s["world"] == 1 and s["time"] > t_loss for s in mh.starts(trace)), proc, 240,
                "the group going on with one worker")
        for h in lost:
            bed.restart(h)
        lost = []
        mh.wait(lambda: any(s["world"] == 2 and s["time"] > t_loss for s in mh.starts(trace)), proc, 240,
                "the group growing back to two workers")
        mh.finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        if lost:
            mh.restore(bed, *lost)
    starts = sorted(mh.starts(trace), key=lambda s: s["time"])
    worlds = [s["world"] for s in starts if s["rank"] == 0]
    assert worlds[0] == 2 and 1 in worlds and worlds[-1] == 2, worlds
    assert mh.epochs_reported(bed, "elastic") == [0, 1, 2]
    one = next(s for s in starts if s["world"] == 1)
    grown = next(s for s in starts if s["world"] == 2 and s["time"] > one["time"])
    steps_of_one = [s for s in mh.steps(trace) if one["time"] < s["time"] < grown["time"]]
    assert steps_of_one, "no step was trained by the one-worker group"
    # the one-worker group counts steps in its own plan: the whole epoch (112 train rows, batch 8:
    # 14 steps) where each of two workers took 7
    assert one["global_step"] == one["epoch"] * 14 + one["batch"], one
    assert grown["global_step"] == grown["epoch"] * 7 + grown["batch"], grown


def test_verification_of_a_billion_pairs_across_hosts_survives_a_lost_host(bed, tmp_path):
    """`posefr verify` of 10^9 pairs with its Ray tasks on the worker hosts equals the single-process
    result, also with a host killed mid-run (Ray retries its tasks elsewhere)."""
    table = mh.embeddings(10_000, 100_000, 32)
    local = tmp_path / "emb" / "embeddings.parquet"
    local.parent.mkdir()
    pq.write_table(table, local)
    emb = mh.upload(bed, local.parent, "mh/emb")
    from posefr_dist.eval import run_verify

    single = run_verify(str(local), str(tmp_path / "single"), fars=(0.1, 0.01, 0.001, 1e-6), use_ray=False)
    b = single["bins"]["all"]
    assert b["genuine"] + b["impostor"] >= 10**9
    out = f"s3://{BUCKET}/mh/verify"
    proc = bed.popen("head", [POSEFR, "verify", emb, "--out", out, "--far", "0.1,0.01,0.001,1e-06"], timeout=300)
    killed = None
    try:
        time.sleep(8)  # tasks under way on every host
        if proc.poll() is None:
            killed = "w3"
            bed.kill(killed)
        mh.finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        if killed:
            mh.restore(bed, killed)
    spread = json.loads(mh.read(bed, out + "/report.json"))
    assert killed, "the verification ended before a host could be killed"
    assert mh.comparable(spread) == mh.comparable(single)


