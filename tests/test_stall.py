"""The round-1 stall (issue 33) on a real 2-CPU Ray: the source stream starts first and holds
Ray Data's CPUs while the training worker holds the other; the target stream must still
deliver. An induced stall fails the stage within its timeout, in one line; streams and sweep
trials that cannot fit are refused at start."""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stall_data(tmp_path_factory) -> Path:
    """More source pairs than Ray Data buffers at once at 160 px, so the source stream's
    execution is still running (and holding what it reserved) when the target stream starts."""
    from date_core.data.sample import write_small_productworld

    return write_small_productworld(tmp_path_factory.mktemp("stall-pw"), mall=360, live=60)


def _cfg(root: Path, storage: Path, *sets: str) -> dict:
    from date_core.config import resolve_config

    return resolve_config(None, [f"data.root={root}", f"runtime.storage={storage}", "runtime.max_failures=0",
                                 "data.max_val_pairs=16", *sets])


def _slow(rows):
    time.sleep(2.0)  # decoding slower than training: the source stream's execution is always busy
    return rows


def busy_source(datasets: dict, cpus: float | None) -> dict:
    """The source stream made slower than its consumer (its execution always wants more CPUs)."""
    kw = {"num_cpus": cpus} if cpus is not None else {}
    # the batch size and CPUs of the decoding before it, so Ray Data fuses the two into one task
    return {**datasets, "train": datasets["train"].map_batches(_slow, batch_size=64, **kw)}


def _source_first_loop(loop_cfg: dict) -> None:
    """A Train worker that forces the read order of the stall: the source stream runs (and
    reserves) first; the target stream is asked only after Ray Data's resource requests went out."""
    import ray.train

    from date_core.runtime.trainer import stream_watch

    rcfg = loop_cfg["cfg"]["runtime"]
    source = stream_watch("train", ray.train.get_dataset_shard("train").iter_batches(batch_size=4), rcfg)
    start = time.monotonic()
    while time.monotonic() - start < loop_cfg["hold_s"]:  # the source stream runs alone, as in training
        next(source)
        time.sleep(0.1)  # a training step; Ray Data asks the cluster for CPUs every 10 s meanwhile
    target = stream_watch("target", ray.train.get_dataset_shard("target").iter_batches(batch_size=4), rcfg)
    got = sum(1 for _, _ in zip(range(3), target))
    next(source)  # and the source stream still moves
    Path(loop_cfg["out"]).write_text(str(got))


@pytest.mark.integration
def test_target_stream_runs_after_the_source_stream_reserved_first(ray_module, stall_data, tmp_path):
    from date_core.runtime.budget import reserve_streams
    from date_core.runtime.labeling import target_with_pseudo
    from date_core.runtime.trainer import build_trainer, data_streams, make_datasets

    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the loop below runs in a Train worker
    # the embedded default's arrangement: one Train worker holding 1 of the 2 CPUs
    cfg = _cfg(stall_data, tmp_path / "ray", "runtime.cpus_per_worker=1", "runtime.stall_timeout_s=30")
    streams, shares = data_streams(True)
    t0 = time.monotonic()
    with reserve_streams(cfg, streams, shares=shares) as budgets:
        assert budgets.cpus == {"train": 0.5, "target": 0.5}
        datasets, counts = make_datasets(cfg, {"image_size": 160, "max_text_len": 16}, str(stall_data / "tokenizer"),
                                         target=functools.partial(target_with_pseudo, cfg, None), budgets=budgets)
        assert counts["train"] > 300 and counts["target"] > 0
        datasets = busy_source(datasets, budgets.task_cpus("train"))
        budgets.attach("train", datasets["train"])
        build_trainer(cfg, "stall-repro", datasets, {"cfg": cfg, "hold_s": 12, "out": str(tmp_path / "got")},
                      loop=_source_first_loop).fit()
    assert (tmp_path / "got").read_text() == "3"  # three target batches, after the source reserved first
    assert time.monotonic() - t0 < 120


