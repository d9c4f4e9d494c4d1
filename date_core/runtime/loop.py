"""The skeleton that every Ray Train worker loop shares: supervised training and PG-DA rounds
(:mod:`date_core.runtime.trainer`) and pretraining (:mod:`date_core.runtime.pretraining`).

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
    ``batch_size`` pairs per micro-step, ``grad_accum`` micro-steps per optimiser step."""

    total_steps: int
    steps_per_epoch: int
    epochs: int
    batch_size: int
    grad_accum: int
    seed: int
    log_every: int
    checkpoint_every: int


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
            batch_size=bs, drop_last=True, local_shuffle_buffer_size=4 * bs,
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


def eta_line(tag: str, state: dict, total_steps: int, rate: float, fields: str) -> str:
    """``[tag] step S/T <fields> R steps/s ETA M min``: the progress line of every loop."""
    eta = (total_steps - state["step"]) / max(rate, 1e-6)
    return f"[{tag}] step {state['step']}/{total_steps} {fields} {rate:.2f} steps/s ETA {eta / 60:.1f} min"


__all__ = ["LoopHooks", "LoopPlan", "eta_line", "run_epochs"]
