"""What both ingesters share: problem reporting, per-subject Ray tasks, crops and image encoding,
dense labels, shard writing and the manifest.

An ingester turns a release into per-subject row tables (one Ray task per subject: decode, crop,
pose, points), then :func:`write_dataset` gives every subject with rows a dense label within its
split (0..K-1 by sorted subject), cuts the rows into shards (Ray tasks again), and writes
``ingest_report.json``, ``ingest_metrics.prom`` and finally ``manifest.json``: a root with a
manifest is complete.

Bad input never aborts other subjects unless ``strict`` is set: each problem is recorded with the
path it concerns, the affected rows are skipped and counted, and the report lists them all.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from posefr_dist import storage
from posefr_dist.data import shards as S
from posefr_dist.data.schema import SPLITS

log = logging.getLogger(__name__)

REPORT_NAME = "ingest_report.json"
METRICS_NAME = "ingest_metrics.prom"
ROW_COLUMNS = ("sample_id", "subject_id", "label", "dataset", "image", "yaw_deg", "pitch_deg", "expression", "points")
IMAGE_FORMATS = ("png", "jpeg")


@dataclass(frozen=True)
class IngestProblem:
    """A file that could not be used, and why (what was skipped because of it)."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


class IngestError(RuntimeError):
    """The ingest cannot go on (bad options, unreadable layout, or a problem under ``strict``)."""

    def __init__(self, message: str, problems: Sequence[IngestProblem] = ()):
        super().__init__(message)
        self.message = message
        self.problems = list(problems)

    def __reduce__(self):  # picklable across Ray workers
        return (IngestError, (self.message, self.problems))


class Collector:
    """Counts, problems and warnings of one unit of work (a subject, or the driver's own checks)."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.counts: Counter[str] = Counter()
        self.problems: list[IngestProblem] = []
        self.warnings: list[IngestProblem] = []

    def problem(self, path: str, reason: str) -> None:
        p = IngestProblem(str(path), reason)
        if self.strict:
            raise IngestError(f"{p} (--strict: stopping at the first problem)", [p])
        self.problems.append(p)

    def warn(self, path: str, reason: str) -> None:
        self.warnings.append(IngestProblem(str(path), reason))

    def merge(self, other: Mapping[str, Any]) -> None:
        self.counts.update(other.get("counts", {}))
        self.problems.extend(IngestProblem(**p) for p in other.get("problems", []))
        self.warnings.extend(IngestProblem(**p) for p in other.get("warnings", []))

    def summary(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "problems": [p.to_dict() for p in self.problems],
                "warnings": [p.to_dict() for p in self.warnings]}


@dataclass
class IngestResult:
    """What an ingest wrote: the manifest (as written), totals, problems and warnings."""

    out: str
    manifest: dict[str, Any]
    counts: dict[str, int]
    problems: list[IngestProblem]
    warnings: list[IngestProblem]
    elapsed_s: float
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> dict[str, int]:
        return {s: v["rows"] for s, v in self.manifest["splits"].items()}


def natural_key(s: str) -> tuple:
    """Sort key: numbers by value ("2" < "10"), then text."""
    return (0, int(s), "") if s.isdigit() else (1, 0, s)


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def encode_image(img: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    if fmt == "jpeg":
        Image.fromarray(img).save(buf, format="JPEG", quality=95)
    else:
        Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if img.shape[0] == size and img.shape[1] == size:
        return img
    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.LANCZOS))


def to_uint8_rgb(arr: np.ndarray) -> np.ndarray:
    """RGB uint8 from an 8-bit image, or from a 16-bit / float grayscale one (thermal frames),
    stretched between its 1st and 99th percentiles."""
    a = np.asarray(arr)
    if a.dtype != np.uint8:
        a = a.astype(np.float32)
        lo, hi = np.percentile(a, [1, 99])
        a = np.clip((a - lo) / max(float(hi - lo), 1e-6) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    elif a.shape[2] == 4:
        a = a[..., :3]
    elif a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return a


# --------------------------------------------------------------------------------------------
# per-subject tasks
# --------------------------------------------------------------------------------------------


def build_rows_table(rows: list[dict[str, Any]], num_points: int) -> pa.Table:
    """A shard-schema table of one subject's rows (label 0: the real label comes later)."""
    cols = {c: [r.get(c) for r in rows] for c in ROW_COLUMNS}
    cols["label"] = [0] * len(rows)
    return S.build_table(cols, num_points)


