"""Two Ray nodes on one machine (ray.cluster_utils.Cluster, 1 CPU each): a 2-worker job places
one training worker on each node."""
from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def two_nodes():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    node = {"num_cpus": 1, "resources": {"trainer_slot": 1}, "object_store_memory": 150 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_two_workers_on_two_nodes(two_nodes, pw_dataset, tmp_path):
    import ray

    from date_core.config import resolve_config
    from date_core.runtime import tracking
    from date_core.runtime.supervised import run_stage

    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = resolve_config(None, [
        f"data.root={pw_dataset}", "data.max_val_pairs=16", f"runtime.storage={tmp_path / 'ray'}",
        "model.preset=tiny", "train.batch_size=8", "train.max_steps=3", "train.checkpoint_every=100",
        # one trainer slot per node places one worker on each; the worker asks for no CPU so
        # that each node's CPU stays free for Ray Data (its file listing needs a whole CPU)
        "runtime.num_workers=2", "runtime.cpus_per_worker=0", "runtime.worker_resources={trainer_slot: 1}",
        "runtime.torch_threads=1",
    ])
    try:
        result = run_stage(cfg, "two-nodes", experiment_id=tracking.setup("test-multinode"), register=False,
                           out_dir=tmp_path / "out")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    nodes = result.metrics["worker_nodes"].split(",") if "worker_nodes" in result.metrics else []
    assert result.metrics["step"] == 3
    assert len(nodes) == 2 and len(set(nodes)) == 2, nodes
