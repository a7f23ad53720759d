"""Results of a tune experiment: the trial table (CSV + Markdown), the best config as a
ready-to-train YAML, the objective against lambda_JE (PNG), and a JSON summary.

All are written into the experiment folder (local or ``s3://``, atomically, via
:mod:`posefr_dist.storage`). :func:`write_outputs` works on plain rows, so it can be tested and
re-run without Ray.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any

from posefr_dist import storage
from posefr_dist.config import Config, dump_config
from posefr_dist.tune.common import TuneOutcome, runs_uri
from posefr_dist.tune.space import apply_params, parse_spec

#: trial statuses, in the order the table lists equal objectives
STATUSES = ("completed", "stopped early", "unfinished", "error")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _scalar(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else x


def _trial_id(result: Any) -> str:
    tid = (result.metrics or {}).get("trial_id")
    if tid:
        return str(tid)
    base = os.path.basename(str(result.path).rstrip("/"))
    return base[len("trial_"):] if base.startswith("trial_") else base


def _kept_checkpoint(df: Any, values: Any, best: float) -> str | None:
    """The checkpoint of a report with the best value that the trial's run still keeps (a val/*
    objective ranks the trial's checkpoints too; among equal values, which one is kept varies);
    failing that (other objectives), the latest checkpoint the run kept."""
    if "checkpoint_path" not in df.columns:
        return None
    order = list(reversed(list(values.index[values == best]))) + list(reversed(list(df.index)))
    for idx in order:
        path = df.loc[idx, "checkpoint_path"]
        if isinstance(path, str) and path and storage.exists(storage.join(path, "meta.json")):
            return path
    return None


def trial_rows(grid: Any, cfg: Config, exp_uri: str) -> list[dict[str, Any]]:
    """One row per trial of a ``ResultGrid``: status, the objective (best and last report),
    completed epochs, the sampled values, and where its run and best checkpoint are."""
    metric, mode = cfg.tune.metric, cfg.tune.mode
    statuses: dict[str, str] = {}
    analysis = getattr(grid, "_experiment_analysis", None)
    for t in getattr(analysis, "trials", None) or []:
        statuses[t.trial_id] = t.status
    rows = []
    for i in range(len(grid)):
        res = grid[i]
        tid = _trial_id(res)
        df = res.metrics_dataframe
        last = res.metrics or {}
        best_value, best_ckpt, epochs = float("nan"), None, 0.0
        if df is not None and len(df) and metric in df.columns:
            values = df[metric].astype(float)
            idx = values.idxmax() if mode == "max" else values.idxmin()
            if _finite(values[idx]):
                best_value = float(values[idx])
                best_ckpt = _kept_checkpoint(df, values, best_value)
            if "epochs_done" in df.columns:
                epochs = float(df["epochs_done"].max())
        status = statuses.get(tid, "TERMINATED" if res.error is None else "ERROR")
        if res.error is not None or status == "ERROR":
            state = "error"
        elif status == "TERMINATED":
            state = "completed" if epochs >= cfg.train.epochs else "stopped early"
        else:
            state = "unfinished"
        row: dict[str, Any] = {
            "trial_id": tid, "status": state, "epochs_done": epochs,
            "objective": best_value, "objective_last": float(last.get(metric, float("nan"))),
        }
        for key in cfg.tune.space:
            row[key] = _scalar(res.config.get(key)) if res.config else None
        row["train/loss"] = float(last["train/loss"]) if _finite(last.get("train/loss")) else float("nan")
        row["time_s"] = float(last.get("time_total_s", float("nan")))
        row["run"] = storage.join(runs_uri(exp_uri), tid)
        row["checkpoint"] = best_ckpt if isinstance(best_ckpt, str) else ""
        row["error"] = str(res.error).splitlines()[0][:300] if res.error is not None else ""
        rows.append(row)
    return sort_rows(rows, mode)


def sort_rows(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Best objective first; trials without one (failed, unfinished) last. Adds ``rank``."""
    sign = -1.0 if mode == "max" else 1.0

    def key(r):
        v = r["objective"]
        has = _finite(v) and r["status"] != "error"
        return (0 if has else 1, sign * v if has else 0.0, STATUSES.index(r["status"]), r["trial_id"])

    out = sorted(rows, key=key)
    for i, r in enumerate(out, 1):
        r["rank"] = i
    return out


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def _columns(cfg: Config) -> list[str]:
    return ["rank", "trial_id", "status", "epochs_done", "objective", "objective_last", *cfg.tune.space,
            "train/loss", "time_s", "run", "checkpoint", "error"]


def table_csv(rows: list[dict[str, Any]], cfg: Config) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_columns(cfg), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        if not math.isfinite(x):
            return "–"
        return f"{x:.4g}"
    return "" if x is None else str(x)


