"""``posefr tune``: a Ray Tune search whose trials each run a Ray Train ``TorchTrainer``.

Each trial is a Tune function trainable (the Train V2 pattern: ``Tuner(TorchTrainer)`` is not
supported). It builds its config from the experiment's base config plus the sampled values,
trains into ``<experiment>/runs/<trial id>/`` with :func:`posefr_dist.train.trainer.train`, and a
Train callback forwards every per-epoch report to Tune, so the ASHA scheduler can stop a poor
trial after any epoch and the searcher (Optuna TPE, or random) learns from the validation metric.

The experiment folder ``<tune.storage_path>/<tune.name>/`` (local or ``s3://``) holds Tune's state
(so ``resume=True`` continues an interrupted experiment, finished trials kept), ``base_config.yaml``,
the per-trial runs, and the results written at the end (posefr_dist.tune.results).
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

from posefr_dist import storage
from posefr_dist.config import Config, ConfigError, dump_config, from_dict, to_dict
from posefr_dist.tune.common import BASE_CONFIG, TuneOutcome, experiment_uri, runs_uri
from posefr_dist.tune.space import apply_params, parse_spec, to_tune_space

log = logging.getLogger("posefr.tune")


# --------------------------------------------------------------------------------------------
# Checks before anything starts
# --------------------------------------------------------------------------------------------


def _extremes(spec: Any, key: str) -> list[Any]:
    name, args = parse_spec(key, spec)
    if name == "randint":
        return [int(args[0]), int(args[1])]
    return list(args)


def check_tune(cfg: Config) -> dict[str, Any]:
    """Validate the base config, the data, and every value the space can give each key in the
    context of the base config (so e.g. a batch size the data cannot fill fails now, not in a
    trial). Returns the data facts of :func:`posefr_dist.train.trainer.check_config`."""
    from posefr_dist.train.trainer import check_config

    meta = check_config(cfg)
    for key, spec in cfg.tune.space.items():
        for value in _extremes(spec, key):
            try:
                trial = apply_params(cfg, {key: value})
                if key.startswith(("data.", "train.", "model.")):
                    check_config(trial)
            except ConfigError as e:
                raise ConfigError(f"tune.space.{key}: value {value!r} gives an invalid trial config: {e}") from None
    if cfg.tune.scheduler == "asha" and cfg.tune.grace_period >= _asha_max_t(cfg, meta):
        log.warning("tune.grace_period=%d is not before the last report (train.epochs=%d): ASHA cannot stop "
                    "any trial early; every trial runs to its end", cfg.tune.grace_period, cfg.train.epochs)
    return meta


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial holds while it trains: its driver plus the Train workers."""
    tc = cfg.train
    need = {"CPU": cfg.tune.driver_cpus + tc.num_workers * tc.cpus_per_worker}
    if tc.use_gpu:
        need["GPU"] = tc.num_workers * tc.gpus_per_worker
    return need


def concurrency(cfg: Config, cluster: dict[str, float], fixed_cluster: bool = True) -> int:
    """How many trials run at once: ``tune.max_concurrent``, or (0) as many as ``cluster`` holds
    with ``tune.data_cpus`` left per trial for Ray Data.

    Raises:
        ConfigError: one trial needs more than the cluster has (it would wait forever) and the
            cluster cannot grow (``fixed_cluster``: the embedded local Ray).
    """
    need = trial_resources(cfg)
    for res, amount in need.items():
        have = float(cluster.get(res, 0.0))
        if amount > have + 1e-9:
            msg = (f"one trial needs {amount:g} {res} (tune.driver_cpus + train.num_workers x "
                   f"train.{'cpus' if res == 'CPU' else 'gpus'}_per_worker) but the cluster has {have:g}")
            if fixed_cluster:
                raise ConfigError(f"train.num_workers: {msg}")
            log.warning("%s; waiting for the autoscaler", msg)
    if cfg.tune.max_concurrent:
        n = cfg.tune.max_concurrent
        free = cluster.get("CPU", 0.0) - n * need["CPU"]
        if free < 1.0 - 1e-9:
            # Ray Data's read tasks take a whole CPU each; with none free, every trial waits forever
            msg = (f"tune.max_concurrent: {n} trials hold {n * need['CPU']:.3g} of the cluster's "
                   f"{cluster.get('CPU', 0):g} CPUs, leaving under 1 CPU for Ray Data's read tasks")
            if fixed_cluster:
                raise ConfigError(msg + "; lower it, or train.cpus_per_worker / tune.driver_cpus")
            log.warning("%s; waiting for the autoscaler", msg)
        return n
    fits = [math.floor((cluster.get("CPU", 0.0) - 1.0 + 1e-9) / need["CPU"]),  # 1 CPU for Ray Data
            math.floor((cluster.get("CPU", 0.0) + 1e-9) / (need["CPU"] + cfg.tune.data_cpus))]
    if "GPU" in need:
        fits.append(math.floor((cluster.get("GPU", 0.0) + 1e-9) / need["GPU"]))
    return max(1, min(fits))


