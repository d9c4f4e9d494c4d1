"""Every config key is read by the code that users run: a key that the schema accepts and no code
reads is a setting that silently does nothing (``train.min_lr_ratio`` was one: accepted, then
ignored by the Ray trainer; issue 29).

The keys are those of :data:`date_core.config_schema.SCHEMA` (``default.yaml``'s, key for key:
``test_config_schema`` keeps the two equal), down to the leaves; the declared keys of a partial
section (``adapt.reliability``, ``adapt.discriminator.parts``) count one by one, and a free-form
section (:data:`WHOLE`) counts as one key. A static scan (``ast``) of ``date_core/`` and
``pipelines/`` looks for a read of each key: its name as ``x["key"]``, ``x.get("key")``,
``x.key``, ``"key" in x``, or in a tuple or list of names that code looks up, in a module that
also names every section above the key (``adapt.mmd.estimator``: ``"adapt"`` and ``"mmd"``).
Docstrings, comments, dict keys and assignments are no reads; neither are reads in ``tests/``,
the docs or ``bench/`` (users run the stages, not the benchmarks), nor the config modules that
declare, merge and type the keys."""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping

from date_core.config_schema import SCHEMA, Section, flat_keys, lookup

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("date_core", "pipelines")
#: they declare, merge or type every key by name, so a name there is no use of the key
NOT_READERS = frozenset({"date_core/config_schema.py", "date_core/config_types.py", "date_core/config.py"})

#: free-form sections, checked as one key (their keys are someone else's)
WHOLE: dict[str, str] = {
    "model.overrides": "any ModelConfig field, handed whole to the model preset (resolve_model_config)",
    "adapt.round_train": "train's keys, merged over train from round 2 on: each is checked as train.<key>",
    "pretrain.train": "train's keys, merged over train for pretraining: each is checked as train.<key>",
}

#: sections handed whole to a module that reads their keys by name without naming the section:
#: a key of the section counts as read in these modules too
SECTION_READERS: dict[str, tuple[str, ...]] = {
    # build_criterion(cfg["loss"]) -> DateCriterion(weights), which reads each term by name
    "loss": ("date_core/training/losses.py",),
}

#: keys read only indirectly (no read of the name anywhere), each with its reason; empty today
INDIRECT: dict[str, str] = {}


@dataclass
class Names:
    """The names of one module: ``reads`` in a read position, ``mentions`` anywhere (a string
    constant other than a docstring, or an attribute)."""

    reads: set[str] = field(default_factory=set)
    mentions: set[str] = field(default_factory=set)


