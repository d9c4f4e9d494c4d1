"""Pipeline configuration: nested YAML dicts, deep-merged, with ``--set a.b=c`` overrides.

A run's config is ``defaults <- --config FILE.yaml <- --set`` overrides, in that order.
Configs stay plain dicts (easy to log to MLflow as flat params, easy for Tune to
sweep); :func:`flatten` gives the ``a.b.c`` view. Every file, override and resolved config is
checked against the typed schema (:mod:`date_core.config_schema`): an unknown key or a value of
the wrong type is a :class:`~date_core.config_schema.ConfigError` (one line) before anything runs.
"""
from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

# the schema module is the lower layer (the keys, their types and the packaged defaults); this
# one merges files and overrides over it, so the import goes one way only
from date_core.config_schema import check, default_config, validate
from date_core.config_types import Config, to_dict, typed


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``base`` with ``update`` merged in recursively (``update`` wins)."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_section(name: str, partial: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``name`` section of ``default.yaml`` with ``partial`` merged over it (``partial`` wins).

    Builders that take one section (``build_optimizer``, ``build_aligner``, the pretraining
    loop) read it through here, so a key they are not given takes the packaged default, never
    a second default written in code."""
    return deep_merge(_packaged_defaults()[name], dict(partial or {}))


@lru_cache(maxsize=1)
def _packaged_defaults() -> dict[str, Any]:
    return default_config()


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (``3``, ``1e-4``, ``true``, ``[1, 2]``)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {text!r} has an empty key")
    return key.split("."), yaml.safe_load(raw) if raw.strip() else ""


def apply_overrides(cfg: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``--set`` style overrides to a config; each key and value is checked against the
    schema (:class:`~date_core.config_schema.ConfigError` on an unknown key or a wrong type)."""
    out = to_dict(cfg)
    for text in overrides:
        path, value = parse_override(text)
        set_value(out, ".".join(path), value, where=f"--set {text}")
    return out


def set_value(cfg: dict[str, Any], path: str, value: Any, where: str = "") -> None:
    """Set the dotted key ``path`` of ``cfg`` in place, checked (and coerced) by the schema."""
    value = check(path, value, where=where)
    parts = path.split(".")
    node = cfg
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):  # e.g. into an empty or null model.overrides
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML mapping from ``path`` (a clear error when it is not a mapping)."""
    with open(path, encoding="utf-8") as fh:
        data = yaml.safe_load(fh) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a config file must hold a YAML mapping, got {type(data).__name__}")
    return data


#: Settings that name a local path or an ``s3://`` URI (``model.preset`` only when it is a file).
PATH_KEYS: tuple[tuple[str, str], ...] = (("data", "root"), ("data", "tokenizer"), ("model", "init_from"),
                                          ("model", "preset"), ("runtime", "storage"))


def absolute_paths(cfg: Mapping[str, Any], base: str | Path | None = None) -> dict[str, Any]:
    """Local paths of :data:`PATH_KEYS` made absolute against ``base`` (default: the working
    directory). Ray Train workers run in a directory of their own, where ``runs/data`` would
    name nothing; URIs (``s3://...``, ``models:/...``), ``None`` and preset names stay as they are."""
    out = to_dict(cfg)
    root = Path(base or Path.cwd())
    for section, key in PATH_KEYS:
        value = (out.get(section) or {}).get(key)
        if not isinstance(value, str) or not value or "://" in value or value.startswith(("models:/", "runs:/")):
            continue  # URIs: s3://..., and MLflow's models:/NAME/VERSION (model.init_from)
        path = Path(value).expanduser()
        if key == "preset" and not (root / path).is_file() and not path.is_file():
            continue  # a preset name such as "tiny"
        out[section][key] = str(path if path.is_absolute() else (root / path).resolve())
    return out


def resolve_config(config_file: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """defaults <- ``config_file`` <- ``overrides``, validated, with local paths made absolute,
    as a frozen :class:`~date_core.config_types.Config` (one typed dataclass per section)."""
    cfg = validate(default_config(), "date_core/configs/default.yaml")
    if config_file:
        cfg = deep_merge(cfg, validate(load_yaml(config_file), str(config_file)))
    return typed(absolute_paths(apply_overrides(cfg, overrides)))


def with_values(cfg: Mapping[str, Any], values: Mapping[str, Any], where: str = "") -> Any:
    """A copy of ``cfg`` with the dotted keys of ``values`` set, each checked (and coerced) by
    the schema: a typed config gives a typed copy, a dict a dict."""
    out = to_dict(cfg)
    for key, value in values.items():
        set_value(out, key, value, where=where)
    return typed(out) if isinstance(cfg, Config) else out


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
