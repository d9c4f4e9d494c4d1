"""Scratch folders in the system temp folder that do not outlive the process that made them.

A Ray Train worker writes each checkpoint to a temporary folder before ``ray.train.report``
copies it to storage. ``tempfile.TemporaryDirectory`` removes it on exit, but a worker killed
in between (Ray ends a failed or stopped run's workers with SIGKILL) leaves the folder behind:
model, teacher and optimiser state, tens of MB each time with the pretrained encoders, on every
node. So each scratch folder carries its process id in its name, and every new one first
removes those whose process is gone.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PREFIX = "date-scratch-"
_NAME = re.compile(rf"^{re.escape(PREFIX)}[a-z0-9_]+-(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def sweep_stale(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the scratch folders under ``root`` (default: the system temp folder) whose
    process no longer runs; returns the removed paths."""
    removed = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{PREFIX}*"):
        match = _NAME.match(path.name)
        if match and path.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextmanager
def scratch_dir(kind: str) -> Iterator[str]:
    """A temporary folder ``date-scratch-<kind>-<pid>-*``, removed on exit, and by the next
    :func:`scratch_dir` on the node should this process be killed first."""
    if not re.fullmatch(r"[a-z0-9_]+", kind):
        raise ValueError(f"scratch kind must be lower-case letters, digits or _, got {kind!r}")
    sweep_stale()
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX}{kind}-{os.getpid()}-") as tmp:
        yield tmp
