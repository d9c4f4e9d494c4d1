"""Shared fixtures: real servers on loopback, started once per session and stopped after.

- ``s3_endpoint``: moto's S3 server (server mode, a real HTTP endpoint); the standard AWS
  environment variables point every client (s3fs, pyarrow, boto3, Ray workers) at it.
- ``mlflow_server``: a real ``mlflow server`` subprocess with a SQLite backend.
- ``ray_local``: a 2-CPU local Ray, for one test module at a time (``ray_module`` fixture).
- ``groceries_dir``: the shared Freiburg groceries VOC data, or a clean skip.
- ``product1m_annotations``: Product1M's real dev and test query files (no images), or a clean skip.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GROCERIES = ROOT.parent / "shared" / "data" / "freiburg_groceries_voc"
PRODUCT1M_ANNOTATIONS = ROOT.parent / "shared" / "data" / "product1m_annotations"
PRODUCT1M_FILES = ("product1m_dev_ossurl_v2.txt", "product1m_test_ossurl_v2.txt")

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server for {url} exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 endpoint on loopback (moto server mode) with bucket ``date-test``.

    Yields the endpoint URL; ``AWS_ENDPOINT_URL`` and test keys are set in the environment for
    the session (and so inherited by Ray started afterwards).
    """
    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV)
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    import boto3

    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="date-test")
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on loopback with a SQLite backend; yields its tracking URI."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    cmd = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
        "--workers", "1",
    ]
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{uri}/health", timeout=300, proc=proc)  # minutes on a loaded 2-core machine
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def ray_module():
    """A local 2-CPU Ray for one test module (shut down after it)."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",  # never join a cluster some other process started with `ray start`
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=256 * 1024 * 1024,
        log_to_driver=False,
        runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                  if k.startswith("AWS_") or k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE")}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def groceries_dir() -> Path:
    """The shared Freiburg groceries data (real photos, VOC boxes), or a skip with the reason."""
    if not (GROCERIES / "annotations").is_dir():
        pytest.skip(f"shared grocery data not found at {GROCERIES}")
    return GROCERIES


@pytest.fixture(scope="session")
def product1m_annotations() -> dict[str, Path]:
    """``{"dev": path, "test": path}``: Product1M's real query files, or a skip with the reason."""
    paths = dict(zip(("dev", "test"), (PRODUCT1M_ANNOTATIONS / f for f in PRODUCT1M_FILES)))
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        pytest.skip(f"Product1M query files not found: {', '.join(missing)}")
    return paths


def checkpoint_registered(run_uri: str) -> bool:
    """True once the Ray Train run at ``run_uri`` (``<storage>/<name>``, local or s3://) has a
    checkpoint it would restart from. A checkpoint folder on storage is not one yet: the
    controller registers it afterwards and then writes its snapshot; a failure injected in
    between (a wide gap on a loaded machine) correctly restarts from scratch."""
    import json

    from date_core.data import storage

    try:
        snapshot = storage.read_bytes(storage.join(run_uri, "checkpoint_manager_snapshot.json"))
        return bool(json.loads(snapshot.decode()).get("latest_checkpoint_result"))
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="session")
def pw_dataset(tmp_path_factory) -> Path:
    """120 mall + 60 live ProductWorld images (about 250 pairs), shared by the runtime tests."""
    from date_core.data.sample import write_small_productworld

    return write_small_productworld(tmp_path_factory.mktemp("productworld"), mall=120, live=60)


def pgda_runs(tracking_uri: str, experiment: str):
    """The one FINISHED PG-DA parent run of ``experiment`` and its child runs (one per round)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    parents = client.search_runs([exp.experiment_id], "tags.`date.stage` = 'pgda'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'")
    return parents[0], children
