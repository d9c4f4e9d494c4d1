"""The resolved config as frozen, typed objects: one dataclass per section of the schema.

:func:`date_core.config.resolve_config` returns a :class:`Config`. Its types are made from
:data:`date_core.config_schema.SCHEMA` when this module is imported, so the schema stays the one
declaration of the keys (and ``default.yaml`` the one place of their values)::

    cfg = resolve_config()
    cfg.train.lr                 # attribute access, typed
    cfg["train"]["lr"]           # the same value: a section is also a read-only Mapping
    cfg.train.lr = 1.0           # dataclasses.FrozenInstanceError
    cfg2 = with_values(cfg, {"train.lr": 1e-4})   # a checked copy (date_core.config)

A section the schema calls partial (``model.overrides``, ``adapt.reliability``,
``adapt.round_train``, ...) holds only the keys that were given, so it stays a plain dict.
The classes are module attributes (``date_core.config_types.TrainConfig``), so a config pickles
by reference to Ray workers and Tune trials.
"""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any, Iterator, Optional

from date_core.config_schema import SCHEMA, Key, Section


class ConfigSection(Mapping):
    """Base of every section type: a frozen dataclass that also reads as a Mapping (so code and
    libraries that take dicts, ``{**cfg.train}``, ``flatten`` and ``yaml`` via :func:`to_dict`,
    keep working). Equality is a Mapping's: a section equals a dict with the same items."""

    __slots__ = ()

    def __getitem__(self, key: str) -> Any:
        if key in self.__dataclass_fields__:
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.__dataclass_fields__)

    def __len__(self) -> int:
        return len(self.__dataclass_fields__)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.items())})"


def _class_name(path: tuple[str, ...]) -> str:
    return "".join(p.title().replace("_", "") for p in path) + "Config"


def _build(section: Section, path: tuple[str, ...]) -> type:
    fields = []
    for name, spec in section.keys().items():
        if isinstance(spec, Section) and not spec.partial:
            sub = _build(spec, (*path, name))
            fields.append((name, Optional[sub] if spec.nullable else sub))
        elif isinstance(spec, Section):
            fields.append((name, Optional[dict] if spec.nullable else dict))
        else:
            fields.append((name, spec.type))
    name = _class_name(path)
    cls = dataclasses.make_dataclass(name, fields, bases=(ConfigSection,), frozen=True, eq=False,
                                     namespace={"__module__": __name__, "__doc__": section.help or None})
    cls.__qualname__ = name
    globals()[name] = cls  # importable by name: pickling by reference finds it
    _TYPES[path] = cls
    return cls


_TYPES: dict[tuple[str, ...], type] = {}
Config = _build(SCHEMA, ())
Config.__doc__ = "The whole pipeline config (``date_core/configs/default.yaml`` and its overrides)."


def typed(cfg: Mapping[str, Any], section: Section = SCHEMA, path: tuple[str, ...] = ()) -> Any:
    """A complete, validated config mapping (``resolve_config``'s merge) -> :class:`Config`.
    Raises ``KeyError`` naming the first key it lacks."""
    cls = _TYPES[path]
    values = {}
    for name, spec in section.keys().items():
        dotted = ".".join((*path, name))
        if name not in cfg:
            raise KeyError(f"config key {dotted!r} is missing")
        value = cfg[name]
        if isinstance(spec, Section) and not spec.partial:
            value = None if value is None and spec.nullable else typed(value, spec, (*path, name))
        elif isinstance(spec, Section):
            value = None if value is None else copy.deepcopy(dict(value))
        else:
            value = copy.deepcopy(value)
        values[name] = value
    return cls(**values)


def to_dict(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A typed config (or any nested mapping) as plain nested dicts: for YAML, JSON and MLflow,
    and as the starting point of a modified copy."""
    return {k: to_dict(v) if isinstance(v, Mapping) else copy.deepcopy(v) for k, v in cfg.items()}


__all__ = ["Config", "ConfigSection", "to_dict", "typed"]
