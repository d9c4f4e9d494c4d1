"""Supervised training on real Ray Train, logged to a real MLflow server on loopback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def _cfg(data_root: Path, storage: str, **train):
    from date_core.config import resolve_config

    overrides = [
        f"data.root={data_root}", "data.max_val_pairs=32", f"runtime.storage={storage}",
        "train.batch_size=8", "train.max_steps=6", "train.checkpoint_every=3", "train.log_every=2",
        "train.warmup_steps=2", "runtime.cpus_per_worker=0.5", "runtime.experiment=test-train",
        "runtime.registered_model=test-seeker",
    ] + [f"train.{k}={v}" for k, v in train.items()]
    return resolve_config(None, overrides)


@pytest.fixture(scope="module")
def tracked(mlflow_server, ray_module):
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    yield mlflow_server
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def test_two_workers_log_to_mlflow_and_register(tracked, pw_dataset, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from date_core.runtime import tracking
    from date_core.config import with_values
    from date_core.runtime.supervised import run_stage

    # Relative paths, as the README's commands give them: Ray Train workers run in a directory
    # of their own, so the config must hand them absolute ones.
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(Path(os.path.relpath(pw_dataset, tmp_path)), "ray")
    assert Path(cfg["data"]["root"]).is_absolute() and Path(cfg["runtime"]["storage"]) == tmp_path / "ray"
    cfg = with_values(cfg, {"runtime.num_workers": 2})
    exp = tracking.setup("test-train")
    result = run_stage(cfg, "two-workers", experiment_id=exp, out_dir=tmp_path / "out")

    client = MlflowClient(tracking_uri=tracked, registry_uri=tracked)
    run = client.get_run(result.run_id)
    assert run.data.params["runtime.num_workers"] == "2"
    assert run.data.params["train.batch_size"] == "8"
    for name in ("mall_val/pg/acc_at_0.5", "mall_val/pr/R_at_1", "mall_val/pg/mIoU", "train/loss/total"):
        assert name in run.data.metrics, name
    history = client.get_metric_history(result.run_id, "train/loss/total")
    assert sorted({m.step for m in history}) == [2, 4, 6]
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"val_predictions.png", "val_recall_at_k.png", "config.yaml"} <= artifacts
    png = Path(client.download_artifacts(result.run_id, "val_predictions.png", str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    version = client.get_model_version("test-seeker", result.version)
    assert version.tags["run_id"] == result.run_id
    assert "mall_val/pg/acc_at_0.5" in version.tags

    # evaluate.py reads the registered version back through the MLflow URI
    out = tmp_path / "metrics.json"
    proc = subprocess.run([sys.executable, str(ROOT / "pipelines" / "evaluate.py"), "--model",
                           f"models:/test-seeker/{result.version}", "--data", str(pw_dataset), "--domain", "live",
                           "--split", "test", "--out", str(out)], capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": tracked}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads(out.read_text())
    for key in ("pr/R@1", "pr/R@5", "pr/R@10", "pr/mAP@10", "pg/mIoU", "pg/acc@0.3", "pg/acc@0.5", "pg/acc@0.7"):
        assert 0.0 <= metrics[f"live_test/{key}"] <= 1.0


def test_rerun_with_same_name_continues(tracked, pw_dataset, tmp_path):
    from date_core.runtime import tracking
    from date_core.runtime.supervised import run_stage

    exp = tracking.setup("test-train")
    first = run_stage(_cfg(pw_dataset, str(tmp_path / "ray"), max_steps=3), "resume-me", experiment_id=exp,
                      register=False, out_dir=tmp_path / "out1")
    assert first.start_step == 0
    second = run_stage(_cfg(pw_dataset, str(tmp_path / "ray"), max_steps=6), "resume-me", experiment_id=exp,
                       register=False, out_dir=tmp_path / "out2")
    assert second.run_id == first.run_id           # the same MLflow run continues
    assert second.start_step == 3                  # from the first run's last checkpoint
    assert second.metrics["step"] == 6


def test_a_pgda_round_on_ray_and_in_the_benchmark_trains_step_for_step_alike(tracked, pw_dataset, tmp_path):
    """One round engine, two feeders: the Ray Train worker (Ray Data shards) and the
    benchmarks' ``train_round`` (in-process shards) run a 20-step round with alignment, an EMA teacher and the
    zoom-out augmentation from the same seed and data, and log the same loss at every step. The
    file order (train.shuffle=false) and no transform augmentation (train.augment=false) make
    the batches comparable; everything else is as a PG-DA round runs."""
    import functools

    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient

    from date_core.adapt.round import round_config
    from date_core.config import with_values
    from date_core.data import io
    from date_core.runtime import session, tracking
    from date_core.runtime.labeling import target_with_pseudo
    from date_core.runtime.supervised import run_stage
    from date_core.text import load_tokenizer

    cfg = _cfg(pw_dataset, str(tmp_path / "ray"), max_steps=20, batch_size=4, log_every=1, checkpoint_every=100,
               shuffle="false", augment="false")
    cfg = round_config(with_values(cfg, {"loss.align_conditional": 1.0, "loss.align_marginal_image": 0.5}), 0)
    exp = tracking.setup("test-train")
    ray_run = run_stage(cfg, "engine-both-ways", stage="pgda-round", experiment_id=exp, register=False,
                        target=functools.partial(target_with_pseudo, cfg, None), align=True, out_dir=tmp_path / "out")
    history = MlflowClient(tracking_uri=tracked).get_metric_history(ray_run.run_id, "train/loss/total")
    by_step = {m.step: m.value for m in history}   # the epoch end logs the last step's loss again
    assert sorted(by_step) == list(range(1, 21))
    on_ray = [by_step[k] for k in range(1, 21)]

    from date_core.adapt import target_rows
    from date_core.adapt.round import train_round

    tok_dir = session.tokenizer_dir(cfg)
    source = io.read_table(str(pw_dataset), "mall", "train")
    target = target_rows(io.read_table(str(pw_dataset), "live", "train"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the Ray worker (runtime.cpus_per_worker 0.5 -> 1 thread)
    try:
        in_process = []
        engine = train_round(cfg, session.vocab_size(tok_dir), source, target, load_tokenizer(tok_dir),
                             device=torch.device("cpu"), on_step=lambda e, logs: in_process.append(logs["loss/total"]))
    finally:
        torch.set_num_threads(threads)
    assert engine.aligner is not None and engine.teacher is not None and engine.steps_done == 20
    np.testing.assert_allclose(in_process, on_ray, rtol=0, atol=1e-5)
    assert len(set(np.round(on_ray, 4))) > 10      # a real run: the loss moves from step to step