def _unwrap(err: BaseException) -> BaseException:
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


def run_subjects(fn: Callable[[dict[str, Any]], tuple[dict[str, Any], pa.Table | None]],
                 payloads: Sequence[dict[str, Any]], use_ray: bool,
                 workers: int | None) -> list[tuple[dict[str, Any], Any]]:
    """Run ``fn`` once per subject payload: ``[(summary, table or ObjectRef)]`` in payload order.

    With Ray, each call is a task (1 CPU) with two returns, so only the small summaries come back
    to the driver; the tables stay in the object store until the shard writers read them. At
    most ``workers`` tasks are in flight (default: as many as Ray schedules). An
    :class:`IngestError` raised in a task (``strict``) cancels the others and is re-raised."""
    if not use_ray:
        return [fn(p) for p in payloads]
    import ray

    from posefr_dist.raysupport import ensure_ray

    ensure_ray()
    task = ray.remote(num_cpus=1, num_returns=2, max_retries=1)(fn)
    limit = workers if workers and workers > 0 else len(payloads)
    it = iter(enumerate(payloads))
    pending: dict[Any, tuple[int, Any]] = {}
    results: dict[int, tuple[dict[str, Any], Any]] = {}

    def submit(batch: Iterable[tuple[int, dict[str, Any]]]) -> None:
        for i, p in batch:
            s_ref, t_ref = task.remote(p)
            pending[s_ref] = (i, t_ref)

    submit(islice(it, limit))
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        i, t_ref = pending.pop(done[0])
        try:
            summary = ray.get(done[0])
        except Exception as e:
            try:  # the task's second return holds the same error: read it so Ray does not log it again
                ray.get(t_ref)
            except Exception:
                pass
            for ref in pending:
                ray.cancel(ref)
            cause = _unwrap(e)
            if isinstance(cause, IngestError):
                raise IngestError(cause.message, cause.problems) from None
            raise
        results[i] = (summary, t_ref)
        submit(islice(it, 1))
    return [results[i] for i in range(len(payloads))]


# --------------------------------------------------------------------------------------------
# shards, manifest, report
# --------------------------------------------------------------------------------------------


def _write_shard(out: str, rel: str, spec: list[tuple[int, int, int, int]], *tables: pa.Table) -> dict[str, Any]:
    """Write one shard from slices (table index, start, stop, label) of subject tables."""
    parts = []
    for ti, start, stop, label in spec:
        t = tables[ti].slice(start, stop - start)
        i = t.schema.get_field_index("label")
        t = t.set_column(i, t.schema.field(i), pa.array(np.full(stop - start, label, np.int32), pa.int32()))
        parts.append(t)
    table = pa.concat_tables(parts).combine_chunks()
    entry = S.write_shard(table, storage.join(out, rel))
    entry["path"] = rel
    return entry


def plan_shards(subjects: Sequence[tuple[str, int]], rows_per_shard: int) -> list[list[tuple[int, int, int, int]]]:
    """Cut subjects (in label order, (key, rows)) into shards of ``rows_per_shard`` rows:
    a list of specs (subject index, start, stop, label)."""
    shards: list[list[tuple[int, int, int, int]]] = []
    cur: list[tuple[int, int, int, int]] = []
    room = rows_per_shard
    for label, (_, n) in enumerate(subjects):
        start = 0
        while start < n:
            take = min(room, n - start)
            cur.append((label, start, start + take, label))
            start += take
            room -= take
            if room == 0:
                shards.append(cur)
                cur, room = [], rows_per_shard
    if cur:
        shards.append(cur)
    return shards