def _asha_max_t(cfg: Config, meta: dict[str, Any]) -> float:
    """The clock value of a trial's last report, less a half: ASHA places no rung there, so a trial
    that reached its last epoch always finishes (and writes its summary) instead of being cut."""
    tc = cfg.train
    reports = tc.epochs
    if cfg.tune.time_attr == "training_iteration" and tc.val_every_steps:
        steps = (meta["train_rows"] // tc.num_workers) // cfg.data.batch_size // tc.grad_accum
        if tc.max_steps_per_epoch:
            steps = min(steps, tc.max_steps_per_epoch)
        reports = tc.epochs + tc.epochs * max(steps, 1) // tc.val_every_steps  # at most
    return max(reports - 0.5, 0.5)


# --------------------------------------------------------------------------------------------
# The trial
# --------------------------------------------------------------------------------------------


def trial_config(base: Config, params: dict[str, Any], exp_uri: str, trial_id: str) -> Config:
    """The config a trial trains with: ``base`` + sampled ``params``, its run under the experiment,
    its checkpoints ranked by the experiment's objective (so the trial's best one is kept)."""
    ranking = {}
    if base.tune.metric.startswith("val/"):
        ranking = {"train__checkpoint_metric": base.tune.metric, "train__checkpoint_mode": base.tune.mode}
    return apply_params(base, params, train__storage_path=runs_uri(exp_uri), train__run_name=trial_id,
                        train__resume_from="", **ranking)


def run_trial(config: dict[str, Any], base: dict[str, Any], exp_uri: str) -> None:
    """Tune function trainable: train one trial's config, forwarding reports to Tune.

    A retried trial (``tune.max_failures``) or one resumed with the experiment reuses its run
    folder, so Ray Train resumes it from its last checkpoint.
    """
    from ray import tune

    from posefr_dist.train.trainer import train
    from posefr_dist.tune.callbacks import EpochReportCallback

    base_cfg = from_dict(base)
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base_cfg, config, exp_uri, trial_id)
    log.info("trial %s: %s", trial_id, ", ".join(f"{k}={v}" for k, v in config.items()))
    train(cfg, callbacks=[EpochReportCallback(cfg.tune.metric, storage.is_remote(exp_uri))])


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _trainable(base: Config, exp_uri: str):
    from ray import tune

    fn = tune.with_parameters(run_trial, base=to_dict(base), exp_uri=exp_uri)
    return tune.with_resources(fn, {"cpu": base.tune.driver_cpus})


# --------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------


def _searcher(cfg: Config, max_concurrent: int):
    """Optuna TPE (Tune wraps it in a concurrency limiter) or Tune's random/grid generator (which
    limits concurrency itself: Tune ignores ``max_concurrent_trials`` for it)."""
    tc = cfg.tune
    points = [dict(p) for p in tc.initial_points] or None
    if tc.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna.samplers.TPESampler(seed=tc.seed, n_startup_trials=tc.tpe_startup_trials)
        return OptunaSearch(points_to_evaluate=points, sampler=sampler)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(points_to_evaluate=points, random_state=tc.seed, max_concurrent=max_concurrent)


def _scheduler(cfg: Config, meta: dict[str, Any]):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    tc = cfg.tune
    if tc.scheduler == "fifo" or tc.grace_period >= _asha_max_t(cfg, meta):  # no rung before the end
        return FIFOScheduler()
    return ASHAScheduler(time_attr=tc.time_attr, max_t=_asha_max_t(cfg, meta), grace_period=tc.grace_period,
                         reduction_factor=tc.reduction_factor, stop_last_trials=False)


def _cluster_resources() -> tuple[dict[str, float], bool]:
    import ray

    return dict(ray.cluster_resources()), not os.environ.get("RAY_ADDRESS")


def _differences(a: Config, b: Config) -> list[str]:
    """Dotted ``section.field`` keys whose values differ between two configs."""
    da, db = to_dict(a), to_dict(b)
    diff = []
    for section, values in da.items():
        if isinstance(values, dict):
            diff += [f"{section}.{k}" for k in values if values[k] != db.get(section, {}).get(k)]
        elif values != db.get(section):
            diff.append(section)
    return diff


