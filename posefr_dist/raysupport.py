"""Connect to Ray: an existing cluster when one is given, otherwise an embedded local instance."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

#: variables every Ray worker needs to see (object storage, DeepSpeed on the CPU, no telemetry)
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR",
    "RAY_USAGE_STATS_ENABLED", "POSEFR_S3_CONNECT_TIMEOUT", "POSEFR_S3_REQUEST_TIMEOUT",
    # how often Ray Train's controller asks the GCS for draining (preempted) nodes (default 5 s),
    # how long it waits for a new worker group's workers (default 60 s; an elastic group sized
    # on a stale view of the cluster waits this long before it tries again with fewer), and how
    # often it polls the workers (default 2 s: a report, and its checkpoint, is registered then)
    "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S",
)


def worker_env() -> dict[str, str]:
    """The forwarded variables this process has, less those a submitted job's own runtime env
    already sets (Ray refuses to merge a job's runtime env with a conflicting one)."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")  # set by Ray in drivers of submitted jobs
    if job:
        try:
            taken = (json.loads(job).get("runtime_env") or {}).get("env_vars") or {}
        except (ValueError, AttributeError):
            taken = {}
        env = {k: v for k, v in env.items() if k not in taken}
    return env


def ensure_ray(num_cpus: int | None = None) -> None:
    """``ray.init`` once: joins ``RAY_ADDRESS`` when set (e.g. inside ``ray job submit``),
    else starts a local instance. Storage and accelerator variables are forwarded to workers.
    Ray Data's progress bars are turned off either way (also when Ray was started elsewhere)."""
    import ray

    if ray.is_initialized():
        quiet_ray_data()
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict = {"runtime_env": {"env_vars": worker_env()}, "logging_level": "WARNING"}
    if not os.environ.get("RAY_ADDRESS"):
        kwargs.update(num_cpus=num_cpus, include_dashboard=False)
        kwargs["runtime_env"]["worker_process_setup_hook"] = "posefr_dist.raysupport.quiet_local_workers"
    ray.init(**kwargs)
    quiet_ray_data()


#: loggers of Ray's own workers that flood a local run's terminal: Ray Train's placement-group
#: cleaner warns every few seconds that it cannot reach the state API, which a local instance
#: started without the dashboard does not serve (the cleaner only matters when a controller dies
#: while its cluster lives on; locally the cluster ends with the driver). Ray Train's per-report
#: INFO logs are set by ``train.ray_log_level`` instead.
LOCAL_QUIET_LOGGERS = {
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
}


def quiet_local_workers() -> None:
    """``worker_process_setup_hook`` of a local instance started by :func:`ensure_ray`: quiets the
    loggers in :data:`LOCAL_QUIET_LOGGERS` in every worker process. Clusters keep Ray's defaults."""
    for name, level in LOCAL_QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def quiet_ray_data() -> None:
    """No progress bars from Ray Data (they flood logs of batch jobs and workers)."""
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        # a training worker starts a short streaming read per epoch: no start/progress/finish lines
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        if hasattr(ctx, "enable_rich_progress_bars"):
            ctx.enable_rich_progress_bars = False
    except Exception:  # pragma: no cover - older/newer Ray without these fields
        pass


def on_this_node() -> Any:
    """A scheduling strategy for the node this process runs on (the driver's): for the run's own
    small state (bad-row counts, the decoded cache), so that losing a worker node loses none of it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
