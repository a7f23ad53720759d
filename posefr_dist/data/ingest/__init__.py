"""Turn licensed releases (FaceScape multi-view, ARL-VTF) into shards (format version 1).

    ingest_facescape(FaceScapeOptions(images=..., out=...))   -> IngestResult
    ingest_arl_vtf(ArlVtfOptions(root=..., out=...))           -> IngestResult

The ``posefr ingest`` subcommands are registered by :func:`posefr_dist.data.ingest.cli.add_ingest_parser`.
See docs/ingest.md for the layouts, what is recorded and the accuracy of the pose estimation.
Names are imported on first use, so registering the command line costs no numpy/pyarrow import.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ArlVtfOptions": "arl_vtf", "ingest_arl_vtf": "arl_vtf",
    "FaceScapeOptions": "facescape", "ingest_facescape": "facescape",
    "IngestError": "common", "IngestProblem": "common", "IngestResult": "common",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
