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
from concurrent.futures import ThreadPoolExecutor

import pyarrow.parquet as pq
import pytest

from posefr_dist.data.synth import synthesize
from tests import multihost as mh
from tests.data_utils import tiny_cfg
from tests.multihost import BUCKET, POSEFR, WORKERS
from tests.testbed import testbed_fixture

pytestmark = [pytest.mark.slow, pytest.mark.testbed, pytest.mark.multihost]

# of the reference run and the interrupted one (7 steps each): the old group trains on through the
# preemption's grace period (up to two epochs on a fast machine), and two failures follow it
EPOCHS = 6
ELASTIC_EPOCHS = 10  # the one-worker group must not finish the run while the lost host starts again

# head + three worker hosts of 2 CPUs and one train slot each: a 2-worker group has a spare host
bed = testbed_fixture("pfrmh", workers=len(WORKERS), worker_cpus=2, grace=6,
                      worker_resources={"train_slot": 1},
                      extra_env={"RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "1",
                                 # reports (checkpoints) registered within 0.25 s, as in the session Ray
                                 "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
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
    config, trace = mh.config(tmp, shards, "reference", epochs=EPOCHS)
    mh.finish(mh.train(bed, config))
    hosts = {mh.host_of(bed, trace, r) for r in (0, 1)}
    assert len(hosts) == 2, f"both workers ran on one host: {hosts}"
    return mh.final_weights(bed, "reference", tmp), mh.steps(trace), trace


def test_two_hosts_train_from_s3_one_worker_each(bed, reference):
    weights, steps, trace = reference
    starts = mh.starts(trace)
    assert sorted(s["rank"] for s in starts) == [0, 1] and {s["world"] for s in starts} == {2}
    assert {s["node_ip"] for s in starts} <= {bed.ip(h) for h in WORKERS}
    assert mh.epochs_reported(bed, "reference") == list(range(EPOCHS))
    assert steps and weights


def test_preempted_killed_and_cut_hosts_resume_to_the_same_weights(bed, shards, reference, tmp_path):
    """One run, three failures of a host of its group, each time restarted on the hosts left:
    - in epoch 0: SIGTERM with a grace period (a spot reclaim): the workers save a checkpoint at the
      notice, and the restarted group resumes from it or a newer one (at most the steps trained
      after the notice's checkpoint are lost);
    - then, each in the group that followed and early in an epoch, once a checkpoint of it is
      registered: every process of a host killed, then a host's link cut.
    Each restart resumes from the newest checkpoint before it, no epoch is reported twice, and the
    final weights equal the uninterrupted run's."""
    config, trace = mh.config(tmp_path, shards, "failures", epochs=EPOCHS)
    proc = mh.train(bed, config)
    events: dict[str, float] = {}
    # the previous victim comes back in a thread while the group trains on: capacity for the next
    # restart (awaited by the next strike after its action)
    pool = ThreadPoolExecutor(max_workers=1)
    back = None
    try:
        for kind, (epoch, batch) in (("preempt", (0, 1)), ("kill", (1, 1)), ("cut", (2, 1))):
            victim, events[kind] = mh.strike(bed, trace, proc, kind, epoch, batch,
                                             after=max(events.values(), default=0.0), capacity=back,
                                             run=None if kind == "preempt" else "failures")
            back = pool.submit(mh.restore, bed, victim)
        back.result()
        mh.finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
        pool.shutdown(wait=True)
        mh.restore(bed, *WORKERS)  # whatever a failed step left down (healthy hosts are left alone)
    starts = sorted(mh.starts(trace), key=lambda s: s["time"])
    assert mh.epochs_reported(bed, "failures") == list(range(EPOCHS))
    assert all(s["world"] == 2 for s in starts)
    hist = mh.history(bed, "failures")
    seen = mh.timeline(events, starts, hist, mh.steps(trace))  # in the messages: what happened when
    for kind, t in events.items():
        resumed = [s for s in starts if s["time"] > t][:2]  # the group that followed the failure
        t_resumed = min(s["time"] for s in resumed)
        newest = max((h for h in hist if h.get("checkpoint") and h["time"] < t_resumed), key=lambda h: h["step"])
        assert {s["global_step"] for s in resumed} == {newest["step"]}, (kind, seen)
        if kind != "preempt":  # the checkpoints every 2 steps: the failure struck mid-epoch
            assert {s["batch"] for s in resumed} != {0}, (kind, seen)
    jit = [h for h in hist if h.get("preemption_checkpoint")]
    assert len(jit) == 1 and events["preempt"] < jit[0]["time"] < events["kill"], jit
    after_notice = [s for s in starts if s["time"] > events["preempt"]]
    assert after_notice[0]["global_step"] >= jit[0]["step"]
    mh.assert_same_weights(reference[0], mh.final_weights(bed, "failures", tmp_path))


def test_elastic_group_shrinks_on_host_loss_and_grows_back(bed, shards, tmp_path):
    """train.min_workers=1: with the spare host and then a host of the group lost, the group goes on
    with one worker from the last checkpoint (at the same share of its epoch), and grows back to
    two once the lost host returns (the spare only after the run); the run reports every epoch once."""
    config, trace = mh.config(tmp_path, shards, "elastic", epochs=ELASTIC_EPOCHS, min_workers=1,
                              elastic_resize_interval_s=2)
    proc = mh.train(bed, config)
    lost: list[str] = []
    events: dict[str, float] = {}
    try:
        mh.wait(mh.reached(trace, 0, 3), proc, 240, "epoch 0 batch 3")
        group = {mh.host_of(bed, trace, r) for r in (0, 1)}
        spare = next(h for h in WORKERS if h not in group)
        bed.kill(spare)
        lost.append(spare)
        bed.wait_node(spare, alive=False)  # else the group restarts at 2 and waits for a host that is gone
        victim = mh.host_of(bed, trace, 1)
        t_loss = events["kill"] = time.time()
        bed.kill(victim)
        lost.append(victim)
        mh.wait(lambda: any(s["world"] == 1 and s["time"] > t_loss for s in mh.starts(trace)), proc, 240,
                "the group going on with one worker")
        events["restart"] = time.time()
        bed.restart(victim)  # the spare stays down: the group grows back onto the host it lost
        events["node alive"] = time.time()
        lost.remove(victim)
        mh.wait(lambda: any(s["world"] == 2 and s["time"] > t_loss for s in mh.starts(trace)), proc, 240,
                "the group growing back to two workers")
        mh.finish(proc)
    except AssertionError as e:  # with what happened when
        raise AssertionError(f"{e}\n{mh.timeline(events, mh.starts(trace), [], mh.steps(trace)[-3:])}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
        if lost:
            mh.restore(bed, *lost)
    starts = sorted(mh.starts(trace), key=lambda s: s["time"])
    worlds = [s["world"] for s in starts if s["rank"] == 0]
    assert worlds[0] == 2 and 1 in worlds and worlds[-1] == 2, worlds
    assert mh.epochs_reported(bed, "elastic") == list(range(ELASTIC_EPOCHS))
    one = next(s for s in starts if s["world"] == 1)
    grown = next(s for s in starts if s["world"] == 2 and s["time"] > one["time"])
    steps_of_one = [s for s in mh.steps(trace) if one["time"] < s["time"] < grown["time"]]
    assert steps_of_one, "no step was trained by the one-worker group"
    # the one-worker group counts steps in its own plan: the whole epoch (112 train rows, batch 8:
    # 14 steps) where each of two workers took 7
    assert one["global_step"] == one["epoch"] * 2 * mh.STEPS_PER_EPOCH + one["batch"], one
    assert grown["global_step"] == grown["epoch"] * mh.STEPS_PER_EPOCH + grown["batch"], grown


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