def run_tune(cfg: Config, resume: bool = False) -> TuneOutcome:
    """Run (or, with ``resume``, continue) the experiment of ``cfg``; write its results.

    A new experiment refuses to start over an existing one (use ``resume`` or another
    ``tune.name``). A resumed one keeps its finished trials and reruns unfinished ones (and failed
    ones with ``tune.resume_errored``); its trials use the saved ``base_config.yaml``.

    Raises:
        ConfigError: a bad value, missing data or a trial too big for the cluster, before any trial.
        RuntimeError: every trial failed.
    """
    from ray import tune

    from posefr_dist.raysupport import ensure_ray
    from posefr_dist.tune.callbacks import InterruptAfterTrials, PlacementGroupReaper, remove_orphaned_placement_groups
    from posefr_dist.tune.results import write_results

    t0 = time.perf_counter()
    logging.getLogger("tensorboardX").setLevel(logging.WARNING)  # metric names with '@', '='
    exp = experiment_uri(cfg)
    fs, store_path = storage.filesystem(cfg.tune.storage_path)
    exp_path = f"{store_path.rstrip('/')}/{cfg.tune.name}"
    base_uri = storage.join(exp, BASE_CONFIG)
    if resume:
        if not storage.exists(base_uri):
            raise ConfigError(f"tune.name: no experiment to resume at {exp} (no {BASE_CONFIG})")
        base = load_config_text(storage.read_text(base_uri), base_uri)
        changed = _differences(base, cfg)
        if changed:
            log.warning("resuming %s as it was started (its base_config.yaml and Tune state); ignoring the "
                        "changed %s", exp, ", ".join(changed))
    else:
        base = cfg
        if storage.exists(base_uri):
            raise ConfigError(f"tune.name: experiment {exp} exists; continue it with --resume or choose another "
                              "tune.name")
    meta = check_tune(base)
    ensure_ray()
    from ray.tune import Tuner

    cluster, fixed = _cluster_resources()
    n_conc = concurrency(base, cluster, fixed)
    trainable = _trainable(base, exp)
    if resume:
        if not Tuner.can_restore(exp_path, storage_filesystem=fs):
            raise ConfigError(f"tune.name: {exp} has no Ray Tune state to resume")
        log.info("resuming experiment %s", exp)
        tuner = Tuner.restore(exp_path, trainable=trainable, resume_unfinished=True,
                              resume_errored=base.tune.resume_errored, storage_filesystem=fs)
    else:
        if Tuner.can_restore(exp_path, storage_filesystem=fs):
            raise ConfigError(f"tune.name: experiment {exp} exists; continue it with --resume or choose another "
                              "tune.name")
        storage.write_text(base_uri, dump_config(base))
        tc = base.tune
        log.info("experiment %s: %d trials (%s search, %s), %d at once, each %s; objective %s (%s)",
                 exp, tc.num_samples, tc.search, tc.scheduler, n_conc, trial_resources(base), tc.metric, tc.mode)
        tuner = Tuner(
            trainable,
            param_space=to_tune_space(tc.space),
            tune_config=tune.TuneConfig(
                metric=tc.metric, mode=tc.mode, search_alg=_searcher(base, n_conc), scheduler=_scheduler(base, meta),
                num_samples=tc.num_samples, max_concurrent_trials=n_conc if tc.search == "optuna" else None,
                reuse_actors=False,
                trial_dirname_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=tc.name, storage_path=store_path, storage_filesystem=fs,
                failure_config=tune.FailureConfig(max_failures=tc.max_failures),
                callbacks=[PlacementGroupReaper(),
                           *([InterruptAfterTrials(tc.stop_after_trials)] if tc.stop_after_trials else [])],
                verbose=1,
            ),
        )
    remove_orphaned_placement_groups()  # e.g. of trials an earlier session stopped
    grid = tuner.fit()
    _reap_after(15.0)
    outcome = write_results(grid, base, exp, wall_s=time.perf_counter() - t0)
    if outcome.rows and all(r["status"] == "error" for r in outcome.rows) and not outcome.interrupted:
        raise RuntimeError(f"every trial of {exp} failed; first error: {outcome.rows[0].get('error')}")
    return outcome


def _reap_after(wait_s: float) -> None:
    """Free what trials stopped at the end of the session hold: their training runs' controllers
    die within seconds of the trial; wait for that (at most ``wait_s``)."""
    from posefr_dist.tune.callbacks import remove_orphaned_placement_groups

    deadline = time.monotonic() + wait_s
    while True:
        _, live = remove_orphaned_placement_groups()
        if not live or time.monotonic() >= deadline:
            return
        time.sleep(0.5)


def load_config_text(text: str, where: str) -> Config:
    """A config from YAML text (e.g. an experiment's saved base config)."""
    import yaml

    try:
        return from_dict(yaml.safe_load(text) or {})
    except (ConfigError, yaml.YAMLError) as e:
        raise ConfigError(f"{where}: {e}") from None
