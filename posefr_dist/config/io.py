"""Loading and writing configs: plain data <-> dataclasses, YAML files, dotted ``key=value``
overrides, and single dotted keys checked on their own. ``cls`` defaults to :class:`Config`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from posefr_dist.config.core import ConfigError, _build, _check_value, _key_type
from posefr_dist.config.root import Config


def from_dict(tree: Mapping[str, Any], cls: type = Config) -> Any:
    """Build and validate a config of type ``cls`` from plain data (e.g. :func:`to_dict` output)."""
    return _build(cls, tree)


def key_type(key: str, cls: type = Config) -> Any:
    """The annotated type of the field a dotted key names (``loss.je_bins`` -> ``int``).

    Raises:
        ConfigError: the key names no field, or names a whole section.
    """
    return _key_type(key, cls)


def check_value(key: str, value: Any, cls: type = Config) -> Any:
    """Validate one dotted ``key: value`` (type and the section's own checks, other fields at their
    defaults) without building a whole config; returns the value coerced to the field's type."""
    return _check_value(key, value, cls)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-data form of a config (for YAML/JSON output)."""
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            node[p] = nxt
        node = nxt
    node[parts[-1]] = value


def parse_overrides(overrides: Iterable[str]) -> list[tuple[str, Any]]:
    """``["a.b=3", "c=x"]`` -> ``[("a.b", 3), ("c", "x")]`` with YAML-typed values."""
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.epochs=3)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from e
        if isinstance(value, (int, float)) and ":" in raw:
            value = raw.strip()  # YAML 1.1 reads 1:0:0 as a base-60 number
        out.append((key, value))
    return out


def merge_overrides(tree: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for key, value in parse_overrides(overrides):
        _set_dotted(tree, key, value)
    return tree


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (), cls: type = Config) -> Any:
    """Build a config of type ``cls`` from defaults, an optional YAML file and overrides.

    Args:
        path: YAML file (mapping of sections) or None for defaults only.
        overrides: dotted ``key=value`` strings applied after the file.
        cls: the dataclass to build (``Config`` by default).

    Returns:
        A validated instance of ``cls``.

    Raises:
        ConfigError: naming the file or the dotted key that is wrong.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p}: invalid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: top level must be a mapping of sections")
        tree = loaded
    tree = merge_overrides(tree, overrides)
    try:
        return _build(cls, tree)
    except ConfigError as e:
        where = f"config file {path}: " if path is not None else ""
        raise ConfigError(f"{where}{e}") from None


def dump_config(cfg: Any) -> str:
    """YAML text of a config, loadable again with :func:`load_config`."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
