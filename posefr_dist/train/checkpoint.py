"""Checkpoints: DeepSpeed's own state plus a consolidated model and our metadata.

A checkpoint folder (one per report, merged from all workers by Ray Train)::

    meta.json            resolved config, label count, epoch, step, data position, world size, metrics
    model.safetensors    consolidated fp32 weights of the whole model (rank 0; gathered under ZeRO-3)
    deepspeed/<tag>/...  DeepSpeed's checkpoint: module + optimizer (+ per-rank ZeRO partitions)

Resume on the same number of workers loads DeepSpeed's state (weights, optimizer, scheduler).
Resume on a different number of workers under ZeRO 1-3, whose optimizer state is partitioned per
rank, loads the consolidated weights and restarts the optimizer state (logged); under ZeRO 0 the
optimizer state is not partitioned and loads on any number of workers. Exported models are built
from ``model.safetensors`` and never unpickle anything.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

META = "meta.json"
WEIGHTS = "model.safetensors"
DS_DIR = "deepspeed"
DS_TAG = "state"


def consolidated_state_dict(engine: Any) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of the engine's module (gathers ZeRO-3 partitions)."""
    module = engine.module
    if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
        import deepspeed

        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() if v.is_floating_point() else v.detach().cpu().clone()
            for k, v in module.state_dict().items()}


def save(engine: Any, folder: str, meta: dict[str, Any], rank: int) -> None:
    """Write this worker's part of a checkpoint into ``folder`` (collective: all ranks call it)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    engine.save_checkpoint(os.path.join(folder, DS_DIR), tag=DS_TAG, save_latest=False)
    state = consolidated_state_dict(engine)  # collective under ZeRO-3
    if rank == 0:
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(folder, WEIGHTS))
        with open(os.path.join(folder, META), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True, default=str)


def read_meta(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, META)) as f:
        return json.load(f)


def load_weights(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, WEIGHTS))


def load(engine: Any, folder: str, world_size: int) -> dict[str, Any]:
    """Restore ``engine`` from a checkpoint folder; returns its metadata."""
    meta = read_meta(folder)
    same_world = int(meta.get("world_size", world_size)) == world_size
    zero = int(meta.get("zero_stage", 0))
    if same_world or zero == 0:
        path, _ = engine.load_checkpoint(os.path.join(folder, DS_DIR), tag=DS_TAG, load_module_strict=True,
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"{folder}: DeepSpeed found no checkpoint under {DS_DIR}/{DS_TAG}")
        meta["optimizer_state"] = "restored"
    else:
        state = load_weights(folder)
        module = engine.module
        if getattr(engine, "zero_optimization_stage", lambda: 0)() == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
                module.load_state_dict(state, strict=True)
        else:
            module.load_state_dict(state, strict=True)
            # ZeRO 1/2 keep fp32 master copies: refresh them from the loaded weights
            refresh = getattr(engine.optimizer, "refresh_fp32_params", None)
            if callable(refresh):
                refresh()
        log.warning("checkpoint %s was written by %s workers under ZeRO-%d; resuming on %d workers with the "
                    "consolidated weights and a fresh optimizer state", folder, meta.get("world_size"), zero,
                    world_size)
        if engine.lr_scheduler is not None:
            engine.lr_scheduler.last_epoch = int(meta.get("global_step", 0)) - 1
            engine.lr_scheduler.step()
        meta["optimizer_state"] = "reset (different world size under ZeRO)"
    return meta


def _fetch(ckpt_uri: str, work: str) -> str:
    """A local folder holding the checkpoint's meta and weights (downloads them from s3://)."""
    from posefr_dist import storage

    src = storage.local_path(ckpt_uri)
    if src is None:
        src = os.path.join(work, "ckpt")
        os.makedirs(src, exist_ok=True)
        for name in (META, WEIGHTS):
            with open(os.path.join(src, name), "wb") as f:
                f.write(storage.read_bytes(storage.join(ckpt_uri, name)))
    if not os.path.exists(os.path.join(src, META)):
        raise FileNotFoundError(f"{ckpt_uri}: not a checkpoint (no {META})")
    return src


#: ModelConfig keys added after the first checkpoints, with the behaviour those checkpoints had
LEGACY_MODEL_KEYS = {"attn_spectral_norm": False, "splat": "frontal"}