def _blocking_target(root: str, num_cpus: float | None):
    """Target rows whose reads never return: an induced stall of the target stream."""
    from date_core.runtime.dataio import read_pairs

    def block(rows):
        time.sleep(3600)
        return rows

    return read_pairs(root, "live", "train", num_cpus=num_cpus).map_batches(block, num_cpus=num_cpus)


@pytest.mark.integration
def test_an_induced_stall_fails_the_stage_in_one_line_within_its_timeout(ray_module, mlflow_server, pw_dataset,
                                                                          tmp_path, monkeypatch):
    from date_core.runtime import tracking
    from date_core.runtime.supervised import run_stage

    from date_core import cli
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    cfg = _cfg(pw_dataset, tmp_path / "ray", "model.preset=tiny", "train.batch_size=8", "train.max_steps=4",
               "runtime.cpus_per_worker=0.5", "runtime.stall_timeout_s=15")
    t0 = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        with cli.stage_errors("pgda", "stall-induced"):
            run_stage(cfg, "stall-induced", stage="pgda-round", experiment_id=tracking.setup("test-stall"),
                      target=functools.partial(_blocking_target, str(pw_dataset)), register=False,
                      out_dir=tmp_path / "out")
    elapsed = time.monotonic() - t0
    message = str(exit_info.value.code)
    assert message.startswith("pgda: stalled: no batch from the target stream for 30s; Ray reports CPU ")
    assert "\n" not in message and "--set runtime.run_name=stall-induced" in message
    assert elapsed < 150  # the watchdog's first allowance (2 x 15 s) plus the stage's start-up


@pytest.mark.integration
def test_streams_that_cannot_fit_are_refused_at_start(ray_module, tmp_path):
    from date_core.runtime.budget import BudgetError, reserve_streams

    small = _cfg(tmp_path, tmp_path / "ray", "runtime.data_cpus=0.1")
    with pytest.raises(BudgetError, match=r"need at least 0.1 CPU each .* lower runtime.cpus_per_worker"):
        with reserve_streams(small, ["train", "target"]):
            pass
    large = _cfg(tmp_path, tmp_path / "ray", "runtime.data_cpus=6", "runtime.stall_timeout_s=2")
    t0 = time.monotonic()
    with pytest.raises(BudgetError, match=r"could not reserve 3 CPU for the train data stream within 2s"):
        with reserve_streams(large, ["train", "target"]):
            pass
    assert time.monotonic() - t0 < 20
    import ray

    assert ray.available_resources().get("CPU") == 2.0  # the groups went with the error


def test_sweep_trials_must_fit_the_cluster_with_their_streams():
    from date_core.config import resolve_config
    from date_core.runtime.space import load_space
    from date_core.runtime.sweep import SweepError, fit_trials

    space = load_space(ROOT / "tune_spaces" / "ci.yaml")  # 0.25 CPU per trial's driver
    cfg = resolve_config(None, ["runtime.cpus_per_worker=1"])
    two = dataclasses.replace(space, max_concurrent_trials=2)
    with pytest.raises(SweepError, match=r"2 concurrent trial\(s\) need 2 x \(0.25 driver \+ 1 Train workers"):
        fit_trials(cfg, two, cluster_cpus=2)
    one = fit_trials(cfg, dataclasses.replace(space, max_concurrent_trials=1), cluster_cpus=2)
    assert one["runtime"]["data_cpus"] == pytest.approx(0.75) and cfg["runtime"]["data_cpus"] is None
    # the CI sweep's arrangement: trainers on a custom slot, no CPU
    slots = resolve_config(None, ["runtime.cpus_per_worker=0", "adapt.label_cpus=0.25"])
    assert fit_trials(slots, two, cluster_cpus=2)["runtime"]["data_cpus"] == pytest.approx(0.75)
    explicit = resolve_config(None, ["runtime.cpus_per_worker=0", "runtime.data_cpus=1"])
    with pytest.raises(SweepError):
        fit_trials(explicit, two, cluster_cpus=2)  # 2 x (0.25 + 0 + 1) > 2
    greedy = resolve_config(None, ["runtime.cpus_per_worker=0", "adapt.label_cpus=1"])
    with pytest.raises(SweepError, match="labelling actor asks for adapt.label_cpus=1"):
        fit_trials(greedy, two, cluster_cpus=2)
