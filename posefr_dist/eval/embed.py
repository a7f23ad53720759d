"""``posefr embed``: batch inference of the exported 2D model with a Ray Data actor pool.

Each actor loads the exported model once (``load_2d``; from ``s3://`` it is downloaded first) and
embeds decoded image batches; GPUs per actor when asked for. The output is the embeddings table of
DESIGN.md (``sample_id, subject_id, yaw_deg, enrollment, embedding``) as Parquet part files under
``EMB_URI``, each written atomically, then ``_SUCCESS`` (rows, files, model, data) last.

Enrollment follows the protocol: rows with |yaw| <= ``enroll_max_yaw`` (default 15°) form the
gallery, unless the shard manifest names the gallery of the split (``manifest["enrollment"]``, as
the ARL-VTF ingest writes it), which then wins. Rows with a null yaw are never enrolled by pose.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from posefr_dist import storage
from posefr_dist.config import DataConfig
from posefr_dist.data.schema import embedding_schema

log = logging.getLogger(__name__)

SUCCESS = "_SUCCESS"


def fetch_model(model_uri: str) -> tuple[str, str | None]:
    """A local folder holding the exported model; (path, temp dir to remove or None)."""
    local = storage.local_path(model_uri)
    if local is not None:
        return local, None
    tmp = tempfile.mkdtemp(prefix="posefr-model-")
    storage.download_dir(model_uri, tmp)
    return tmp, tmp


class Embedder:
    """Ray Data actor: the exported 2D model, loaded once per actor."""

    def __init__(self, model_uri: str, use_gpu: bool, enroll_max_yaw: float, gallery: list[str] | None):
        import torch

        from posefr_dist.model import load_2d

        path, tmp = fetch_model(model_uri)
        try:
            self.model = load_2d(path)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.model.to(self.device).eval()
        self.enroll_max_yaw = enroll_max_yaw
        self.gallery = set(gallery) if gallery is not None else None
        self.schema = embedding_schema(int(self.model.embedding_dim))

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        import torch

        from posefr_dist.data.pipeline import to_float_images

        images = torch.from_numpy(to_float_images(np.asarray(batch["image"]))).to(self.device)
        with torch.no_grad():
            emb = self.model.embed(images).float().cpu().numpy()
        yaw = np.asarray(batch["yaw_deg"], np.float32)
        sids = [str(s) for s in batch["sample_id"]]
        if self.gallery is not None:
            enrolled = np.array([s in self.gallery for s in sids], bool)
        else:
            enrolled = np.nan_to_num(np.abs(yaw), nan=np.inf) <= self.enroll_max_yaw
        yaw_arr = pa.array(yaw, pa.float32(), mask=np.isnan(yaw))
        return pa.Table.from_arrays([
            pa.array(sids, pa.string()),
            pa.array([str(s) for s in batch["subject_id"]], pa.string()),
            yaw_arr,
            pa.array(enrolled, pa.bool_()),
            pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), emb.shape[1]),
        ], schema=self.schema)


def _check_model(model_uri: str) -> None:
    if not storage.exists(storage.join(model_uri, "config.json")):
        raise FileNotFoundError(f"exported model {model_uri}: config.json is missing "
                                "(expected the output of `posefr export`)")


def _cpus_per_actor(actors: int, gpus_per_actor: float) -> float:
    """CPUs per embedding actor, leaving at least one CPU for the read/decode tasks that feed them
    (actors holding every CPU would starve those tasks and the pipeline would stall)."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    want = 1.0
    if actors * want > total - 1.0:
        want = max(0.1, (total - 1.0) / actors) if total > 1.0 else 0.5 / actors
        log.info("embedding actors get %.2f CPU each so %d of them leave a CPU for reading", want, actors)
    return want


