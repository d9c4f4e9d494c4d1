"""Fault tolerance with data and checkpoints on a real S3 endpoint (moto server, loopback):
one training worker's process is killed mid-run; the run completes, resumed from a checkpoint."""
from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import checkpoint_registered

pytestmark = pytest.mark.integration


def _train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes on this machine (Ray names them in the title)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if cmd.startswith("ray::RayTrainWorker"):
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def s3_ray(s3_endpoint, ray_module):  # S3 env first, so Ray's workers inherit it
    return s3_endpoint


def _upload(local: Path, uri: str) -> None:
    import pyarrow.fs as pafs

    from date_core.data import storage

    fs, path = storage.resolve_filesystem(uri)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def test_killed_worker_resumes_from_s3_checkpoint(s3_ray, pw_dataset, tmp_path):
    import pyarrow.fs as pafs

    from date_core.config import resolve_config
    from date_core.data import storage
    from date_core.runtime import tracking
    from date_core.runtime.supervised import run_stage

    data_uri, store_uri = "s3://date-test/pw", "s3://date-test/ray"
    _upload(pw_dataset, data_uri)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = resolve_config(None, [
        f"data.root={data_uri}", "data.max_val_pairs=16", f"runtime.storage={store_uri}",
        "model.preset=tiny", "train.batch_size=8", "train.max_steps=10", "train.checkpoint_every=2", "train.log_every=2",
        "runtime.num_workers=2", "runtime.cpus_per_worker=0.5", "runtime.max_failures=2",
    ])
    fs, root = storage.resolve_filesystem(f"{store_uri}/killed")
    killed: list[int] = []

    def kill_after_first_checkpoint() -> None:
        deadline = time.time() + 600
        while time.time() < deadline:
            pids = _train_worker_pids()
            if pids and checkpoint_registered(f"{store_uri}/killed"):
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])
                return
            time.sleep(0.5)

    killer = threading.Thread(target=kill_after_first_checkpoint, daemon=True)
    killer.start()
    try:
        result = run_stage(cfg, "killed", experiment_id=tracking.setup("test-fault"), register=False,
                           out_dir=tmp_path / "out")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    killer.join(timeout=5)
    assert killed, "no training worker was killed (no checkpoint appeared in time)"
    assert result.metrics["step"] == 10
    assert result.start_step >= 2, "the restarted worker group did not resume from a checkpoint"
    # checkpoints live on S3, not on the local disk
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(root))]
    assert any(n.startswith("checkpoint_") for n in names)
    assert (result.model_dir / "model.safetensors").is_file()
    # whatever scratch folder the killed worker held was swept by the next report on the node
    assert not list(Path(tempfile.gettempdir()).glob(f"date-scratch-*-{killed[0]}-*"))


def test_each_worker_reads_its_own_copy_of_a_checkpoint(tmp_path):
    """Two workers of a node resuming from one checkpoint: each gets a private folder, so a
    late worker's download cannot overwrite files another is reading (ray-project/ray#48726),
    and the copies are removed afterwards."""
    from ray.train import Checkpoint

    from date_core.runtime.trainer import worker_checkpoint_dir

    src = tmp_path / "ckpt"
    (src / "model").mkdir(parents=True)
    (src / "model" / "weights.bin").write_bytes(b"x" * 1000)
    ckpt = Checkpoint.from_directory(str(src))
    with worker_checkpoint_dir(ckpt) as first, worker_checkpoint_dir(ckpt) as second:
        assert first != second and src not in (first, second)
        assert (first / "model" / "weights.bin").read_bytes() == (second / "model" / "weights.bin").read_bytes()
        (first / "model" / "weights.bin").write_bytes(b"")  # one worker's folder changing ...
        assert (second / "model" / "weights.bin").stat().st_size == 1000  # ... leaves the other's whole
    assert not first.exists() and not second.exists()
    assert (src / "model" / "weights.bin").stat().st_size == 1000
