"""Why a variant wins or loses: diagnostics of a training checkpoint on a split.

The ablation table says *whether* the 3D branch helps the 2D encoder across pose; these figures
help say *why*. For a checkpoint of any variant, on one split (rows read in-process):

* ``tar_2d``: TAR@FAR per probe yaw bin of the 2D path (the same protocol as ``posefr verify``:
  gallery = |yaw| <= ``enroll_max_yaw``). The drop from the 0-30 bin to the 90+ bin says how much
  of the difficulty is pose.
* ``tar_3d`` (3D variants): the same protocol on the 3D branch's embeddings of the rows' point
  clouds. Point clouds are pose-free, so a high, flat ``tar_3d`` means the 3D branch carries the
  identity that the 2D branch is to learn from.
* ``cross_cos`` (3D variants): mean cosine between the normalised 2D and 3D embeddings of the same
  row, per yaw bin, and the same for rows of different identities (``cross_cos_impostor``): how far
  the shared embedding Linear ties the two domains together.
* attention (3D variants): ``gamma`` (the weight of the attention output), the mean row entropy of
  A_2D and of A_3D (nats; log(HW) is uniform), and the joint entropy L_JE(A_2D, A_3D) per yaw bin
  with the model's own histogram settings, whatever its lambda_JE, so ``jam`` and ``jam-je`` are
  measured alike. Next to it, from the same joint histogram and with the same binning:
  ``mi_2d_3d`` (the mutual information MI(A_2D; A_3D)) and ``hist_entropy_2d`` / ``hist_entropy_3d``
  (the entropies H(A_2D), H(A_3D) of its marginals), so L_JE = H(A_2D) + H(A_3D) - MI per row: a
  lower L_JE from a higher MI means aligned maps, one from lower marginal entropies means sharper
  maps.

Example:
    >>> rep = diagnose("out/demo/runs/demo-jam-je/checkpoint_000011", "out/demo/shards")  # doctest: +SKIP
    >>> rep["tar_3d"]["all"]["0.01"], rep["attention"]["je_2d_3d"]["90+"]  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from posefr_dist.data import shards as S

__all__ = ["diagnose", "read_split_arrays", "diagnostics_table"]


def read_split_arrays(shards_uri: str, split: str, max_rows: int | None = None) -> dict[str, np.ndarray]:
    """Images (float32 [-1, 1], NCHW), points, subject ids, yaw and pitch of a split, in shard order."""
    from posefr_dist.data.pipeline import to_float_images

    images, points, sids, yaws, pitches = [], [], [], [], []
    n = 0
    for uri in S.shard_uris(shards_uri, split):
        table = S.read_shard_bytes(uri).select(["sample_id", "subject_id", "image", "yaw_deg", "pitch_deg", "points"])
        for i, row in enumerate(table.to_pylist()):
            try:
                img = S.decode_image(row["image"])
            except ValueError as e:
                raise S.ShardError(uri, i, "image", str(e)) from None
            images.append(img)
            pts = row["points"]
            points.append(None if pts is None else np.asarray(pts, np.float32).reshape(-1, 3))
            sids.append(row["subject_id"])
            yaws.append(np.nan if row["yaw_deg"] is None else float(row["yaw_deg"]))
            pitches.append(np.nan if row["pitch_deg"] is None else float(row["pitch_deg"]))
            n += 1
            if max_rows is not None and n >= max_rows:
                break
        if max_rows is not None and n >= max_rows:
            break
    img = to_float_images(np.stack(images)).transpose(0, 3, 1, 2).copy()
    has_points = np.array([p is not None for p in points])
    npts = next((p.shape[0] for p in points if p is not None), 0)
    pts = np.zeros((len(points), npts, 3), np.float32)
    for i, p in enumerate(points):
        if p is not None:
            pts[i] = p
    return {"image": img, "points": pts, "has_points": has_points, "subject_id": np.array(sids),
            "yaw": np.array(yaws, np.float32), "pitch": np.array(pitches, np.float32)}


def _bin_of(yaw: np.ndarray, edges: list[float]) -> np.ndarray:
    """Bin names per row, exactly as the verification report bins probes."""
    from posefr_dist.eval.verify import UNKNOWN_POSE, yaw_bin_index, yaw_bin_names

    names = yaw_bin_names(edges) + [UNKNOWN_POSE]
    return np.array(names, dtype=object)[yaw_bin_index(yaw, edges)]


def _per_bin(values: np.ndarray, bins: np.ndarray) -> dict[str, float]:
    out = {}
    for b in sorted(set(bins.tolist())):
        m = bins == b
        out[b] = float(values[m].mean()) if m.any() else float("nan")
    out["all"] = float(values.mean()) if values.size else float("nan")
    return out


def _tars(report: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {b: dict(v.get("tar_at_far", {})) for b, v in report["bins"].items()}


def diagnose(checkpoint_uri: str, shards_uri: str, split: str = "test", *, fars: Iterable[float] = (0.01,),
             yaw_edges: Iterable[float] = (0, 30, 60, 90), enroll_max_yaw: float = 15.0,
             batch_size: int = 128, max_rows: int | None = None) -> dict[str, Any]:
    """Diagnostics of one checkpoint on ``split`` of ``shards_uri`` (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    from posefr_dist.eval.verify import verify_arrays
    from posefr_dist.model.entropy import histogram_entropies, joint_histogram
    from posefr_dist.train.checkpoint import load_model

    model, meta = load_model(checkpoint_uri)
    data = read_split_arrays(shards_uri, split, max_rows)
    edges = [float(e) for e in yaw_edges]
    fars = list(fars)
    yaw = data["yaw"]
    bins = _bin_of(yaw, edges)
    enrolled = np.nan_to_num(np.abs(yaw), nan=np.inf) <= enroll_max_yaw
    has3d = model.encoder_3d is not None
    e2, e3, ent2, ent3, je, h2, h3 = [], [], [], [], [], [], []
    lc = model.loss_cfg
    with torch.no_grad():
        for i in range(0, len(yaw), batch_size):
            img = torch.from_numpy(data["image"][i:i + batch_size])
            emb, a2 = model.embed_2d(img, return_attention=True)
            e2.append(emb)
            if has3d:
                pts = torch.from_numpy(data["points"][i:i + batch_size])
                # the 3D map laid out at the image's pose, as in training (model.splat)
                pose = {"yaw_deg": torch.from_numpy(data["yaw"][i:i + batch_size]),
                        "pitch_deg": torch.from_numpy(data["pitch"][i:i + batch_size])}
                j3, a3 = model.jam(model.encoder_3d(pts, **pose), "3d")
                e3.append(model._embed_3d(j3))
                ent2.append(-(a2 * a2.clamp_min(1e-30).log()).sum(-1).mean(-1))
                ent3.append(-(a3 * a3.clamp_min(1e-30).log()).sum(-1).mean(-1))
                hm2, hm3, h23 = histogram_entropies(joint_histogram(a2, a3, lc.je_bins, lc.je_bandwidth, lc.je_norm))
                je.append(h23)
                h2.append(hm2)
                h3.append(hm3)
    emb2 = torch.cat(e2).numpy()
    subjects = data["subject_id"]
    out: dict[str, Any] = {
        "checkpoint": checkpoint_uri, "split": split, "rows": int(len(yaw)),
        "variant": model.variant, "epoch": meta.get("epoch"),
        "tar_2d": _tars(verify_arrays(emb2, subjects, yaw, enrolled, fars=fars, yaw_edges=edges)),
    }
    if not has3d:
        return out
    keep = data["has_points"]  # rows without a point cloud have no 3D figures
    emb3 = torch.cat(e3).numpy()
    out["tar_3d"] = _tars(verify_arrays(emb3[keep], subjects[keep], yaw[keep], enrolled[keep], fars=fars,
                                         yaw_edges=edges))
    n2 = F.normalize(torch.from_numpy(emb2[keep]), dim=1)
    n3 = F.normalize(torch.from_numpy(emb3[keep]), dim=1)
    same = (n2 * n3).sum(1).numpy()
    # impostor pairs: each row's 2D embedding against the 3D embedding of a row of another identity
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(same))
    other = subjects[keep][perm] != subjects[keep]
    imp = (n2 * n3[perm]).sum(1).numpy()[other]
    out["cross_cos"] = _per_bin(same, bins[keep])
    out["cross_cos_impostor"] = float(imp.mean()) if imp.size else float("nan")
    hw = int(model.encoder_2d.map_size) ** 2
    je_rows, h2_rows, h3_rows = (torch.cat(x).numpy()[keep] for x in (je, h2, h3))
    out["attention"] = {
        "gamma": float(model.jam.gamma.detach().reshape(-1)[0]),
        "uniform_entropy": math.log(hw),
        "row_entropy_2d": _per_bin(torch.cat(ent2).numpy(), bins),
        "row_entropy_3d": float(torch.cat(ent3).numpy()[keep].mean()),
        "je_2d_3d": _per_bin(je_rows, bins[keep]),
        "mi_2d_3d": _per_bin(h2_rows + h3_rows - je_rows, bins[keep]),
        "hist_entropy_2d": _per_bin(h2_rows, bins[keep]),
        "hist_entropy_3d": _per_bin(h3_rows, bins[keep]),
        "je_max": 2 * math.log(lc.je_bins),
    }
    return out


