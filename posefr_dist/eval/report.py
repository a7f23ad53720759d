"""Writing a verification report: ``report.json``, ``report.md``, ``roc.png``, ``tar_vs_yaw.png``.

Each file is written under a temporary name in the output folder and renamed into place
(``os.replace``), and ``report.json`` goes last: a folder holding ``report.json`` holds a finished
report. Plots use matplotlib's Agg canvas directly (no pyplot, no global backend switch).
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any

REPORT_FILES = ("report.md", "roc.png", "tar_vs_yaw.png", "report.json")


def _far_keys(report: dict) -> list[str]:
    return [repr(float(f)) for f in report["protocol"]["fars"]]


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100.0 * x:.2f}"


def _small(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def _tar_cell(b: dict, key: str) -> str:
    if key in b["far_below_resolution"]:
        return "n/a (FAR < 1/N)" if b["impostor"] else "n/a"
    return _pct(b["tar_at_far"][key])


def render_markdown(report: dict) -> str:
    """The human-readable report: one table per view, bins x FARs."""
    p = report["protocol"]
    keys = _far_keys(report)
    bins = report["bins"]
    lines = [
        "# Verification report",
        "",
        f"- source: `{p.get('source')}`",
        f"- gallery: {p['gallery_rows']} rows, {p['gallery_subjects']} subjects; probes: "
        f"{p['probe_rows']} rows; embedding dimension {p['embedding_dim']}",
        f"- rule: {p['threshold_rule']}",
        f"- yaw bins: {p['yaw_bins']}",
        f"- {p['far_below_resolution']}",
        f"- EER/AUC: histogram of {p['histogram_cells']} cells (score resolution "
        f"{p['score_resolution']:.3g})",
        "",
        "## TAR (%) at FAR, threshold set per bin",
        "",
        "| bin | probes | genuine pairs | impostor pairs | "
        + " | ".join(f"TAR@{k}" for k in keys) + " | EER (%) | AUC |",
        "|---|---:|---:|---:|" + "---:|" * len(keys) + "---:|---:|",
    ]
    for name, b in bins.items():
        auc = "—" if b["auc"] is None else f"{b['auc']:.5f}"
        lines.append(f"| {name} | {b['probes']} | {b['genuine']} | {b['impostor']} | "
                     + " | ".join(_tar_cell(b, k) for k in keys) + f" | {_pct(b['eer'])} | {auc} |")
    lines += [
        "",
        "## Threshold and achieved FAR",
        "",
        "| bin | " + " | ".join(f"t@{k} (achieved FAR)" for k in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for name, b in bins.items():
        cells = []
        for k in keys:
            t = b["threshold_at_far"][k]
            cells.append("—" if t is None else f"{t:.6f} ({_small(b['achieved_far'][k])})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## One global threshold per FAR (set on all impostors), applied to each bin",
        "",
        "| bin | " + " | ".join(f"TAR@{k} (FAR)" for k in keys) + " |",
        "|---|" + "---:|" * len(keys),
    ]
    for name, b in bins.items():
        cells = [f"{_pct(b['tar_at_global_threshold'][k])} ({_small(b['far_at_global_threshold'][k])})"
                 for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def plot_roc(report: dict) -> bytes:
    """Per-bin ROC (TAR against FAR, log FAR axis) as PNG bytes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for name, b in report["bins"].items():
        roc = b.get("roc") or {}
        if roc.get("far"):
            style = {"color": "black", "linewidth": 2.0} if name == "all" else {}
            ax.plot(roc["far"], roc["tar"], label=name, **style)
            drawn += 1
    for f in report["protocol"]["fars"]:
        ax.axvline(f, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("FAR")
    ax.set_ylabel("TAR")
    ax.set_ylim(0.0, 1.01)
    ax.set_title("ROC per pose bin")
    ax.grid(True, which="both", alpha=0.3)
    if drawn:
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "no bin has both genuine and impostor pairs", transform=ax.transAxes,
                ha="center")
    fig.tight_layout()
    return _png(fig)


def plot_tar_vs_yaw(report: dict) -> bytes:
    """TAR at each FAR against the yaw bins (the ``all`` bin as dashed lines), PNG bytes."""
    from matplotlib.figure import Figure

    keys = _far_keys(report)
    names = [n for n in report["bins"] if n not in ("all", "unknown-pose")]
    fig = Figure(figsize=(6.4, 4.8))
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(names)))
    for i, k in enumerate(keys):
        y = [report["bins"][n]["tar_at_far"][k] for n in names]
        y = [math.nan if v is None else 100.0 * v for v in y]
        line, = ax.plot(x, y, marker="o", label=f"FAR {k}")
        a = report["bins"]["all"]["tar_at_far"][k]
        if a is not None:
            ax.axhline(100.0 * a, color=line.get_color(), linestyle="--", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels(names)
    ax.set_xlabel("probe |yaw| bin (degrees)")
    ax.set_ylabel("TAR (%)")
    ax.set_ylim(0.0, 101.0)
    ax.set_title("TAR at FAR by pose (dashed: all probes)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    return _png(fig)


def write_report(report: dict[str, Any], out_dir: str) -> dict[str, str]:
    """Write the report files into ``out_dir`` (a folder, file:// or s3://); returns name -> path.

    Every file is written atomically; ``report.json`` last.
    """
    from posefr_dist import storage

    out_dir = os.fspath(out_dir)
    payload = {
        "report.md": render_markdown(report).encode("utf-8"),
        "roc.png": plot_roc(report),
        "tar_vs_yaw.png": plot_tar_vs_yaw(report),
        "report.json": (json.dumps(report, indent=2, allow_nan=False) + "\n").encode("utf-8"),
    }
    paths = {}
    for name in REPORT_FILES:
        path = storage.join(out_dir, name)
        storage.write_bytes(path, payload[name])  # atomic: temp + rename, or one S3 upload
        paths[name] = path
    return paths
