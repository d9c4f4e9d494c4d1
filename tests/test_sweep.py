"""Sweeps: search spaces are checked by the config schema (one-line errors), and a 4-trial sweep
with 2 trials at once on 2 CPUs runs on real Ray and a real MLflow server: every trial an MLflow
run under the sweep's run, ASHA stops at least one early, and the best config runs through
pgda.py as it is."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from date_core.config import resolve_config
from date_core.config_schema import ConfigError
from date_core.runtime.space import load_space, trial_config
from date_core.evaluation.selection import spearman

ROOT = Path(__file__).resolve().parents[1]
CI_SPACE = ROOT / "tune_spaces" / "ci.yaml"


def _space(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(CI_SPACE.read_text())
    for key, value in changes.items():
        section, _, name = key.partition("__")
        if name:
            data[section] = {k: v for k, v in data[section].items() if k != name.replace("_DOT_", ".")} if value is None \
                else {**data[section], name.replace("_DOT_", "."): value}
        else:
            data[key] = value
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_spaces_load():
    for path in sorted((ROOT / "tune_spaces").glob("*.yaml")):
        space = load_space(path)
        assert space.params
    keys = set(load_space(ROOT / "tune_spaces" / "alignment.yaml").params)
    assert {"loss.align_marginal_image", "loss.align_marginal_query", "loss.align_conditional", "adapt.aligner",
            "loss.pseudo_box_focus", "adapt.keep_schedule.start", "adapt.keep_schedule.end", "adapt.ema_decay"} <= keys


@pytest.mark.parametrize("changes, message", [
    ({"params__loss_DOT_align_conditionl": {"uniform": [0.1, 1.0]}},
     "unknown config key 'loss.align_conditionl' (in {space} params); did you mean 'loss.align_conditional'?"),
    ({"params__train_DOT_epochs": {"uniform": [1, 3]}}, "config key 'train.epochs' expects int, got 1.0 (float)"),
    ({"params__adapt_DOT_aligner": {"choice": ["mmd", "mmmd"]}}, "config key 'adapt.aligner' expects one of mmd, adversarial"),
    ({"params__train_DOT_lr": {"loguniforn": [1e-4, 1e-2]}}, "unknown distribution 'loguniforn'"),
    ({"max_concurent_trials": 2}, "unknown config key 'max_concurent_trials' (in {space}); did you mean 'max_concurrent_trials'?"),
    ({"config": {"adapt.round": 2}}, "did you mean 'adapt.rounds'?"),
    ({"metric": "pg/acc@0.55"}, "unknown metric 'pg/acc@0.55'"),
])
def test_bad_space_is_one_line(tmp_path, changes, message):
    path = _space(tmp_path, **changes)
    with pytest.raises(ConfigError) as info:
        load_space(path)
    assert message.format(space=path) in str(info.value) and "\n" not in str(info.value)


def test_cli_refuses_bad_space_and_bad_set_before_ray(tmp_path):
    bad = _space(tmp_path, **{"params__train_DOT_epoch": {"choice": [1, 2]}})
    for extra, expected in ([["--space", str(bad)], "sweep: bad search space: unknown config key 'train.epoch'"],
                            [["--space", str(CI_SPACE), "--set", "train.lr=fast"],
                             "sweep: bad configuration: config key 'train.lr' expects float, got 'fast'"]):
        out = subprocess.run([sys.executable, str(ROOT / "pipelines" / "sweep.py"), *extra, "--dry-run"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and out.stderr.strip().startswith(expected), out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def test_trial_config_builds_the_schedule():
    cfg = trial_config(resolve_config(None, ["adapt.rounds=3"]),
                       {"adapt.keep_schedule.start": 0.2, "adapt.keep_schedule.end": 0.6, "loss.align_conditional": 0.3})
    assert cfg["adapt"]["keep_schedule"] == [0.2, 0.6] and cfg["loss"]["align_conditional"] == 0.3
    with pytest.raises(ConfigError, match="expects float"):
        trial_config(cfg, {"train.lr": "fast"})


def test_spearman():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) != spearman([1, 2], [1, 2])  # NaN under 3 pairs


# ------------------------------------------------------------------------- integration
@pytest.fixture(scope="module")
def ray_slots():
    """A local 2-CPU Ray with two "trainer_slot"s: each trial's Train worker takes a slot and no
    CPU, so two trials (0.25 CPU each) and their labelling leave a CPU for Ray Data."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=2, resources={"trainer_slot": 2}, include_dashboard=False,
             object_store_memory=256 * 1024 * 1024, log_to_driver=False,
             runtime_env={"env_vars": {k: v for k, v in os.environ.items()
                                       if k.startswith("AWS_") or k in ("OMP_NUM_THREADS", "HF_HUB_OFFLINE")}})
    try:
        yield ray
    finally:
        ray.shutdown()


def _stage(name: str):
    return importlib.import_module(f"date_pipelines.{name}")


@pytest.mark.integration
def test_sweep_four_trials_asha_mlflow_and_best_config(ray_slots, mlflow_server, pw_dataset, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    sets = [f"data.root={pw_dataset}", "model.preset=tiny", "data.max_val_pairs=16", f"runtime.storage={tmp_path / 'ray'}",
            "runtime.run_name=sweep-t", "runtime.experiment=test-sweep", "runtime.registered_model=test-sweep-seeker",
            "train.batch_size=8", "train.max_steps=3", "train.checkpoint_every=100", "train.log_every=100",
            "runtime.cpus_per_worker=0", "runtime.worker_resources={trainer_slot: 1}", "runtime.torch_threads=1",
            "adapt.label_cpus=0.25", "adapt.views=[identity, hflip]", "adapt.sensitivity_pass=false"]
    best = tmp_path / "best.yaml"
    argv = ["--space", str(CI_SPACE), "--select-by", "target_val", "--out", str(best)]
    assert _stage("sweep").main(argv + [a for s in sets for a in ("--set", s)]) == 0

    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    exp = client.get_experiment_by_name("test-sweep")
    sweep_run, = client.search_runs([exp.experiment_id], "tags.`date.stage` = 'sweep'")
    assert sweep_run.info.status == "FINISHED"
    trials = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{sweep_run.info.run_id}'")
    assert len(trials) == 4
    for run in trials:  # each trial's config as params, and the selection criteria per round
        assert run.data.params["model.preset"] == "tiny" and "train.seed" in run.data.params
        assert "config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "target_val/pg/mIoU" in run.data.metrics and "proxy/reliability" in run.data.metrics
    stopped = [r for r in trials if r.data.tags.get("date.sweep.status") == "stopped early"]
    assert stopped and all(r.info.status == "KILLED" for r in stopped)
    assert {r.info.status for r in trials} <= {"FINISHED", "KILLED"}
    assert sweep_run.data.metrics["n_stopped"] >= 1
    assert {a.path for a in client.list_artifacts(sweep_run.info.run_id)} >= {"trials.json", "best.yaml"}

    # the best config runs through pgda.py (one round here, for CI's time)
    cfg = yaml.safe_load(best.read_text())
    assert cfg["runtime"]["run_name"] is None and cfg["model"]["preset"] == "tiny"
    assert _stage("pgda").main(["--config", str(best), "--set", "runtime.run_name=best-run", "--set", "adapt.rounds=1"]) == 0
    assert client.search_model_versions("name='test-sweep-seeker'")
