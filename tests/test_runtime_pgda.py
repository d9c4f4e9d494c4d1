"""The main job on real Ray with a real MLflow server: a 2-round PG-DA run that is killed after
its first round and re-run with the same name, which continues at round 2."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import pgda_runs

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def _cmd(data: Path, storage: Path) -> list[str]:
    sets = [
        f"data.root={data}", "data.max_val_pairs=16", f"runtime.storage={storage}", "runtime.run_name=pgda-t",
        "runtime.experiment=test-pgda", "runtime.registered_model=test-pgda-seeker", "adapt.rounds=2",
        "train.batch_size=8", "train.max_steps=4", "train.checkpoint_every=100", "train.log_every=2",
        "loss.align_marginal_image=0.1", "loss.align_marginal_query=0.1", "loss.align_conditional=0.1",
        "adapt.keep_schedule=[0.5]", "adapt.sensitivity_pass=true",  # off by default; measured here
    ]
    return [sys.executable, str(ROOT / "pipelines" / "pgda.py"), *[a for s in sets for a in ("--set", s)]]


def test_pgda_two_rounds_killed_and_resumed(mlflow_server, pw_dataset, tmp_path):
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    state_file = tmp_path / "ray" / "pgda-t" / "pgda_state.json"
    log1 = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_cmd(pw_dataset, tmp_path / "ray"), env=env, stdout=log1, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.time() + 900
    while time.time() < deadline and first.poll() is None:
        if state_file.is_file() and len(json.loads(state_file.read_text())["rounds"]) == 1:
            break
        time.sleep(1)
    assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
    first.wait()
    log1.close()

    second = subprocess.run(_cmd(pw_dataset, tmp_path / "ray"), env=env, capture_output=True, text=True,
                            timeout=900)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "1 round(s) already done" in second.stdout
    assert "round 1/2" not in second.stdout and "round 2/2" in second.stdout
    assert "PG-DA results on live_test" in second.stdout
    # the local model copies of both runs (the killed one's included) are gone
    assert not (Path(tempfile.gettempdir()) / "date-pgda-pgda-t").exists()

    state = json.loads(state_file.read_text())
    assert [r["round"] for r in state["rounds"]] == [0, 1]
    # pseudo-labels of round 1: one row for every target train pair, committed once
    commit = json.loads((Path(state["rounds"][0]["pseudo"]) / "_COMMITTED.json").read_text())
    labels = pq.read_table(commit["file"])
    n_target = sum(pq.read_metadata(f).num_rows for f in (pw_dataset / "live" / "train").glob("*.parquet"))
    assert labels.num_rows == n_target == commit["rows"]
    assert 0 < labels.filter(labels["kept"]).num_rows <= n_target

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    parent, children = pgda_runs(mlflow_server, "test-pgda")
    parents = [parent]
    assert sorted(c.data.tags["date.run_name"] for c in children) == ["pgda-t-round0", "pgda-t-round1"]
    round0 = next(c for c in children if c.data.tags["date.run_name"] == "pgda-t-round0")
    assert round0.data.metrics["pseudo/n_pairs"] == n_target
    assert "pseudo/precision@0.5".replace("@", "_at_") in round0.data.metrics
    # the precision of each computed reliability signal (sensitivity: asked for above), and at the
    # patch level, is logged per round
    for name in ("confidence", "agreement", "sensitivity", "centre/confidence"):
        assert f"pseudo/precision_at_0.5/{name}" in round0.data.metrics, name
    assert "live_test/pg/acc_at_0.5" in parents[0].data.metrics
    assert client.get_model_version("test-pgda-seeker", state["registered_version"])
