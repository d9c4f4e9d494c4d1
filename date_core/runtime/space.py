"""Search spaces as data (``tune_spaces/*.yaml``): reading and checking them, and the trial
configs they produce.

A space file holds the sweep's settings and, under ``params``, one distribution per config key::

    metric: pg/acc@0.5        # the labelled target-val metric that --select-by target_val ranks by
    mode: max
    num_samples: 12
    max_concurrent_trials: 2
    resources: {cpu: 1}       # per trial (its driver); Train workers ask for runtime.* resources
    search: {algorithm: random, seed: 0}
    scheduler: {type: asha, grace_period: 1, reduction_factor: 2}   # time attribute: the round
    config: {adapt.rounds: 3} # set for every trial (over --config, under --set)
    params:
      loss.align_conditional: {loguniform: [0.01, 1.0]}
      adapt.aligner: {choice: [mmd, adversarial]}
      adapt.keep_schedule.start: {uniform: [0.1, 0.5]}   # a schedule's first and last value

Every key under ``params`` and ``config`` is a key of the typed config schema, and every value a
distribution may produce has the key's type: a typo or a wrong type is a one-line
:class:`~date_core.config_schema.ConfigError` naming the key and the nearest known one, before
Ray starts. A ``schedule`` key (``adapt.keep_schedule``) is swept by its ``.start`` and
``.end``; a trial's schedule runs linearly between them over ``adapt.rounds``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np

from date_core.config import load_yaml, set_value
from date_core.config_schema import ConfigError, Key, Section, check, lookup
from date_core.evaluation.metrics import METRIC_NAMES
from date_core.config_types import to_dict

#: distribution name -> what its argument is
DISTRIBUTIONS = {"loguniform": "[low, high], low > 0", "uniform": "[low, high]", "randint": "[low, high) integers",
                 "choice": "a list of values", "grid": "a list of values (every one is tried)"}
SCHEDULE_PARTS = ("start", "end")

SPACE_SCHEMA = Section({
    "metric": Key(str, "labelled target-val metric (e.g. pg/acc@0.5) that --select-by target_val ranks by"),
    "mode": Key(Literal["max", "min"], "max or min"),
    "num_samples": Key(int, "trials (times each grid combination)"),
    "max_concurrent_trials": Key(int, "trials running at once"),
    "resources": Key(dict[str, float], "resources of each trial's driver, e.g. {cpu: 1}"),
    "search": Section({"algorithm": Key(Literal["random"], "random (and grid) sampling"),
                       "seed": Key(int, "sampling seed")}),
    "scheduler": Section({"type": Key(Literal["asha", "fifo"], "asha stops weak trials early; fifo never"),
                          "grace_period": Key(int, "rounds before a trial can be stopped"),
                          "reduction_factor": Key(float, "ASHA keeps 1/reduction_factor of the trials per rung")}),
    "config": Key(dict[str, Any], "config keys set for every trial"),
    "params": Key(dict[str, dict[str, Any]], "config key -> {distribution: argument}"),
})


@dataclass(frozen=True)
class Space:
    path: str
    metric: str
    mode: str
    num_samples: int
    max_concurrent_trials: int
    resources: dict[str, float]
    search: dict[str, Any]
    scheduler: dict[str, Any]
    config: dict[str, Any]
    params: dict[str, dict[str, Any]]


def _param_spec(key: str, where: str) -> Key:
    """The schema key a ``params`` entry sets (``<schedule>.start|end`` -> one float)."""
    head, _, tail = key.rpartition(".")
    if tail in SCHEDULE_PARTS and head:
        spec = lookup(head, where)
        if isinstance(spec, Key) and spec.schedule:
            return Key(float, f"{tail} of {head}")
    spec = lookup(key, where)
    if isinstance(spec, Section):
        raise ConfigError(f"config key {key!r} is a section; sweep its keys one by one ({where})")
    return spec


def _check_distribution(key: str, dist: Mapping[str, Any], where: str) -> None:
    if len(dist) != 1:
        raise ConfigError(f"params.{key} needs exactly one distribution ({', '.join(DISTRIBUTIONS)}), got {dict(dist)} ({where})")
    (kind, arg), = dist.items()
    if kind not in DISTRIBUTIONS:
        from difflib import get_close_matches

        near = get_close_matches(kind, list(DISTRIBUTIONS), n=1)
        raise ConfigError(f"params.{key}: unknown distribution {kind!r} ({where})"
                          + (f"; did you mean {near[0]!r}?" if near else f"; choose from {', '.join(DISTRIBUTIONS)}"))
    spec = _param_spec(key, where)
    if kind in ("choice", "grid"):
        if not isinstance(arg, list) or not arg:
            raise ConfigError(f"params.{key}: {kind} takes {DISTRIBUTIONS[kind]}, got {arg!r} ({where})")
        for value in arg:
            check(key, value, spec, where)
        return
    if not (isinstance(arg, list) and len(arg) == 2):
        raise ConfigError(f"params.{key}: {kind} takes {DISTRIBUTIONS[kind]}, got {arg!r} ({where})")
    low, high = (check(key, float(v) if kind != "randint" and isinstance(v, int) else v, spec, where) for v in arg)
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ConfigError(f"params.{key}: {kind} takes {DISTRIBUTIONS[kind]}, got {arg!r} ({where})")


def load_space(path: str | Path) -> Space:
    """Read and check a space file (one-line :class:`ConfigError` on any problem)."""
    where = str(path)
    try:
        raw = load_yaml(path)
    except OSError as exc:
        raise ConfigError(f"cannot read search space {path}: {exc.strerror or exc}") from None
    raw = check("", raw, SPACE_SCHEMA, where, root=SPACE_SCHEMA)
    missing = [k for k in ("metric", "mode", "num_samples", "params") if k not in raw]
    if missing:
        raise ConfigError(f"search space {path} lacks {', '.join(missing)}")
    if raw["metric"] not in METRIC_NAMES:
        from difflib import get_close_matches

        near = get_close_matches(raw["metric"], list(METRIC_NAMES), n=1)
        raise ConfigError(f"unknown metric {raw['metric']!r} ({where})"
                          + (f"; did you mean {near[0]!r}?" if near else f"; choose from {', '.join(METRIC_NAMES)}"))
    if not raw["params"]:
        raise ConfigError(f"search space {path} has no params")
    for key, value in raw.get("config", {}).items():
        check(key, value, where=f"{where} config")
    for key, dist in raw["params"].items():
        _check_distribution(key, dist, f"{where} params")
    return Space(where, raw["metric"], raw["mode"], raw["num_samples"], raw.get("max_concurrent_trials", 1),
                 raw.get("resources", {"cpu": 1}), raw.get("search", {"algorithm": "random", "seed": 0}),
                 raw.get("scheduler", {"type": "asha"}), raw.get("config", {}), raw["params"])


def param_space(space: Space) -> dict[str, Any]:
    """The Tune ``param_space`` (flat dotted keys -> Tune distributions)."""
    from ray import tune

    make = {"loguniform": lambda a: tune.loguniform(*a), "uniform": lambda a: tune.uniform(*a),
            "randint": lambda a: tune.randint(*a), "choice": tune.choice, "grid": tune.grid_search}
    return {key: make[kind](arg) for key, dist in space.params.items() for kind, arg in dist.items()}


def trial_config(base: Mapping[str, Any], params: Mapping[str, Any], where: str = "trial") -> dict[str, Any]:
    """A trial's full config: ``base`` with the sampled ``params`` set (schedules built from their
    start and end), checked again by the schema."""
    cfg = to_dict(base)
    schedules: dict[str, dict[str, float]] = {}
    for key, value in params.items():
        head, _, tail = key.rpartition(".")
        if tail in SCHEDULE_PARTS and head and isinstance(lookup(head), Key) and lookup(head).schedule:
            schedules.setdefault(head, {})[tail] = float(value)
        else:
            set_value(cfg, key, value, where=where)
    # a schedule has one value per labelling round: after every round but the last (unless
    # adapt.label_last_round); with a single labelling round only its start counts
    labellings = max(1, int(cfg["adapt"]["rounds"]) - 1 + int(bool(cfg["adapt"].get("label_last_round"))))
    for key, ends in schedules.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        start, end = ends.get("start", list(node)[0]), ends.get("end", list(node)[-1])
        values = np.linspace(start, end, labellings)
        set_value(cfg, key, [round(float(v), 4) for v in values], where=where)
    return cfg
