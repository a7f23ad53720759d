"""The comparisons and the regression gate of ``posefr nightly`` (see
:mod:`posefr_dist.eval.nightly`): which earlier reports a model's night is compared with, the TAR
drops per bin and FAR, and the night's Prometheus figures.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Sequence

from posefr_dist import storage
from posefr_dist.eval.nightly_history import REPORT_FILE, RegisteredModel, _read_json, night_uri

PREVIOUS_NIGHT, PREVIOUS_MODEL = "previous-night", "previous-model"
#: a drop must exceed max_drop by more than this to count (float noise in stored figures)
DROP_EPS = 1e-12


# --------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Baseline:
    kind: str  # PREVIOUS_NIGHT or PREVIOUS_MODEL
    model: str
    date: str


def find_baselines(model: RegisteredModel, date: str, registry: Sequence[RegisteredModel],
                   index: dict[str, list[str]]) -> list[Baseline]:
    """The reports ``model``'s report of night ``date`` is compared with (see the module doc)."""
    out = []
    earlier = [d for d in index.get(model.name, []) if d < date]
    if earlier:
        out.append(Baseline(PREVIOUS_NIGHT, model.name, earlier[-1]))
    older = [m for m in registry if (m.created, m.name) < (model.created, model.name)]
    for prev in reversed(older):
        nights = [d for d in index.get(prev.name, []) if d <= date]
        if nights:
            out.append(Baseline(PREVIOUS_MODEL, prev.name, nights[-1]))
            break
    return out


def compare_reports(new: dict, old: dict, max_drop: float) -> list[dict[str, Any]]:
    """One row per bin x FAR with a TAR in both reports: before, after, drop, regression."""
    rows = []
    old_bins = old.get("bins") or {}
    for bin_name, b in (new.get("bins") or {}).items():
        ob = old_bins.get(bin_name)
        if ob is None:
            continue
        old_tars = ob.get("tar_at_far") or {}
        for far, after in (b.get("tar_at_far") or {}).items():
            before = old_tars.get(far)
            if before is None or after is None:
                continue
            drop = float(before) - float(after)
            rows.append({"bin": bin_name, "far": far, "before": float(before), "after": float(after),
                         "drop": drop, "regression": drop > max_drop + DROP_EPS})
    return rows


def _protocol_mismatch(new: dict, old: dict) -> str | None:
    a, b = new.get("nightly") or {}, old.get("nightly") or {}
    for key in ("data", "split"):
        if key in a and key in b and a[key] != b[key]:
            return f"{key} differs ({b[key]!r} then, {a[key]!r} now)"
    return None


@dataclass
class ModelNight:
    model: RegisteredModel
    date: str
    uri: str
    evaluated: bool  # evaluated by this run (False: the night's report already existed)
    report: dict
    comparisons: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def regressions(self) -> list[dict[str, Any]]:
        return [c for c in self.comparisons if c["regression"]]

    def summary(self) -> dict[str, Any]:
        return {"uri": self.model.uri, "created": self.model.created_iso, "created_from": self.model.created_from,
                "report": f"{self.model.name}/{REPORT_FILE}", "comparisons": self.comparisons,
                "not_compared": self.skipped, "regression_count": len(self.regressions)}


def regression_message(night: ModelNight, c: dict[str, Any], max_drop: float) -> str:
    against = ("its report of the previous night" if c["against"] == PREVIOUS_NIGHT
               else f"previous model {c['against_model']}")
    return (f"model {night.model.name}, bin {c['bin']}, FAR {c['far']}: TAR {c['before']:.4f} -> {c['after']:.4f} "
            f"(drop {c['drop']:.4f} > max {max_drop:g}) against {against} (night {c['against_date']})")


def _compare(night: ModelNight, registry: Sequence[RegisteredModel], index: dict[str, list[str]],
             history_uri: str, max_drop: float) -> None:
    night.comparisons, night.skipped = [], []
    for base in find_baselines(night.model, night.date, registry, index):
        old_uri = storage.join(night_uri(history_uri, base.date, base.model), REPORT_FILE)
        old = _read_json(old_uri)
        why = _protocol_mismatch(night.report, old)
        if why:
            night.skipped.append({"against": base.kind, "against_model": base.model, "against_date": base.date,
                                  "reason": why})
            continue
        for row in compare_reports(night.report, old, max_drop):
            night.comparisons.append({"against": base.kind, "against_model": base.model,
                                      "against_date": base.date, **row})


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def nightly_registry(night: ModelNight):
    """The night's figures of one model: ``posefr_tar{model,bin,far}`` etc. (see
    :func:`posefr_dist.metrics.verification_registry`) plus the nightly gauges."""
    from prometheus_client import Gauge

    from posefr_dist.metrics import verification_registry

    name = night.model.name
    r = verification_registry(night.report, {"model": name})
    Gauge("posefr_nightly_regressions", "TAR drops beyond --max-drop (bins x FARs x baselines)", ["model"],
          registry=r).labels(model=name).set(len(night.regressions))
    midnight = dt.datetime.combine(dt.date.fromisoformat(night.date), dt.time(), dt.timezone.utc)
    Gauge("posefr_nightly_date_timestamp_seconds", "The night (00:00 UTC) these figures belong to", ["model"],
          registry=r).labels(model=name).set(midnight.timestamp())
    Gauge("posefr_model_created_timestamp_seconds", "Creation time of the model", ["model"],
          registry=r).labels(model=name).set(night.model.created.timestamp())
    drop = Gauge("posefr_nightly_tar_drop", "TAR of the baseline minus TAR now, per bin and FAR",
                 ["model", "against", "bin", "far"], registry=r)
    for c in night.comparisons:
        drop.labels(model=name, against=c["against"], bin=c["bin"], far=c["far"]).set(c["drop"])
    return r