def load_model(ckpt_uri: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The whole joint model of a checkpoint (both branches; eval mode) and its ``meta.json``.

    ``ckpt_uri`` may be a folder or an ``s3://`` URI. Only ``model.safetensors`` is read.
    """
    import shutil
    import tempfile

    from posefr_dist.config import LossConfig, ModelConfig
    from posefr_dist.model import build_model

    work = tempfile.mkdtemp(prefix="posefr-ckpt-")
    try:
        src = _fetch(ckpt_uri, work)
        meta = read_meta(src)
        cfg = meta["config"]
        # checkpoints written before these keys existed used the old behaviour, not today's default
        model_cfg = {**LEGACY_MODEL_KEYS, **cfg["model"]}
        model = build_model(ModelConfig(**model_cfg), LossConfig(**cfg["loss"]), num_classes=meta["num_classes"],
                            image_size=meta["image_size"], num_points=meta["num_points"])
        model.load_state_dict(load_weights(src), strict=True)
        model.eval()
        return model, meta
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0] if "/" in uri.rstrip("/") else "."


def resolve_pretrained_2d(uri: str) -> dict[str, Any]:
    """What ``model.pretrained_2d`` names, without reading any weights.

    Accepted: a folder written by ``posefr export`` / ``posefr pretrain`` (``config.json`` with
    format ``posefr-2d`` and ``model.safetensors``), that folder's ``model.safetensors``, or an
    AdaFace-layout checkpoint file (``.ckpt`` or ``.safetensors``); local paths or ``s3://`` URIs.

    Returns:
        ``{"format": "posefr-2d" | "adaface" | None, "weights": URI of the weights file,
        "config": the export's config.json or None}``; format None means "decide by the keys" (a
        ``.safetensors`` file with no ``config.json`` beside it).

    Raises:
        FileNotFoundError: nothing at ``uri``, or an export folder lacks its weights.
        ValueError: a folder that is not a ``posefr-2d`` export.
    """
    from posefr_dist import storage
    from posefr_dist.model.export import CONFIG_NAME, EXPORT_FORMAT, WEIGHTS_NAME

    def read_config(cfg_uri: str) -> dict[str, Any]:
        try:
            conf = json.loads(storage.read_text(cfg_uri))
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_uri}: invalid JSON: {e}") from None
        if not isinstance(conf, dict) or conf.get("format") != EXPORT_FORMAT:
            got = conf.get("format") if isinstance(conf, dict) else None
            raise ValueError(f"{cfg_uri}: format {got!r}, expected {EXPORT_FORMAT!r} (a folder written by "
                             "posefr export or posefr pretrain)")
        return conf

    cfg_uri = storage.join(uri, CONFIG_NAME)
    local = storage.local_path(uri)
    if storage.exists(cfg_uri):
        weights = storage.join(uri, WEIGHTS_NAME)
        if not storage.exists(weights):
            raise FileNotFoundError(f"{uri}: exported 2D model without {WEIGHTS_NAME}")
        return {"format": EXPORT_FORMAT, "weights": weights, "config": read_config(cfg_uri)}
    if local is not None and os.path.isdir(local):
        raise ValueError(f"{uri}: a folder without {CONFIG_NAME}: not a {EXPORT_FORMAT} export (name the "
                         "AdaFace checkpoint file itself)")
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri} does not exist")
    if uri.endswith(".safetensors"):
        sibling = storage.join(_parent(uri), CONFIG_NAME)
        if storage.exists(sibling):
            try:
                return {"format": EXPORT_FORMAT, "weights": uri, "config": read_config(sibling)}
            except ValueError:
                pass  # some other config.json next to an AdaFace file: decide by the keys
        return {"format": None, "weights": uri, "config": None}
    return {"format": "adaface", "weights": uri, "config": None}


def _load_posefr_2d(model: torch.nn.Module, tensors: dict[str, torch.Tensor], weights_uri: str,
                    conf: dict[str, Any] | None) -> dict[str, list[str]]:
    """Load a ``posefr-2d`` export's ``encoder.*`` into ``model.encoder_2d`` and ``head.*`` into
    ``model.embed``; ``attention.*`` (and anything else) is skipped. Shapes must all fit."""
    enc = getattr(model, "encoder_2d", None)
    embed = getattr(model, "embed", None)
    if enc is None or embed is None:
        raise TypeError("target must be a joint model with 'encoder_2d' and 'embed' (a PoseFRModel)")
    own = model.state_dict()
    new: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    bad: list[str] = []
    for k, v in tensors.items():
        if k.startswith("encoder."):
            t = "encoder_2d." + k[len("encoder."):]
        elif k.startswith("head."):
            t = "embed." + k[len("head."):]
        else:
            skipped.append(k)
            continue
        if t not in own:
            bad.append(f"key {k}: the model has no {t}")
        elif tuple(own[t].shape) != tuple(v.shape):
            bad.append(f"key {k}: file {tuple(v.shape)} vs model {t} {tuple(own[t].shape)}")
        else:
            new[t] = v
    wanted = [k for k in own if k.startswith(("encoder_2d.", "embed."))]
    missing = [k for k in wanted if k not in new and not k.endswith("num_batches_tracked")]

    def file_key(t: str) -> str:
        return "encoder." + t[len("encoder_2d."):] if t.startswith("encoder_2d.") else "head." + t[len("embed."):]

    bad += [f"key {file_key(k)} missing (model {k})" for k in missing if file_key(k) not in tensors]
    if bad:
        hint = ""
        if conf is not None:
            theirs = (conf.get("encoder_2d"), conf.get("image_size"), conf.get("embedding_dim"))
            ours = (getattr(enc, "spec_name", None), getattr(enc, "image_size", None),
                    getattr(embed, "embedding_dim", None))
            if theirs != ours:
                hint = (f" (the export is {theirs[0]} at {theirs[1]}x{theirs[1]} with {theirs[2]}-d embeddings, the "
                        f"model {ours[0]} at {ours[1]}x{ours[1]} with {ours[2]}-d)")
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(f"pretrained 2D model {weights_uri} does not fit the model{hint}: "
                         + "; ".join(bad[:5]) + more)
    model.load_state_dict(new, strict=False)
    return {"loaded": sorted(new), "skipped": sorted(skipped), "missing": []}


def load_pretrained_2d(model: torch.nn.Module, uri: str) -> dict[str, Any]:
    """Start a joint model's 2D trunk and shared output layer from a pretrained 2D model
    (``model.pretrained_2d``; a path or an ``s3://`` URI). Only tensors are read.

    Two layouts (see :func:`resolve_pretrained_2d`):

    * this project's own 2D export (``posefr export`` / ``posefr pretrain``; a folder with
      ``config.json`` of format ``posefr-2d``, or its ``model.safetensors``): ``encoder.*`` goes to
      ``encoder_2d``, ``head.*`` to the shared ``embed``; ``attention.*`` is skipped (the joint
      attention starts fresh). Every trunk and head tensor must be there with the model's shape.
    * AdaFace's layout (:func:`posefr_dist.model.load_adaface_backbone`).

    Returns:
        ``{"loaded": [model state keys], "skipped": [file keys], "missing": [...], "format": ...,
        "params": [names of the model's parameters that were loaded]}``; ``params`` is what the
        trainer gives its own learning rate (``train.pretrained_lr_mult``) and freezes
        (``train.freeze_pretrained_epochs``).

    Raises:
        FileNotFoundError: nothing at ``uri``.
        ValueError: a tensor's shape differs from the model's (the message names the file and the
            key) or the folder is not an export.
    """
    import shutil
    import tempfile

    from posefr_dist import storage
    from posefr_dist.model import load_adaface_backbone
    from posefr_dist.model.iresnet import read_checkpoint_tensors

    info = resolve_pretrained_2d(uri)
    weights = info["weights"]
    local = storage.local_path(weights)
    work = None
    try:
        if local is None:
            work = tempfile.mkdtemp(prefix="posefr-pretrained-")
            local = os.path.join(work, os.path.basename(weights.rstrip("/")) or "model.ckpt")
            with open(local, "wb") as f:
                f.write(storage.read_bytes(weights))
        fmt = info["format"]
        if fmt is None:  # a .safetensors file on its own: our export's keys or AdaFace's
            from safetensors import safe_open

            with safe_open(local, framework="pt") as f:
                ours = (f.metadata() or {}).get("format") == "posefr-2d" or any(
                    k.startswith("encoder.") for k in f.keys())
            fmt = "posefr-2d" if ours else "adaface"
        if fmt == "posefr-2d":
            out: dict[str, Any] = _load_posefr_2d(model, read_checkpoint_tensors(local), weights, info["config"])
        else:
            out = load_adaface_backbone(model, local, load_output_layer=True, strict=True)
    finally:
        if work:
            shutil.rmtree(work, ignore_errors=True)
    names = {n for n, _ in model.named_parameters()}
    out["format"] = fmt
    out["params"] = sorted(k for k in out["loaded"] if k in names)
    return out


def export_checkpoint(ckpt_uri: str, out_uri: str) -> dict[str, Any]:
    """Export the 2D path of a training checkpoint to the inference format (safetensors + JSON).

    ``ckpt_uri`` and ``out_uri`` may be folders or ``s3://`` URIs. Returns the export's config.
    ``config.json`` is written last, locally and on S3, so its presence marks a finished export.
    """
    import shutil
    import tempfile

    from posefr_dist import storage
    from posefr_dist.model import export_2d
    from posefr_dist.model.export import CONFIG_NAME

    model, meta = load_model(ckpt_uri)
    work = tempfile.mkdtemp(prefix="posefr-export-")
    try:
        out_local = os.path.join(work, "export")
        export_2d(model, out_local)
        extra = {"source_checkpoint": ckpt_uri, "epoch": meta.get("epoch"), "global_step": meta.get("global_step"),
                 "metrics": meta.get("metrics", {})}
        with open(os.path.join(out_local, "training.json"), "w") as f:
            json.dump(extra, f, indent=2, sort_keys=True, default=str)
        storage.upload_dir(out_local, out_uri, last=(CONFIG_NAME,))
        with open(os.path.join(out_local, CONFIG_NAME)) as f:
            return json.load(f)
    finally:
        shutil.rmtree(work, ignore_errors=True)
