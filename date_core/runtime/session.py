"""Where a pipeline stage runs: Ray (local or a cluster), run names, dataset and tokenizer."""
from __future__ import annotations

import os
import time
from typing import Any, Mapping

import ray

from date_core.data import storage


def init_ray(cfg: Mapping[str, Any] | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` / the job's cluster when there is one, else start a local Ray
    sized to this machine (no dashboard, a modest object store)."""
    if ray.is_initialized():
        return
    # Ray Data's live progress bars turn logs of non-interactive jobs into megabytes of noise.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.data.DataContext.get_current().enable_progress_bars = os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] != "1"
    env_vars = {k: v for k, v in os.environ.items()
                if k.startswith(("AWS_", "MLFLOW_", "RAY_DATA_")) or k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    runtime_env = {"env_vars": env_vars} if env_vars else None
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=runtime_env, log_to_driver=True)
        return
    cpus = os.cpu_count() or 2
    # address="local": a fresh Ray for this job, never one some other process left running
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, runtime_env=runtime_env,
             object_store_memory=int((cfg or {}).get("runtime", {}).get("object_store_mb", 512)) * 1024 * 1024)


def run_name(cfg: Mapping[str, Any], stage: str) -> str:
    """The configured run name, or a fresh ``<stage>-YYYYmmdd-HHMMSS``."""
    name = cfg["runtime"].get("run_name")
    return str(name) if name else f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"


def tokenizer_dir(cfg: Mapping[str, Any]) -> str:
    """The tokenizer folder: ``data.tokenizer`` when set, else the dataset's ``tokenizer/``."""
    path = cfg["data"].get("tokenizer") or storage.join(cfg["data"]["root"], "tokenizer")
    if not storage.exists(path):
        raise FileNotFoundError(f"no tokenizer at {path}: run pipelines/prepare.py first or set data.tokenizer")
    return str(path)


def vocab_size(tokenizer: str) -> int:
    from date_core.text import load_tokenizer

    return len(load_tokenizer(storage.localize_dir(tokenizer)))
