"""The skeleton that every Ray Train worker loop shares: supervised training and PG-DA rounds
(:mod:`date_core.runtime.trainer`) and pretraining (:mod:`date_core.runtime.pretraining`); the
PG-DA benchmark runs its rounds through it too, on in-process shards
(:class:`date_core.data.shard.TableShard`). No ray here: a shard is anything with Ray Data's
``iter_torch_batches``.

It walks the epochs over the worker's ``train`` shard from a resumed position (skipping the
batches the epoch already trained on), counts micro-steps for gradient accumulation, measures
throughput, prints progress and logs to MLflow on rank 0, and reports a checkpoint every
``checkpoint_every`` optimiser steps and at each epoch end. A loop supplies what differs as
hooks: its step, its progress line, its epoch-end evaluation and its save.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch

Batch = Mapping[str, torch.Tensor]


@dataclass
class LoopHooks:
    """What a worker loop does at each point of the skeleton.

    - ``step(batch, micro_step) -> logs``: one micro-step; ``logs["stepped"]`` is 1.0 when the
      optimiser stepped (every ``grad_accum`` micro-steps).
    - ``progress(state, logs, rate)``: rank 0's progress line (``rate``: optimiser steps/s).
    - ``epoch_end(state, metrics) -> metrics``: after each epoch, on every rank (evaluate on
      rank 0 and log there); returns the metrics to report.
    - ``save(state, metrics)``: report ``metrics`` with a checkpoint (every rank: a barrier).
    """

    step: Callable[[Batch, int], dict[str, float]]
    progress: Callable[[dict, dict[str, float], float], None]
    epoch_end: Callable[[dict, dict[str, Any]], dict[str, Any]]
    save: Callable[[dict, dict[str, Any]], None]


@dataclass
class LoopPlan:
    """The run's shape: ``total_steps`` optimiser steps in epochs of ``steps_per_epoch``;
    ``batch_size`` pairs per micro-step, ``grad_accum`` micro-steps per optimiser step;
    ``shuffle``: a local shuffle buffer of 4 batches, seeded per epoch (``train.shuffle``)."""

    total_steps: int
    steps_per_epoch: int
    epochs: int
    batch_size: int
    grad_accum: int
    seed: int
    log_every: int
    checkpoint_every: int
    shuffle: bool = True

    @classmethod
    def from_config(cls, cfg_train: Mapping[str, Any], n_train: int, world: int = 1) -> "LoopPlan":
        """The plan of a ``train:`` section over ``n_train`` source pairs on ``world``
        data-parallel workers: ``max_steps`` when set, else ``epochs`` epochs of
        ``n_train // world // batch_size // grad_accum`` optimiser steps."""
        bs, accum = int(cfg_train["batch_size"]), int(cfg_train["grad_accum"])
        per_epoch = max(1, int(n_train) // max(1, world) // bs // accum)
        total = int(cfg_train["max_steps"] or per_epoch * int(cfg_train["epochs"]))
        return cls(total, per_epoch, -(-total // per_epoch), bs, accum, int(cfg_train["seed"]),
                   int(cfg_train["log_every"]), int(cfg_train["checkpoint_every"]), bool(cfg_train["shuffle"]))


def run_epochs(shard: Any, hooks: LoopHooks, plan: LoopPlan, state: dict[str, int], *, start_step: int,
               rank: int, tracker: Any, prefix: str, watch: Callable[[str, Any], Any]) -> None:
    """Train from ``state`` (``step``, ``epoch``, ``batch_in_epoch``; updated in place) to
    ``plan.total_steps``. ``shard``: this worker's Ray Data shard; ``watch(stream, batches)``
    puts an iterator under the stall watchdog; ``tracker.log(metrics, step)`` logs to MLflow;
    logged keys are ``<prefix>/<name>``."""
    t0 = t_first = time.time()
    last_log: dict[str, float] = {}
    micro = 0
    bs = plan.batch_size
    while state["step"] < plan.total_steps:
        skip = state["batch_in_epoch"]
        batches = watch("train", shard.iter_torch_batches(
            batch_size=bs, drop_last=True, local_shuffle_buffer_size=4 * bs if plan.shuffle else None,
            local_shuffle_seed=plan.seed + state["epoch"]))
        for i, batch in enumerate(batches):
            if i < skip:  # data position: the batches this epoch already trained on
                continue
            if state["batch_in_epoch"] >= plan.steps_per_epoch * plan.grad_accum or state["step"] >= plan.total_steps:
                break
            logs = hooks.step(batch, micro)
            micro += 1
            if micro == 1:  # throughput clock starts after the first batch (startup, warm-up)
                t_first = time.time()
            state["batch_in_epoch"] += 1
            if not logs["stepped"]:
                continue
            state["step"] += 1
            last_log = {f"{prefix}/{k}": v for k, v in logs.items() if k != "stepped"}
            if micro > 1:  # pairs per second of this worker since its first batch
                last_log[f"{prefix}/samples_per_s"] = (micro - 1) * bs / max(time.time() - t_first, 1e-9)
            if rank == 0 and state["step"] % plan.log_every == 0:
                tracker.log(last_log, state["step"])
                hooks.progress(state, logs, (state["step"] - start_step) / max(1e-6, time.time() - t0))
            if state["step"] % plan.checkpoint_every == 0 and state["step"] < plan.total_steps:
                hooks.save(state, {**last_log, "step": state["step"], "start_step": start_step})
        state["epoch"] += 1
        state["batch_in_epoch"] = 0
        metrics = hooks.epoch_end(state, {**last_log, "step": state["step"], "epoch": state["epoch"],
                                          "start_step": start_step})
        hooks.save(state, metrics)
        if state["epoch"] >= plan.epochs:
            break


def cycle_batches(make_iter: Callable[[], Any]) -> Any:
    """Endless iterator over a re-creatable iterable: the target shard is cycled under the
    source. An empty shard raises instead of spinning."""
    while True:
        empty = True
        for item in make_iter():
            empty = False
            yield item
        if empty:
            raise RuntimeError("the target dataset shard is empty")


def eta_line(tag: str, state: dict, total_steps: int, rate: float, fields: str) -> str:
    """``[tag] step S/T <fields> R steps/s ETA M min``: the progress line of every loop."""
    eta = (total_steps - state["step"]) / max(rate, 1e-6)
    return f"[{tag}] step {state['step']}/{total_steps} {fields} {rate:.2f} steps/s ETA {eta / 60:.1f} min"


__all__ = ["LoopHooks", "LoopPlan", "cycle_batches", "eta_line", "run_epochs"]
