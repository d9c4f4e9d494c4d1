"""Deterministic split assignment by a hash of ``image_id``.

Every query of an image lands in the same split (an image never straddles train and test),
the assignment is the same on every machine and run, and adding images never moves the old
ones (each image's split depends on its own id only).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from ..batch import stable_key
from .schema import SPLITS

DEFAULT_FRACTIONS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}
_SCALE = float(2 ** 63)


def parse_fractions(text: str | Mapping[str, float] | None) -> dict[str, float]:
    """``"train=0.8,val=0.1,test=0.1"`` (or a mapping, or None for the defaults) -> fractions.

    The fractions must be non-negative, name only train/val/test, and sum to 1 (within 1e-6).
    """
    if text is None:
        return dict(DEFAULT_FRACTIONS)
    if isinstance(text, Mapping):
        fracs = {str(k): float(v) for k, v in text.items()}
    else:
        fracs = {}
        for part in str(text).split(","):
            if not part.strip():
                continue
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"split fraction {part!r} is not of the form name=value")
            fracs[name.strip()] = float(value)
    unknown = sorted(set(fracs) - set(SPLITS))
    if unknown:
        raise ValueError(f"unknown split name(s) {unknown}; use {list(SPLITS)}")
    if any(v < 0 for v in fracs.values()):
        raise ValueError(f"split fractions must be >= 0, got {fracs}")
    total = sum(fracs.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {total:g} from {fracs}")
    return {name: fracs.get(name, 0.0) for name in SPLITS}


def assign_split(image_id: str, fractions: Mapping[str, float] = DEFAULT_FRACTIONS, salt: str = "") -> str:
    """The split of one image: its hash in [0, 1) picks a slot of the cumulative fractions."""
    u = stable_key(salt + str(image_id)) / _SCALE
    acc = 0.0
    last = None
    for name in SPLITS:
        frac = float(fractions.get(name, 0.0))
        if frac <= 0:
            continue
        acc += frac
        last = name
        if u < acc:
            return name
    if last is None:
        raise ValueError(f"no split has a positive fraction: {dict(fractions)}")
    return last  # float round-off at the very top of [0, 1)


def assign_splits(image_ids: Iterable[str], fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
                  salt: str = "") -> np.ndarray:
    """Vectorised :func:`assign_split` -> object array of split names."""
    return np.asarray([assign_split(i, fractions, salt) for i in image_ids], dtype=object)