def _fmt(x: Any, scale: float = 1.0, digits: int = 1) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{scale * x:.{digits}f}"


def diagnostics_table(diags: dict[str, list[dict[str, Any]]], far: float = 0.01,
                      bins: tuple[str, ...] = ("0-30", "90+", "all")) -> str:
    """Markdown: one row per variant, means over the given runs (one diagnostics dict per seed)."""
    from posefr_dist.eval import far_key

    k = far_key(far)

    def mean(vals: list[float]) -> float:
        vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
        return sum(vals) / len(vals) if vals else float("nan")

    head = (["variant", "runs"] + [f"2D TAR {b}" for b in bins] + [f"3D TAR {b}" for b in bins]
            + ["2D-3D cos same id (0-30 / 90+)", "2D-3D cos other id", "gamma",
               "A_2D row entropy (0-30 / 90+)", "L_JE(A_2D, A_3D) (0-30 / 90+)", "MI(A_2D; A_3D) (0-30 / 90+)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v, runs in diags.items():
        row = [v, str(len(runs))]
        row += [_fmt(mean([r["tar_2d"].get(b, {}).get(k) for r in runs]), 100) for b in bins]
        if any("tar_3d" in r for r in runs):
            row += [_fmt(mean([r["tar_3d"].get(b, {}).get(k) for r in runs]), 100) for b in bins]
            cc = [_fmt(mean([r["cross_cos"].get(b) for r in runs]), 1, 2) for b in ("0-30", "90+")]
            row.append(" / ".join(cc))
            row.append(_fmt(mean([r["cross_cos_impostor"] for r in runs]), 1, 2))
            row.append(_fmt(mean([r["attention"]["gamma"] for r in runs]), 1, 3))
            ent = [_fmt(mean([r["attention"]["row_entropy_2d"].get(b) for r in runs]), 1, 2) for b in ("0-30", "90+")]
            row.append(" / ".join(ent))
            je = [_fmt(mean([r["attention"]["je_2d_3d"].get(b) for r in runs]), 1, 2) for b in ("0-30", "90+")]
            row.append(" / ".join(je))
            mi = [_fmt(mean([r["attention"].get("mi_2d_3d", {}).get(b) for r in runs]), 1, 3) for b in ("0-30", "90+")]
            row.append(" / ".join(mi))
        else:
            row += ["n/a"] * (len(bins) + 6)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
