"""MLflow glue: tracking URI, runs that resume by name, flat params, metrics from workers,
and the seeker as a registered model version.

Tracking URI: ``MLFLOW_TRACKING_URI``, else a local SQLite file (``runs/mlflow.db``) with
artifacts under ``runs/mlartifacts``. The registry uses aliases (``challenger``,
``champion``), never the deprecated stages.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
import pandas as pd
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from date_core.config import flatten
from date_core.runtime.seeker_pyfunc import CHECKPOINT_KEY
from date_core.config_types import to_dict

RUN_NAME_TAG = "date.run_name"
STAGE_TAG = "date.stage"
DEFAULT_DIR = Path("runs")
MODEL_ARTIFACT = "model"
_MAX_PARAM_LEN = 6000


def _client(uri: str | None = None) -> MlflowClient:
    """A client whose tracking AND registry are ``uri`` (the registry would otherwise follow a
    process-global setting that an earlier call may have pointed elsewhere)."""
    uri = uri or tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` or the default local SQLite store (absolute, so that Ray workers
    with another working directory log to the same file)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    DEFAULT_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(DEFAULT_DIR / 'mlflow.db').resolve()}"


def setup(experiment: str, uri: str | None = None) -> str:
    """Point this process at the tracking server and experiment; returns the experiment id."""
    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:"):
        # A file store beside the database, not ./mlruns of whatever directory we run in.
        location = (DEFAULT_DIR / "mlartifacts").resolve().as_uri()
    return client.create_experiment(experiment, artifact_location=location)


def find_run(experiment_id: str, run_name: str, parent_run_id: str | None = None, uri: str | None = None):
    """The latest run of this experiment tagged with ``run_name`` (and ``parent_run_id``), or None."""
    query = f"tags.`{RUN_NAME_TAG}` = '{run_name}'"
    if parent_run_id:
        query += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    runs = _client(uri).search_runs(
        [experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def start_or_resume(experiment_id: str, run_name: str, stage: str, parent_run_id: str | None = None,
                    uri: str | None = None) -> tuple[str, bool]:
    """The id of the run named ``run_name`` (created if new); ``True`` when it already existed.

    Re-running a command with the same run name continues the same MLflow run, as the Ray
    Train run continues from its checkpoint.
    """
    client = _client(uri)
    run = find_run(experiment_id, run_name, parent_run_id, uri)
    if run is not None:
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id, True
    tags = {RUN_NAME_TAG: run_name, STAGE_TAG: stage}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    return run.info.run_id, False


def log_config(run_id: str, cfg: Mapping[str, Any], uri: str | None = None) -> None:
    """The full resolved config: flat ``a.b.c`` params, and the nested file ``config.yaml`` to
    read or rerun with ``--config`` (skipped when already logged: params are immutable, and a
    resumed run has them)."""
    client = _client(uri)
    if client.get_run(run_id).data.params:
        return
    client.log_dict(run_id, to_dict(cfg), "config.yaml")
    params = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in sorted(flatten(cfg).items())]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])


def mlflow_key(name: str) -> str:
    """MLflow's name for a metric: it refuses ``@``, so ``live_test/pg/acc@0.5`` is logged as
    ``live_test/pg/acc_at_0.5`` (JSON files and tables keep the ``@`` names)."""
    return name.replace("@", "_at_")


def log_metrics(run_id: str, metrics: Mapping[str, Any], step: int, uri: str | None = None) -> None:
    """Log the finite numeric entries of ``metrics`` at ``step`` (strings and NaNs are skipped)."""
    now = int(time.time() * 1000)
    items = [Metric(mlflow_key(k), float(v), now, int(step)) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
    for i in range(0, len(items), 500):
        _client(uri).log_batch(run_id, metrics=items[i:i + 500])


def end_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    _client(uri).set_terminated(run_id, status=status)


def _seeker_signature():
    """The pyfunc's signature: a ``query`` column of strings in, ``[N, d]`` float32 out."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    return ModelSignature(inputs=Schema([ColSpec("string", "query")]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]))


def log_and_register(run_id: str, checkpoint_dir: str | Path, registered_model: str,
                     metrics: Mapping[str, float], uri: str | None = None) -> str:
    """Log ``checkpoint_dir`` as the run's pyfunc model and register it as a new version of
    ``registered_model`` carrying ``metrics`` as version tags; returns the version number."""
    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT, python_model=str(Path(__file__).with_name("seeker_pyfunc.py")),
            artifacts={CHECKPOINT_KEY: str(checkpoint_dir)}, signature=_seeker_signature(),
            input_example=pd.DataFrame({"query": ["red running shoe"]}),
            # Explicit requirements: inferring them imports and inspects the whole environment.
            pip_requirements=["date-on-ray", "torch", "transformers", "tokenizers"],
        )
    version = mlflow.register_model(info.model_uri, registered_model)
    client = _client(uri)
    client.set_model_version_tag(registered_model, version.version, "run_id", run_id)
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and math.isfinite(float(value)):
            client.set_model_version_tag(registered_model, version.version, mlflow_key(key), f"{float(value):.6f}")
    return str(version.version)


