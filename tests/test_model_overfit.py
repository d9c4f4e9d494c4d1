"""The tiny model learns: it overfits 32 fixed image-query pairs on real drawn images (two
objects per image, so grounding must read the query) to grounding Acc@0.5 >= 0.9 and retrieval
R@1 >= 0.9 within a bounded number of steps."""
from __future__ import annotations

import time

import torch

from date_core import build_model
from date_core.training.engine import build_optimizer, build_scheduler, evaluate, train_step
from date_core.training.losses import DateCriterion

from _model_synth import overfit_pairs, rows_to_batch, tokenizer_for

MAX_STEPS = 300


def test_tiny_overfits_32_pairs_on_both_seekers():
    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    rows = overfit_pairs(n_images=16, seed=0)
    assert len(rows) == 32
    tok = tokenizer_for(rows)
    batch = rows_to_batch(rows, tok, image_size=96, max_len=8)
    model = build_model("tiny", vocab_size=len(tok), max_text_len=8)
    crit = DateCriterion()
    opt = build_optimizer(model, {"lr": 2e-3, "weight_decay": 0.0})
    sched = build_scheduler(opt, warmup_steps=20, total_steps=MAX_STEPS, min_lr_ratio=0.1)
    start, metrics, step = time.perf_counter(), {}, 0
    for step in range(1, MAX_STEPS + 1):
        train_step(model, crit, batch, opt, sched)
        if step % 10 == 0:
            metrics = evaluate(model, [batch])
            if metrics["pg/acc@0.5"] >= 0.9 and metrics["pr/R@1"] >= 0.9:
                break
    elapsed = time.perf_counter() - start
    print(f"overfit: {step} steps, {elapsed:.1f}s, {metrics}")
    assert metrics["pr/n_gallery"] == 16  # queries are ranked against the unique images
    assert metrics["pg/acc@0.5"] >= 0.9, metrics
    assert metrics["pr/R@1"] >= 0.9, metrics
