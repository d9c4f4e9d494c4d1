"""Scratch folders (checkpoint staging) do not outlive a killed process."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from date_core.runtime.scratch import PREFIX, scratch_dir, sweep_stale

# a process that stages a 1 MB "checkpoint" in a scratch folder, says where, and waits there
_CHILD = """
import sys, time
from pathlib import Path
from date_core.runtime.scratch import scratch_dir
with scratch_dir("ckpt") as tmp:
    (Path(tmp) / "train_state.pt").write_bytes(b"x" * (1 << 20))
    print(tmp, flush=True)
    time.sleep(600)
"""


def test_a_killed_processs_scratch_folder_is_removed_by_the_next_one():
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True)
    try:
        left = Path(child.stdout.readline().strip())
        assert left.is_dir() and left.name.startswith(f"{PREFIX}ckpt-{child.pid}-")
        os.kill(child.pid, signal.SIGKILL)  # as Ray ends a stopped run's workers: no cleanup runs
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert (left / "train_state.pt").is_file(), "SIGKILL ran no cleanup, so the folder must still be there"
    with scratch_dir("ckpt") as mine:
        assert not left.exists(), "a new scratch folder did not sweep the dead process's one"
        assert Path(mine).is_dir() and f"-{os.getpid()}-" in Path(mine).name
    assert not Path(mine).exists()


def test_sweep_keeps_live_processes_folders_and_other_names(tmp_path):
    live = tmp_path / f"{PREFIX}ckpt-{os.getpid()}-abc"
    dead_pid = 2 ** 22 + 17  # above Linux's default pid_max (4194304): no such process
    dead = tmp_path / f"{PREFIX}ckpt-{dead_pid}-abc"
    other = tmp_path / f"date-model-{dead_pid}-abc"  # not a scratch folder: not ours to judge
    for p in (live, dead, other):
        p.mkdir()
    assert sweep_stale(tmp_path) == [dead]
    assert live.is_dir() and other.is_dir() and not dead.exists()


def test_scratch_kind_is_checked():
    with pytest.raises(ValueError, match="scratch kind"):
        with scratch_dir("../x"):
            pass
