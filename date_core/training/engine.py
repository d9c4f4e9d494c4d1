"""The plain single-process PyTorch training loop, in separately callable pieces.

The unit tests, the benchmark baseline and the distributed trainer's per-worker loop
(``date_core.runtime``) all call these functions, so the training logic exists once:

- :func:`build_optimizer`, :func:`build_scheduler` (linear warm-up then cosine),
- :func:`train_step` (source batch, optional target batch and aligner, gradient accumulation),
- :func:`evaluate` (all PR and PG metrics over an iterable of batches),
- :func:`fit` (a simple epoch loop for tests and benchmarks).

Batches are dicts with the keys of :mod:`date_core.batch` (torch tensors or numpy arrays).
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from date_core import batch as B
from date_core.config import config_section
from date_core.training.losses import DateCriterion
from date_core.evaluation.metrics import PG_NAMES, dedupe_gallery, grounding_metrics, retrieval_metrics
from date_core.model import unwrap

Batch = Mapping[str, Any]
Aligner = Callable[[dict, dict], dict]

# parameters that must not be shrunk by weight decay (AdamW): biases, norms, embeddings,
# learned tokens and the temperature
_NO_DECAY_HINTS = ("bias", "norm", "embeddings", "semantic_tokens", "reg_token", "type_",
                   "log_logit_scale", "cls_token", "position")


def build_optimizer(model: nn.Module, cfg_train: Mapping[str, Any],
                    extra_modules: Iterable[nn.Module] = ()) -> torch.optim.Optimizer:
    """AdamW over the model (and e.g. a domain discriminator in ``extra_modules``).

    ``cfg_train``: the ``train:`` config section, or part of it (the rest from ``default.yaml``);
    reads ``lr``, ``weight_decay``, ``betas`` and ``encoder_lr_mult`` (learning-rate factor for
    the two encoders, useful with pretrained ones).
    """
    cfg_train = config_section("train", cfg_train)  # a key not given takes default.yaml's value
    lr = float(cfg_train["lr"])
    wd = float(cfg_train["weight_decay"])
    enc_mult = float(cfg_train["encoder_lr_mult"])
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    seen: set[int] = set()
    modules = [("", model), *((f"extra{i}.", m) for i, m in enumerate(extra_modules))]
    for prefix, module in modules:
        for name, param in module.named_parameters():
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            full = prefix + name
            no_decay = param.dim() < 2 or any(h in full for h in _NO_DECAY_HINTS)
            is_encoder = ".backbone." in f".{full}" or full.split(".")[0] in ("vision", "text")
            groups.setdefault((no_decay, is_encoder), []).append(param)
    param_groups = [
        {"params": params, "weight_decay": 0.0 if no_decay else wd,
         "lr": lr * (enc_mult if is_encoder else 1.0)}
        for (no_decay, is_encoder), params in groups.items()
    ]
    betas = tuple(cfg_train["betas"])
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, weight_decay=wd)


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float = 0.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``
    at ``total_steps`` (stepped once per optimiser step)."""
    warmup_steps, total_steps = max(0, int(warmup_steps)), max(1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def schedule_from_config(optimizer: torch.optim.Optimizer, cfg_train: Mapping[str, Any],
                         total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``train:`` section's schedule over ``total_steps`` optimiser steps: ``warmup_steps``
    (at most a fifth of the run, so that a short run, e.g. a later PG-DA round, still decays),
    then cosine decay to ``min_lr_ratio * lr``. Every training loop builds its schedule here."""
    cfg_train = config_section("train", cfg_train)
    total_steps = max(1, int(total_steps))
    warmup = min(int(cfg_train["warmup_steps"]), total_steps // 5)
    return build_scheduler(optimizer, warmup, total_steps, float(cfg_train["min_lr_ratio"]))


def to_device(batch: Batch, device: str | torch.device) -> dict[str, Tensor]:
    """Every array of a batch as a tensor on ``device`` (numpy from Ray Data is accepted)."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            value = torch.from_numpy(value)
        if isinstance(value, Tensor):
            out[key] = value.to(device, non_blocking=True)
    return out


def _forward(model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return model(batch[B.PIXEL_VALUES], batch[B.INPUT_IDS], batch[B.ATTENTION_MASK])


#: ``train.precision`` values: ``auto`` = bf16 autocast on a GPU, float32 on a CPU; ``bf16`` = bf16
#: autocast on either; ``fp32`` = never. Master weights and optimiser state stay float32 always.
PRECISIONS = ("auto", "bf16", "fp32")


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU multiplies bfloat16 in hardware (``amx_bf16`` or ``avx512_bf16`` in
    ``/proc/cpuinfo``'s flags). Without either, oneDNN emulates bf16 and it runs slower than float32."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                cpuinfo = fh.read()
        except OSError:
            return False
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def autocast_dtype(device: str | torch.device, precision: str = "auto") -> torch.dtype | None:
    """The autocast dtype of a training step on ``device`` under ``train.precision`` (see
    :data:`PRECISIONS`): ``torch.bfloat16`` or None (float32). ``bf16`` on a CPU without native
    bf16 still runs bf16 (it was asked for) but warns that it will be slower than float32."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown train.precision {precision!r}; choose one of {PRECISIONS}")
    kind = torch.device(device).type
    if precision == "fp32" or (precision == "auto" and kind != "cuda"):
        return None
    if kind == "cpu" and not cpu_has_native_bf16():
        import warnings

        warnings.warn("train.precision=bf16 on a CPU without AMX-BF16 or AVX512-BF16: bfloat16 is emulated "
                      "there and runs slower than float32", RuntimeWarning, stacklevel=2)
    return torch.bfloat16


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def train_step(model: nn.Module, criterion: DateCriterion, batch: Batch, optimizer: torch.optim.Optimizer,
               scheduler: Any = None, *, target_batch: Batch | None = None, aligner: Aligner | None = None,
               grad_accum: int = 1, micro_step: int = 0, autocast_dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", max_grad_norm: float | None = 1.0) -> dict[str, float]:
    """One micro-step: forward, loss, backward; the optimiser steps every ``grad_accum`` micro-steps.

    Loss = criterion on the source ``batch``; plus, with ``target_batch``, the criterion on the
    target in pseudo mode (retrieval always; ``pseudo_box_*`` terms only where ``has_box``,
    weighted per pair by ``box_weight``; no confidence term);
    plus, with ``aligner``, ``aligner(source_outputs, target_outputs)`` -> named terms weighted
    by ``criterion.weights``. Returns floats: ``loss/<term>`` (source), ``loss/target/<term>``,
    ``loss/<alignment term>``, ``loss/total`` and ``lr``; ``stepped`` is 1.0 when the optimiser
    stepped. Under DDP the gradient all-reduce is skipped on the micro-steps that do not step.
    """
    if grad_accum < 1:
        raise ValueError("grad_accum must be >= 1")
    if aligner is not None and target_batch is None:
        raise ValueError("an aligner needs a target_batch")
    device = torch.device(device)
    model.train()
    stepping = (micro_step + 1) % grad_accum == 0
    sync = contextlib.nullcontext() if stepping or not hasattr(model, "no_sync") else model.no_sync()
    logs: dict[str, float] = {}
    with sync:
        with _autocast(device, autocast_dtype):
            src = to_device(batch, device)
            src_out = _forward(model, src)
            terms = criterion(src_out, src)
            total = criterion.total(terms)
            logs.update({f"loss/{k}": float(v.detach()) for k, v in terms.items()})
            if target_batch is not None:
                tgt = to_device(target_batch, device)
                tgt_out = _forward(model, tgt)
                # target boxes are pseudo boxes: their own weights, never the confidence head
                tgt_terms = criterion(tgt_out, tgt, pseudo=True)
                total = total + criterion.total(tgt_terms)
                logs.update({f"loss/target/{k}": float(v.detach()) for k, v in tgt_terms.items()})
                if aligner is not None:
                    align_terms = aligner(src_out, tgt_out)
                    total = total + criterion.total(align_terms)
                    logs.update({f"loss/{k}": float(v.detach()) for k, v in align_terms.items()})
        if not torch.isfinite(total):
            raise FloatingPointError(f"non-finite loss {float(total)}; terms: {logs}")
        (total / grad_accum).backward()
    logs["loss/total"] = float(total.detach())
    logs.update(optimizer_update(optimizer, scheduler, stepping, max_grad_norm))
    return logs


def optimizer_update(optimizer: torch.optim.Optimizer, scheduler: Any, stepping: bool,
                     max_grad_norm: float | None) -> dict[str, float]:
    """After a micro-step's backward: on a stepping micro-step clip, step, zero the gradients
    and advance the schedule. Returns ``lr``, ``stepped`` and (when clipped) ``grad_norm``;
    every training step of the library (supervised, pretraining) ends with it."""
    logs: dict[str, float] = {}
    if stepping:
        if max_grad_norm is not None:
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
    # the peak rate (the heads'); the encoders' groups run at encoder_lr_mult of it
    logs["lr"] = max(float(g["lr"]) for g in optimizer.param_groups)
    logs["stepped"] = 1.0 if stepping else 0.0
    return logs


@torch.no_grad()
def predict(model: nn.Module, batches: Iterable[Batch], device: str | torch.device = "cpu",
            autocast_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Run the model over batches and collect, on CPU: ``image_emb``, ``query_emb``,
    ``pred_boxes``, ``pred_conf`` and the batch keys that evaluation needs."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    keep = (B.ITEM_KEY, B.IMAGE_KEY, B.PAIR_KEY, B.BOXES, B.HAS_BOX, B.ALT_BOXES, B.ALT_MASK)
    cols: dict[str, list[Tensor]] = {}
    try:
        for batch in batches:
            tensors = to_device(batch, device)
            with _autocast(device, autocast_dtype):
                out = _forward(model, tensors)
            for key in ("image_emb", "query_emb", "pred_boxes", "pred_conf"):
                cols.setdefault(key, []).append(out[key].float().cpu())
            for key in keep:
                if key in tensors:
                    cols.setdefault(key, []).append(tensors[key].cpu())
    finally:
        model.train(was_training)
    if not cols:
        raise ValueError("evaluate/predict got no batches")
    return {k: torch.cat(v) for k, v in cols.items()}


def pair_ious(pred: Mapping[str, Tensor]) -> dict[str, list]:
    """Per pair with a box, from :func:`predict`'s output: ``pair_key`` and the IoU of the
    predicted box with its best-matching answer (the one ``pg/acc@t`` thresholds), for paired
    bootstrap intervals over pairs and seeds."""
    from date_core.boxes import best_match_iou

    has = pred.get(B.HAS_BOX, torch.ones(pred["pred_boxes"].shape[0])).bool()
    alt = pred[B.ALT_BOXES][has] if B.ALT_BOXES in pred else None
    mask = pred[B.ALT_MASK][has].bool() if B.ALT_MASK in pred else None
    iou, _ = best_match_iou(pred["pred_boxes"][has].float(), pred[B.BOXES][has].float(), alt, mask)
    return {"pair_key": pred[B.PAIR_KEY][has].tolist(), "iou": [round(float(v), 5) for v in iou]}


def metrics_from_predictions(pred: Mapping[str, Tensor], chunk: int = 8192) -> dict[str, float]:
    """All PR and PG metrics from :func:`predict`'s output.

    PR: every query against the gallery of unique images (by ``image_key``; without it every
    row is its own image), relevance = same ``item_key`` (without it, the pair's own image).
    PG: over rows with ``has_box`` (PG metrics are NaN when there are none).
    """
    n = pred["query_emb"].shape[0]
    image_key = pred.get(B.IMAGE_KEY, torch.arange(n))
    item_key = pred.get(B.ITEM_KEY, image_key)
    g_emb, _, g_item = dedupe_gallery(pred["image_emb"], image_key, item_key)
    out = retrieval_metrics(pred["query_emb"], item_key, g_emb, g_item, chunk=chunk)
    if B.BOXES in pred:
        has = pred.get(B.HAS_BOX, torch.ones(n)).bool()
        alt = pred[B.ALT_BOXES][has] if B.ALT_BOXES in pred else None
        mask = pred[B.ALT_MASK][has] if B.ALT_MASK in pred else None
        out.update(grounding_metrics(pred["pred_boxes"][has], pred[B.BOXES][has], alt, mask))
    else:
        out.update({name: float("nan") for name in PG_NAMES})
        out["pg/n_boxes"] = 0.0
    return out


def evaluate(model: nn.Module, batches: Iterable[Batch], device: str | torch.device = "cpu",
             autocast_dtype: torch.dtype | None = None, chunk: int = 8192) -> dict[str, float]:
    """All PR and PG metrics (``pr/R@1`` ... ``pg/acc@0.7``, plus counts) over ``batches``
    (any iterable: a DataLoader, a list of batches collected from a Ray Data iterator)."""
    return metrics_from_predictions(predict(model, batches, device, autocast_dtype), chunk=chunk)


def fit(model: nn.Module, train_batches_factory: Callable[[], Iterable[Batch]], *,
        criterion: DateCriterion | None = None, cfg_train: Mapping[str, Any] | None = None,
        epochs: int = 1, max_steps: int | None = None, eval_batches_factory: Callable[[], Iterable[Batch]] | None = None,
        eval_every: int | None = None, device: str | torch.device = "cpu",
        autocast_dtype: torch.dtype | None = None, time_budget_s: float | None = None,
        callback: Callable[[int, dict[str, float]], None] | None = None) -> list[dict[str, float]]:
    """A simple epoch loop for tests and benchmarks; returns the history of logged dicts.

    ``train_batches_factory()`` gives one epoch's batches. Evaluation runs every ``eval_every``
    optimiser steps and at the end (when ``eval_batches_factory`` is given); its metrics are
    logged under ``val/...`` with ``step`` and ``elapsed_s``. Stops at ``max_steps`` or after
    ``time_budget_s`` seconds of wall clock, whichever comes first.
    """
    cfg_train = config_section("train", cfg_train)
    criterion = criterion or DateCriterion()
    grad_accum = int(cfg_train["grad_accum"])
    model.to(device)
    optimizer = build_optimizer(model, cfg_train)
    if max_steps is None:
        first = train_batches_factory()
        n_batches = len(first) if hasattr(first, "__len__") else sum(1 for _ in first)
        max_steps = max(1, epochs * n_batches // grad_accum)
    scheduler = schedule_from_config(optimizer, cfg_train, max_steps)
    history: list[dict[str, float]] = []
    start, step, micro = time.perf_counter(), 0, 0

    def run_eval() -> None:
        metrics = evaluate(model, eval_batches_factory(), device=device, autocast_dtype=autocast_dtype)
        entry = {f"val/{k}": v for k, v in metrics.items()}
        entry.update(step=float(step), elapsed_s=time.perf_counter() - start)
        history.append(entry)
        if callback:
            callback(step, entry)

    done = False
    while not done:
        n_seen = 0
        for batch in train_batches_factory():
            n_seen += 1
            logs = train_step(model, criterion, batch, optimizer, scheduler, grad_accum=grad_accum,
                              micro_step=micro, autocast_dtype=autocast_dtype, device=device)
            micro += 1
            if logs["stepped"]:
                step += 1
                logs.update(step=float(step), elapsed_s=time.perf_counter() - start)
                history.append(logs)
                if callback:
                    callback(step, logs)
                if eval_batches_factory is not None and eval_every and step % eval_every == 0:
                    run_eval()
            over_time = time_budget_s is not None and time.perf_counter() - start > time_budget_s
            if step >= max_steps or over_time:
                done = True
                break
        if n_seen == 0:
            raise ValueError("train_batches_factory() gave no batches")
    if eval_batches_factory is not None and not (eval_every and step % eval_every == 0 and step > 0):
        run_eval()
    return history
