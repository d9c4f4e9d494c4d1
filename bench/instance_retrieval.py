"""Instance-level retrieval (Product1M's task) on the ProductWorld instance mode: a plain dual
encoder, DATE without pretraining and DATE with CAPTURE-style pretraining, same budget, 3 seeds.

    python pipelines/prepare.py synth --instance --queries 3000 --seed 0 \\
        --splits train=0.6,val=0.1,test=0.3 --out runs/data/pw-instance   # 889 test queries
    python bench/instance_retrieval.py --data runs/data/pw-instance
    python bench/instance_retrieval.py --data runs/data/groceries-instance --name instance_retrieval_freiburg

Every row trains the ``lite`` encoders (EfficientNet-Lite0 + MiniLM, frozen as the preset has
them) for the same number of optimiser steps at the same batch size, in process on the CPU:

- ``dual_encoder``: :class:`date_core.model.dual.DualEncoder` (mean-pooled encoders, one linear
  head each) with the retrieval term alone (:class:`~date_core.training.losses.ContrastiveCriterion`);
- ``date``: the DATE model with its full criterion (retrieval on every pair, box terms on the
  single-product pairs that have a box);
- ``date_capture``: ``--pretrain-share`` of the steps pretrain the DATE model with the
  CAPTURE-style losses (:mod:`date_core.training.pretrain`), the rest train it as ``date``.

All train on ``multi/train`` (multi-product images, captions) plus ``single/train``
(single-product photos, titles), through ``engine.train_step`` (the step train.py's workers run)
and the data layer's ``BatchTransform``. Each model then ranks ``single/gallery`` for every
``multi/test`` query with :mod:`date_core.retrieval.instance`; the scoring rule (caption weight, and for
DATE the pooled embedding or the best semantic token) is chosen per model on ``multi/val``.
A random ranking is the floor. Writes ``bench/results/<name>.json`` as
``{"rows": {row: {"mAP@10": [per seed], ...}}}`` (``mAP@N`` etc. are the official script's
definitions, ``textbook/mAP@N`` the textbook ones) and prints the Markdown table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from _common import hardware_string, markdown_table, today, write_result

from date_core.retrieval import instance as inst
from date_core.data import io
from date_core.training.engine import build_optimizer, build_scheduler, train_step
from date_core.training.losses import ContrastiveCriterion, DateCriterion
from date_core.evaluation.metrics_instance import INSTANCE_NS, instance_retrieval_metrics
from date_core.model import build_model, pretrained_tokenizer_dir, resolve_model_config
from date_core.model.dual import DualEncoder
from date_core.training.pretrain import pretrain_loop


ROOT = Path(__file__).resolve().parents[1]
ROWS = ("random", "dual_encoder", "date", "date_capture")
METRICS = [f"{m}@{n}" for m in ("mAP", "Prec", "mAR") for n in INSTANCE_NS]
TABLE = ("mAP@10", "mAP@50", "mAP@100", "textbook/mAP@10", "textbook/mAP@50", "textbook/mAP@100", "mAR@10",
         "textbook/mAR@10")


def load_split(root: str, domain: str, split: str, tok, cfg) -> tuple[dict[str, np.ndarray], Any]:
    """One split -> (its model batch as numpy columns, its Arrow table)."""
    table = inst.read_split(root, domain, split)
    parts = list(inst.model_batches(table, tok, cfg.image_size, cfg.max_text_len, batch_size=128))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, table


def batches(data: dict[str, np.ndarray], batch_size: int, rng: np.random.Generator | None = None):
    n = len(data["input_ids"])
    order = rng.permutation(n) if rng is not None else np.arange(n)
    stop = n - (batch_size - 1) if rng is not None else n
    for i in range(0, stop, batch_size):
        idx = order[i:i + batch_size]
        yield {k: torch.from_numpy(v[idx]) for k, v in data.items()}


def endless(data: dict[str, np.ndarray], batch_size: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        yield from batches(data, batch_size, rng)


def train(model: torch.nn.Module, criterion, data, steps: int, args, seed: int) -> float:
    """``steps`` optimiser steps of ``engine.train_step`` -> training seconds."""
    if steps <= 0:
        return 0.0
    opt = build_optimizer(model, {"lr": args.lr, "weight_decay": 0.05, "encoder_lr_mult": 1.0})
    sched = build_scheduler(opt, min(args.warmup, steps // 5), steps, min_lr_ratio=0.05)
    t0 = time.perf_counter()
    for step, batch in zip(range(steps), endless(data, args.batch_size, seed)):
        train_step(model, criterion, batch, opt, sched, max_grad_norm=1.0)
    return time.perf_counter() - t0


def pretrain(model: torch.nn.Module, data, steps: int, args, seed: int, tok) -> float:
    """``steps`` CAPTURE-style pretraining steps (:mod:`date_core.training.pretrain`, the packaged
    ``pretrain:`` loss weights) at the same learning rate and batch size -> seconds."""

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    pretrain_loop(model, lambda: batches(data, args.batch_size, rng), steps,
                  {"train": {"lr": args.lr, "weight_decay": 0.05, "warmup_steps": args.warmup}},
                  tokenizer=tok, seed=seed)
    return time.perf_counter() - t0


def score(model: torch.nn.Module, val, test, gallery, args) -> tuple[dict[str, float], dict]:
    """Choose the scoring rule on val, apply it to test -> (test metrics, choice)."""
    g = inst.encode_gallery(model, batches(gallery[0], 64))
    qv = inst.encode_queries(model, batches(val[0], 64))
    qt = inst.encode_queries(model, batches(test[0], 64))
    glabels = inst.labels(gallery[1], gallery=True)
    rule = inst.choose_rule(qv, g, inst.labels(val[1]), glabels)
    metrics = inst.evaluate(qt, g, inst.labels(test[1]), glabels, rule["text_weight"], rule["image_pool"])
    return metrics, {"image_pool": rule["image_pool"], "text_weight": rule["text_weight"],
                     "val_textbook_mAP@10": rule["val_metric"]}


def pick(metrics: dict[str, float]) -> dict[str, float]:
    out = {}
    for name in METRICS:
        out[name] = metrics[f"inst/official/{name}"]
        out[f"textbook/{name}"] = metrics[f"inst/textbook/{name}"]
    return out


def run_row(row: str, seed: int, cfg, data, args, tok) -> tuple[dict[str, float], dict]:
    torch.manual_seed(seed)
    info: dict[str, Any] = {"seed": seed}
    if row == "dual_encoder":
        model = DualEncoder(resolve_model_config(args.preset))
        info["train_s"] = train(model, ContrastiveCriterion(gather=False), data["train"], args.steps, args, seed)
    else:
        model = build_model(args.preset)
        pre_steps = int(round(args.steps * args.pretrain_share)) if row == "date_capture" else 0
        info["pretrain_s"] = pretrain(model, data["train"], pre_steps, args, seed, tok) if pre_steps else 0.0
        info["train_s"] = train(model, DateCriterion(gather=False), data["train"], args.steps - pre_steps,
                                args, seed)
        info["pretrain_steps"] = pre_steps
    metrics, choice = score(model, data["val"], data["test"], data["gallery"], args)
    info.update(choice)
    return pick(metrics), info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="an instance-mode root (multi/*, single/train, single/gallery)")
    ap.add_argument("--name", default="instance_retrieval", help="result name (bench/results/<name>.json)")
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--preset", default="lite")
    ap.add_argument("--steps", type=int, default=200, help="optimiser steps per row (pretraining included)")
    ap.add_argument("--pretrain-share", type=float, default=0.5, help="share of date_capture's steps spent pretraining")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--max-train", type=int, default=4000, help="cap on training pairs (decoded once, in memory)")
    args = ap.parse_args()

    from date_core.text import load_tokenizer

    cfg = resolve_model_config(args.preset)
    tok_dir = pretrained_tokenizer_dir(cfg) or Path(args.data) / "tokenizer"
    tok = load_tokenizer(tok_dir)
    t0 = time.perf_counter()
    multi, multi_t = load_split(args.data, "multi", "train", tok, cfg)
    # single/train: ProductWorld's single-product photos with titles (the Freiburg mode has none)
    has_single = ("single", "train") in io.list_datasets(args.data)
    single, single_t = load_split(args.data, "single", "train", tok, cfg) if has_single else ({}, None)
    rng = np.random.default_rng(0)
    train_data = {k: np.concatenate([multi[k], single[k]]) if has_single else multi[k] for k in multi}
    if len(train_data["input_ids"]) > args.max_train:
        keep = rng.choice(len(train_data["input_ids"]), args.max_train, replace=False)
        train_data = {k: v[keep] for k, v in train_data.items()}
    data = {"train": train_data, "val": load_split(args.data, "multi", "val", tok, cfg),
            "test": load_split(args.data, "multi", "test", tok, cfg),
            "gallery": load_split(args.data, "single", "gallery", tok, cfg)}
    sizes = {"train_pairs": len(train_data["input_ids"]), "train_multi": multi_t.num_rows,
             "train_single": single_t.num_rows if has_single else 0, "val_queries": data["val"][1].num_rows,
             "test_queries": data["test"][1].num_rows, "gallery": data["gallery"][1].num_rows}
    print(f"[instance] data decoded in {time.perf_counter() - t0:.0f} s: {json.dumps(sizes)}", flush=True)

    rows: dict[str, dict[str, list[float]]] = {}
    runs: list[dict] = []
    # seed-major: a run cut short still holds whole seeds of every row; the result file is
    # rewritten after every run ("complete": false until the last)
    for seed in args.seeds:
        for row in args.rows:
            if row == "random":
                test_t, gallery_t = data["test"][1], data["gallery"][1]
                ranked = inst.random_ranking(test_t.num_rows, gallery_t.num_rows, seed=seed)
                metrics = pick(instance_retrieval_metrics(ranked, inst.labels(test_t), inst.labels(gallery_t, True)))
                info = {"seed": seed}
            else:
                metrics, info = run_row(row, seed, cfg, data, args, tok)
            for k, v in metrics.items():
                rows.setdefault(row, {}).setdefault(k, []).append(v)
            runs.append({"row": row, **info, **metrics})
            print(f"[instance] {row} seed {seed}: mAP@10 {metrics['mAP@10']:.4f} "
                  f"textbook mAP@10 {metrics['textbook/mAP@10']:.4f} {json.dumps(info)}", flush=True)
            done = seed == args.seeds[-1] and row == args.rows[-1]
            md = markdown_table([{"row": r, **{k: _mean_std(v) for k, v in m.items() if k in TABLE}}
                                 for r, m in rows.items()])
            write_result(args.name, {"date": today(), "hardware": hardware_string(), "args": vars(args),
                                     "sizes": sizes, "complete": done, "rows": rows, "runs": runs,
                                     "table_markdown": md})
    print(md)


def _mean_std(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


if __name__ == "__main__":
    main()
