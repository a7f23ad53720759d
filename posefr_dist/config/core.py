"""The typed-tree machinery under every config: errors, coercion to annotated types, building a
dataclass tree from plain data with unknown keys rejected, and looking up one dotted key.

Nothing here knows the sections: the root class is always passed in (``posefr_dist.config.io``
supplies :class:`~posefr_dist.config.Config` as the default).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Iterable, Mapping


class ConfigError(ValueError):
    """A configuration value is missing, unknown or invalid; the message names the dotted key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _one_of(value: Any, allowed: Iterable[Any], key: str) -> None:
    allowed = list(allowed)
    _check(value in allowed, key, f"got {value!r}; allowed: {', '.join(map(repr, allowed))}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` to the annotated type ``tp`` where that is lossless."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        _check(isinstance(value, Mapping), key, f"expected a mapping for section, got {value!r}")
        return _build(tp, value, key)
    if origin in (list, tuple):
        _check(isinstance(value, (list, tuple)), key, f"expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        _check(isinstance(value, Mapping), key, f"expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        _check(isinstance(value, int) and not isinstance(value, bool), key,
               f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads an unquoted off/on as false/true
            return "on" if value else "off"
        _check(isinstance(value, (str, int, float)), key,
               f"expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: type, values: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for k, v in values.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{key}: unknown key{hint}")
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def _key_type(key: str, cls: type) -> Any:
    """The annotated type of the field a dotted key names (``loss.je_bins`` -> ``int``).

    Raises:
        ConfigError: the key names no field, or names a whole section.
    """
    parts = key.split(".")
    node: Any = cls
    for i, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(node)]
        here = ".".join(parts[: i + 1])
        if part not in names:
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{here}: unknown key{hint}")
        tp = typing.get_type_hints(node)[part]
        if i + 1 < len(parts):
            _check(dataclasses.is_dataclass(tp), here, f"is a value, not a section (in {key!r})")
            node = tp
        else:
            _check(not dataclasses.is_dataclass(tp), key, "names a whole section; name one of its fields")
            return tp
    raise ConfigError(f"{key}: empty key")


def _check_value(key: str, value: Any, cls: type) -> Any:
    """Validate one dotted ``key: value`` (type and the section's own checks, other fields at their
    defaults) without building a whole config; returns the value coerced to the field's type."""
    parts = key.split(".")
    tp = _key_type(key, cls)
    coerced = _coerce(value, tp, key)
    node: Any = cls
    for part in parts[:-1]:
        node = typing.get_type_hints(node)[part]
    section = ".".join(parts[:-1])
    try:
        node(**{parts[-1]: coerced})
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{section or key}: {e}") from e
    return coerced
