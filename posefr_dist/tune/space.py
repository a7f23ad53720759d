"""The search space: dotted config keys mapped to distributions, checked before anything starts.

A space is written in the config file (``tune.space``)::

    tune:
      space:
        loss.lambda_je: {loguniform: [1.0e-3, 10]}
        loss.je_bins: {choice: [16, 32, 64]}
        loss.je_bandwidth: {uniform: [0.5, 2.0]}
        train.lr: {randint: [1, 4]}          # integers, both ends included

Every key must name a field of the config; every value a distribution can produce is checked
against that field (type and range), so a bad space fails on load with a message naming the key.
Those checks are done by :class:`posefr_dist.config.TuneConfig` itself (``posefr_dist.config.space``,
re-exported here with the whole :class:`~posefr_dist.config.Config` as the root); this module adds
the conversion to Ray Tune's sample objects and applying sampled values. It imports Ray only in
:func:`to_tune_space`.
"""

from __future__ import annotations

from typing import Any, Mapping

from posefr_dist.config import Config, from_dict, to_dict
from posefr_dist.config import space as _space
from posefr_dist.config.space import DISTRIBUTIONS, RESERVED, parse_spec

__all__ = ["DISTRIBUTIONS", "RESERVED", "apply_params", "check_initial_points", "check_space", "flatten_space",
           "parse_spec", "to_tune_space"]


def flatten_space(space: Any) -> Any:
    """Nested groups to dotted keys (see :func:`posefr_dist.config.space.flatten_space`)."""
    return _space.flatten_space(space, cls=Config)


def check_space(space: Mapping[str, Any], search: str = "optuna") -> dict[str, Any]:
    """Raise :class:`~posefr_dist.config.ConfigError` naming the key if ``space`` is not a valid
    search space; returns it with each distribution in canonical form (``{name: [numbers...]}``)."""
    return _space.check_space(space, search, cls=Config)


def check_initial_points(points: list[Any], space: Mapping[str, Any], search: str = "optuna") -> list[dict]:
    """Each point sets keys of the space to values the space can produce (Optuna: every key);
    returns the points with values typed as their fields."""
    return _space.check_initial_points(points, space, search, cls=Config)


def to_tune_space(space: Mapping[str, Any]) -> dict[str, Any]:
    """The space as Ray Tune sample objects (flat dotted keys)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        name, args = parse_spec(key, spec)
        if name == "loguniform":
            out[key] = tune.loguniform(float(args[0]), float(args[1]))
        elif name == "uniform":
            out[key] = tune.uniform(float(args[0]), float(args[1]))
        elif name == "randint":
            out[key] = tune.randint(int(args[0]), int(args[1]) + 1)  # Tune's upper end is exclusive
        elif name == "choice":
            out[key] = tune.choice(list(args))
        else:
            out[key] = tune.grid_search(list(args))
    return out


def apply_params(cfg: Config, params: Mapping[str, Any], **fixed: Any) -> Config:
    """``cfg`` with the dotted ``params`` (and ``fixed`` ``section__field=value`` pairs) set,
    validated as a whole."""
    tree = to_dict(cfg)
    items = list(params.items()) + [(k.replace("__", "."), v) for k, v in fixed.items()]
    for key, value in items:
        node = tree
        parts = key.split(".")
        for p in parts[:-1]:
            node = node[p]
        node[parts[-1]] = value.item() if hasattr(value, "item") else value  # numpy scalars
    return from_dict(tree)
