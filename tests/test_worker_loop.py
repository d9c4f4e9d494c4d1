"""The worker-loop skeleton shared by the Ray Train loops (:mod:`date_core.training.loop`), run
on a stand-in shard: it resumes at the saved data position, steps the optimiser every
``grad_accum`` micro-steps, checkpoints on cadence and at each epoch end, and stops at
``total_steps``."""
from __future__ import annotations

import pytest

from date_core.training.loop import LoopHooks, LoopPlan, run_epochs


class Shard:
    """``iter_torch_batches`` over ``n`` numbered batches (the seed is recorded per epoch)."""

    def __init__(self, n: int):
        self.n, self.seeds = n, []

    def iter_torch_batches(self, *, batch_size, drop_last, local_shuffle_buffer_size, local_shuffle_seed):
        self.seeds.append(local_shuffle_seed)
        return iter([{"i": i} for i in range(self.n)])


class Tracker:
    def __init__(self):
        self.logged = []

    def log(self, metrics, step):
        self.logged.append(step)


def _run(state, *, accum=2, total=5, per_epoch=3, epochs=2, checkpoint_every=2, n=6):
    seen, saves, progress, watched = [], [], [], []

    def step(batch, micro):
        seen.append(batch["i"])
        return {"loss/total": 1.0, "stepped": float((micro + 1) % accum == 0)}

    hooks = LoopHooks(step=step, progress=lambda st, logs, rate: progress.append(st["step"]),
                      epoch_end=lambda st, m: {**m, "val": 1.0},
                      save=lambda st, m: saves.append((st["step"], st["epoch"], "val" in m)))
    plan = LoopPlan(total_steps=total, steps_per_epoch=per_epoch, epochs=epochs, batch_size=4, grad_accum=accum,
                    seed=10, log_every=1, checkpoint_every=checkpoint_every)
    shard, tracker = Shard(n), Tracker()
    run_epochs(shard, hooks, plan, state, start_step=state["step"], rank=0, tracker=tracker, prefix="train",
               watch=lambda name, it: watched.append(name) or it)
    return seen, saves, progress, shard.seeds, watched


def test_epochs_accumulation_checkpoints_and_the_stop():
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    seen, saves, progress, seeds, watched = _run(state)
    # epoch 1: 3 optimiser steps of 2 micro-steps each (batches 0-5); epoch 2 stops at step 5
    assert seen == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert state == {"step": 5, "epoch": 2, "batch_in_epoch": 0}
    # cadence checkpoints at steps 2 and 4 (not at the last step), and one at each epoch end
    assert saves == [(2, 0, False), (3, 1, True), (4, 1, False), (5, 2, True)]
    assert progress == [1, 2, 3, 4, 5] and seeds == [10, 11] and watched == ["train", "train"]


def test_a_resumed_run_skips_the_batches_its_epoch_already_trained_on():
    state = {"step": 4, "epoch": 1, "batch_in_epoch": 2}  # saved after 1 step of epoch 2
    seen, saves, _, seeds, _ = _run(state)
    assert seen == [2, 3] and state["step"] == 5 and seeds == [11]
    assert saves == [(5, 2, True)]


@pytest.mark.parametrize("accum", [1, 3])
def test_micro_steps_per_optimiser_step(accum):
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    seen, *_ = _run(state, accum=accum, total=2, per_epoch=2, epochs=1, checkpoint_every=100, n=8)
    assert len(seen) == 2 * accum and state["step"] == 2
