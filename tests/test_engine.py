"""The plain training loop's pieces: train_step (source, target, aligner, accumulation),
optimiser and scheduler, evaluate on numpy batches, fit."""
from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch

from date_core import batch as B
from date_core import build_model
from date_core.training.engine import (autocast_dtype, build_optimizer, build_scheduler, cpu_has_native_bf16, evaluate, fit,
                              train_step)
from date_core.training.losses import DateCriterion

from _model_synth import overfit_pairs, random_scene_rows, rows_to_batch, tokenizer_for


@pytest.fixture(scope="module")
def data():
    rows = overfit_pairs(n_images=4, seed=1)
    tok = tokenizer_for(rows)
    return tok, rows_to_batch(rows, tok, max_len=8)


def _model(tok, seed=0):
    torch.manual_seed(seed)
    return build_model("tiny", vocab_size=len(tok), max_text_len=8, vision_layers=1, text_layers=1,
                       fusion_layers=1)


def test_target_batch_and_aligner_terms_are_added_with_their_weights(data):
    tok, src = data
    tgt = dict(src)
    tgt[B.HAS_BOX] = torch.tensor([1.0, 0.0] * 4)      # half the target pairs carry pseudo boxes
    tgt[B.BOX_WEIGHT] = torch.full((8,), 0.5)
    seen = {}

    def aligner(s_out, t_out):
        seen.update(s=s_out, t=t_out)
        return {"align_conditional": (s_out["fused"].mean(0) - t_out["fused"].mean(0)).pow(2).sum() + 1.0}

    model = _model(tok)
    crit = DateCriterion({"align_conditional": 0.25})
    opt = build_optimizer(model, {"lr": 1e-3})
    logs = train_step(model, crit, src, opt, target_batch=tgt, aligner=aligner)
    assert {"fused", "image_tokens", "query_tokens"} <= set(seen["s"]) and seen["t"]["fused"].shape[0] == 8
    w = crit.weights
    supervised = ("retrieval", "box_l1", "box_giou", "confidence", "box_focus")
    src_total = sum(w[k] * logs[f"loss/{k}"] for k in supervised)
    # target boxes are pseudo boxes: their own weights, and no confidence term
    pseudo = ("retrieval", "pseudo_box_l1", "pseudo_box_giou", "pseudo_box_focus")
    assert "loss/target/confidence" not in logs
    tgt_total = sum(w[k] * logs[f"loss/target/{k}"] for k in pseudo)
    assert logs["loss/total"] == pytest.approx(src_total + tgt_total + 0.25 * logs["loss/align_conditional"], rel=1e-5)
    assert logs["loss/target/pseudo_box_l1"] != pytest.approx(logs["loss/box_l1"])  # per-pair box weights applied
    assert logs["stepped"] == 1.0 and logs["lr"] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="target_batch"):
        train_step(model, crit, src, opt, aligner=aligner)


def _halves(batch):
    return ({k: v[:4] for k, v in batch.items()}, {k: v[4:] for k, v in batch.items()})


def test_gradient_accumulation_steps_every_n_and_matches_the_full_batch(data):
    tok, batch = data
    crit = DateCriterion({"retrieval": 0.0, "confidence": 0.0})  # per-pair terms only: halves average exactly
    full, accum = _model(tok), None
    accum = copy.deepcopy(full)
    opt_full = torch.optim.SGD(full.parameters(), lr=0.5)
    opt_acc = torch.optim.SGD(accum.parameters(), lr=0.5)
    sched = build_scheduler(opt_acc, 0, 10)
    train_step(full, crit, batch, opt_full, max_grad_norm=None)

    before = [p.detach().clone() for p in accum.parameters()]
    first, second = _halves(batch)
    logs = train_step(accum, crit, first, opt_acc, sched, grad_accum=2, micro_step=0, max_grad_norm=None)
    assert logs["stepped"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, accum.parameters()))  # no step yet
    assert any(p.grad is not None for p in accum.parameters())
    logs = train_step(accum, crit, second, opt_acc, sched, grad_accum=2, micro_step=1, max_grad_norm=None)
    assert logs["stepped"] == 1.0 and all(p.grad is None for p in accum.parameters())
    assert sched.last_epoch == 1  # the scheduler counts optimiser steps, not micro-steps
    for (name, a), b in zip(full.named_parameters(), accum.parameters()):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)


def test_scheduler_warms_up_linearly_then_decays_by_cosine():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[9] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[14] == pytest.approx(0.1) and lrs[15] == pytest.approx(0.1)


