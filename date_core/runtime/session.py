"""Where a pipeline stage runs: Ray (local or a cluster), run names, dataset and tokenizer."""
from __future__ import annotations

import copy
import logging
import os
import time
from typing import Any, Mapping

import ray

from date_core.config import config_section
from date_core.data import storage


def init_ray(cfg: Mapping[str, Any] | None = None) -> None:
    """Connect to ``RAY_ADDRESS`` / the job's cluster when there is one, else start a local Ray
    sized to this machine (no dashboard, a modest object store)."""
    if ray.is_initialized():
        return
    # Ray Data's live progress bars turn logs of non-interactive jobs into megabytes of noise.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # "Loading weights" bars of every worker
    os.environ.setdefault("RAY_verbose_spill_logs", "0")  # the raylet's "Spilled N MiB" lines (still in its log)
    quiet_worker()  # this driver too: ray.data may have been imported before the variables were set
    ray.data.DataContext.get_current().enable_progress_bars = os.environ["RAY_DATA_DISABLE_PROGRESS_BARS"] != "1"
    # RAY_DATA_LOGGING_CONFIG names a file on this machine: each worker's setup hook writes its own
    env_vars = {k: v for k, v in os.environ.items()
                if k.startswith(("AWS_", "MLFLOW_", "RAY_DATA_")) and k != "RAY_DATA_LOGGING_CONFIG"
                or k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    # Ray Train re-routes a worker's print() through its logger and also to stdout, so every
    # progress line of the training loop reached the driver twice.
    env_vars["RAY_TRAIN_ENABLE_PRINT_PATCH"] = os.environ.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ray's deprecation notices about its own internals (Ray Train's dataset manager passes
    # ExecutionOptions.exclude_resources) reached the job's terminal from every worker; they are
    # for Ray's developers, and a job can do nothing about them.
    env_vars["PYTHONWARNINGS"] = os.environ.get("PYTHONWARNINGS", "ignore::DeprecationWarning")
    # Under `ray job submit` the job's runtime env already reaches every worker, and ray.init
    # refuses (ValueError) to set one of its fields or variables a second time, even to the
    # same value.
    job_env = _job_runtime_env()
    runtime_env: dict[str, Any] = {"env_vars": {k: v for k, v in env_vars.items()
                                                if k not in (job_env.get("env_vars") or {})}}
    if os.environ.get("RAY_ADDRESS"):
        if "worker_process_setup_hook" not in job_env:
            runtime_env["worker_process_setup_hook"] = "date_core.runtime.session.quiet_worker"
        # WARNING: not the three "connecting to the cluster" INFO lines in every job's log
        ray.init(runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING)
        return
    cpus = os.cpu_count() or 2
    runtime_env["worker_process_setup_hook"] = "date_core.runtime.session.quiet_local_worker"
    # The one node of a local Ray is never drained: Ray Train's preemption watcher (an extra
    # actor per run) has nothing to watch there.
    runtime_env["env_vars"].setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # address="local": a fresh Ray for this job, never one some other process left running
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, runtime_env=runtime_env,
             object_store_memory=int(config_section("runtime", (cfg or {}).get("runtime"))["object_store_mb"]) * 1024 * 1024,
             **local_ray_options(cpus))


def verbose() -> bool:
    """Whether the stage runs with ``--verbose`` (:func:`date_core.cli.resolve` sets
    ``DATE_VERBOSE=1``): Ray's own INFO lines and its notes are then shown."""
    return os.environ.get("DATE_VERBOSE") == "1"


def local_ray_options(cpus: int) -> dict[str, Any]:
    """``ray.init`` options of a local Ray started by a stage (and the process environment its
    processes inherit), quiet unless :func:`verbose`.

    - Ray turns token authentication on for a new local cluster and warns that it did (its
      logger stays at ERROR unless verbose; the cluster is the same either way).
    - A stage runs about ten Ray worker processes by design (Train controller and worker, two
      data-stream coordinators, map and labelling actors): up to ``max(cpus, 8)`` may start at
      once, which is also what the raylet's "N worker processes have been started" warning
      measures against.
    """
    if not verbose():
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    return {"logging_level": logging.INFO if verbose() else logging.WARNING,
            "_system_config": {"worker_maximum_startup_concurrency": max(int(cpus), 8)}}


def _job_runtime_env() -> dict[str, Any]:
    """The runtime env of the submitted job running this driver (``ray job submit
    --working-dir ... --runtime-env-json ...``); empty outside a submitted job."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    return (json.loads(raw).get("runtime_env") or {}) if raw else {}


def _ray_data_logging_config() -> str:
    """A Ray Data logging config (``RAY_DATA_LOGGING_CONFIG``): Ray's default, with the console
    handler at WARNING; the ``ray-data.log`` files keep every level."""
    import tempfile

    import yaml
    from ray.data._internal.logging import DEFAULT_CONFIG

    config = copy.deepcopy(DEFAULT_CONFIG)
    config["handlers"]["console"]["level"] = "WARNING"
    path = os.path.join(tempfile.gettempdir(), f"date-ray-data-logging-{os.getuid()}.yaml")
    # many workers start at once (a sweep's trials): each writes its own file and renames it
    # over the shared name, so no reader ever sees a half-written config
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        yaml.safe_dump(config, fh)
    os.replace(tmp, path)
    return path


def quiet_worker() -> None:
    """Ray worker-process setup hook (every worker of a stage, on every node; also run by the
    driver): Ray Data's console at WARNING, its executor INFO lines only in Ray's log files.

    The config file is written on each node: a path passed from the driver would name nothing
    on the other nodes of a cluster, and ``import ray.data`` fails on a config it cannot open.
    """
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", _ray_data_logging_config())
    from ray.data._internal.logging import configure_logging

    configure_logging()  # ray.data is imported by now (the config starts from Ray's default)
    # "Progress bars disabled. To enable, ..." is warned by every process that runs a dataset
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


#: Ray Train's placement-group cleaner asks the State API (served by the dashboard) every second
#: whether the controller lives, and warns each time it cannot: on a local Ray without a dashboard
#: that is hundreds of identical lines per stage. It only matters when a controller dies while
#: its cluster lives on; a local Ray ends with this job, so the warning is noise there.
_LOCAL_NOISE = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_local_worker() -> None:
    """Ray worker-process setup hook of the local Ray started by :func:`init_ray`."""
    quiet_worker()
    for name in _LOCAL_NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)


def run_name(cfg: Mapping[str, Any], stage: str) -> str:
    """The configured run name, or a fresh ``<stage>-YYYYmmdd-HHMMSS``."""
    name = cfg["runtime"].get("run_name")
    return str(name) if name else f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}"


def tokenizer_dir(cfg: Mapping[str, Any]) -> str:
    """The tokenizer folder: ``data.tokenizer`` when set; else the pretrained text encoder's own
    (MiniLM's for the ``lite`` preset); else the dataset's corpus WordPiece ``tokenizer/``."""
    from date_core.model import pretrained_tokenizer_dir, resolve_model_config

    path = cfg["data"].get("tokenizer")
    if not path:
        own = pretrained_tokenizer_dir(resolve_model_config(cfg["model"]["preset"],
                                                            **(cfg["model"].get("overrides") or {})))
        path = str(own) if own is not None else storage.join(cfg["data"]["root"], "tokenizer")
    if not storage.exists(path):
        raise FileNotFoundError(f"no tokenizer at {path}: run pipelines/prepare.py first or set data.tokenizer")
    return str(path)


def vocab_size(tokenizer: str) -> int:
    from date_core.text import load_tokenizer

    return len(load_tokenizer(tokenizer))