def embed(model_uri: str, data_uri: str, split: str, out_uri: str, *, batch_size: int = 256,
          actors: int = 1, gpus_per_actor: float = 0.0, enroll_max_yaw: float = 15.0,
          on_bad_row: str = "error", rows_per_file: int = 100_000) -> dict[str, Any]:
    """Embed split ``split`` of the shards at ``data_uri``; write the table to ``out_uri``.

    Returns a summary (rows, gallery rows, files, seconds, rows/s, skipped rows).
    """
    from posefr_dist.data import shards as S
    from posefr_dist.data.pipeline import build_dataset
    from posefr_dist.raysupport import ensure_ray

    _check_model(model_uri)  # a clear error here, not a traceback from inside an actor
    ensure_ray()
    man = S.read_manifest(data_uri)
    gallery = (man.get("enrollment") or {}).get(split)
    cpus_per_actor = _cpus_per_actor(actors, gpus_per_actor)
    sd = build_dataset(data_uri, split, DataConfig(uri=data_uri, on_bad_row=on_bad_row,
                                                   decode_batch_size=min(batch_size, 256)), training=False)
    from ray.data import ActorPoolStrategy

    ds = sd.dataset.map_batches(
        Embedder, fn_constructor_kwargs=dict(model_uri=model_uri, use_gpu=gpus_per_actor > 0,
                                             enroll_max_yaw=enroll_max_yaw, gallery=gallery),
        batch_size=batch_size, batch_format="numpy", compute=ActorPoolStrategy(size=actors),
        num_gpus=gpus_per_actor or None, num_cpus=cpus_per_actor,
    )
    t0 = time.perf_counter()
    files: list[dict[str, Any]] = []
    pending: list[pa.Table] = []
    rows = gallery_rows = 0

    def flush() -> None:
        if not pending:
            return
        table = pa.concat_tables(pending)
        pending.clear()
        buf = io.BytesIO()
        pq.write_table(table, buf)
        name = f"part-{len(files):05d}.parquet"
        storage.write_bytes(storage.join(out_uri, name), buf.getvalue())
        files.append({"path": name, "rows": table.num_rows})

    buffered = 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        pending.append(batch)
        buffered += batch.num_rows
        rows += batch.num_rows
        gallery_rows += int(np.asarray(batch.column("enrollment")).sum())
        if buffered >= rows_per_file:
            flush()
            buffered = 0
    flush()
    dt = time.perf_counter() - t0
    summary = {"rows": rows, "gallery_rows": gallery_rows, "files": files, "seconds": dt,
               "rows_per_s": rows / max(dt, 1e-9), "skipped_rows": sd.skipped(), "model": model_uri,
               "data": data_uri, "split": split,
               "enrollment": "manifest gallery list" if gallery is not None else f"|yaw| <= {enroll_max_yaw}"}
    storage.write_text(storage.join(out_uri, SUCCESS), json.dumps(summary, indent=2))
    log.info("embedded %d rows (%d gallery) in %.1fs (%.0f rows/s) -> %s", rows, gallery_rows, dt,
             summary["rows_per_s"], out_uri)
    return summary


def evaluate(model_uri: str, data_uri: str, out_uri: str, *, split: str = "test", fars=None, yaw_edges=None,
             batch_size: int = 256, actors: int = 1, gpus_per_actor: float = 0.0,
             enroll_max_yaw: float = 15.0) -> dict[str, Any]:
    """``posefr evaluate``: embed + verify; the embeddings land in ``<out>/embeddings/``."""
    from posefr_dist.eval.verify import DEFAULT_FARS, DEFAULT_YAW_EDGES, run_verify

    emb_uri = storage.join(out_uri, "embeddings")
    summary = embed(model_uri, data_uri, split, emb_uri, batch_size=batch_size, actors=actors,
                    gpus_per_actor=gpus_per_actor, enroll_max_yaw=enroll_max_yaw)
    out_dir = storage.local_path(out_uri)
    tmp = None
    if out_dir is None:  # the report writer works on a local folder; upload after
        tmp = tempfile.mkdtemp(prefix="posefr-report-")
        out_dir = tmp
    try:
        report = run_verify(emb_uri, out_dir, fars=tuple(fars or DEFAULT_FARS),
                            yaw_edges=tuple(yaw_edges or DEFAULT_YAW_EDGES))
        if tmp:
            for name in sorted(os.listdir(tmp)):
                with open(os.path.join(tmp, name), "rb") as f:
                    storage.write_bytes(storage.join(out_uri, name), f.read())
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    report.setdefault("embedding", summary)
    return report