def write_dataset(out: str, dataset: str, generator: dict[str, Any], results: list[tuple[dict[str, Any], Any]],
                  driver: Collector, num_points: int, image_size: int, rows_per_shard: int, use_ray: bool,
                  manifest_extra: Mapping[str, Any] | None = None, t0: float | None = None) -> IngestResult:
    """Labels, shards, report, metrics and manifest (last) from the per-subject results.

    Each summary has ``subject_id``, ``split``, ``rows`` (count) and the collector fields."""
    t0 = time.perf_counter() if t0 is None else t0
    total = Collector()
    total.merge(driver.summary())
    by_split: dict[str, list[tuple[dict[str, Any], Any]]] = {s: [] for s in SPLITS}
    for summary, table in results:
        total.merge(summary)
        if summary["rows"] > 0:
            by_split[summary["split"]].append((summary, table))
    n_rows = sum(s["rows"] for split in by_split.values() for s, _ in split)
    if n_rows == 0:
        raise IngestError(f"{dataset}: no rows to write ({len(total.problems)} problem(s); "
                          f"counts {dict(total.counts)})", total.problems)
    entries: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    jobs = []
    for split in SPLITS:
        subs = sorted(by_split[split], key=lambda st: natural_key(st[0]["subject_id"]))
        by_split[split] = subs
        plan = plan_shards([(s["subject_id"], s["rows"]) for s, _ in subs], rows_per_shard)
        for k, spec in enumerate(plan):
            used = sorted({ti for ti, *_ in spec})
            local = {ti: j for j, ti in enumerate(used)}
            spec_l = [(local[ti], a, b, lab) for ti, a, b, lab in spec]
            jobs.append((split, f"{split}/{S.shard_name(k)}", spec_l, [subs[ti][1] for ti in used]))
    if use_ray:
        import ray

        writer = ray.remote(num_cpus=1, max_retries=2)(_write_shard)
        refs = [writer.remote(out, rel, spec, *tabs) for _, rel, spec, tabs in jobs]
        written = ray.get(refs)
    else:
        written = [_write_shard(out, rel, spec, *tabs) for _, rel, spec, tabs in jobs]
    for (split, *_), entry in zip(jobs, written):
        entries[split].append(entry)
    elapsed = time.perf_counter() - t0
    counts = dict(sorted(total.counts.items()))
    counts["problems"] = len(total.problems)
    counts["warnings"] = len(total.warnings)
    manifest = S.make_manifest(generator=generator, dataset=dataset, num_points=num_points, image_size=image_size,
                               splits=entries, identities={s: len(by_split[s]) for s in SPLITS})
    manifest["ingest"] = {"counts": counts, "report": REPORT_NAME}
    if manifest_extra:
        manifest.update(manifest_extra)
    report = {
        "dataset": dataset, "generator": generator, "counts": counts,
        "rows": {s: manifest["splits"][s]["rows"] for s in SPLITS},
        "identities": {s: manifest["splits"][s]["identities"] for s in SPLITS},
        "problems": [p.to_dict() for p in total.problems],
        "warnings": [p.to_dict() for p in total.warnings],
        "elapsed_s": round(elapsed, 3),
    }
    storage.write_text(storage.join(out, REPORT_NAME), json.dumps(report, indent=2, sort_keys=True) + "\n")
    _write_metrics(out, dataset, manifest, counts)
    S.write_manifest(out, manifest)  # last: its presence marks a complete root
    log.info("ingest %s: %d rows in %.1fs, %d problem(s)", dataset, n_rows, elapsed, len(total.problems))
    return IngestResult(out, manifest, counts, total.problems, total.warnings, elapsed)


def _write_metrics(out: str, dataset: str, manifest: Mapping[str, Any], counts: Mapping[str, int]) -> None:
    """Rows per split, skipped rows per reason and problems, Prometheus text format."""
    from prometheus_client import CollectorRegistry, Gauge

    from posefr_dist.metrics import write_textfile

    reg = CollectorRegistry()
    rows = Gauge("posefr_ingest_rows", "Rows written per split", ["dataset", "split"], registry=reg)
    skipped = Gauge("posefr_ingest_skipped", "Inputs skipped per reason", ["dataset", "reason"], registry=reg)
    probs = Gauge("posefr_ingest_problems", "Missing or malformed inputs reported", ["dataset"], registry=reg)
    for split, info in manifest["splits"].items():
        rows.labels(dataset=dataset, split=split).set(info["rows"])
    for key, n in counts.items():
        if key.startswith("skipped_"):
            skipped.labels(dataset=dataset, reason=key[len("skipped_"):]).set(n)
    probs.labels(dataset=dataset).set(counts.get("problems", 0))
    write_textfile(reg, storage.join(out, METRICS_NAME))
