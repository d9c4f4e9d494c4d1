"""One PG-DA round (or a supervised run): the round engine that the Ray workers and the
benchmark both drive.

A round is built from the run config alone (:meth:`RoundEngine.build`): the criterion of the
round's loss weights, the domain aligner when an alignment term is on, AdamW, the warm-up +
cosine schedule over the round's optimiser steps, the EMA teacher that follows the student and
is the round's output, the zoom-out and strong augmentations, and the round's clocks (the
optimiser steps done, which pin the GRL warm-up and the teacher's schedule). Every round starts
afresh from the previous round's output model: a new optimiser, schedule and teacher
(:func:`round_config` gives round ``r``'s config). Where batches come from is the caller's: Ray
Data shards in :mod:`date_core.runtime.trainer`; :func:`train_round` runs a whole round
in-process (the benchmarks: ``bench/pgda_ablation.py``, ``bench/real_groceries.py``) on
:class:`~date_core.data.shard.TableShard` s. No ray, no mlflow here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

from .selftrain import EMATeacher, adaptation_step, ema_decay_for, round_loss_weights, zoom_settings

if TYPE_CHECKING:
    import pyarrow as pa


def round_config(cfg: Mapping[str, Any], r: int):
    """Round ``r``'s (0-based) config: ``adapt.round_train`` overrides ``train`` from round 1 on
    (later rounds start from trained weights and usually need fewer steps), and the alignment
    weights are zero outside ``adapt.align_from_round`` .. ``align_until_round``
    (:func:`~date_core.adapt.selftrain.round_loss_weights`). A typed config in, a typed config out."""
    from date_core.config_types import to_dict, typed

    out = to_dict(cfg)
    if r > 0 and cfg["adapt"]["round_train"]:
        out["train"].update(dict(cfg["adapt"]["round_train"]))
    out["loss"] = round_loss_weights(cfg["loss"], cfg["adapt"], r)
    return typed(out)


def alignment_terms(cfg: Mapping[str, Any]) -> list[str]:
    """The alignment loss terms a (round's) config trains: those with a non-zero weight."""
    from date_core.training.losses import active_alignment_terms

    return active_alignment_terms(cfg["loss"])


@dataclass
class RoundEngine:
    """What one round trains with, and its step. ``model`` may be replaced by a DDP wrapper
    after :meth:`build` (the optimiser holds the same parameters)."""

    model: nn.Module
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    aligner: nn.Module | None
    teacher: EMATeacher | None
    total_steps: int
    grad_accum: int
    zoom: dict[str, Any] | None
    strong_aug: bool
    device: torch.device
    autocast_dtype: torch.dtype | None
    steps_done: int = 0

    @classmethod
    def build(cls, cfg: Mapping[str, Any], model: nn.Module, total_steps: int, *, target: bool, align: bool,
              device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None,
              gather: bool = True) -> "RoundEngine":
        """The round of ``cfg`` (a resolved config; :func:`round_config` for PG-DA round r) over
        ``total_steps`` optimiser steps, training ``model`` (moved to ``device``). ``target``:
        the round sees target batches (then an EMA teacher follows the student when
        ``adapt.teacher``); ``align``: build the aligner (its terms' weights come from
        ``cfg["loss"]``); ``gather``: contrastive negatives gathered across data-parallel ranks."""
        from date_core.training.engine import build_optimizer, schedule_from_config
        from date_core.training.losses import build_criterion

        tcfg, adapt = cfg["train"], cfg["adapt"]
        device = torch.device(device)
        criterion = build_criterion(cfg["loss"], gather=gather, pseudo_focus=adapt["pseudo_focus"])
        aligner = None
        if target and align:
            from .aligner import build_aligner_for_model

            aligner = build_aligner_for_model(adapt, model).to(device)
        model.to(device)
        optimizer = build_optimizer(model, tcfg, extra_modules=[aligner] if aligner is not None else ())
        scheduler = schedule_from_config(optimizer, tcfg, total_steps)
        teacher = EMATeacher(model, ema_decay_for(total_steps, adapt)) if target and adapt["teacher"] else None
        return cls(model=model, criterion=criterion, optimizer=optimizer, scheduler=scheduler, aligner=aligner,
                   teacher=teacher, total_steps=int(total_steps), grad_accum=int(tcfg["grad_accum"]),
                   zoom=zoom_settings(tcfg), strong_aug=bool(adapt["strong_aug"]), device=device,
                   autocast_dtype=autocast_dtype)

    def step(self, batch: Mapping[str, Any], target_batch: Mapping[str, Any] | None, micro_step: int) -> dict[str, float]:
        """One micro-step on a source ``batch`` (and a ``target_batch`` in a PG-DA round): the
        loss dict's logs, ``logs["stepped"]`` 1.0 when the optimiser stepped. The GRL warm-up
        follows the round's optimiser steps done (not micro-steps)."""
        logs = adaptation_step(self.model, self.criterion, batch, self.optimizer, self.scheduler,
                               target_batch=target_batch, aligner=self.aligner, teacher=self.teacher,
                               progress=self.steps_done / max(1, self.total_steps), grad_accum=self.grad_accum,
                               micro_step=micro_step, zoom_out=self.zoom, strong_aug=self.strong_aug,
                               autocast_dtype=self.autocast_dtype, device=self.device)
        if logs["stepped"]:
            self.steps_done += 1
        return logs

    @property
    def output(self) -> nn.Module:
        """The round's output model: the EMA teacher when there is one, else the student."""
        from date_core.model import unwrap

        return self.teacher.model if self.teacher is not None else unwrap(self.model)

    def state_dict(self) -> dict[str, Any]:
        """Optimiser, schedule, aligner, teacher and clock (the model is saved on its own)."""
        aligner = getattr(self.aligner, "module", self.aligner)  # DDP-wrapped discriminators
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "aligner": aligner.state_dict() if aligner is not None else None,
                "teacher": self.teacher.state_dict() if self.teacher is not None else None,
                "steps_done": self.steps_done}

    def load_state_dict(self, state: Mapping[str, Any], step: int | None = None) -> None:
        """Restore :meth:`state_dict`; ``step`` (a checkpoint's optimiser step) sets the clock
        where the state predates ``steps_done``."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        aligner = getattr(self.aligner, "module", self.aligner)
        if aligner is not None and state.get("aligner"):
            aligner.load_state_dict(state["aligner"])
        if self.teacher is not None and state.get("teacher"):
            self.teacher.load_state_dict(state["teacher"])
        self.steps_done = int(state.get("steps_done", step or 0))


def train_round(rc: Mapping[str, Any], vocab: int, source: "pa.Table", target: "pa.Table | None", tok: Any, *,
                init: nn.Module | None = None, labels: "pa.Table | None" = None, device: torch.device | str = "cpu",
                amp: torch.dtype | None = None, on_step: Callable[[RoundEngine, dict], None] | None = None,
                progress: Callable[[dict, dict], None] | None = None) -> RoundEngine:
    """One round exactly as a Ray Train worker of rank 0 runs it, fed in-process (no Ray): seed, the
    model of ``rc`` (``init``'s weights loaded into it: the previous round's output, as the
    next pipeline round loads the saved teacher), the round's engine, the worker-loop skeleton
    over ``source`` with ``target`` (its pseudo boxes joined from ``labels``) cycled beneath.
    ``on_step(engine, logs)`` after every micro-step; ``progress(state, logs)`` at a third of
    the round. Returns the engine (``engine.output``: the round's output model)."""
    import dataclasses

    from date_core import build_model
    from date_core.data.shard import TableShard
    from date_core.data.transforms import BatchTransform
    from date_core.training.loop import LoopHooks, LoopPlan, cycle_batches, run_epochs
    from .pseudo import join_pseudo, pseudo_lookup

    tcfg = rc["train"]
    # the worker's plan; progress lines at each third, no checkpoints (a round here is one process)
    plan = LoopPlan.from_config(tcfg, source.num_rows)
    total = plan.total_steps
    plan = dataclasses.replace(plan, log_every=max(1, total // 3), checkpoint_every=total + 1)
    torch.manual_seed(int(tcfg["seed"]))  # a worker of rank 0 seeds each round's run
    model = build_model(rc["model"]["preset"], vocab_size=vocab, **dict(rc["model"]["overrides"]))
    if init is not None:
        model.load_state_dict(init.state_dict())
    engine = RoundEngine.build(rc, model, total, target=target is not None, align=bool(alignment_terms(rc)), device=device,
                               autocast_dtype=amp, gather=False)
    size, max_len, augment = model.config.image_size, model.config.max_text_len, bool(tcfg["augment"])
    seed, bs = plan.seed, plan.batch_size
    # own call counters: a run's augmentations do not depend on the runs before it in this process
    src = TableShard(source, BatchTransform(tok, size, max_len, train=augment, seed=seed, own_counter=True))
    tgt_iter = None
    if target is not None:
        lookup = pseudo_lookup(labels) if labels is not None else None
        tgt = TableShard(target, BatchTransform(tok, size, max_len, train=augment, seed=seed + 1, own_counter=True),
                         rows_fn=(lambda rows: join_pseudo(rows, lookup)) if lookup is not None else None)
        tgt_iter = cycle_batches(lambda: tgt.iter_torch_batches(batch_size=bs, drop_last=True))

    def step(batch, micro):
        logs = engine.step(batch, next(tgt_iter) if tgt_iter is not None else None, micro)
        if on_step is not None:
            on_step(engine, logs)
        return logs

    hooks = LoopHooks(step, lambda state, logs, rate: progress and progress(state, logs), lambda st, m: m,
                      lambda st, m: None)
    run_epochs(src, hooks, plan, {"step": 0, "epoch": 0, "batch_in_epoch": 0}, start_step=0, rank=0,
               tracker=_NoTracker(), prefix="train", watch=lambda name, it: it)
    return engine


class _NoTracker:
    def log(self, metrics: Mapping[str, Any], step: int) -> None:  # in-process: the caller keeps its record
        pass


__all__ = ["RoundEngine", "alignment_terms", "round_config", "train_round"]