def table_markdown(rows: list[dict[str, Any]], cfg: Config, title: str = "") -> str:
    cols = ["rank", "trial_id", "status", "epochs_done", "objective", "objective_last", *cfg.tune.space,
            "train/loss", "time_s"]
    heads = {"trial_id": "trial", "epochs_done": "epochs", "objective": f"{cfg.tune.metric} ({cfg.tune.mode}, best)",
             "objective_last": "last", "time_s": "time (s)"}
    lines = [f"## {title}", ""] if title else []
    lines.append("| " + " | ".join(heads.get(c, c) for c in cols) + " |")
    lines.append("|" + "|".join("---:" if c not in ("trial_id", "status") else "---" for c in cols) + "|")
    for r in rows:
        cells = [_fmt(r.get(c)) if c != "epochs_done" else f"{r.get(c, 0):g}" for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    for r in rows:
        if r["status"] != "error" and _finite(r["objective"]):
            return r
    return None


def best_config(base: Config, row: dict[str, Any]) -> Config:
    """``base`` with the trial's values: a config to train from scratch with ``posefr train``.

    The run goes to the base config's ``train.storage_path`` as ``<tune.name>-best``."""
    params = {k: row[k] for k in base.tune.space if row.get(k) is not None}
    return apply_params(base, params, train__run_name=f"{base.tune.name}-best", train__resume_from="")


def best_yaml(base: Config, row: dict[str, Any], exp_uri: str) -> str:
    cfg = best_config(base, row)
    values = ", ".join(f"{k}={_fmt(row[k])}" for k in base.tune.space)
    header = (f"# Best trial {row['trial_id']} of the tune experiment {exp_uri}\n"
              f"# {base.tune.metric} = {row['objective']:.6g} ({base.tune.mode}; {row['status']}, "
              f"{row['epochs_done']:g} epochs) with {values}\n"
              f"# Train it: posefr train --config best.yaml\n")
    return header + dump_config(cfg)


def _plot_key(cfg: Config, rows: list[dict[str, Any]]) -> str | None:
    numeric = [k for k in cfg.tune.space if any(_finite(r.get(k)) for r in rows)]
    if "loss.lambda_je" in numeric:
        return "loss.lambda_je"
    return numeric[0] if numeric else None


def plot_png(rows: list[dict[str, Any]], cfg: Config, title: str = "") -> tuple[bytes, str] | None:
    """PNG of the objective (best per trial) against lambda_JE (or the first numeric key of the
    space when lambda_JE is not searched); returns (bytes, key) or None without a numeric key."""
    key = _plot_key(cfg, rows)
    if key is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    styles = {"completed": dict(marker="o", color="tab:blue"),
              "stopped early": dict(marker="v", color="tab:orange"),
              "unfinished": dict(marker="s", color="tab:gray")}
    for status, st in styles.items():
        pts = [(r[key], r["objective"]) for r in rows
               if r["status"] == status and _finite(r.get(key)) and _finite(r["objective"])]
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, s=36, label=f"{status} ({len(pts)})", **st)
    best = best_row(rows)
    if best is not None and _finite(best.get(key)):
        ax.scatter([best[key]], [best["objective"]], s=220, marker="*", color="gold", edgecolor="black",
                   zorder=5, label=f"best ({best['trial_id']})")
    spec = cfg.tune.space.get(key)
    if spec is not None and parse_spec(key, spec)[0] == "loguniform":
        ax.set_xscale("log")
    ax.set_xlabel("λ_JE (loss.lambda_je)" if key == "loss.lambda_je" else key)
    ax.set_ylabel(f"{cfg.tune.metric} (best epoch)")
    ax.set_title(title or f"{cfg.tune.name}: {len(rows)} trials", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue(), key


def expected_trials(cfg: Config) -> int:
    grids = [len(parse_spec(k, s)[1]) for k, s in cfg.tune.space.items() if parse_spec(k, s)[0] == "grid"]
    return cfg.tune.num_samples * math.prod(grids) if grids else cfg.tune.num_samples


def write_outputs(rows: list[dict[str, Any]], cfg: Config, exp_uri: str, wall_s: float = 0.0,
                  interrupted: bool | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """Write the table, best config, plot and summary; returns ({name: uri}, summary)."""
    if interrupted is None:
        interrupted = any(r["status"] == "unfinished" for r in rows) or len(rows) < expected_trials(cfg)
    outputs: dict[str, str] = {}
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    title = (f"{cfg.tune.name}: {len(rows)} trials ({', '.join(f'{n} {s}' for s, n in counts.items() if n)})"
             + (" — interrupted" if interrupted else ""))
    outputs["table_csv"] = storage.join(exp_uri, "trials.csv")
    storage.write_text(outputs["table_csv"], table_csv(rows, cfg))
    outputs["table_md"] = storage.join(exp_uri, "trials.md")
    storage.write_text(outputs["table_md"], table_markdown(rows, cfg, title))
    best = best_row(rows)
    if best is not None:
        outputs["best_config"] = storage.join(exp_uri, "best.yaml")
        storage.write_text(outputs["best_config"], best_yaml(cfg, best, exp_uri))
    png = plot_png(rows, cfg, title)
    if png is not None:
        data, key = png
        outputs["plot"] = storage.join(exp_uri, f"objective_vs_{key.split('.')[-1]}.png")
        storage.write_bytes(outputs["plot"], data)
    summary = {"experiment": exp_uri, "metric": cfg.tune.metric, "mode": cfg.tune.mode,
               "trials": len(rows), "expected_trials": expected_trials(cfg), "counts": counts,
               "interrupted": interrupted, "wall_s": round(wall_s, 1), "best": best, "outputs": outputs}
    outputs["summary"] = storage.join(exp_uri, "tune_summary.json")
    storage.write_text(outputs["summary"], json.dumps(summary, indent=2, default=str))
    return outputs, summary


def write_results(grid: Any, cfg: Config, exp_uri: str, wall_s: float = 0.0) -> TuneOutcome:
    """Rows from a ``ResultGrid`` plus :func:`write_outputs`; returns a ``TuneOutcome``."""
    rows = trial_rows(grid, cfg, exp_uri)
    outputs, summary = write_outputs(rows, cfg, exp_uri, wall_s)
    return TuneOutcome(exp_uri, rows, summary["best"], outputs, summary["interrupted"], wall_s)

