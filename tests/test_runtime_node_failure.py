"""Losing a node costs minutes, not the run: a PG-DA job on a head and 3 worker nodes
(ray.cluster_utils.Cluster) with data, checkpoints and pseudo-labels on the loopback S3
endpoint and MLflow on a loopback server. One worker node that hosts a training worker is
removed during the round, after its first checkpoint; the job continues from that checkpoint on
the nodes left and loses nothing. One round that also labels the target (``adapt.label_last_round``)
keeps it short: later rounds run the same code."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from conftest import checkpoint_registered

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster(s3_endpoint):  # the S3 settings first: every node's workers inherit them
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # The head holds the machine's 2 CPUs: the driver's Ray Data reads and decodes, the
    # pseudo-labelling actor. Each worker node offers one trainer slot and no CPU, so the 2
    # training workers land on 2 of the 3 worker nodes and one node is spare.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "object_store_memory": 200 * 1024 * 1024})
    for _ in range(3):
        cluster.add_node(num_cpus=0, resources={"trainer_slot": 1}, object_store_memory=100 * 1024 * 1024)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def _training_nodes(cluster) -> list:
    """The worker nodes whose raylet runs a Ray Train worker process (raylets fork the worker
    processes: a worker's parent is its node's raylet). Only this cluster's processes count."""
    raylets = {node.all_processes["raylet"][0].process.pid: node for node in cluster.worker_nodes}
    hosts = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                continue
            status = (entry / "status").read_text()
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if ppid in raylets:
            hosts.append(raylets[ppid])
    return hosts


def test_node_lost_mid_round_resumes_from_checkpoint(cluster, s3_endpoint, mlflow_server, pw_dataset, tmp_path):
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    from date_core.data import io, storage

    prefix = f"s3://date-test/node-failure-{uuid.uuid4().hex[:8]}"
    storage.upload_dir(pw_dataset, f"{prefix}/pw")
    name, model_name = "pgda-nf", f"test-nf-seeker-{uuid.uuid4().hex[:6]}"
    sets = [f"data.root={prefix}/pw", f"runtime.storage={prefix}/runs", f"runtime.run_name={name}",
            "runtime.experiment=test-node-failure", f"runtime.registered_model={model_name}",
            "model.preset=tiny", "data.max_val_pairs=16", "train.batch_size=8", "train.max_steps=6",
            "train.checkpoint_every=2", "train.log_every=2", "adapt.rounds=1", "adapt.label_last_round=true",
            "adapt.keep_schedule=[0.5]", "adapt.views=[identity]", "adapt.sensitivity_pass=false",
            "runtime.num_workers=2", "runtime.cpus_per_worker=0", "runtime.worker_resources={trainer_slot: 1}",
            "runtime.torch_threads=1", "runtime.max_failures=2"]
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "MLFLOW_TRACKING_URI": mlflow_server}
    log_path = tmp_path / "driver.log"
    removed: list[str] = []

    def remove_a_training_node() -> None:
        round0 = f"{prefix}/runs/{name}-round0"
        deadline = time.time() + 600
        while time.time() < deadline and driver.poll() is None:
            hosts = _training_nodes(cluster)
            if len(hosts) == 2 and checkpoint_registered(round0):
                removed.append(hosts[0].node_id)
                cluster.remove_node(hosts[0])
                return
            time.sleep(0.5)

    with open(log_path, "w") as log:
        driver = subprocess.Popen([sys.executable, str(ROOT / "pipelines" / "pgda.py"),
                                   *[a for s in sets for a in ("--set", s)]],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
        remover = threading.Thread(target=remove_a_training_node, daemon=True)
        remover.start()
        try:
            driver.wait(timeout=900)
        finally:
            if driver.poll() is None:
                driver.kill()
        remover.join(timeout=5)
    # (a Cluster without a dashboard: Ray Train's placement-group cleaner warns every second
    # that it cannot reach the State API; dropped from what a failure shows)
    out = "\n".join(line for line in log_path.read_text().splitlines() if "PlacementGroupCleaner" not in line)
    assert driver.returncode == 0, out[-5000:]
    assert removed, "no training node was removed (no registered checkpoint while the round trained)"
    assert len(cluster.worker_nodes) == 2
    assert "resumed from checkpoint at step" in out, out[-5000:]
    assert "PG-DA results on live_test" in out

    # nothing lost: one pseudo-label row per target pair, committed once, on S3
    state = json.loads(storage.read_bytes(f"{prefix}/runs/{name}/pgda_state.json"))
    assert [r["round"] for r in state["rounds"]] == [0]
    commit = json.loads(storage.read_bytes(storage.join(state["rounds"][0]["pseudo"], "_COMMITTED.json")))
    fs, path = storage.resolve_filesystem(commit["file"])
    labels = pq.read_table(path, filesystem=fs)
    n_target = io.read_table(str(pw_dataset), "live", "train", columns=["pair_id"]).num_rows
    assert labels.num_rows == commit["rows"] == n_target
    assert sorted(labels["pair_id"].to_pylist()) == sorted(
        io.read_table(str(pw_dataset), "live", "train", columns=["pair_id"])["pair_id"].to_pylist())

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    exp = client.get_experiment_by_name("test-node-failure")
    parent = client.search_runs([exp.experiment_id], f"tags.`date.run_name` = '{name}'")[0]
    assert parent.info.status == "FINISHED"
    children = {c.data.tags["date.run_name"]: c for c in
                client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")}
    assert sorted(children) == [f"{name}-round0"]
    # the round's last attempt started from a checkpoint, not from scratch
    assert children[f"{name}-round0"].data.metrics["start_step"] >= 2
    assert children[f"{name}-round0"].data.metrics["step"] == 6
    # the final model is registered exactly once
    versions = client.search_model_versions(f"name = '{model_name}'")
    assert [v.version for v in versions] == [state["registered_version"]] == ["1"]
