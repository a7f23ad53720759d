"""``posefr nightly``: scheduled re-evaluation of the exported models, with history and a regression gate.

Model registry (``--models URI``)
    A folder (or ``s3://`` prefix) holding one exported 2D model per sub-folder
    (``<models>/<name>/config.json`` + ``model.safetensors``, as ``posefr export`` writes them).
    The folder name is the model's name. Sub-folders whose ``config.json`` is not a ``posefr-2d``
    export, and names starting with ``.`` or ``_``, are not models. A model's creation time is,
    in this order:

    1. ``created`` in the model's ``config.json``;
    2. ``models.<name>.created_at`` in ``<models>/registry.json``
       (``{"models": {"<name>": {"created_at": "2026-01-02T03:04:05Z"}}}``);
    3. the modification time of the model's ``config.json`` (last-modified time on S3).

    Times are ISO 8601 strings (no offset = UTC) or Unix seconds. Models are ordered by creation
    time, then by name; the *newest* model is the last one. The *previous model* of a model M is
    the newest model created before M that has a report in the history on or before the night
    being evaluated.

History (``--history URI``)
    ``<history>/<YYYY-MM-DD>/<model>/`` holds one night's evaluation of one model: ``report.md``,
    ``roc.png``, ``tar_vs_yaw.png``, ``metrics.prom`` (Prometheus text format) and ``report.json``
    (the verification report plus a ``nightly`` section: model, creation time, data, split). Each
    file is written atomically and ``report.json`` last, so a folder holding ``report.json`` is a
    finished night; a folder without it is re-evaluated. Embeddings are not kept.
    ``<history>/<YYYY-MM-DD>/summary.json`` lists the models of the night, their comparisons and
    regressions; it is rewritten only when its content changes.

Comparisons and the gate
    Each evaluated model is compared, in every yaw bin and at every FAR present in both reports
    with a TAR in both, with (a) its own report of the latest earlier night (*previous night*),
    and (b) the previous model's report from the latest night on or before this one that
    evaluated it (*previous model*). Reports made on other data or another split are not compared.
    A TAR that drops by more than ``--max-drop`` (absolute) is a regression.

Idempotence
    When ``<history>/<date>/<model>/report.json`` exists the model is not evaluated again and no
    file of it is rewritten; the comparisons are computed again from the history, so a rerun gives
    the same exit code and messages, and its figures are pushed again.

Exit codes: 0 no regression; 1 error (including a failed push); 2 usage; 3 regression (one
``posefr nightly: regression: ...`` line per bin and FAR on stderr; wins over a failed push).

Code: ``nightly_history`` (the registry and the history layout), ``nightly_gate`` (comparisons, the
gate, the Prometheus figures) and this module (evaluating, writing and the run, the command line);
the public names of all three are importable from here.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

from posefr_dist import storage
from posefr_dist.eval.nightly_gate import (DROP_EPS, PREVIOUS_MODEL, PREVIOUS_NIGHT, Baseline, ModelNight,
                                           _compare, _protocol_mismatch, compare_reports, find_baselines,
                                           nightly_registry, regression_message)
from posefr_dist.eval.nightly_history import (CONFIG_FILE, EXPORT_FORMAT, REGISTRY_FILE, REPORT_FILE, NightlyError,
                                              RegisteredModel, _read_json, check_date, history_index, list_models,
                                              night_uri, parse_time)

__all__ = [
    "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_REGRESSION", "PUSH_JOB", "REGISTRY_FILE", "CONFIG_FILE",
    "REPORT_FILE", "MARKDOWN_FILE", "METRICS_FILE", "SUMMARY_FILE", "PLOT_FILES", "EXPORT_FORMAT",
    "DEFAULT_MAX_DROP", "PREVIOUS_NIGHT", "PREVIOUS_MODEL", "DROP_EPS",
    "NightlyError", "RegisteredModel", "parse_time", "list_models", "check_date", "night_uri", "history_index",
    "Baseline", "find_baselines", "compare_reports", "ModelNight", "regression_message", "nightly_registry",
    "NightlyResult", "today_utc", "run_nightly", "cmd_nightly", "add_nightly_parser", "main",
]

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_REGRESSION = 0, 1, 2, 3

PUSH_JOB = "posefr_nightly"
MARKDOWN_FILE = "report.md"
METRICS_FILE = "metrics.prom"
SUMMARY_FILE = "summary.json"
PLOT_FILES = ("roc.png", "tar_vs_yaw.png")
DEFAULT_MAX_DROP = 0.01


# --------------------------------------------------------------------------------------------
# one model, one night
# --------------------------------------------------------------------------------------------


def _markdown(night: ModelNight, max_drop: float) -> str:
    from posefr_dist.eval.report import render_markdown

    m = night.model
    lines = [render_markdown(night.report).rstrip("\n"), "", "## Nightly", "",
             f"- night: {night.date}; model `{m.name}` (`{m.uri}`), created {m.created_iso} ({m.created_from})",
             f"- data: `{night.report['nightly']['data']}`, split `{night.report['nightly']['split']}`",
             f"- regression gate: a TAR drop above {max_drop:g} (absolute)", ""]
    if night.comparisons:
        lines += ["| against | model | night | bin | FAR | TAR then | TAR now | drop | |",
                  "|---|---|---|---|---:|---:|---:|---:|---|"]
        for c in night.comparisons:
            lines.append(f"| {c['against']} | {c['against_model']} | {c['against_date']} | {c['bin']} | {c['far']} | "
                         f"{100 * c['before']:.2f} | {100 * c['after']:.2f} | {100 * c['drop']:+.2f} | "
                         f"{'**regression**' if c['regression'] else ''} |")
    else:
        lines.append("No earlier report to compare with.")
    for s in night.skipped:
        lines.append(f"- not compared with {s['against']} {s['against_model']} ({s['against_date']}): {s['reason']}")
    return "\n".join(lines) + "\n"


def _evaluate_night(model: RegisteredModel, date: str, data_uri: str, split: str,
                    eval_kwargs: dict[str, Any]) -> tuple[dict, dict[str, bytes]]:
    """Evaluate into a local scratch folder; returns the report (with its nightly section, as
    stored) and the plot files."""
    from posefr_dist.eval.embed import evaluate

    tmp = tempfile.mkdtemp(prefix="posefr-nightly-")
    try:
        report = evaluate(model.uri, data_uri, tmp, split=split, **eval_kwargs)
        plots = {}
        for name in PLOT_FILES:
            with open(os.path.join(tmp, name), "rb") as f:
                plots[name] = f.read()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["nightly"] = {"date": date, "model": model.name, "model_uri": model.uri, "created": model.created_iso,
                         "created_from": model.created_from, "data": data_uri.rstrip("/") or data_uri, "split": split}
    # the stored form (plain JSON types), so a rerun that reads it back computes the same
    return json.loads(json.dumps(report, allow_nan=False)), plots


def _write_night(night: ModelNight, plots: dict[str, bytes], max_drop: float) -> None:
    """Every file atomically, ``report.json`` last."""
    from posefr_dist.metrics import write_textfile

    for name, data in plots.items():
        storage.write_bytes(storage.join(night.uri, name), data)
    storage.write_text(storage.join(night.uri, MARKDOWN_FILE), _markdown(night, max_drop))
    write_textfile(nightly_registry(night), storage.join(night.uri, METRICS_FILE))
    storage.write_text(storage.join(night.uri, REPORT_FILE), json.dumps(night.report, indent=2, allow_nan=False) + "\n")


def _write_summary(history_uri: str, date: str, nights: Iterable[ModelNight], max_drop: float) -> str:
    """Merge this run's models into the night's summary; write only when the content changes."""
    uri = storage.join(history_uri, date, SUMMARY_FILE)
    old_text = storage.read_text(uri) if storage.exists(uri) else None
    models: dict[str, Any] = {}
    if old_text is not None:
        try:
            models = dict(json.loads(old_text).get("models") or {})
        except (json.JSONDecodeError, AttributeError):
            log.warning("%s: unreadable; rewritten", uri)
    for n in nights:
        models[n.model.name] = n.summary()
    models = dict(sorted(models.items()))
    regressions = [{"model": name, **c} for name, m in models.items() for c in m.get("comparisons", [])
                   if c.get("regression")]
    doc = {"date": date, "max_drop": max_drop, "models": models, "regressions": regressions}
    text = json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n"
    if text != old_text:
        storage.write_text(uri, text)
    return uri


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


@dataclass
class NightlyResult:
    date: str
    nights: list[ModelNight]
    summary_uri: str
    max_drop: float
    push_errors: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[tuple[ModelNight, dict[str, Any]]]:
        return [(n, c) for n in self.nights for c in n.regressions]

    @property
    def exit_code(self) -> int:
        if self.regressions:
            return EXIT_REGRESSION
        return EXIT_ERROR if self.push_errors else EXIT_OK


def today_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).date().isoformat()


def run_nightly(models_uri: str, data_uri: str, history_uri: str, *, date: str | None = None,
                max_drop: float = DEFAULT_MAX_DROP, pushgateway: str | None = None,
                model_names: Sequence[str] = (), split: str = "test", fars: Sequence[float] | None = None,
                yaw_edges: Sequence[float] | None = None, batch_size: int = 256, actors: int = 1,
                gpus_per_actor: float = 0.0, enroll_max_yaw: float = 15.0) -> NightlyResult:
    """Evaluate the newest model (or the models named) for night ``date`` (default today, UTC),
    store the reports, compare, push. See the module doc."""
    date = check_date(date or today_utc())
    if not max_drop >= 0.0:
        raise NightlyError(f"--max-drop {max_drop}: must be >= 0")
    registry = list_models(models_uri)
    if not registry:
        raise NightlyError(f"{models_uri}: no exported model (<name>/{CONFIG_FILE} of format {EXPORT_FORMAT})")
    by_name = {m.name: m for m in registry}
    if model_names:
        missing = [n for n in dict.fromkeys(model_names) if n not in by_name]
        if missing:
            raise NightlyError(f"{models_uri}: no model {', '.join(missing)} (models: {', '.join(by_name)})")
        chosen = [m for m in registry if m.name in set(model_names)]  # creation order
    else:
        chosen = [registry[-1]]
    eval_kwargs = dict(fars=list(fars) if fars else None, yaw_edges=list(yaw_edges) if yaw_edges else None,
                       batch_size=batch_size, actors=actors, gpus_per_actor=gpus_per_actor,
                       enroll_max_yaw=enroll_max_yaw)
    index = history_index(history_uri)
    nights: list[ModelNight] = []
    for model in chosen:
        uri = night_uri(history_uri, date, model.name)
        if date in index.get(model.name, []):
            log.info("%s: the night's report exists; not evaluated again", uri)
            report = _read_json(storage.join(uri, REPORT_FILE))
            night = ModelNight(model, date, uri, False, report)
            _compare(night, registry, index, history_uri, max_drop)
        else:
            log.info("evaluating model %s (%s) for night %s", model.name, model.uri, date)
            report, plots = _evaluate_night(model, date, data_uri, split, eval_kwargs)
            night = ModelNight(model, date, uri, True, report)
            _compare(night, registry, index, history_uri, max_drop)
            _write_night(night, plots, max_drop)
            index.setdefault(model.name, []).append(date)
            index[model.name].sort()
        nights.append(night)
    summary_uri = _write_summary(history_uri, date, nights, max_drop)
    result = NightlyResult(date, nights, summary_uri, max_drop)
    if pushgateway:
        from posefr_dist.metrics import push

        for night in nights:
            try:
                push(nightly_registry(night), pushgateway, PUSH_JOB, {"model": night.model.name})
            except Exception as e:  # noqa: BLE001 - reported, and the exit code says so
                result.push_errors.append(f"push of model {night.model.name} to {pushgateway} failed: {e}")
    return result


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _date_arg(text: str) -> str:
    try:
        return check_date(text)
    except NightlyError as e:
        raise argparse.ArgumentTypeError(str(e).replace("--date ", "")) from None


def cmd_nightly(args: argparse.Namespace) -> int:
    res = run_nightly(args.models, args.data, args.history, date=args.date, max_drop=args.max_drop,
                      pushgateway=args.pushgateway, model_names=args.model or (), split=args.split,
                      fars=args.far, yaw_edges=args.yaw_edges, batch_size=args.batch_size, actors=args.actors,
                      gpus_per_actor=args.gpus_per_actor, enroll_max_yaw=args.enroll_max_yaw)
    for n in res.nights:
        tars = n.report["bins"].get("all", {}).get("tar_at_far", {})
        figures = ", ".join(f"TAR@{k} {'—' if v is None else f'{100 * v:.2f}%'}" for k, v in tars.items())
        state = "evaluated" if n.evaluated else "already evaluated"
        print(f"{res.date} model {n.model.name} (created {n.model.created_iso}): {state}; all probes: {figures}")
        print(f"  report: {storage.join(n.uri, REPORT_FILE)}")
        by_base: dict[tuple[str, str, str], list[dict]] = {}
        for c in n.comparisons:
            by_base.setdefault((c["against"], c["against_model"], c["against_date"]), []).append(c)
        for (kind, other, night), rows in by_base.items():
            worst = max(rows, key=lambda c: c["drop"])
            bad = sum(c["regression"] for c in rows)
            print(f"  vs {kind} {other} ({night}): {len(rows)} bin x FAR figures, {bad} regression(s); "
                  f"largest drop {100 * worst['drop']:+.2f} points at {worst['bin']} FAR {worst['far']}")
        for s in n.skipped:
            print(f"  not compared with {s['against']} {s['against_model']} ({s['against_date']}): {s['reason']}")
        if not n.comparisons and not n.skipped:
            print("  nothing earlier to compare with")
    print(f"summary: {res.summary_uri}")
    for n, c in res.regressions:
        print(f"posefr nightly: regression: {regression_message(n, c, res.max_drop)}", file=sys.stderr)
    for e in res.push_errors:
        print(f"posefr nightly: error: {e}", file=sys.stderr)
    return res.exit_code


def add_nightly_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``posefr nightly`` on ``subparsers``; its ``func`` returns the exit code."""
    from posefr_dist.cliutil import comma_floats

    fars_default, edges_default = "0.1,0.01,0.001,0.0001", "0,30,60,90"
    p = subparsers.add_parser(
        "nightly", help="re-evaluate the newest model, keep the history, gate on TAR regressions",
        description="Evaluate the newest model of a registry (or the models named) for one night, "
                    "store the report under HISTORY/DATE/MODEL/, compare with the previous night and "
                    "the previous model, push the figures. Exit 3 on a TAR drop above --max-drop.")
    p.add_argument("--models", required=True, help="model registry: one exported model per sub-folder (or s3://)")
    p.add_argument("--data", required=True, help="shard root (folder or s3://)")
    p.add_argument("--history", required=True, help="history root: DATE/MODEL/report.json ... (folder or s3://)")
    p.add_argument("--date", type=_date_arg, default=None, help="the night, YYYY-MM-DD (default today, UTC)")
    p.add_argument("--max-drop", type=float, default=DEFAULT_MAX_DROP,
                   help=f"largest allowed TAR drop, absolute (default {DEFAULT_MAX_DROP})")
    p.add_argument("--pushgateway", help="Prometheus Pushgateway HOST:PORT (job posefr_nightly, grouped by model)")
    p.add_argument("--model", action="append", metavar="NAME",
                   help="evaluate this model (repeatable; default the newest)")
    p.add_argument("--split", default="test")
    p.add_argument("--far", type=comma_floats, default=comma_floats(fars_default), help=f"default {fars_default}")
    p.add_argument("--yaw-edges", type=comma_floats, default=comma_floats(edges_default), help=f"default {edges_default}")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--actors", type=int, default=1, help="embedding actors (model replicas)")
    p.add_argument("--gpus-per-actor", type=float, default=0.0)
    p.add_argument("--enroll-max-yaw", type=float, default=15.0, help="gallery = |yaw| <= this")
    p.set_defaults(func=cmd_nightly)
    return p


def main(argv: list[str] | None = None) -> int:
    """``posefr nightly ...`` on its own (what ``jobs/nightly.py`` runs); same errors and exit
    codes as the ``posefr`` command."""
    from posefr_dist.cliutil import base_parser, run

    parser, sub = base_parser()
    add_nightly_parser(sub)
    return run(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
