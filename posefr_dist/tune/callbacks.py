"""Callbacks between Ray Train, Ray Tune and the experiment driver (imports Ray)."""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Any

from ray import tune
from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY, TuneReportCallback

log = logging.getLogger("posefr.tune")


def epochs_done(metrics: dict[str, Any]) -> float:
    """Completed epochs at a report: ``epoch + 1`` at an epoch's end, ``epoch`` in its middle."""
    epoch = int(metrics.get("epoch", 0))
    return float(epoch + 1 if metrics.get("end_of_epoch", True) else epoch)


class EpochReportCallback(TuneReportCallback):
    """Forwards each Ray Train report to the Tune trial that runs the trainer.

    Runs in the Train controller. Adds ``epochs_done`` (ASHA's default clock), the checkpoint's
    URI, and replaces a non-finite objective (e.g. a pose bin without probes) by 0.0, as the
    training loop does for its checkpoint metric, so that schedulers and searchers can compare it.
    """

    def __init__(self, metric: str, remote_storage: bool = False):
        super().__init__()
        self.metric = metric
        self.remote_storage = remote_storage

    def after_report(self, run_context, metrics, checkpoint) -> None:
        row = dict(metrics[0]) if metrics else {}
        row["epochs_done"] = epochs_done(row)
        value = row.get(self.metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            row[self.metric] = 0.0
        if checkpoint is not None:
            path = checkpoint.path
            row[CHECKPOINT_PATH_KEY] = ("s3://" + path.lstrip("/")) if self.remote_storage else path
        self._training_actor_item_queue.put(row)


class InterruptAfterTrials(tune.Callback):
    """Interrupts the experiment, the way Ctrl+C does, when ``n`` trials have finished.

    Ray Tune treats SIGUSR1 like SIGINT: it ends the tuning loop, stops running trials and saves
    the experiment state, which ``Tuner.restore`` resumes. The count covers the whole experiment
    and fires only when it reaches ``n`` exactly, so a resumed experiment runs to its end.
    """

    def __init__(self, n: int):
        self.n = n
        self.fired = False

    def _count(self, trials, trial) -> None:
        done = sum(1 for t in trials if t is trial or t.status in ("TERMINATED", "ERROR"))
        if self.n and not self.fired and done == self.n:
            self.fired = True
            if not callable(signal.getsignal(signal.SIGUSR1)):
                # Tune installs its handler only when the experiment runs in the main thread;
                # without it SIGUSR1 would end the process
                log.warning("tune.stop_after_trials=%d reached, but the experiment does not run in the main "
                            "thread and cannot be interrupted; it continues", self.n)
                return
            log.warning("tune.stop_after_trials=%d reached: interrupting the experiment (resume with --resume)",
                        self.n)
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._count(trials, trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._count(trials, trial)


def remove_orphaned_placement_groups() -> tuple[int, int]:
    """Remove the placement groups that dead actors of this job left behind; returns how many, and
    how many groups of this job's live actors remain.

    When Tune stops a trial (ASHA, an interruption), its actor ends and with it the Train controller
    it owns, abruptly; the controller's worker-group placement group belongs to the job, so it
    would hold its CPUs/GPUs until the experiment's driver exits and the next trial's Ray Data
    tasks could wait forever. Ray Train's own cleaner needs the dashboard's state API, which a local
    Ray started without the dashboard lacks. Only groups created by an actor of this job that has
    died, and not detached, are removed.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    removed = live = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached:
            continue
        if not pg.creator_actor_id or ray.ActorID(pg.creator_actor_id).is_nil() or pg.creator_job_id.hex() != job:
            continue
        if not pg.creator_actor_dead:
            live += 1
            continue
        log.info("removing placement group %s left by a stopped trial's training run", pg.placement_group_id.hex())
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
        removed += 1
    return removed, live


class PlacementGroupReaper(tune.Callback):
    """Runs :func:`remove_orphaned_placement_groups` in the experiment driver every few seconds."""

    def __init__(self, every_s: float = 2.0):
        self.every_s = every_s
        self._last = 0.0

    def on_step_begin(self, iteration, trials, **info) -> None:
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            try:
                remove_orphaned_placement_groups()
            except Exception as e:  # never let housekeeping end an experiment
                log.warning("could not check for orphaned placement groups: %s", e)
