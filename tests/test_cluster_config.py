"""``cluster.yaml`` passes Ray's own cluster-config checks (the steps ``ray up`` runs before it
contacts AWS: ``prepare_config``, then ``validate_config`` against the autoscaler's schema,
which rejects unknown keys), has a GPU worker type, and references only files that exist.
The on-premises variant shown in docs/cluster.md passes the same checks."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"


def _ray_checks(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def test_ray_accepts_cluster_yaml(cluster):
    prepared = _ray_checks(cluster)
    assert prepared["provider"]["type"] == "aws"
    # nothing came from Ray's AWS defaults that the file did not mean: e.g. a nightly Ray wheel
    # in setup_commands, or spot-priced default workers
    assert set(prepared["available_node_types"]) == {cluster["head_node_type"], "gpu_8x"}
    assert prepared["setup_commands"] == cluster["setup_commands"]


def test_unknown_key_is_rejected(cluster):
    import jsonschema

    bad = copy.deepcopy(cluster)
    bad["available_node_types"]["gpu_8x"]["min_worker"] = 1  # a typo of min_workers
    with pytest.raises(jsonschema.ValidationError):
        _ray_checks(bad)


def test_gpu_worker_type_with_min_and_max(cluster):
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    assert not types[head].get("resources", {}).get("GPU")  # a CPU head
    gpu = {name: t for name, t in types.items() if name != head and t.get("resources", {}).get("GPU", 0) >= 1}
    assert gpu, "no GPU worker type"
    for t in gpu.values():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= cluster["max_workers"]
        assert t["node_config"]["InstanceType"]
        # S3 access by instance profile, never by keys in the file
        assert t["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")


def test_no_secrets_and_pinned_install(cluster):
    text = CLUSTER.read_text()
    assert not re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)|AKIA[0-9A-Z]{16}", text)
    setup = " ".join(cluster["setup_commands"])
    assert "-c /home/ray/date-on-ray/constraints.txt" in setup and "torch==" in setup
    ray_pin = re.search(r"^ray==(\S+)$", (ROOT / "constraints.txt").read_text(), re.M)
    assert ray_pin, "constraints.txt pins no Ray version"
    for key in ("head_image", "worker_image"):
        assert f":{ray_pin.group(1)}-" in cluster["docker"][key], "cluster image and pinned Ray differ"
    import ray

    assert ray.__version__ == ray_pin.group(1)


def test_referenced_files_exist(cluster):
    # file_mounts sources (relative to the repository root, where `ray up` runs) and every
    # repository file a setup command names
    for remote, local in cluster["file_mounts"].items():
        assert (ROOT / local).exists(), f"file_mounts {remote}: {local} does not exist"
    mount = {remote.rstrip("/"): (ROOT / local) for remote, local in cluster["file_mounts"].items()}
    commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                              "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
                for c in cluster.get(key) or []]
    referenced = 0
    for command in commands:
        for remote_root, local_root in mount.items():
            for rel in re.findall(re.escape(remote_root) + r"/([\w./-]+)", command):
                referenced += 1
                assert (local_root / rel).exists(), f"{command!r}: {rel} is not in the repository"
    assert referenced, "the setup commands install nothing from the mounted checkout"
    for name in cluster.get("rsync_filter") or []:
        assert (ROOT / name).is_file(), name


def _docs_yaml_blocks() -> list[dict]:
    text = (ROOT / "docs" / "cluster.md").read_text()
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", text, re.S)]


def test_docs_onprem_variant():
    blocks = [b for b in _docs_yaml_blocks() if b.get("provider", {}).get("type") == "local"]
    assert blocks, "docs/cluster.md shows no on-premises (local provider) config"
    prepared = _ray_checks(blocks[0])
    assert prepared["provider"]["head_ip"] and prepared["provider"]["worker_ips"]
