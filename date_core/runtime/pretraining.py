"""CAPTURE-style pretraining (:mod:`date_core.training.pretrain`) as a Ray Train stage, driver and worker.

Recipe, as :mod:`date_core.runtime.trainer` and :mod:`date_core.runtime.supervised` do it for
supervised training::

    datasets: the image-caption pairs of pretrain.domains x pretrain.splits (caption = query;
              boxes unused), decoded by Ray Data, split across the workers
    worker:   the configured model (model.preset + overrides; model.init_from's weights when
              set) + the pretraining heads, AdamW + warm-up/cosine (train with pretrain.train
              over it), pretrain_step per batch, a checkpoint every train.checkpoint_every steps
              and at each epoch end (model folder with the heads beside it, optimiser state)
    driver:   MLflow run (config params, loss curves), the final model folder, registered as a
              new version of pretrain.registered_model

The registered checkpoint is an ordinary DATE checkpoint (``load_model`` reads it; the heads file
beside it is ignored there): ``model.init_from=models:/<name>/<version>`` starts training from it.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Mapping

import ray
import ray.train
import torch

from date_core.runtime import session, tracking
from date_core.runtime.budget import StreamBudgets, reserve_streams
from date_core.training.loop import LoopHooks, LoopPlan, eta_line, run_epochs
from date_core.training.pretrain import pretrain_train_config
from date_core.runtime.scratch import scratch_dir
from date_core.runtime.supervised import StageResult
from date_core.runtime.trainer import (MODEL_DIR, TRAIN_STATE, _Tracker, build_trainer, checkpoint_model_dir,
                                       init_model, stream_watch, worker_checkpoint_dir, worker_setup)


STAGE = "pretrain"


def pretrain_parts(cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The ``(domain, split)`` datasets pretraining reads."""
    p = cfg["pretrain"]
    return list(dict.fromkeys((str(d), str(s)) for d, s in itertools.product(p["domains"], p["splits"])))


def make_pretrain_dataset(cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], tokenizer: str,
                          budgets: StreamBudgets | None = None):
    """``({"train": model batches}, {"train": rows})`` over every part of :func:`pretrain_parts`;
    ``budgets``: the stream confined to its reserved group (:mod:`date_core.runtime.budget`)."""
    from date_core.runtime.dataio import count_rows, read_pairs, to_model_batches
    from date_core.text import load_tokenizer

    cpus = budgets.task_cpus("train") if budgets is not None else None
    root = cfg["data"]["root"]
    tcfg = pretrain_train_config(cfg)
    parts = [read_pairs(root, d, s, shuffle_files=bool(tcfg["shuffle"]), num_cpus=cpus) for d, s in pretrain_parts(cfg)]
    rows = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    count = sum(count_rows(root, d, s) for d, s in pretrain_parts(cfg))
    tok = load_tokenizer(tokenizer)
    batches = to_model_batches(rows, tok, int(model_cfg["image_size"]), int(model_cfg["max_text_len"]),
                               train=bool(tcfg["augment"]), seed=int(tcfg["seed"]), num_cpus=cpus)
    return {"train": budgets.attach("train", batches) if budgets is not None else batches}, {"train": count}


# ----------------------------------------------------------------------------- worker
def _save(tmp: str, pretrainer, optimizer, scheduler, tokenizer, state: dict, metrics: dict):
    from safetensors.torch import save_file

    from date_core.inference import save_checkpoint
    from date_core.training.pretrain import HEADS_FILE

    inner = getattr(pretrainer, "module", pretrainer)
    folder = Path(tmp) / MODEL_DIR
    heads = {"mlm_prob": inner.mlm_prob, "mpm_ratio": inner.mpm_ratio, "fusion_layers": len(inner.heads.text_fusion),
             "terms": list(inner.active)}
    save_checkpoint(inner.model, folder, tokenizer, extra={"step": state["step"], "metrics": metrics, "pretrain": heads})
    save_file({k: v.detach().cpu().contiguous() for k, v in inner.heads.state_dict().items()}, str(folder / HEADS_FILE))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **state},
               Path(tmp) / TRAIN_STATE)
    return ray.train.Checkpoint.from_directory(tmp)


def _report(pretrainer, optimizer, scheduler, tokenizer, state, rank, metrics) -> None:
    with scratch_dir("ckpt") as tmp:  # removed even if this worker is killed mid-report
        ckpt = _save(tmp, pretrainer, optimizer, scheduler, tokenizer, state, metrics) if rank == 0 else None
        ray.train.report(metrics, checkpoint=ckpt)


