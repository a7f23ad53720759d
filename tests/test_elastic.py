"""World-size changes and preemption notices of the training loop, without a cluster (the
multi-host runs are in tests/test_multihost.py)."""

from __future__ import annotations

import pytest

from posefr_dist.config import ConfigError, load_config
from posefr_dist.train.control import PreemptionCheck, position_for_world


@pytest.mark.parametrize(
    "args, want",
    [
        # 2 -> 1 worker: 3 batches of 8 rows on each of 2 ranks = 48 rows = 6 batches of one rank
        ((1, 3, 2, 1, 8, 1, 10), (1, 6, 16)),
        # 1 -> 2 workers: 5 batches of one rank = 40 rows = 2.5 batches per rank: rounded down
        ((1, 5, 1, 2, 8, 1, 10), (1, 2, 12)),
        # with grad_accum 2 the batch count stays a whole number of optimizer steps
        ((0, 6, 2, 3, 4, 2, 10), (0, 4, 2)),
        # past the new world's epoch length: the next epoch, from its start
        ((2, 9, 3, 1, 8, 1, 20), (3, 0, 60)),
        # same world: unchanged
        ((1, 4, 2, 2, 8, 1, 10), (1, 4, 14)),
    ],
)
def test_position_for_world_keeps_the_share_of_the_epoch(args, want):
    assert position_for_world(*args) == want


def test_position_for_world_never_passes_the_rows_already_read():
    for saved in (1, 2, 3, 4):
        for world in (1, 2, 3, 4):
            for batches in range(0, 12):
                epoch, b, step = position_for_world(0, batches, saved, world, 8, 1, 100)
                assert b * 8 * world <= batches * 8 * saved
                assert step == b


def test_preemption_check_asks_only_every_n_steps(monkeypatch):
    import ray.train

    calls = []

    class Info:
        preempted_node_ids = ["n1"]
        preempted_ranks = [1]
        deadline_ms = 123

    answers = iter([None, Info()])
    monkeypatch.setattr(ray.train, "get_preemption_info", lambda: calls.append(1) or next(answers))
    check = PreemptionCheck(every=3)
    got = [check.notice(step) for step in range(1, 10)]
    # asked at steps 3 and 6; the notice at 6 is said once, and nothing is asked afterwards
    assert got == [False, False, False, False, False, True, False, False, False]
    assert len(calls) == 2
    assert not any(PreemptionCheck(every=0).notice(s) for s in range(1, 5))


@pytest.mark.parametrize("override, field", [
    ("train.worker_resources={CPU: 1}", "train.worker_resources.CPU"),
    ("train.worker_resources={slot: 0}", "train.worker_resources.slot"),
    ("train.elastic_resize_interval_s=0", "train.elastic_resize_interval_s"),
    ("train.max_preemptions=-2", "train.max_preemptions"),
    ("train.preemption_check_steps=-1", "train.preemption_check_steps"),
])
def test_elastic_settings_are_checked(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, [override])


def test_elastic_settings_make_a_valid_scaling_config():
    import ray.train

    cfg = load_config(None, ["train.worker_resources={train_slot: 1}", "train.min_workers=1",
                             "train.elastic_resize_interval_s=5"])
    tc = cfg.train
    assert tc.worker_resources == {"train_slot": 1.0}
    sc = ray.train.ScalingConfig(num_workers=(tc.min_workers, tc.num_workers),
                                 resources_per_worker={"CPU": tc.cpus_per_worker, **tc.worker_resources},
                                 elastic_resize_monitor_interval_s=tc.elastic_resize_interval_s)
    assert (sc.min_workers, sc.max_workers) == (1, 2)
    assert sc._resources_per_worker_not_none["train_slot"] == 1.0
    ray.train.FailureConfig(max_failures=tc.max_failures, max_preemption_failures=tc.max_preemptions)


def test_gpu_pods_drain_within_their_grace_period():
    """The GPU worker pods of k8s/base/raycluster.yaml: SIGTERM drains the Ray node (the notice
    the training workers save a checkpoint on) for less time than Kubernetes waits before SIGKILL."""
    from pathlib import Path

    import yaml

    doc = yaml.safe_load((Path(__file__).resolve().parents[1] / "k8s" / "base" / "raycluster.yaml").read_text())
    group = next(g for g in doc["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu")
    spec = group["template"]["spec"]
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    drain = float(env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"])
    assert 30 <= drain < spec["terminationGracePeriodSeconds"]
