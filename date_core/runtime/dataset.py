"""The prepared dataset a stage reads: there, or generated only where that was asked for.

A mistyped ``data.root`` (an S3 prefix with a typo included) must never turn into a run on
generated data. So synthetic ProductWorld is generated only

- at the embedded default's own root (``data.root`` of ``date_core/configs/default.yaml``,
  ``runs/data/productworld`` under the working directory), or
- anywhere, when the run asks for it explicitly with ``data.synth.generate: true``,

and only when that root holds no dataset at all. Any other root without a dataset, and any
dataset without a domain or split the stage reads, stops the stage before Ray starts with one
line (a :class:`~date_core.data.schema.DataError`) naming the path and how to prepare it.
"""
from __future__ import annotations

from typing import Any, Iterable, Literal, Mapping

from date_core.config import absolute_paths, default_config
from date_core.data import io
from date_core.data.schema import DataError

#: The (config key of the domain, config key of the split) pairs each stage reads.
STAGE_PARTS: dict[str, tuple[tuple[str, str], ...]] = {
    "train": (("source_domain", "train_split"), ("source_domain", "val_split")),
    "pgda": (("source_domain", "train_split"), ("source_domain", "val_split"), ("source_domain", "test_split"),
             ("target_domain", "train_split"), ("target_domain", "test_split")),
}


def default_root() -> str:
    """The embedded default's dataset root, resolved as a run's config resolves it."""
    return absolute_paths(default_config())["data"]["root"]


def required_parts(cfg: Mapping[str, Any], stage: str) -> list[tuple[str, str]]:
    """The ``(domain, split)`` datasets ``stage`` reads under this config, in reading order."""
    data = cfg["data"]
    return list(dict.fromkeys((str(data[d]), str(data[s])) for d, s in STAGE_PARTS[stage]))


def _present(root: str) -> list[tuple[str, str]]:
    try:
        return io.list_datasets(root)
    except OSError as exc:  # an S3 bucket that does not exist or cannot be listed
        raise DataError(root, f"cannot list the dataset root ({exc})".replace("\n", " ")) from None


def _prepare_hint(root: str) -> str:
    return (f"prepare it with `python pipelines/prepare.py {{synth,manifest,voc,product1m}} ... --out {root}` "
            f"(ProductWorld: `python pipelines/prepare.py synth --mall 1600 --live 1000 --out {root}`)")


def plan_dataset(cfg: Mapping[str, Any], parts: Iterable[tuple[str, str]]) -> Literal["ready", "generate"]:
    """``"ready"`` when ``data.root`` holds every part, ``"generate"`` when ProductWorld may be
    generated there (see the module docstring); otherwise raises :class:`DataError`."""
    data = cfg["data"]
    root = str(data["root"])
    parts = list(parts)
    present = _present(root)
    missing = [p for p in parts if p not in present]
    if not missing:
        return "ready"
    explicit = bool(data["synth"]["generate"])
    if not present:
        if explicit or root == default_root():
            return "generate"
        raise DataError(root, "no prepared dataset here; " + _prepare_hint(root)
                        + ", or pass --set data.synth.generate=true to generate ProductWorld there")
    names = ", ".join(f"{d}/{s}" for d, s in missing)
    holds = ", ".join(f"{d}/{s}" for d, s in present)
    raise DataError(root, f"the dataset has no {names} (it holds {holds}); check data.source_domain, "
                          f"data.target_domain and the data.*_split keys, or " + _prepare_hint(root))


def ensure_dataset(cfg: Mapping[str, Any], stage: str) -> None:
    """Check that ``data.root`` holds what ``stage`` reads, generating ProductWorld where
    allowed; raises :class:`DataError` (one line) otherwise."""
    data = cfg["data"]
    parts = required_parts(cfg, stage)
    if plan_dataset(cfg, parts) == "ready":
        return
    synth = data["synth"]
    mall, live, seed = int(synth["mall"]), int(synth["live"]), int(synth["seed"])
    from date_core.runtime.dataio import prepare_synth

    print(f"[{stage}] no dataset at {data['root']}: generating ProductWorld ({mall} mall + {live} live images)",
          flush=True)
    prepare_synth(str(data["root"]), mall, live, seed, meta={"command": f"{stage}.py embedded default"})
    plan_dataset(cfg, parts)  # it writes mall and live: a config naming other domains still fails here


__all__ = ["STAGE_PARTS", "default_root", "ensure_dataset", "plan_dataset", "required_parts"]