def pretrain_loop_per_worker(loop_cfg: dict) -> None:
    """One data-parallel pretraining worker. ``loop_cfg``: ``cfg`` (the resolved run config),
    ``tokenizer`` (folder), ``vocab_size``, ``counts``, ``mlflow`` ({uri, run_id} or None)."""
    from safetensors.torch import load_file

    from date_core.training.engine import build_optimizer, schedule_from_config
    from date_core.inference import load_model
    from date_core.training.pretrain import HEADS_FILE, build_pretrainer, pretrain_step
    from date_core.text import load_tokenizer

    cfg, counts = loop_cfg["cfg"], loop_cfg["counts"]
    tcfg, rcfg = pretrain_train_config(cfg), cfg["runtime"]
    rank, world, device, autocast = worker_setup(tcfg, rcfg)

    spec = loop_cfg.get("mlflow") or {}
    model = init_model(cfg, loop_cfg["vocab_size"], cfg["model"].get("init_from"), spec.get("uri"))
    tokenizer = load_tokenizer(loop_cfg["tokenizer"])
    pretrainer, criterion = build_pretrainer(model, tokenizer, cfg["pretrain"])
    pretrainer.to(device)
    optimizer = build_optimizer(pretrainer.model, tcfg, extra_modules=[pretrainer.heads])
    plan = LoopPlan.from_config(tcfg, counts["train"], world)
    accum, total_steps, epochs = plan.grad_accum, plan.total_steps, plan.epochs
    scheduler = schedule_from_config(optimizer, tcfg, total_steps)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    start_step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with worker_checkpoint_dir(checkpoint) as ckpt_dir:
            pretrainer.model.load_state_dict(load_model(Path(ckpt_dir) / MODEL_DIR).state_dict())
            pretrainer.heads.load_state_dict(load_file(str(Path(ckpt_dir) / MODEL_DIR / HEADS_FILE)))
            saved = torch.load(Path(ckpt_dir) / TRAIN_STATE, map_location=device, weights_only=False)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state = {k: int(saved[k]) for k in state}
        start_step = state["step"]
        if rank == 0:
            print(f"[pretrain] resumed from checkpoint at step {start_step}", flush=True)
    # the grounding seeker never runs in pretraining: DDP must not wait for its gradients
    pretrainer = ray.train.torch.prepare_model(pretrainer, parallel_strategy_kwargs={"find_unused_parameters": True})
    tracker = _Tracker(loop_cfg.get("mlflow"), rank)
    generator = torch.Generator().manual_seed(int(tcfg["seed"]) * 1000 + rank + 7919 * start_step)
    train_shard = ray.train.get_dataset_shard("train")

    def step(batch, micro: int) -> dict[str, float]:
        return pretrain_step(pretrainer, criterion, batch, optimizer, scheduler, generator=generator,
                             grad_accum=accum, micro_step=micro, autocast_dtype=autocast, device=device)

    def progress(state: dict, logs: dict, rate: float) -> None:
        losses = " ".join(f"{k} {v:.3f}" for k, v in logs.items() if k.startswith("loss/"))
        print(eta_line("pretrain", state, total_steps, rate, losses), flush=True)

    def epoch_end(state: dict, metrics: dict) -> dict:
        if rank == 0:
            tracker.log(metrics, state["step"])
            print(f"[pretrain] epoch {state['epoch']}/{epochs} step {state['step']}/{total_steps}", flush=True)
        return metrics

    def save(state: dict, metrics: dict) -> None:
        _report(pretrainer, optimizer, scheduler, tokenizer, state, rank, metrics)

    run_epochs(train_shard, LoopHooks(step, progress, epoch_end, save), plan, state, start_step=start_step,
               rank=rank, tracker=tracker, prefix="pretrain",
               watch=lambda name, it: stream_watch(name, it, cfg["runtime"]))


# ----------------------------------------------------------------------------- driver
def run_pretrain(cfg: Mapping[str, Any], name: str, *, experiment_id: str, out_dir: str | Path,
                 register: bool = True) -> StageResult:
    """Pretrain as the Ray Train run ``name`` (same name = resume) logged to MLflow; the final
    model folder goes to ``out_dir/model`` (the caller owns ``out_dir``) and, with ``register``,
    becomes a new version of ``pretrain.registered_model``."""
    from date_core.model import resolve_model_config

    uri = tracking.tracking_uri()
    run_id, resumed = tracking.start_or_resume(experiment_id, name, STAGE, None, uri)
    tracking.log_config(run_id, cfg, uri)
    print(f"[{STAGE}] MLflow run {run_id} ({'resumed' if resumed else 'new'}) at {uri}", flush=True)
    try:
        tok = session.tokenizer_dir(cfg)
        vocab = session.vocab_size(tok)
        if cfg["model"].get("init_from"):  # pretraining may continue from other weights too
            tracking.log_init_source(run_id, cfg["model"]["init_from"], uri)
            init_model(cfg, vocab, cfg["model"]["init_from"], uri)
        model_cfg = resolve_model_config(cfg["model"]["preset"], **(cfg["model"].get("overrides") or {})).to_dict()
        with reserve_streams(cfg, ["train"]) as budgets:
            datasets, counts = make_pretrain_dataset(cfg, model_cfg, tok, budgets)
            print(f"[{STAGE}] image-caption pairs: {counts['train']} from "
                  + ", ".join(f"{d}/{s}" for d, s in pretrain_parts(cfg)) + f"; data stream {budgets.describe()}",
                  flush=True)
            loop_cfg = {"cfg": dict(cfg), "tokenizer": tok, "vocab_size": vocab, "counts": counts,
                        "mlflow": {"uri": uri, "run_id": run_id}}
            result = build_trainer(cfg, name, datasets, loop_cfg, loop=pretrain_loop_per_worker).fit()
        if result.checkpoint is None:
            raise RuntimeError(f"pretraining run {name} finished without a checkpoint")
    except BaseException:
        tracking.end_run(run_id, "FAILED", uri)
        raise
    model_dir = checkpoint_model_dir(result.checkpoint, Path(out_dir) / "model")
    metrics = dict(result.metrics or {})
    version = None
    if register:
        registered = cfg["pretrain"]["registered_model"]
        version = tracking.log_and_register(run_id, model_dir, registered, metrics, uri)
        print(f"[{STAGE}] registered {registered} version {version}", flush=True)
    tracking.end_run(run_id, "FINISHED", uri)
    return StageResult(run_id, model_dir, metrics, int(metrics.get("start_step", 0)), version)


__all__ = ["pretrain_parts", "make_pretrain_dataset", "pretrain_loop_per_worker", "run_pretrain"]
