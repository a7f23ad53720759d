"""Typed configuration: dataclasses validated on construction, YAML files, dotted overrides.

A config is built in three steps, each of which can fail with a message naming the field:

1. defaults (the dataclass fields, ``posefr_dist.config.sections`` and ``.root``),
2. a YAML file (``load_config("jobs/configs/demo.yaml")``),
3. ``key=value`` overrides in dotted form (``train.epochs=3 loss.lambda_je=0.5``); the value is
   parsed as YAML, so ``true``, ``3``, ``1e-3`` and ``[0, 30, 60, 90]`` have their natural types.

Unknown keys are rejected (with the closest valid names), values are coerced to the declared type
where that is lossless, and each section checks its own invariants in ``__post_init__``.

Modules (import from this package; only ``posefr_dist.tune.space`` uses ``config.space`` directly,
to re-export its checks)::

    core.py      ConfigError, coercion to the annotated types, building a dataclass tree
    sections.py  DataConfig (+ AugmentConfig), SynthConfig, ModelConfig, LossConfig, EvalConfig,
                 TrainConfig
    space.py     the checks of tune.space and tune.initial_points against the root class
    root.py      TuneConfig and the root Config
    io.py        from_dict / to_dict, key_type / check_value, overrides, load_config / dump_config

Example:
    >>> cfg = load_config(None, ["train.epochs=2", "model.variant=2d-only"])
    >>> cfg.train.epochs, cfg.model.variant
    (2, '2d-only')
"""

from __future__ import annotations

# the private helpers are re-exported for the modules that import them from here (train.loop: _build)
from posefr_dist.config.core import ConfigError, _build, _check, _coerce, _one_of, _type_name
from posefr_dist.config.io import (_set_dotted, check_value, dump_config, from_dict, key_type, load_config,
                                   merge_overrides, parse_overrides, to_dict)
from posefr_dist.config.root import Config, TuneConfig, _default_tune_space
from posefr_dist.config.sections import (AugmentConfig, DataConfig, EvalConfig, LossConfig, ModelConfig,
                                         SynthConfig, TrainConfig)

__all__ = [
    "AugmentConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "LossConfig", "ModelConfig",
    "SynthConfig", "TrainConfig", "TuneConfig",
    "check_value", "dump_config", "from_dict", "key_type", "load_config", "merge_overrides",
    "parse_overrides", "to_dict",
]
