"""The checks of a search space (``tune.space``) and its initial points, done when the tune section
is built, so a bad space fails on load with a message naming the key.

A space maps dotted config keys to distributions (see :mod:`posefr_dist.tune.space`). Every key
must name a field of the root config class ``cls`` and every value a distribution can produce is
checked against that field (type and range). The root class is passed in, so this module sits below
the sections (``posefr_dist.config.root`` passes :class:`~posefr_dist.config.Config`;
:mod:`posefr_dist.tune.space` re-exports these with that default).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from posefr_dist.config.core import ConfigError, _check_value, _key_type

#: distribution name -> how many list items it takes (None = one or more)
DISTRIBUTIONS = {"loguniform": 2, "uniform": 2, "randint": 2, "choice": None, "grid": None}

#: keys a trial sets itself, or that make no sense to search
RESERVED = ("tune.", "train.storage_path", "train.run_name", "train.resume_from", "train.chaos_kill_at")


def _err(key: str, msg: str) -> ConfigError:
    return ConfigError(f"tune.space.{key}: {msg}")


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def parse_spec(key: str, spec: Any) -> tuple[str, list[Any]]:
    """``{loguniform: [a, b]}`` -> ``("loguniform", [a, b])`` with the shape and bounds checked."""
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise _err(key, f"expected one distribution such as {{uniform: [0.5, 2.0]}} or "
                        f"{{choice: [16, 32]}}, got {spec!r}; distributions: {', '.join(DISTRIBUTIONS)}")
    (name, args), = spec.items()
    if name not in DISTRIBUTIONS:
        raise _err(key, f"unknown distribution {name!r}; distributions: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, (list, tuple)) or not args:
        raise _err(key, f"{name} takes a non-empty list, got {args!r}")
    args = [float(a) if isinstance(a, str) and _looks_float(a) else a for a in args]  # YAML 1.1: 1e-3
    want = DISTRIBUTIONS[name]
    if want is not None:
        if len(args) != want or not all(_number(a) for a in args):
            raise _err(key, f"{name} takes [low, high] (two numbers), got {args!r}")
        lo, hi = args
        if not lo < hi:
            raise _err(key, f"{name} needs low < high, got [{lo}, {hi}]")
        if name == "loguniform" and lo <= 0:
            raise _err(key, f"loguniform needs low > 0, got {lo}")
        if name == "randint" and not all(float(a).is_integer() for a in args):
            raise _err(key, f"randint takes integer bounds, got {args!r}")
    return name, list(args)


def _looks_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _check_key(key: Any, cls: type) -> type:
    if not isinstance(key, str) or not key:
        raise ConfigError(f"tune.space: keys must be dotted config keys such as 'loss.lambda_je', got {key!r}")
    if key.startswith(RESERVED) or key == "tune":
        raise _err(key, "cannot be searched (set by the experiment itself)")
    try:
        return _key_type(key, cls)
    except ConfigError as e:
        raise ConfigError(f"tune.space: {e}") from None


def _check_values(key: str, values: list[Any], cls: type) -> list[Any]:
    out = []
    for v in values:
        try:
            out.append(_check_value(key, v, cls))
        except ConfigError as e:
            raise ConfigError(f"tune.space: {e} (value {v!r} of the distribution)") from None
    return out


def flatten_space(space: Any, *, cls: type) -> Any:
    """Nested groups to dotted keys: ``{loss: {je_bins: {choice: [...]}}}`` -> ``{"loss.je_bins": ...}``.

    This is what a CLI override such as ``tune.space.loss.je_bins={choice: [16, 32]}`` produces;
    a later entry wins over an earlier one for the same key, and ``null`` removes a key
    (``tune.space.loss.je_bandwidth=null``)."""
    if not isinstance(space, Mapping):
        return space
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Mapping[str, Any]) -> None:
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            is_spec = isinstance(v, Mapping) and (len(v) == 1 and next(iter(v)) in DISTRIBUTIONS
                                                  or _names_field(key, cls))
            if isinstance(v, Mapping) and v and not is_spec:
                walk(key, v)
            else:
                out.pop(key, None)
                if v is not None:
                    out[key] = v

    walk("", space)
    return out


def _names_field(key: str, cls: type) -> bool:
    try:
        _key_type(key, cls)
        return True
    except ConfigError:
        return False


def check_space(space: Mapping[str, Any], search: str = "optuna", *, cls: type) -> dict[str, Any]:
    """Raise :class:`ConfigError` naming the key if ``space`` is not a valid search space;
    returns it with each distribution in canonical form (``{name: [numbers...]}``)."""
    if not isinstance(space, Mapping) or not space:
        raise ConfigError("tune.space: need a mapping of one or more dotted keys to distributions")
    out: dict[str, Any] = {}
    for key, spec in space.items():
        tp = _check_key(key, cls)
        name, args = parse_spec(key, spec)
        out[key] = {name: args}
        if name in ("uniform", "loguniform") and tp is int:
            raise _err(key, f"is an integer field; use randint or choice instead of {name}")
        if name == "randint" and tp is not int and tp is not float:
            raise _err(key, "randint needs a numeric field")
        if name == "grid" and search != "random":
            raise _err(key, "grid needs tune.search=random (Optuna samples; it does not enumerate grids)")
        values = _check_values(key, [int(a) for a in args] if name == "randint" else args, cls)
        if name in ("choice", "grid"):
            out[key] = {name: values}  # typed as the field (YAML 1.1 reads 1e-3 as a string)
    return out


def check_initial_points(points: list[Any], space: Mapping[str, Any], search: str = "optuna", *,
                         cls: type) -> list[dict]:
    """Each point sets keys of the space to values the space can produce (Optuna: every key);
    returns the points with values typed as their fields."""
    typed: list[dict] = []
    for i, point in enumerate(points):
        where = f"tune.initial_points[{i}]"
        if not isinstance(point, Mapping) or not point:
            raise ConfigError(f"{where}: expected a mapping of dotted keys to values, got {point!r}")
        if search == "optuna" and set(point) != set(space):
            missing = [k for k in space if k not in point]
            if missing:
                raise ConfigError(f"{where}: Optuna needs a value for every key of tune.space; "
                                  f"missing {', '.join(missing)}")
        for key, value in point.items():
            if key not in space:
                raise ConfigError(f"{where}.{key}: not a key of tune.space ({', '.join(space)})")
            try:
                value = _check_value(key, value, cls)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            name, args = parse_spec(key, space[key])
            if name in ("choice", "grid"):
                ok = value in args
            else:
                ok = args[0] <= value <= args[1]
            if not ok:
                raise ConfigError(f"{where}.{key}: {value!r} is outside tune.space.{key} ({name} {args})")
        typed.append({key: _check_value(key, value, cls) for key, value in point.items()})
    return typed
