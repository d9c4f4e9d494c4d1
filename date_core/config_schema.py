"""The typed schema of the pipeline config: every section and key of
``date_core/configs/default.yaml`` with its type and a one-line description.

The defaults live in ``default.yaml`` (one place); this module declares what each key may hold.
It is the one source that the stages' ``--config`` files and ``--set`` overrides
(:func:`date_core.config.resolve_config`), the sweep's search spaces (``pipelines/sweep.py``)
and the stages' ``--help`` (:func:`describe`) read. A test keeps the key sets of this schema
and ``default.yaml`` equal, so a key added to one and not the other fails CI.

Errors are :class:`ConfigError`: one line naming the key, where it came from, and the nearest
known key::

    unknown config key 'train.epoch' (in --set train.epoch=2); did you mean 'train.epochs'?
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Callable, Literal, Mapping, Optional, Union


class ConfigError(ValueError):
    """A config value or key the schema refuses (the message is one line)."""


@dataclass(frozen=True)
class Key:
    """One config value: its type (a ``typing`` annotation: ``int``, ``float | None``,
    ``list[str]``, ``Literal["mmd", "adversarial"]``, ``dict[str, float]``) and a description.
    ``schedule``: a per-round list of floats whose first and last value a search space may set
    (``<key>.start`` / ``<key>.end``)."""

    type: Any
    help: str = ""
    schedule: bool = False


@dataclass(frozen=True)
class Section:
    """A mapping of named keys. ``partial``: only some keys need be present (a dict of overrides
    such as ``model.overrides``), so ``default.yaml`` holds a subset; ``nullable``: the whole
    section may be ``null``. ``fields`` may be a function, called on first use (the model's
    fields need an import that the CLI's ``--help`` should not pay for)."""

    fields: Mapping[str, "Key | Section"] | Callable[[], Mapping[str, "Key | Section"]]
    help: str = ""
    partial: bool = False
    nullable: bool = False
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def keys(self) -> Mapping[str, "Key | Section"]:
        if "fields" not in self._cache:
            self._cache["fields"] = dict(self.fields() if callable(self.fields) else self.fields)
        return self._cache["fields"]


Spec = Union[Key, Section]
_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _model_fields() -> dict[str, Key]:
    """``model.overrides``: any field of :class:`date_core.model.config.ModelConfig`, typed as
    the dataclass declares it."""
    from date_core.model.config import ModelConfig

    hints = typing.get_type_hints(ModelConfig)
    return {f.name: Key(hints[f.name], "model preset field") for f in dataclasses.fields(ModelConfig)}


# --------------------------------------------------------------------------------- the schema
_TRAIN = {
    "epochs": Key(int, "passes over the source train split"),
    "batch_size": Key(int, "pairs per worker and step (PG-DA rounds add as many target pairs)"),
    "grad_accum": Key(int, "micro-batches per optimiser step"),
    "lr": Key(float, "peak learning rate"),
    "encoder_lr_mult": Key(float, "learning-rate factor of the unfrozen pretrained encoder layers"),
    "zoom_out": Key(Optional[list[float]], "scale augmentation [lo, hi] (null = off)"),
    "zoom_prob": Key(float, "share of the training images that are shrunk"),
    "weight_decay": Key(float, "AdamW weight decay"),
    "betas": Key(list[float], "AdamW betas"),
    "warmup_steps": Key(int, "linear warm-up steps (at most a fifth of the run), then cosine decay"),
    "min_lr_ratio": Key(float, "floor of the cosine decay, as a fraction of lr"),
    "max_steps": Key(Optional[int], "stop after this many optimiser steps (overrides epochs)"),
    "checkpoint_every": Key(int, "optimiser steps between checkpoints (also one per epoch end)"),
    "seed": Key(int, "random seed"),
    "shuffle": Key(bool, "a new pair order every epoch (files, then a local buffer of 4 batches); false reads "
                         "in file order"),
    "augment": Key(bool, "the data transform's training augmentation: horizontal flip and colour jitter"),
    "log_every": Key(int, "steps between progress lines and metric logs"),
    "precision": Key(Literal["auto", "bf16", "fp32"], "autocast: auto = bf16 on a GPU, float32 on a CPU; "
                     "bf16 = also on a CPU (faster where it has AMX); fp32 = never"),
}

SCHEMA = Section({
    "data": Section({
        "root": Key(str, "prepared dataset (OUT of pipelines/prepare.py), local or s3://"),
        "source_domain": Key(str, "annotated domain"),
        "target_domain": Key(str, "unannotated domain that PG-DA adapts to"),
        "synth": Section({"mall": Key(int, "mall images"), "live": Key(int, "live images"),
                          "seed": Key(int, "generator seed"),
                          "generate": Key(bool, "generate it at any data.root (else only at the embedded default's)")},
                         "small ProductWorld prepared at data.root when it holds none"),
        "tokenizer": Key(Optional[str], "tokenizer folder; null = the text encoder's own, else the dataset's"),
        "train_split": Key(str, "training split"),
        "val_split": Key(str, "validation split"),
        "test_split": Key(str, "test split"),
        "max_val_pairs": Key(Optional[int], "cap on validation pairs per epoch; null = all"),
    }),
    "model": Section({
        "preset": Key(str, "lite | tiny | small | base | path to a preset YAML"),
        "overrides": Section(_model_fields, "any preset field, e.g. {hidden_size: 192}", partial=True),
        "init_from": Key(Optional[str], "null (default) = off; else a checkpoint folder or models:/NAME/VERSION "
                                        "whose weights start training (e.g. pipelines/pretrain.py's)"),
    }),
    "loss": Section({name: Key(float, "weight of the loss term (0 disables it)") for name in (
        "retrieval", "box_l1", "box_giou", "confidence", "box_focus", "pseudo_box_l1", "pseudo_box_giou",
        "pseudo_box_focus", "align_marginal_image", "align_marginal_query", "align_conditional", "adversarial")}),
    "train": Section(_TRAIN),
    "runtime": Section({
        "num_workers": Key(int, "Ray Train workers"),
        "use_gpu": Key(bool, "one GPU per worker"),
        "cpus_per_worker": Key(float, "CPUs per Train worker"),
        "worker_resources": Key(dict[str, float], "extra custom resources per worker, e.g. {trainer_slot: 1}"),
        "placement_strategy": Key(Literal["PACK", "SPREAD", "STRICT_SPREAD"], "placement of the workers"),
        "torch_threads": Key(Optional[int], "null = cpus_per_worker (at least 1)"),
        "data_cpus": Key(Optional[float], "CPUs of the data streams together; null = what the trainers leave"),
        "stall_timeout_s": Key(float, "seconds without a batch before a stream counts as stalled"),
        "max_failures": Key(int, "worker failures a Train run survives"),
        "keep_checkpoints": Key(int, "Ray Train checkpoints kept per run"),
        "train_log_level": Key(Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                               "Ray Train's own log lines on the terminal"),
        "object_store_mb": Key(int, "object store of a local Ray started by the stage"),
        "storage": Key(str, "Ray storage_path (local or s3://)"),
        "run_name": Key(Optional[str], "same name = resume; null = a fresh timestamped name"),
        "experiment": Key(str, "MLflow experiment"),
        "registered_model": Key(str, "MLflow registered model name"),
    }),
    "adapt": Section({
        "rounds": Key(int, "self-training rounds"),
        "aligner": Key(Literal["mmd", "adversarial"], "domain aligner (runs when an alignment weight is set)"),
        "token_pooling": Key(Literal["flatten", "mean", "tokens"], "how the aligner pools semantic tokens"),
        "conditional": Key(Literal["joint", "fused"], "MMD conditional alignment: joint (features, boxes) or fused"),
        "conditional_detach_boxes": Key(bool, "no gradient through the boxes of conditional alignment"),
        "size_reweight": Key(bool, "MMD aligner: weight source pairs to the target's (predicted) box sizes"),
        "protect_box": Key(bool, "project the conditional alignment gradient off the box head's input directions"),
        "align_from_round": Key(int, "alignment weights apply from this 0-based round on (0 = every round)"),
        "align_until_round": Key(Optional[int], "alignment weights apply before this 0-based round only (null = every round)"),
        "mmd": Section({"multipliers": Key(list[float], "kernel bandwidth multipliers"),
                        "estimator": Key(Literal["unbiased", "biased"], "MMD estimator")}, "MK-MMD aligner"),
        "discriminator": Section({
            "hidden": Key(int, "discriminator width"),
            "dropout": Key(float, "discriminator dropout"),
            "parts": Section({p: Key(float, "weight of this discriminator") for p in ("image", "query", "conditional")},
                             "discriminators and their weights (null = all at 1)", partial=True, nullable=True),
            "grl_schedule": Key(Literal["dann", "constant", "linear"], "gradient-reversal warm-up"),
            "grl_gamma": Key(float, "DANN schedule's gamma"),
            "grl_max_steps": Key(int, "warm-up length when no step count is known"),
            "grl_max_coeff": Key(float, "largest gradient-reversal coefficient"),
        }, "adversarial aligner"),
        "keep_schedule": Key(list[float], "kept fraction of target pairs per round (last value repeats)",
                             schedule=True),
        "min_reliability": Key(float, "pairs at or below this reliability are never kept"),
        "views": Key(list[str], "teacher views for pseudo-labelling (identity, hflip, scale_0.9, ...)"),
        "consensus": Key(Literal["median", "mean"], "how the views' boxes combine"),
        "focus_zoom": Key(Optional[float], "the views see each pair zoomed in by this about the first box's "
                          "centre (null = off)"),
        "strong_aug": Key(bool, "the student trains on strongly augmented target pixels (colour, blur, cutout)"),
        "pseudo_focus": Key(Literal["box", "centre"], "pseudo_box_focus targets the box's patches or its centre patch"),
        "reliability": Section({s: Key(float, "weight of the reliability signal")
                                for s in ("agreement", "confidence", "retrieval", "sensitivity")},
                               "weights of the reliability signals", partial=True),
        "retrieval_topk": Key(int, "retrieval signal: own image within the top k"),
        "search_chunk": Key(int, "queries per chunk of the retrieval signal"),
        "sensitivity_pass": Key(bool, "also ground each target image with another product's query (query sensitivity, logged only)"),
        "teacher": Key(bool, "an EMA teacher labels the target and is each round's output"),
        "ema_decay": Key(Optional[float], "fixed EMA decay; null = half-life of ema_half_life x the round's steps"),
        "ema_half_life": Key(float, "EMA half-life as a fraction of the round's steps"),
        "label_batch_size": Key(int, "pairs per labelling batch"),
        "label_actors": Key(int, "labelling actors (Ray Data actor pool)"),
        "label_cpus": Key(float, "CPUs per labelling actor (CPU runs)"),
        "label_threads": Key(Optional[int], "torch threads per labelling actor (CPU runs; null = label_cpus)"),
        "label_last_round": Key(bool, "also pseudo-label after the last round"),
        "round_train": Section(_TRAIN, "train settings of rounds 2.. (override train)", partial=True),
    }),
    "pretrain": Section({
        "domains": Key(list[str], "domains whose image-caption pairs pretrain"),
        "splits": Key(list[str], "splits whose image-caption pairs pretrain"),
        "loss": Section({name: Key(float, "weight of the pretraining term (0 disables it)")
                         for name in ("mlm", "mpm", "itc")}, "weights of the pretraining loss terms"),
        "mlm_prob": Key(float, "share of the caption's non-special tokens masked"),
        "mpm_ratio": Key(float, "share of the image's patch cells blanked"),
        "fusion_layers": Key(int, "cross-attention blocks of each pretraining head"),
        "train": Section(_TRAIN, "train settings of pretraining (override train)", partial=True),
        "registered_model": Key(str, "MLflow registered model of the pretrained weights"),
    }, "pipelines/pretrain.py: CAPTURE-style cross-modal pretraining"),
    "promote": Section({
        "metric": Key(str, "primary metric the challenger must win (e.g. pg/acc@0.5, higher is better)"),
        "margin": Key(float, "by at least this much"),
        "guards": Key(list[str], "metrics the challenger must not lose by more than tolerance"),
        "tolerance": Key(float, "largest allowed loss on a guard metric"),
        "domain": Key(Optional[str], "evaluation domain; null = data.target_domain"),
        "split": Key(str, "evaluation split (labelled)"),
        "limit": Key(Optional[int], "evaluate only the first N pairs; null = all"),
    }),
})


# ------------------------------------------------------------------------------- look-ups
def flat_keys(spec: Section = SCHEMA, prefix: str = "", *, expand_partial: bool = False) -> dict[str, Spec]:
    """``{"train.epochs": Key, ...}``: every key of ``spec`` by dotted path (partial sections
    count as one key unless ``expand_partial``)."""
    out: dict[str, Spec] = {}
    for name, sub in spec.keys().items():
        path = f"{prefix}{name}"
        if isinstance(sub, Section) and (not sub.partial or expand_partial):
            out.update(flat_keys(sub, path + ".", expand_partial=expand_partial))
        else:
            out[path] = sub
    return out


def _nearest(path: str, root: Section = SCHEMA) -> str:
    """``; did you mean 'x.y'?``: the same name in another section (adapt.epochs ->
    train.epochs), else the closest spelling (keys of a partial section such as model.overrides
    are listed only for a path inside it: listing the model's fields imports the model)."""
    known = list(flat_keys(root)) + _sections(root)
    for section in [k for k, v in flat_keys(root).items() if isinstance(v, Section) and path.startswith(k + ".")]:
        known += [f"{section}.{name}" for name in lookup(section, root=root).keys()]
    leaf = path.rsplit(".", 1)[-1]
    match = [k for k in known if "." in path and k.rsplit(".", 1)[-1] == leaf and k != path][:1]
    match = match or difflib.get_close_matches(path, known, n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else "; no similar key (see --help for the list)"


def _sections(spec: Section = SCHEMA, prefix: str = "") -> list[str]:
    out = []
    for name, sub in spec.keys().items():
        if isinstance(sub, Section):
            out.append(prefix + name)
            if not sub.partial:
                out.extend(_sections(sub, f"{prefix}{name}."))
    return out


def _where(where: str) -> str:
    return f" (in {where})" if where else ""


def lookup(path: str | list[str], where: str = "", root: Section = SCHEMA) -> Spec:
    """The spec of the dotted ``path``; :class:`ConfigError` naming the nearest known key when
    there is none. Inside a ``dict[str, X]`` key any name is allowed (its spec is ``X``)."""
    parts = path.split(".") if isinstance(path, str) else list(path)
    spec: Spec = root
    for i, part in enumerate(parts):
        dotted = ".".join(parts[:i + 1])
        if isinstance(spec, Section) and part in spec.keys():
            spec = spec.keys()[part]
        elif isinstance(spec, Key) and typing.get_origin(_strip_none(spec.type)) is dict:
            spec = Key(typing.get_args(_strip_none(spec.type))[1], spec.help)
        else:
            raise ConfigError(f"unknown config key {dotted!r}{_where(where)}{_nearest(dotted, root)}")
    return spec


def _strip_none(tp: Any) -> Any:
    """``X | None`` -> ``X`` (other unions unchanged)."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else Union[tuple(rest)]
    return tp


# ------------------------------------------------------------------------------ validation
def type_name(tp: Any) -> str:
    """A type annotation in words: ``int``, ``float or null``, ``list of str``, ``one of a, b``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None) or tp is None:
        return "null"
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (list, tuple):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict:
        return f"mapping of str to {type_name(args[1])}" if args else "mapping"
    if tp is Any:
        return "any value"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (a float may be written as an int, or as text such as ``1e-4``,
    which YAML 1.1 reads as a string); raises :class:`_Mismatch` otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is type(None) or tp is None:
        if value is None:
            return None
        raise _Mismatch
    if origin in (Union, types.UnionType):
        for arm in sorted(args, key=lambda a: a is not type(None)):  # null first: None never coerces
            try:
                return _coerce(value, arm)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise _Mismatch
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        return [_coerce(v, args[0]) for v in value] if args else list(value)
    if origin is dict:
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        return {k: _coerce(v, args[1]) for k, v in value.items()} if args else dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _Mismatch


def check(path: str, value: Any, spec: Spec | None = None, where: str = "", root: Section = SCHEMA) -> Any:
    """``value`` validated (and coerced) for the key at dotted ``path`` of ``root`` (the config
    schema, or another such as a search space's); nested mappings are checked key by key.
    Raises :class:`ConfigError` (one line)."""
    spec = spec if spec is not None else lookup(path, where, root)
    if isinstance(spec, Section):
        if value is None and spec.nullable:
            return None
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key {path!r} expects a mapping{' or null' if spec.nullable else ''}, "
                              f"got {value!r} ({type(value).__name__}){_where(where)}")
        out = {}
        for name, sub in value.items():
            child = f"{path}.{name}" if path else str(name)
            if name not in spec.keys():
                raise ConfigError(f"unknown config key {child!r}{_where(where)}{_nearest(child, root)}")
            out[name] = check(child, sub, spec.keys()[name], where, root)
        return out
    try:
        return _coerce(value, spec.type)
    except _Mismatch:
        raise ConfigError(f"config key {path!r} expects {type_name(spec.type)}, got {value!r} "
                          f"({type(value).__name__}){_where(where)}") from None


def default_config() -> dict[str, Any]:
    """The packaged defaults (``date_core/configs/default.yaml``), unchecked."""
    import yaml

    text = resources.files("date_core").joinpath("configs/default.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def validate(cfg: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """A (possibly partial) config mapping validated against the schema; returns the coerced copy."""
    return check("", cfg, SCHEMA, where)


# ------------------------------------------------------------------------------------ docs
@lru_cache(maxsize=1)
def describe() -> str:
    """Every key, its type, its default and what it does: the ``--help`` epilog of the stages."""
    defaults = default_config()
    lines = ["config keys (date_core/configs/default.yaml; set with --config FILE.yaml or --set KEY=VALUE):"]
    for path, spec in flat_keys().items():
        default: Any = defaults
        for part in path.split("."):
            default = (default or {}).get(part)
        tp = "mapping" if isinstance(spec, Section) else type_name(spec.type)
        lines.append(f"  {path} ({tp}) = {default!r}: {spec.help}")
    return "\n".join(lines)