def is_mlflow_uri(model_uri: str) -> bool:
    """True for ``models:/``, ``runs:/`` and ``mlflow-artifacts:/`` URIs."""
    return str(model_uri).startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


def download_checkpoint(model_uri: str, dst: str | Path | None = None, uri: str | None = None) -> Path:
    """A local seeker checkpoint folder from an MLflow URI (``models:/name@alias``,
    ``models:/name/3``, ``runs:/<id>/model``; tracking server ``uri``, default
    :func:`tracking_uri`) or a local folder (returned as is)."""
    if not model_uri.startswith(("models:/", "runs:/", "mlflow-artifacts:/")) and "://" not in model_uri \
            or model_uri.startswith("file://"):
        path = Path(model_uri.removeprefix("file://"))
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a seeker checkpoint folder (no config.json)")
        return path
    uri = uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    dst = Path(dst or tempfile.mkdtemp(prefix="date-model-"))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    for candidate in (local / "artifacts" / Path(str(CHECKPOINT_KEY)), *local.rglob("config.json")):
        folder = candidate if candidate.is_dir() else candidate.parent
        if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
            return folder
    shutil.rmtree(dst, ignore_errors=True)
    raise FileNotFoundError(f"{model_uri}: no seeker checkpoint inside the downloaded model")


@contextmanager
def local_checkpoint(model_uri: str, uri: str | None = None) -> Iterator[Path]:
    """:func:`download_checkpoint` into a temporary folder that is removed afterwards (a local
    checkpoint folder is used in place)."""
    with tempfile.TemporaryDirectory(prefix="date-model-") as tmp:
        yield download_checkpoint(model_uri, tmp, uri)


@contextmanager
def init_checkpoint(source: str, uri: str | None = None) -> Iterator[Path]:
    """The local folder of a ``model.init_from`` source: a checkpoint folder (local or
    ``s3://``) or an MLflow model URI (downloaded from tracking server ``uri``), removed after."""
    from date_core.data import storage

    if is_mlflow_uri(source):
        with local_checkpoint(source, uri) as folder:
            yield folder
    else:
        with storage.local_dir(source) as folder:
            yield Path(folder)


def log_init_source(run_id: str, source: str, uri: str | None = None) -> str:
    """Record where a run's initial weights came from: param ``init_from.source`` (and, for a
    registry URI, ``init_from.run_id``: the run that produced that version). Returns the source."""
    client = _client(uri)
    params = {"init_from.source": str(source)}
    if str(source).startswith("models:/"):
        from mlflow.exceptions import MlflowException

        name_version = str(source)[len("models:/"):]
        try:
            if "@" in name_version:
                name, alias = name_version.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            else:
                name, version = name_version.rsplit("/", 1)
                mv = client.get_model_version(name, version)
            params["init_from.run_id"] = str(mv.run_id)
            params["init_from.version"] = str(mv.version)
        except (MlflowException, ValueError) as exc:
            raise FileNotFoundError(f"model.init_from={source}: no such registered model version ({exc})") from None
    logged = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in params.items() if k not in logged]  # params are immutable: a resumed run has them
    if new:
        client.log_batch(run_id, params=new)
    return str(source)


def evaluate_model(model_uri: str, data: str, domain: str, split: str, *, batch_size: int = 64,
                   limit: int | None = None, device: str = "cpu", png: str | Path | None = None) -> dict[str, Any]:
    """All PR + PG metrics (``<domain>_<split>/pr/R@1`` ...) of a seeker given as a checkpoint
    folder or an MLflow URI, on one split of a prepared dataset; optionally a PNG grid of its
    predictions. The one evaluation of ``pipelines/evaluate.py`` and ``pipelines/promote.py``.

    Raises ``FileNotFoundError`` / ``ValueError`` for a missing model or evaluation data.
    """
    import json

    from date_core.evaluation.evaluate import evaluate_split, samples_in_pixels

    with local_checkpoint(model_uri) as model_dir:
        ev = evaluate_split(model_dir, data, domain, split, batch_size=batch_size, limit=limit, device=device)
        if png:
            from date_core.evaluation.figures import prediction_grid

            size = json.loads((model_dir / "config.json").read_text())["model"]["image_size"]
            prediction_grid(*samples_in_pixels(ev, size), png)
    return {"model": model_uri, "data": data, "domain": domain, "split": split, **dict(sorted(ev.metrics.items()))}