def test_optimizer_groups_exclude_norms_and_biases_from_decay_and_take_extra_modules(data):
    tok, _ = data
    model = _model(tok)
    disc = torch.nn.Linear(4, 1)
    opt = build_optimizer(model, {"lr": 1e-3, "weight_decay": 0.1, "encoder_lr_mult": 0.5}, extra_modules=[disc])
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert decay_of[id(disc.weight)] == 0.1 and decay_of[id(disc.bias)] == 0.0
    assert decay_of[id(model.grounding.norm.weight)] == 0.0
    assert decay_of[id(model.retrieval.log_logit_scale)] == 0.0
    assert lr_of[id(model.text.backbone.encoder.layer[0].attention.self.query.weight)] == pytest.approx(5e-4)
    assert lr_of[id(model.grounding.patch_score.weight)] == pytest.approx(1e-3)
    n_params = sum(1 for _ in model.parameters()) + 2
    assert len(decay_of) == n_params


def test_evaluate_accepts_numpy_batches_like_ray_data(data):
    tok, batch = data
    model = _model(tok)
    as_torch = evaluate(model, [batch])
    halves = [{k: v.numpy() for k, v in h.items()} for h in _halves(batch)]
    as_numpy = evaluate(model, halves)
    for name in ("pr/R@1", "pr/mAP@10", "pg/mIoU", "pg/acc@0.5"):
        assert as_numpy[name] == pytest.approx(as_torch[name], abs=1e-6)
    assert as_torch["pr/n_gallery"] == 4 and as_torch["pr/n_queries"] == 8
    # unannotated data: PR is still measured, PG is NaN
    unlabelled = dict(batch)
    unlabelled[B.HAS_BOX] = torch.zeros(8)
    m = evaluate(model, [unlabelled])
    assert math.isnan(m["pg/acc@0.5"]) and not math.isnan(m["pr/R@1"])
    with pytest.raises(ValueError, match="no batches"):
        evaluate(model, [])


def test_fit_runs_steps_and_evaluates(data):
    tok, _ = data
    rows = random_scene_rows(32, seed=5)
    batches = [rows_to_batch(rows[i:i + 8], tok, max_len=8) for i in range(0, 32, 8)]
    model = _model(tok)
    history = fit(model, lambda: batches, cfg_train={"lr": 1e-3, "warmup_steps": 2}, max_steps=6,
                  eval_batches_factory=lambda: batches[:1], eval_every=3)
    steps = [h for h in history if "loss/total" in h]
    evals = [h for h in history if "val/pg/acc@0.5" in h]
    assert [h["step"] for h in steps] == [1, 2, 3, 4, 5, 6]
    assert [h["step"] for h in evals] == [3, 6]
    assert all(math.isfinite(h["loss/total"]) for h in steps)


def test_precision_resolves_per_device_and_reads_the_cpu_flags():
    assert autocast_dtype("cuda", "auto") is torch.bfloat16   # a GPU trains in bf16 by default
    assert autocast_dtype("cpu", "auto") is None              # a CPU in float32 unless asked
    assert autocast_dtype("cuda", "fp32") is None and autocast_dtype("cpu", "fp32") is None
    with pytest.raises(ValueError, match="train.precision"):
        autocast_dtype("cpu", "fp16")
    assert cpu_has_native_bf16("processor: 0\nflags\t\t: fpu sse avx512f amx_bf16 amx_tile\n")
    assert cpu_has_native_bf16("flags : fpu avx512_bf16")
    assert not cpu_has_native_bf16("flags : fpu sse avx2 avx512f\nbugs : amx_bf16")  # flags lines only


def test_a_bf16_cpu_step_keeps_float32_weights_and_tracks_the_float32_step(data):
    tok, src = data
    logs, params = {}, {}
    for name in ("fp32", "bf16"):
        model = _model(tok)
        opt = build_optimizer(model, {"lr": 1e-3})
        with pytest.warns(RuntimeWarning) if name == "bf16" and not cpu_has_native_bf16() else contextlib.nullcontext():
            dtype = autocast_dtype("cpu", name)
        logs[name] = train_step(model, DateCriterion({}), src, opt, autocast_dtype=dtype)
        params[name] = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params["bf16"])  # master weights stay float32
    # the same init and batch: bf16's loss is float32's up to bf16 rounding, and the update moves
    # the weights the same way (cosine of the two updates from the shared init)
    assert logs["bf16"]["loss/total"] == pytest.approx(logs["fp32"]["loss/total"], rel=0.05)
    init = [p.detach() for p in _model(tok).parameters() if p.requires_grad]
    d32 = torch.cat([(a - b).flatten() for a, b in zip(params["fp32"], init)])
    d16 = torch.cat([(a - b).flatten() for a, b in zip(params["bf16"], init)])
    assert torch.nn.functional.cosine_similarity(d32, d16, dim=0) > 0.9