def scan(source: str) -> Names:
    """The names that ``source`` reads (see the module docstring) and mentions."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    parent = {id(child): node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    out = Names()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            out.mentions.add(node.attr)
            if isinstance(node.ctx, ast.Load):
                out.reads.add(node.attr)
            continue
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in docstrings:
            continue
        out.mentions.add(node.value)
        up = parent.get(id(node))
        if isinstance(up, ast.Subscript):
            read = isinstance(up.ctx, ast.Load)  # x["key"] = ... and del x["key"] are no reads
        elif isinstance(up, ast.Call):
            func = up.func
            read = ((isinstance(func, ast.Attribute) and func.attr in ("get", "pop", "setdefault")
                     and up.args[:1] == [node])
                    or (isinstance(func, ast.Name) and func.id in ("getattr", "hasattr") and up.args[1:2] == [node]))
        elif isinstance(up, ast.Compare):
            read = up.left is node and isinstance(up.ops[0], (ast.In, ast.NotIn))
        else:
            read = isinstance(up, (ast.Tuple, ast.List, ast.Set))  # names looked up one by one
        if read:
            out.reads.add(node.value)
    return out


@lru_cache(maxsize=1)
def project_sources() -> dict[str, str]:
    """``{relative path: text}`` of every module under :data:`SCANNED`, less :data:`NOT_READERS`."""
    out = {}
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in NOT_READERS:
                out[rel] = path.read_text(encoding="utf-8")
    return out


@lru_cache(maxsize=1)
def _project_names() -> dict[str, Names]:
    return {rel: scan(text) for rel, text in project_sources().items()}


def config_key_paths(spec: Section = SCHEMA, prefix: str = "") -> list[str]:
    """Every key of the schema by dotted path, a :data:`WHOLE` section as one (whose keys are
    never listed: ``model.overrides``' would import the model)."""
    out: list[str] = []
    for name, sub in spec.keys().items():
        path = prefix + name
        if isinstance(sub, Section) and path not in WHOLE:
            out += config_key_paths(sub, path + ".")
        else:
            out.append(path)
    return out


def unread_keys(paths: Iterable[str], names: Mapping[str, Names],
                section_readers: Mapping[str, Iterable[str]] = SECTION_READERS) -> list[str]:
    """The ``paths`` that no module of ``names`` reads in the context of their sections."""
    unread = []
    for path in paths:
        *sections, key = path.split(".")
        handed = set(section_readers.get(".".join(sections), ()))
        if not any(key in mod.reads and (rel in handed or all(s in mod.mentions for s in sections))
                   for rel, mod in names.items()):
            unread.append(path)
    return unread


def describe_unread(paths: Iterable[str]) -> str:
    """One line per key: ``  [section] key``."""
    return "\n".join(f"  [{p.rsplit('.', 1)[0] if '.' in p else '(top)'}] {p.rsplit('.', 1)[-1]}" for p in paths)


# ------------------------------------------------------------------------------------ the tests
def test_every_config_key_is_read_by_the_code():
    unread = [p for p in unread_keys(config_key_paths(), _project_names()) if p not in INDIRECT]
    assert not unread, (
        f"{len(unread)} config key(s) accepted by date_core/config_schema.py (default.yaml) but read nowhere "
        f"under {' or '.join(d + '/' for d in SCANNED)}: read each where it should act, or remove it from "
        f"default.yaml, the schema and the docs (INDIRECT in {Path(__file__).name} only for a key read "
        f"indirectly, with its reason):\n" + describe_unread(unread))


def test_the_scan_finds_an_unread_key():
    """The scanner on a made-up module: only real reads in the section's context count."""
    source = '''
"""A module docstring naming train.warmup_steps is no read."""
TERMS = ("box_l1", "box_giou")


def build(cfg):
    """Neither is a function's docstring: ["seed"]."""
    t, mmd = cfg["train"], cfg["adapt"]["mmd"]
    t["max_steps"] = 3                  # a write
    plan = {"checkpoint_every": 2}      # a dict key: a write too
    # t["log_every"] in a comment
    weights = [cfg["loss"][name] for name in TERMS]
    return t["lr"], t.epochs, t.get("grad_accum"), "zoom_out" in t, mmd["estimator"]
'''
    other = 'def f(d):\n    return d["hidden"], d["multipliers"]\n'  # names neither section
    names = {"m.py": scan(source), "other.py": scan(other)}
    paths = ["train.lr", "train.epochs", "train.grad_accum", "train.zoom_out", "adapt.mmd.estimator",
             "loss.box_l1", "loss.box_giou",
             "train.warmup_steps", "train.seed", "train.max_steps", "train.checkpoint_every", "train.log_every",
             "adapt.discriminator.hidden", "adapt.mmd.multipliers", "loss.confidence"]
    assert unread_keys(paths, names) == paths[7:]
    assert unread_keys(["adapt.mmd.multipliers"], names, {"adapt.mmd": ["other.py"]}) == []  # handed whole
    assert describe_unread(["train.min_lr_ratio", "adapt.discriminator.hidden"]) == (
        "  [train] min_lr_ratio\n  [adapt.discriminator] hidden")


def test_the_real_scan_reports_a_key_it_cannot_find():
    """On the project's own sources: a made-up key, and ``train.min_lr_ratio`` with its one read
    taken out (what issue 29 was), are reported on top of what the first test reports."""
    paths = config_key_paths()
    assert "train.min_lr_ratio" in paths and "adapt.discriminator.parts.image" in paths
    assert "model.overrides" in paths and not any(p.startswith("model.overrides.") for p in paths)
    assert all(key in paths or any(p.startswith(key + ".") for p in paths) for key in flat_keys())
    baseline = unread_keys(paths, _project_names())
    assert unread_keys([*paths, "train.never_read_anywhere"], _project_names()) == [*baseline,
                                                                                    "train.never_read_anywhere"]
    without = {rel: scan(re.sub(r"\bmin_lr_ratio\b", "other_name", text))
               for rel, text in project_sources().items()}
    assert [p for p in unread_keys(paths, without) if p not in baseline] == ["train.min_lr_ratio"]
    assert not any(rel.startswith(("tests/", "bench/", "docs/")) for rel in project_sources())


def test_the_exceptions_are_current():
    """Each entry of :data:`WHOLE`, :data:`SECTION_READERS` and :data:`INDIRECT` names a real
    key or section, a section handed whole is read as a whole somewhere, and a key listed as
    read indirectly really has no direct read (else it leaves the list)."""
    assert all(isinstance(lookup(path), Section) for path in [*WHOLE, *SECTION_READERS])
    names = _project_names()
    for section, readers in SECTION_READERS.items():
        assert set(readers) <= set(names), section
        *above, name = section.split(".")
        assert any(name in mod.reads and all(s in mod.mentions for s in above) for mod in names.values()), section
    assert set(INDIRECT) <= set(config_key_paths())
    assert unread_keys(INDIRECT, names) == list(INDIRECT)
