"""The per-worker training loop run by Ray Train (``train_loop_per_worker``).

Each worker builds the model, wraps it in a DeepSpeed engine, streams its share of the train split
(its planned batches from ``posefr_dist.data.loader``), and at every epoch end (and every ``val_every_steps``)
validates the 2D branch on the val split with the exact pose-binned protocol, saves a checkpoint
and reports both with ``ray.train.report``. A restarted worker group resumes from the last reported
checkpoint (on whatever world size it restarts with); an explicit ``resume_from`` does the same
from any checkpoint. Run-control pieces (optimizer, preemption notices, world-size changes) are in
``posefr_dist.train.control``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from typing import Any, Iterator

import numpy as np
import torch

from posefr_dist.config import Config
from posefr_dist.data.loader import RankBatches, RankStream, iter_split, plan_for
from posefr_dist.data.pipeline import collate
from posefr_dist.train.control import (Chaos, PreemptionCheck, PretrainedFreeze, build_optimizer, je_weight,
                                       position_for_world, refresh_lr, set_report_log_level, sync_buffers)

log = logging.getLogger("posefr.train")


def config_from_dict(tree: dict[str, Any]) -> Config:
    from posefr_dist.config import _build

    return _build(Config, tree)


def flatten_report(report: dict[str, Any], prefix: str = "val") -> dict[str, float]:
    """``val/tar@far=0.01/90+``-style scalars from a verification report (missing values -> NaN)."""
    out: dict[str, float] = {}
    for name, b in report["bins"].items():
        for far, tar in (b.get("tar_at_far") or {}).items():
            out[f"{prefix}/tar@far={far}/{name}"] = float("nan") if tar is None else float(tar)
        if b.get("eer") is not None:
            out[f"{prefix}/eer/{name}"] = float(b["eer"])
    return out


def embed_split(module: torch.nn.Module, batches: Iterator[dict[str, Any]], device: torch.device,
                dtype: torch.dtype) -> dict[str, np.ndarray]:
    """2D embeddings of every row of an iterator, with their ids and yaw."""
    embs, subs, yaws, sids = [], [], [], []
    was_training = module.training
    module.eval()
    with torch.no_grad():
        for b in batches:
            e = module.embed_2d(b["image"].to(device=device, dtype=dtype))
            embs.append(e.float().cpu().numpy())
            subs += list(b["subject_id"])
            sids += list(b["sample_id"])
            yaws.append(b["yaw_deg"].float().numpy())
    module.train(was_training)
    if not embs:
        return {"embedding": np.zeros((0, 1), np.float32), "subject_id": np.array([]), "yaw_deg": np.zeros(0),
                "sample_id": np.array([])}
    return {"embedding": np.concatenate(embs), "subject_id": np.asarray(subs), "yaw_deg": np.concatenate(yaws),
            "sample_id": np.asarray(sids)}


def validate(cfg: Config, emb: dict[str, np.ndarray]) -> dict[str, float]:
    from posefr_dist.eval import verify_arrays

    yaw = emb["yaw_deg"]
    enrollment = np.abs(yaw) <= cfg.eval.enroll_max_yaw
    if not enrollment.any() or enrollment.all():
        log.warning("validation skipped: the val split has %d gallery and %d probe rows",
                    int(enrollment.sum()), int((~enrollment).sum()))
        return {}
    report = verify_arrays(emb["embedding"], emb["subject_id"], yaw, enrollment, fars=cfg.eval.fars,
                           yaw_edges=cfg.eval.yaw_edges)
    return flatten_report(report)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.util

    from posefr_dist.metrics import TrainingMetrics, start_training_exporter
    from posefr_dist.model import build_model
    from posefr_dist.train import checkpoint as ckpt
    from posefr_dist.train.deepspeed import deepspeed_config, import_deepspeed, resolve_precision
    from posefr_dist.train.reference import LOSS_TERMS

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = config_from_dict(config["cfg"])
    meta_in: dict[str, Any] = config["meta"]
    tc = cfg.train
    set_report_log_level(tc.ray_log_level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    deepspeed = import_deepspeed(tc.use_gpu)
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    np.random.seed(tc.seed)
    if tc.use_gpu:
        device = torch.device("cuda", ctx.get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(os.environ.get("POSEFR_TORCH_THREADS", "1"))))
    precision = resolve_precision(tc)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    model = build_model(cfg.model, cfg.loss, num_classes=meta_in["num_classes"], image_size=meta_in["image_size"],
                        num_points=meta_in["num_points"])
    loaded = None
    if cfg.model.pretrained_2d:
        loaded = ckpt.load_pretrained_2d(model, cfg.model.pretrained_2d)
        if rank == 0:
            log.info("2D trunk from %s (%s layout): %d tensors loaded, %d file keys skipped", cfg.model.pretrained_2d,
                     loaded["format"], len(loaded["loaded"]), len(loaded["skipped"]))
    base_lambda_je = float(model.lambda_je)
    data = config["data"]
    train_h, val_h = data["train"], data["val"]
    # every epoch deals each rank the same number of rows (the plan's equal shares)
    rows_per_worker = plan_for(train_h.source, cfg.data, seed=tc.seed, epoch=0, world=world).rows_per_rank
    micro_per_epoch = rows_per_worker // cfg.data.batch_size
    steps_per_epoch = micro_per_epoch // tc.grad_accum
    if tc.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, tc.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(f"train split gives {rows_per_worker} rows per worker: fewer than one step of "
                         f"data.batch_size={cfg.data.batch_size} x train.grad_accum={tc.grad_accum}")
    total_steps = steps_per_epoch * tc.epochs
    optimizer, scheduler, freeze = build_optimizer(model, tc, total_steps, loaded)
    if rank == 0 and loaded is not None and len(optimizer.param_groups) > 2:
        log.info("pretrained parameters at lr x %g, frozen for %d epoch(s)", tc.pretrained_lr_mult,
                 tc.freeze_pretrained_epochs)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(tc, cfg.data.batch_size, world), dist_init_required=False,
    )

    start_epoch, global_step, skip_batches = 0, 0, 0
    # after a worker-group restart, the run's last checkpoint; else the one asked for (if any)
    resume = ray.train.get_checkpoint()
    if resume is None and tc.resume_from:
        from posefr_dist import storage

        rfs, rpath = storage.filesystem(tc.resume_from)
        resume = ray.train.Checkpoint(path=rpath, filesystem=rfs)
    micro_needed = steps_per_epoch * tc.grad_accum
    if resume is not None:
        with resume.as_directory() as d:
            m = ckpt.load(engine, d, world)
        pos = m.get("data_position", {})
        start_epoch, skip_batches = int(pos.get("epoch", m["epoch"] + 1)), int(pos.get("batches", 0))
        global_step = int(m["global_step"])
        saved_world = int(m.get("world_size", world))
        if saved_world != world:
            # another world size (an elastic resize, a restart on fewer nodes): same share of the epoch
            start_epoch, skip_batches, global_step = position_for_world(
                start_epoch, skip_batches, saved_world, world, cfg.data.batch_size, tc.grad_accum, steps_per_epoch)
            if scheduler is not None:  # the schedule's position in this world's step count
                scheduler.last_epoch = global_step
                refresh_lr(scheduler)
        if rank == 0:
            log.info("resumed from checkpoint (epoch %s, step %d, %d worker(s), optimizer %s); continuing on %d "
                     "worker(s) at epoch %d batch %d", m["epoch"], int(m["global_step"]), saved_world,
                     m["optimizer_state"], world, start_epoch, skip_batches)

    metrics = TrainingMetrics()
    server = start_training_exporter(metrics, tc.metrics_port) if (rank == 0 and tc.metrics_port) else None
    chaos = Chaos(tc.chaos_kill_at, os.path.join(config.get("chaos_dir") or tempfile.gettempdir(), "chaos-fired"))
    trace = None
    if cfg.data.trace_dir:
        os.makedirs(cfg.data.trace_dir, exist_ok=True)
        trace = open(os.path.join(cfg.data.trace_dir, f"rank{rank}.jsonl"), "a")
        # one line per worker start: where each rank of each (re)started group ran and resumed
        with open(os.path.join(cfg.data.trace_dir, "workers.jsonl"), "a") as f:
            f.write(json.dumps({"rank": rank, "world": world, "node_ip": ray.util.get_node_ip_address(),
                                "pid": os.getpid(), "epoch": start_epoch, "batch": skip_batches,
                                "global_step": global_step, "time": time.time()}) + "\n")
    zero3 = tc.zero_stage == 3
    t_run = time.perf_counter()

    def checkpoint_and_report(epoch: int, step_in_epoch: int, end_of_epoch: bool, epoch_stats: dict[str, float],
                              validate_now: bool = True):
        emb = None
        if validate_now and (rank == 0 or zero3):  # under ZeRO-3 every rank takes part in each forward
            emb = embed_split(engine.module, (collate(b) for b in iter_split(val_h, cfg.data, cfg.eval.batch_size)),
                              device, dtype)
        report: dict[str, Any] = dict(epoch_stats)
        if rank == 0 and emb is not None:
            report.update(validate(cfg, emb))
            metrics.update_validation(report)
            for name, h in (("train", train_h), ("val", val_h)):  # counted once per row however often read
                metrics.skipped_rows.labels(split=name).set(h.source.skipped())
        # the checkpoint ranking needs a number: a metric without pairs counts as 0
        if not math.isfinite(report.get(tc.checkpoint_metric, float("nan"))):
            report[tc.checkpoint_metric] = 0.0
        position = {"epoch": epoch + 1, "batches": 0} if end_of_epoch else {"epoch": epoch, "batches": step_in_epoch * tc.grad_accum}
        meta = {
            "epoch": epoch if end_of_epoch else epoch - 1,
            "epoch_in_progress": None if end_of_epoch else epoch,
            "global_step": global_step,
            "data_position": position,
            "world_size": world,
            "zero_stage": tc.zero_stage,
            "precision": precision,
            "num_classes": meta_in["num_classes"],
            "image_size": meta_in["image_size"],
            "num_points": meta_in["num_points"],
            "config": config["cfg"],
            "metrics": {k: v for k, v in report.items() if isinstance(v, (int, float))},
        }
        report.update(epoch=epoch, step=global_step, end_of_epoch=end_of_epoch)
        with tempfile.TemporaryDirectory(prefix="posefr-ckpt-") as tmp:
            ckpt.save(engine, tmp, meta, rank)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if rank == 0:
            tars = {k.split("/", 1)[1]: round(v, 4) for k, v in report.items()
                    if k.startswith("val/tar@far=0.01/") and isinstance(v, float)}
            log.info("epoch %d step %d: validation %s", epoch, global_step, tars)

    preemption = PreemptionCheck(tc.preemption_check_steps)
    # a streamed split: one read for the rest of the run (the cached one is indexed in memory)
    stream = None if train_h.is_cached else RankStream(
        train_h, cfg.data, seed=tc.seed, rank=rank, world=world, epochs=list(range(start_epoch, tc.epochs)),
        batch_size=cfg.data.batch_size, batches=micro_needed, start=skip_batches)
    for epoch in range(start_epoch, tc.epochs):
        engine.train()
        # both are functions of the epoch, so a resumed run continues them exactly
        freeze.set_epoch(epoch, scheduler)
        engine.module.lambda_je = je_weight(base_lambda_je, epoch, cfg.loss.je_warmup_epochs)
        metrics.epoch.set(epoch)
        sums = {k: 0.0 for k in LOSS_TERMS}
        seen, wait, t_epoch = 0, 0.0, time.perf_counter()
        # the planned batches of this rank, from where a resumed run left off (nothing skipped is read)
        start = skip_batches if epoch == start_epoch else 0
        loader = RankBatches(train_h, cfg.data, seed=tc.seed, epoch=epoch, rank=rank, world=world,
                             batch_size=cfg.data.batch_size, start=start, augment=cfg.data.augment,
                             pin_memory=tc.use_gpu, stream=stream, batches=micro_needed)
        it = iter(loader)
        micro, step_in_epoch = start, start // tc.grad_accum
        while step_in_epoch < steps_per_epoch:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                break
            wait += time.perf_counter() - t0
            micro += 1
            chaos.maybe_die(epoch, step_in_epoch, rank)
            if trace is not None:
                trace.write(json.dumps({"epoch": epoch, "batch": micro - 1, "gid": batch["gid"].tolist(),
                                       "time": time.time()}) + "\n")
                trace.flush()
            inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "gid"}
            inputs["image"] = inputs["image"].to(dtype)
            inputs["points"] = inputs["points"].to(dtype)
            out = engine(inputs)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch} step {global_step}: "
                                         + ", ".join(f"{k}={float(out[k])}" for k in LOSS_TERMS))
            engine.backward(loss)
            engine.step()
            if micro % tc.grad_accum == 0:  # an optimizer step just happened
                sync_buffers(engine.module, world)
            n = int(inputs["image"].shape[0])
            seen += n
            for k in LOSS_TERMS:
                sums[k] += float(out[k].detach().float()) * n
            if micro % tc.grad_accum:
                continue
            step_in_epoch += 1
            global_step += 1
            if rank == 0 and (global_step % tc.log_every_steps == 0 or step_in_epoch == steps_per_epoch):
                dt = time.perf_counter() - t_epoch
                rate = seen * world / max(dt, 1e-9)
                left = (tc.epochs - epoch) * steps_per_epoch - step_in_epoch
                eta = left * dt / max(step_in_epoch, 1)
                lr = scheduler.get_last_lr()[0] if scheduler is not None else tc.lr
                terms = {k: sums[k] / max(seen, 1) for k in LOSS_TERMS}
                metrics.update_losses(terms)
                metrics.lr.set(lr)
                metrics.step.set(global_step)
                metrics.samples_per_s.set(rate)
                log.info("epoch %d step %d/%d loss %.4f (2d %.4f 3d %.4f je %.4f) lr %.4g %.1f samples/s "
                         "data wait %.0f%% ETA %.0fs", epoch, step_in_epoch, steps_per_epoch, terms["loss"],
                         terms["loss_2d"], terms["loss_3d"], terms["loss_je"], lr, rate,
                         100 * wait / max(dt, 1e-9), eta)
            mid_epoch = step_in_epoch < steps_per_epoch
            if tc.val_every_steps and global_step % tc.val_every_steps == 0 and mid_epoch:
                checkpoint_and_report(epoch, step_in_epoch, False, _epoch_stats(sums, seen, world, wait, t_epoch,
                                                                                 scheduler, tc))
                freeze.apply_eval()  # validation put the whole model back in training mode
            elif preemption.notice(global_step) and mid_epoch:
                # a just-in-time checkpoint (no validation: the node's grace period is short); the run
                # trains on until the node goes, and the restarted group resumes from here
                stats = _epoch_stats(sums, seen, world, wait, t_epoch, scheduler, tc)
                stats["preemption_checkpoint"] = 1.0
                checkpoint_and_report(epoch, step_in_epoch, False, stats, validate_now=False)
                if rank == 0:
                    log.warning("preemption checkpoint saved at epoch %d step %d", epoch, global_step)
        loader.close()
        stats = _epoch_stats(sums, seen, world, wait, t_epoch, scheduler, tc)
        metrics.data_wait.set(stats["data_wait_fraction"])
        checkpoint_and_report(epoch, step_in_epoch, True, stats)
    if server is not None:
        server.shutdown()
        server.server_close()
    if trace is not None:
        trace.close()
    if rank == 0:
        log.info("training finished in %.1fs", time.perf_counter() - t_run)


def _epoch_stats(sums, seen, world, wait, t_epoch, scheduler, tc) -> dict[str, float]:
    dt = time.perf_counter() - t_epoch
    out = {f"train/{k}": v / max(seen, 1) for k, v in sums.items()}
    out["train/samples_per_s"] = seen * world / max(dt, 1e-9)
    out["train/epoch_seconds"] = dt
    out["data_wait_fraction"] = wait / max(dt, 1e-9)
    out["lr"] = scheduler.get_last_lr()[0] if scheduler is not None else tc.lr
    return out


# the run-control helpers are imported from here too (posefr_dist.train.control)
__all__ = ["train_loop_per_worker", "config_from_dict", "flatten_report", "embed_split", "validate",
           "sync_buffers", "build_optimizer", "PretrainedFreeze", "refresh_lr", "je_weight", "position_for_world",
           "PreemptionCheck", "Chaos"]
