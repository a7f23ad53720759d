"""Prometheus metrics: a training exporter (scraped), and batch-job figures (pushed or a text file).

Training: rank 0 calls :func:`start_training_exporter` (port from ``train.metrics_port``) and
updates the :class:`TrainingMetrics` gauges each step/epoch; a PodMonitor scrapes it.

Batch jobs (evaluation, nightly): :func:`verification_registry` turns a verification report into
gauges ``posefr_tar{bin,far}`` etc., written with :func:`write_textfile` beside the report and,
when a Pushgateway is given, pushed with :func:`push`.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Mapping

from prometheus_client import CollectorRegistry, Gauge, start_http_server, write_to_textfile
from prometheus_client.exposition import generate_latest, push_to_gateway

log = logging.getLogger(__name__)


class TrainingMetrics:
    """Gauges of one training process (its own registry, so tests can read it)."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.samples_per_s = Gauge("posefr_train_samples_per_second", "Training throughput, all workers", registry=r)
        self.loss = Gauge("posefr_train_loss", "Loss terms (last logged step)", ["term"], registry=r)
        self.lr = Gauge("posefr_train_learning_rate", "Learning rate", registry=r)
        self.epoch = Gauge("posefr_train_epoch", "Current epoch", registry=r)
        self.step = Gauge("posefr_train_step", "Optimizer steps so far", registry=r)
        self.data_wait = Gauge("posefr_train_data_wait_fraction", "Share of step time spent waiting for data",
                               registry=r)
        self.skipped_rows = Gauge("posefr_data_skipped_rows", "Bad rows skipped (data.on_bad_row=skip)",
                                  ["split"], registry=r)
        self.val_tar = Gauge("posefr_val_tar", "Validation TAR per yaw bin and FAR", ["bin", "far"], registry=r)

    def update_losses(self, terms: Mapping[str, float]) -> None:
        for k, v in terms.items():
            self.loss.labels(term=k).set(v)

    def update_validation(self, metrics: Mapping[str, Any]) -> None:
        for key, value in metrics.items():
            m = _VAL_KEY.match(key)
            if m and value is not None:
                self.val_tar.labels(bin=m.group("bin"), far=m.group("far")).set(float(value))

    def exposition(self) -> str:
        return generate_latest(self.registry).decode()


_VAL_KEY = re.compile(r"^val/tar@far=(?P<far>[^/]+)/(?P<bin>.+)$")


def start_training_exporter(metrics: TrainingMetrics, port: int, addr: str = "0.0.0.0") -> Any:
    """Serve ``metrics`` over HTTP on ``port``; returns the server (``.shutdown()`` to stop)."""
    server, _thread = start_http_server(port, addr=addr, registry=metrics.registry)
    log.info("training metrics on http://%s:%d/metrics", addr, port)
    return server


def verification_registry(report: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> CollectorRegistry:
    """Gauges of a verification report (see ``posefr_dist.eval``)."""
    labels = dict(labels or {})
    names = sorted(labels)
    r = CollectorRegistry()
    tar = Gauge("posefr_tar", "TAR at FAR per yaw bin", names + ["bin", "far"], registry=r)
    thr = Gauge("posefr_threshold", "Score threshold at FAR per yaw bin", names + ["bin", "far"], registry=r)
    eer = Gauge("posefr_eer", "Equal error rate per yaw bin", names + ["bin"], registry=r)
    pairs = Gauge("posefr_pairs", "Pairs per yaw bin", names + ["bin", "kind"], registry=r)
    for bin_name, b in report.get("bins", {}).items():
        for far, v in (b.get("tar_at_far") or {}).items():
            if v is not None:
                tar.labels(**labels, bin=bin_name, far=far).set(float(v))
        for far, v in (b.get("threshold_at_far") or {}).items():
            if v is not None:
                thr.labels(**labels, bin=bin_name, far=far).set(float(v))
        if b.get("eer") is not None:
            eer.labels(**labels, bin=bin_name).set(float(b["eer"]))
        for kind in ("genuine", "impostor"):
            if b.get(kind) is not None:
                pairs.labels(**labels, bin=bin_name, kind=kind).set(float(b[kind]))
    return r


def write_textfile(registry: CollectorRegistry, path: str) -> None:
    """Prometheus text format, written atomically (local path or any storage URI)."""
    from posefr_dist import storage

    if storage.local_path(path) is not None:
        write_to_textfile(storage.local_path(path), registry)  # writes a temp file and renames
    else:
        storage.write_bytes(path, generate_latest(registry))


def push(registry: CollectorRegistry, gateway: str, job: str, grouping: Mapping[str, str]) -> None:
    """Push ``registry`` to a Pushgateway (``host:port``), replacing the group's previous figures."""
    push_to_gateway(gateway, job=job, registry=registry, grouping_key=dict(grouping), timeout=10)
