"""The local Ray that a stage starts (``session.init_ray``): what the user reads in the driver's
output. Each worker progress line must arrive once, Ray Train's placement-group cleaner must
not warn every second that the State API (no dashboard on a local Ray) is out of reach, and
Ray's core warnings stay off without ``--verbose`` (a dozen worker processes on a small
machine, Ray Train's preemption watcher on a one-node Ray, Ray's token-authentication note).

Runs in a subprocess: ``init_ray`` starts its own Ray, which must not meet the test modules'."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys, time
    from date_core.runtime.session import init_ray
    init_ray({"runtime": {"object_store_mb": 128}})
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(cfg):
        for i in range(5):
            print(f"[train] progress line {i}", flush=True)
            time.sleep(2)  # the cleaner checks every second: ~10 chances to warn

    TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(storage_path=sys.argv[1], name="quiet")).fit()

    import ray

    @ray.remote(num_cpus=0)
    class Idle:
        def ping(self):
            return 1

    actors = [Idle.remote() for _ in range(14)]  # past the raylet's default "too many workers" mark
    assert sum(ray.get([a.ping.remote() for a in actors])) == 14
    time.sleep(2)
""")


def test_local_ray_prints_each_worker_line_once_without_state_api_noise(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TRAIN_ENABLE_PRINT_PATCH",
                                                            "RAY_BACKEND_LOG_LEVEL", "RAY_AUTH_MODE", "DATE_VERBOSE")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ray")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for i in range(5):
        assert out.count(f"[train] progress line {i}") == 1, out[-3000:]
    assert "Failed to query Ray Train Controller" not in out
    for noise in ("PreemptionWatcher", "worker processes have been started", "Token authentication", "logging.cc",
                  "Started a local Ray instance"):
        assert noise not in out, (noise, out[-3000:])
