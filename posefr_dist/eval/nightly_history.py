"""The model registry and the history layout of ``posefr nightly`` (see
:mod:`posefr_dist.eval.nightly` for both): which exported models there are and when each was
created, and which nights hold a finished report of which model.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from posefr_dist import storage

log = logging.getLogger("posefr_dist.eval.nightly")

REGISTRY_FILE = "registry.json"
CONFIG_FILE = "config.json"
REPORT_FILE = "report.json"
EXPORT_FORMAT = "posefr-2d"

_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class NightlyError(ValueError):
    """Bad registry, history or arguments; the message names the URI and the field."""


# --------------------------------------------------------------------------------------------
# the model registry
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    uri: str
    created: dt.datetime  # timezone-aware, UTC
    created_from: str  # where the creation time came from

    @property
    def created_iso(self) -> str:
        return _iso(self.created)


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def parse_time(value: Any, where: str) -> dt.datetime:
    """An ISO 8601 string (no offset = UTC) or Unix seconds -> an aware UTC datetime."""
    if isinstance(value, bool):
        raise NightlyError(f"{where}: expected an ISO 8601 time or Unix seconds, got {value!r}")
    if isinstance(value, (int, float)):
        try:
            return dt.datetime.fromtimestamp(float(value), tz=dt.timezone.utc)
        except (OverflowError, OSError, ValueError) as e:
            raise NightlyError(f"{where}: {value!r} is not a valid Unix time ({e})") from None
    if isinstance(value, str):
        try:
            t = dt.datetime.fromisoformat(value.strip())
        except ValueError:
            raise NightlyError(f"{where}: {value!r} is not an ISO 8601 time (e.g. 2026-01-02T03:04:05Z)") from None
        if t.tzinfo is None:
            t = t.replace(tzinfo=dt.timezone.utc)
        return t.astimezone(dt.timezone.utc)
    raise NightlyError(f"{where}: expected an ISO 8601 time or Unix seconds, got {value!r}")


def _read_json(uri: str) -> Any:
    text = storage.read_text(uri)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise NightlyError(f"{uri}: not valid JSON ({e})") from None


def _mtime(uri: str) -> dt.datetime:
    loc = storage.resolve(uri)
    info = storage.with_retries(uri, lambda: loc.fs.get_file_info(loc.path))
    if info.mtime is None:
        raise NightlyError(f"{uri}: the store reports no modification time; set `created` in it")
    t = info.mtime
    return t.replace(tzinfo=dt.timezone.utc) if t.tzinfo is None else t.astimezone(dt.timezone.utc)


def _registry_times(models_uri: str) -> dict[str, Any]:
    uri = storage.join(models_uri, REGISTRY_FILE)
    if not storage.exists(uri):
        return {}
    doc = _read_json(uri)
    entries = doc.get("models") if isinstance(doc, dict) else None
    if not isinstance(entries, dict):
        raise NightlyError(f'{uri}: expected {{"models": {{"<name>": {{"created_at": ...}}}}}}')
    out = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or "created_at" not in entry:
            raise NightlyError(f"{uri}: models.{name}: no created_at")
        out[name] = entry["created_at"]
    return out


def list_models(models_uri: str) -> list[RegisteredModel]:
    """The models of the registry, oldest first (creation time, then name)."""
    prefix = models_uri.rstrip("/")
    registry = None
    found: list[RegisteredModel] = []
    for uri in storage.list_files(models_uri, CONFIG_FILE):
        rel = uri[len(prefix):].lstrip("/").replace(os.sep, "/").split("/")
        if len(rel) != 2 or rel[1] != CONFIG_FILE:
            continue
        name = rel[0]
        conf = _read_json(uri)
        if not isinstance(conf, dict) or conf.get("format") != EXPORT_FORMAT:
            log.warning("%s: not a %s export; not a model of the registry", uri, EXPORT_FORMAT)
            continue
        if conf.get("created") is not None:
            created, source = parse_time(conf["created"], f"{uri}: created"), f"{CONFIG_FILE} created"
        else:
            if registry is None:
                registry = _registry_times(models_uri)
            if name in registry:
                where = f"{storage.join(models_uri, REGISTRY_FILE)}: models.{name}.created_at"
                created, source = parse_time(registry[name], where), f"{REGISTRY_FILE} created_at"
            else:
                created, source = _mtime(uri), f"{CONFIG_FILE} modification time"
        found.append(RegisteredModel(name, storage.join(models_uri, name), created, source))
    found.sort(key=lambda m: (m.created, m.name))
    return found


# --------------------------------------------------------------------------------------------
# the history
# --------------------------------------------------------------------------------------------


def check_date(text: str) -> str:
    if not _DATE_RE.match(text or ""):
        raise NightlyError(f"--date {text!r}: expected YYYY-MM-DD")
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        raise NightlyError(f"--date {text!r}: not a calendar date") from None
    return text


def night_uri(history_uri: str, date: str, model: str) -> str:
    return storage.join(history_uri, date, model)


def history_index(history_uri: str) -> dict[str, list[str]]:
    """model -> sorted dates of the nights that hold a finished report of it."""
    prefix = history_uri.rstrip("/")
    index: dict[str, list[str]] = {}
    for uri in storage.list_files(history_uri, REPORT_FILE):
        rel = uri[len(prefix):].lstrip("/").replace(os.sep, "/").split("/")
        if len(rel) == 3 and rel[2] == REPORT_FILE and _DATE_RE.match(rel[0]):
            index.setdefault(rel[1], []).append(rel[0])
    for dates in index.values():
        dates.sort()
    return index
