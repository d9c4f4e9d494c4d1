"""Supervised (and domain-adaptive) training on Ray Train V2, read top to bottom as a recipe:

1. datasets: Ray Data reads Parquet, decodes and letterboxes on its own CPUs
   (:func:`make_datasets`), Ray Train splits ``train``/``target`` across workers and gives every
   worker the whole ``val`` set;
2. the per-worker loop (:func:`train_loop_per_worker`) builds the model, restores the latest
   checkpoint (model, optimiser, scheduler, step, data position), wraps the model in DDP and
   calls the library's :func:`date_core.adapt.adaptation_step` per batch (supervised source
   loss; in a PG-DA round also the target stream, the aligner and the EMA teacher);
3. checkpoints every ``train.checkpoint_every`` optimiser steps and at each epoch end, with the
   validation PR + PG metrics of rank 0;
4. the trainer (:func:`build_trainer`): ``ScalingConfig``, ``FailureConfig(max_failures)``, and a
   ``RunConfig`` whose name makes a re-run continue from the last checkpoint.

Rank 0 alone logs to MLflow (the run id travels in the loop config).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import ray
import ray.train
import torch
from ray.train import (Checkpoint, CheckpointConfig, DataConfig, FailureConfig, LoggingConfig, RunConfig,
                       ScalingConfig)
from ray.train.torch import TorchTrainer

from date_core.data import storage
from date_core.training.engine import autocast_dtype
from date_core.runtime.budget import StreamBudgets
from date_core.runtime.dataio import count_rows, read_pairs, to_model_batches
from date_core.training.loop import LoopHooks, LoopPlan, cycle_batches, eta_line, run_epochs
from date_core.runtime.scratch import scratch_dir
from date_core.text import load_tokenizer

TRAIN_STATE = "train_state.pt"
MODEL_DIR = "model"
TEACHER_DIR = "teacher"


# ----------------------------------------------------------------------------- datasets
def make_datasets(cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], tokenizer: str,
                  target: Callable[[float | None], ray.data.Dataset] | None = None,
                  budgets: StreamBudgets | None = None) -> tuple[dict[str, ray.data.Dataset], dict[str, int]]:
    """The ``train`` / ``val`` (/ ``target``) datasets of a run and their row counts.

    ``target(num_cpus)`` builds the target rows (possibly joined with pseudo boxes) with tasks
    of ``num_cpus``; the adaptation stage passes it. ``budgets``: each stream confined to its
    reserved group (:mod:`date_core.runtime.budget`; ``val`` shares ``train``'s). Counts come
    from the Parquet footers, before any decoding.
    """
    data = cfg["data"]
    size, max_len = int(model_cfg["image_size"]), int(model_cfg["max_text_len"])

    def cpus(stream: str) -> float | None:
        return budgets.task_cpus(stream) if budgets is not None else None

    root, source = data["root"], data["source_domain"]
    shuffle, augment = bool(cfg["train"]["shuffle"]), bool(cfg["train"]["augment"])
    train_rows = read_pairs(root, source, data["train_split"], shuffle_files=shuffle, num_cpus=cpus("train"))
    val_rows = read_pairs(root, source, data["val_split"], num_cpus=cpus("val"))
    counts = {"train": count_rows(root, source, data["train_split"]),
              "val": count_rows(root, source, data["val_split"])}
    if data.get("max_val_pairs"):
        val_rows = val_rows.limit(int(data["max_val_pairs"]))
        counts["val"] = min(counts["val"], int(data["max_val_pairs"]))
    tok = load_tokenizer(tokenizer)  # loaded once, shipped with the tasks
    seed = int(cfg["train"]["seed"])
    datasets = {
        "train": to_model_batches(train_rows, tok, size, max_len, train=augment, seed=seed, num_cpus=cpus("train")),
        "val": to_model_batches(val_rows, tok, size, max_len, train=False, num_cpus=cpus("val")),
    }
    if target is not None:
        counts["target"] = count_rows(root, data["target_domain"], data["train_split"])
        datasets["target"] = to_model_batches(target(cpus("target")), tok, size, max_len, train=augment, seed=seed + 1,
                                              num_cpus=cpus("target"))
    if budgets is not None:
        datasets = {name: budgets.attach(name, ds) for name, ds in datasets.items()}
    if not shuffle:  # file order, batch for batch: what train.shuffle=false promises
        for ds in datasets.values():
            ds.context.execution_options.preserve_order = True
    return datasets, counts


def data_streams(target: bool) -> tuple[list[str], dict[str, str]]:
    """The streams of a stage that get a CPU budget, and those that share another's."""
    return (["train", "target"] if target else ["train"]), {"val": "train"}


# ----------------------------------------------------------------------------- worker loop
def stream_watch(stream: str, batches, rcfg: Mapping[str, Any]):
    """``batches`` under the stall watchdog (:func:`date_core.runtime.watchdog.watched`) at
    ``runtime.stall_timeout_s``."""
    from date_core.runtime.watchdog import watched

    return watched(batches, stream, float(rcfg["stall_timeout_s"]))


def _save(tmp: str, engine, tokenizer, state: dict, metrics: dict) -> Checkpoint:
    from date_core.inference import save_checkpoint
    from date_core.model import unwrap

    extra = {"step": state["step"], "metrics": metrics}
    save_checkpoint(unwrap(engine.model), Path(tmp) / MODEL_DIR, tokenizer, extra=extra)
    if engine.teacher is not None:  # the EMA teacher: the round's output model in PG-DA
        save_checkpoint(engine.teacher.model, Path(tmp) / TEACHER_DIR, tokenizer, extra={**extra, "ema": True})
    torch.save({**engine.state_dict(), **state}, Path(tmp) / TRAIN_STATE)
    return Checkpoint.from_directory(tmp)


def worker_setup(tcfg: Mapping[str, Any], rcfg: Mapping[str, Any]) -> tuple[int, int, torch.device, Any]:
    """A Ray Train worker's start: quiet report logs, torch threads, a per-rank seed ->
    (rank, world size, device, autocast dtype of ``train.precision``: :func:`~date_core.training.engine.autocast_dtype`)."""
    _quiet_report_log(str(rcfg["train_log_level"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(rcfg.get("torch_threads") or rcfg.get("cpus_per_worker") or 1)))
    torch.manual_seed(int(tcfg["seed"]) + rank)
    return rank, world, device, autocast_dtype(device, str(tcfg["precision"]))

def train_loop_per_worker(loop_cfg: dict) -> None:
    """One data-parallel worker. ``loop_cfg``: ``cfg`` (the resolved run config), ``tokenizer``
    (folder), ``vocab_size``, ``counts`` (rows per dataset), ``mlflow`` ({uri, run_id} or None),
    ``init_from`` (checkpoint folder to start from when no run checkpoint exists: the previous
    PG-DA round, whole), ``init_weights`` (``model.init_from``: weights loaded into the configured
    model, see :func:`init_model`), ``tag``
    (metric prefix of the validation split, e.g. ``mall_val``)."""
    from date_core.adapt.round import RoundEngine
    from date_core.training.engine import evaluate
    from date_core.inference import load_model
    from date_core.text import load_tokenizer

    cfg, counts = loop_cfg["cfg"], loop_cfg["counts"]
    tcfg, rcfg = cfg["train"], cfg["runtime"]
    rank, world, device, autocast = worker_setup(tcfg, rcfg)

    # -- model: a fresh one, or the adaptation's previous round; then the round's engine
    if loop_cfg.get("init_from"):
        with storage.local_dir(loop_cfg["init_from"]) as init_dir:
            model = load_model(init_dir)
    else:  # the configured model, with the weights of model.init_from when set (e.g. pretrained)
        model = init_model(cfg, loop_cfg["vocab_size"], loop_cfg.get("init_weights"),
                           (loop_cfg.get("mlflow") or {}).get("uri"))
    tokenizer = load_tokenizer(loop_cfg["tokenizer"])
    plan = LoopPlan.from_config(tcfg, counts["train"], world)
    bs, total_steps, epochs = plan.batch_size, plan.total_steps, plan.epochs
    engine = RoundEngine.build(cfg, model, total_steps, target="target" in counts, align=bool(loop_cfg.get("align")),
                               device=device, autocast_dtype=autocast)
    if engine.teacher is not None and rank == 0:
        print(f"[train] EMA teacher, decay {engine.teacher.decay:.4f} over {total_steps} steps", flush=True)

    # -- resume: the run's latest checkpoint wins over everything
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with worker_checkpoint_dir(checkpoint) as ckpt_dir:
            trained = load_model(Path(ckpt_dir) / MODEL_DIR)
            model.load_state_dict(trained.state_dict())
            saved = torch.load(Path(ckpt_dir) / TRAIN_STATE, map_location=device, weights_only=False)
        state = {k: int(saved[k]) for k in state}
        engine.load_state_dict(saved, step=state["step"])
        start_step = state["step"]
        if rank == 0:
            print(f"[train] resumed from checkpoint at step {start_step} (epoch {state['epoch']})", flush=True)
    engine.model = model = ray.train.torch.prepare_model(model)
    aligner = engine.aligner
    if aligner is not None and world > 1 and any(p.requires_grad for p in aligner.parameters()):
        # domain discriminators are trained parameters too: DDP keeps them equal on every rank
        engine.aligner = ray.train.torch.prepare_model(aligner, parallel_strategy_kwargs={"find_unused_parameters": True})
    # Where the workers run (one line in the report; the multi-node test reads it).
    nodes = [ray.get_runtime_context().get_node_id()]
    if world > 1 and torch.distributed.is_initialized():
        nodes = [None] * world
        torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    tracker = _Tracker(loop_cfg.get("mlflow"), rank)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    target_iter = None
    if "target" in counts:
        target_shard = ray.train.get_dataset_shard("target")
        target_iter = stream_watch("target", cycle_batches(lambda: target_shard.iter_torch_batches(batch_size=bs, drop_last=True)),
                                   rcfg)

    tag = loop_cfg.get("tag", "val")

    def step(batch, micro: int) -> dict[str, float]:
        return engine.step(batch, next(target_iter) if target_iter is not None else None, micro)

    def progress(state: dict, logs: dict, rate: float) -> None:
        print(eta_line("train", state, total_steps, rate,
                       f"epoch {state['epoch'] + 1} loss {logs['loss/total']:.3f} lr {logs['lr']:.2e}"), flush=True)

    def epoch_end(state: dict, metrics: dict) -> dict:
        # validation on rank 0 (the unsplit val set) of the output model: the EMA teacher in
        # PG-DA rounds, else the student
        metrics["worker_nodes"] = ",".join(nodes)
        if rank == 0:
            val = evaluate(engine.output, stream_watch("val", val_shard.iter_torch_batches(batch_size=bs), rcfg),
                           device=device, autocast_dtype=autocast)
            metrics.update({f"{tag}/{k}": v for k, v in val.items()})
            tracker.log(metrics, state["step"])
            print(f"[train] epoch {state['epoch']}/{epochs} step {state['step']}/{total_steps} "
                  f"{tag}: pg/acc@0.5={val.get('pg/acc@0.5', float('nan')):.3f} "
                  f"pr/R@1={val.get('pr/R@1', float('nan')):.3f}", flush=True)
        return metrics

    def save(state: dict, metrics: dict) -> None:
        _report(engine, tokenizer, state, rank, metrics)

    run_epochs(train_shard, LoopHooks(step, progress, epoch_end, save), plan, state, start_step=start_step,
               rank=rank, tracker=tracker, prefix="train", watch=lambda name, it: stream_watch(name, it, rcfg))


def init_model(cfg: Mapping[str, Any], vocab_size: int, source: str | None = None, uri: str | None = None):
    """The model of ``model.preset`` + ``model.overrides``; with ``source`` (``model.init_from``:
    a checkpoint folder, local or ``s3://``, or an MLflow model URI on tracking server ``uri``)
    its weights are loaded into it, strictly (:func:`date_core.inference.load_weights_into`:
    ``FileNotFoundError`` when missing, ``ValueError`` when the architecture differs)."""
    from date_core import build_model
    from date_core.inference import load_weights_into

    model = build_model(cfg["model"]["preset"], vocab_size=vocab_size, **dict(cfg["model"].get("overrides") or {}))
    if source:
        from date_core.runtime import tracking

        with tracking.init_checkpoint(str(source), uri) as folder:
            load_weights_into(model, folder)
    return model


def _quiet_report_log(level: str) -> None:
    """Hold Ray Train's per-report INFO line (the whole metrics dict, every checkpoint) to
    ``runtime.train_log_level`` on the console. Ray 2.60 logs it under a logger named by the
    module's file path, outside ``ray.train``, so ``LoggingConfig`` does not reach it."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(getattr(logging, level.upper(), logging.WARNING))


def _report(engine, tokenizer, state, rank, metrics) -> None:
    """Every rank reports (it is a barrier); rank 0 attaches the checkpoint."""
    with scratch_dir("ckpt") as tmp:  # removed even if this worker is killed mid-report
        ckpt = _save(tmp, engine, tokenizer, state, metrics) if rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt)


class _Tracker:
    """MLflow logging from rank 0 only (no-op elsewhere and when tracking is off)."""

    def __init__(self, spec: Mapping[str, str] | None, rank: int):
        self.spec = spec if rank == 0 else None

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        if self.spec:
            from date_core.runtime import tracking

            tracking.log_metrics(self.spec["run_id"], metrics, step, uri=self.spec["uri"])


# ----------------------------------------------------------------------------- trainer
def storage_location(storage_uri: str) -> dict[str, Any]:
    """``storage_path`` (and ``storage_filesystem`` for ``s3://``, with the endpoint from the AWS
    environment) of a Ray Train or Tune ``RunConfig``."""
    if storage.is_s3(storage_uri):
        fs, path = storage.resolve_filesystem(storage_uri)
        return dict(storage_path=path, storage_filesystem=fs)
    return dict(storage_path=str(Path(storage_uri).resolve()))


def run_config(cfg: Mapping[str, Any], name: str) -> RunConfig:
    """Storage (local path or ``s3://``, with the endpoint from the AWS environment), failure
    handling and checkpoint retention of a run called ``name`` (same name = resume)."""
    return RunConfig(
        name=name, **storage_location(str(cfg["runtime"]["storage"])),
        failure_config=FailureConfig(max_failures=int(cfg["runtime"]["max_failures"])),
        checkpoint_config=CheckpointConfig(num_to_keep=int(cfg["runtime"]["keep_checkpoints"])),
        # ray.train INFO lines (resources, process groups, devices) go to the log files only
        logging_config=LoggingConfig(log_level=str(cfg["runtime"]["train_log_level"])),
    )


def build_trainer(cfg: Mapping[str, Any], name: str, datasets: dict, loop_cfg: dict,
                  loop=None) -> TorchTrainer:
    """A ``TorchTrainer`` over ``datasets`` (``train`` and ``target`` split across workers);
    ``loop``: the per-worker function (default :func:`train_loop_per_worker`)."""
    rt = cfg["runtime"]
    scaling = ScalingConfig(
        num_workers=int(rt["num_workers"]), use_gpu=bool(rt["use_gpu"]),
        # extra custom resources (e.g. one "trainer slot" per node) pin workers to nodes while
        # leaving the node's CPUs to Ray Data
        resources_per_worker={"CPU": float(rt["cpus_per_worker"]), **dict(rt.get("worker_resources") or {})},
        placement_strategy=str(rt["placement_strategy"]),
    )
    return TorchTrainer(
        loop or train_loop_per_worker, train_loop_config=loop_cfg, scaling_config=scaling,
        run_config=run_config(cfg, name), datasets=datasets,
        dataset_config=DataConfig(datasets_to_split=[k for k in ("train", "target") if k in datasets]),
    )


@contextlib.contextmanager
def worker_checkpoint_dir(checkpoint: Checkpoint) -> Iterator[Path]:
    """A worker's own local copy of a run checkpoint (local or ``s3://``), removed afterwards.

    ``Checkpoint.as_directory()`` gives every worker of a node the same temporary download
    folder, and a worker that arrives after the first download has finished downloads into it
    again while the others read it (ray-project/ray#48726): a 2-worker resume from S3 read a
    truncated weights file ("header too small"). A private folder per worker has no such race;
    the cost is one download per worker instead of per node."""
    with scratch_dir("resume") as tmp:
        checkpoint.to_directory(tmp)
        yield Path(tmp)


def checkpoint_model_dir(checkpoint: Checkpoint, dst: str | Path, prefer_teacher: bool = False) -> Path:
    """Copy the model folder of a run checkpoint (local or ``s3://``) to ``dst``; with
    ``prefer_teacher`` the EMA teacher's folder when the checkpoint has one."""
    import shutil

    dst = Path(dst)
    with checkpoint.as_directory() as ckpt_dir:
        src = Path(ckpt_dir) / MODEL_DIR
        if prefer_teacher and (Path(ckpt_dir) / TEACHER_DIR).is_dir():
            src = Path(ckpt_dir) / TEACHER_DIR
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
    return dst


def checkpoint_step(model_dir: str | Path) -> int:
    """The optimiser step a saved model folder was written at."""
    meta = json.loads((Path(model_dir) / "config.json").read_text())
    return int(meta.get("extra", {}).get("step", 0))


__all__ = ["build_trainer", "make_datasets", "train_loop_per_worker", "run_config", "init_model",
           "checkpoint_model_dir", "checkpoint_step"]
