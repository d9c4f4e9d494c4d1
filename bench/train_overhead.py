#!/usr/bin/env python
"""What Ray Train costs: the same tiny model, data and number of steps through the plain
PyTorch loop (decode inline, one process) and through Ray Train (Ray Data decodes on its own
CPUs), with 1 worker and with 2 workers, in one run.

Throughput is pairs/s per run, measured from each loop's first batch (start-up excluded; it is
reported apart). Goal: Ray Train with 1 worker costs at most 5% against the plain loop.
The dataset is sized so that the timed steps fit in one epoch: an epoch boundary brings
validation, a checkpoint and a new Ray Data pass, which the plain loop does not have (the
trainer's epoch-end costs are measured by the "short epochs" row, not hidden in the others).
The 2-worker run trains the same number of pairs (half the steps per worker).

  python bench/train_overhead.py                 # ~6 min on 2 CPUs
  python bench/train_overhead.py --steps 60
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

from _common import markdown_table, write_result  # noqa: E402  (after the thread settings)


def plain(root: Path, steps: int, batch_size: int, threads: int) -> dict:
    """The plain loop: read Parquet, decode, train_step, all in this process."""
    import torch

    from date_core import build_model
    from date_core.data import io
    from date_core.data.transforms import BatchTransform
    from date_core.training.engine import build_optimizer, build_scheduler, train_step
    from date_core.training.losses import build_criterion
    from date_core.text import load_tokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tok = load_tokenizer(root / "tokenizer")
    model = build_model("tiny", vocab_size=len(tok))
    transform = BatchTransform(tok, model.config.image_size, model.config.max_text_len, train=True, seed=0)
    table = io.read_table(str(root), "mall", "train")
    opt = build_optimizer(model, {"lr": 1e-3})
    sched = build_scheduler(opt, 10, steps)
    crit = build_criterion({})
    done, t_first = 0, None
    while done < steps:
        for rows in io.iter_numpy_batches(table, batch_size):
            if len(rows["query"]) < batch_size or done >= steps:
                continue
            train_step(model, crit, transform(rows), opt, sched)
            done += 1
            if t_first is None:
                t_first = time.time()
    return {"samples_per_s": (steps - 1) * batch_size / (time.time() - t_first)}


def ray_train(root: Path, steps: int, batch_size: int, workers: int, cpus: float, threads: int,
              limit_rows: int | None = None) -> dict:
    """Ray Train over the same data; ``limit_rows`` shortens the epoch to that many pairs."""
    from date_core.config import resolve_config
    from date_core.runtime.session import vocab_size
    from date_core.runtime.trainer import build_trainer, make_datasets
    from date_core.model import resolve_model_config

    cfg = resolve_config(None, [
        f"data.root={root}", "data.max_val_pairs=32", f"runtime.storage={tempfile.mkdtemp()}",
        f"train.batch_size={batch_size}", f"train.max_steps={steps}", "train.checkpoint_every=100000",
        "train.warmup_steps=10", f"runtime.num_workers={workers}", f"runtime.cpus_per_worker={cpus}",
        f"runtime.torch_threads={threads}", "train.log_every=100000",
    ])
    tok = str(root / "tokenizer")
    model_cfg = resolve_model_config("tiny").to_dict()
    datasets, counts = make_datasets(cfg, model_cfg, tok)
    if limit_rows:
        datasets["train"], counts["train"] = datasets["train"].limit(limit_rows), min(limit_rows, counts["train"])
    loop = {"cfg": cfg, "tokenizer": tok, "vocab_size": vocab_size(tok), "counts": counts, "mlflow": None}
    start = time.time()
    result = build_trainer(cfg, f"overhead-{workers}w-{int(start)}", datasets, loop).fit()
    wall = time.time() - start
    per_worker = float(result.metrics["train/samples_per_s"])
    return {"samples_per_s": per_worker * workers, "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=None,
                   help="ProductWorld mall images (default: enough train pairs for --steps in one epoch)")
    p.add_argument("--steps", type=int, default=80, help="optimiser steps per run (per worker)")
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args(argv)

    import ray

    from date_core.data import io
    from date_core.data.sample import write_small_productworld

    # ~0.8 of the images land in train, ~1.1 pairs each; 25% headroom for drop_last and shards
    images = args.images or int(args.steps * args.batch_size * 1.25 / 0.8 / 1.1) + 50
    root = write_small_productworld(Path(tempfile.mkdtemp()) / "pw", mall=images, live=0)
    train_pairs = io.read_table(str(root), "mall", "train").num_rows
    print(f"dataset: {images} images, {train_pairs} train pairs; {args.steps} steps of {args.batch_size}", flush=True)
    rows = [{"run": "plain PyTorch loop (1 process, 1 thread)", **plain(root, args.steps, args.batch_size, 1)}]
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows.append({"run": "Ray Train, 1 worker (1 CPU, 1 thread)",
                 **ray_train(root, args.steps, args.batch_size, 1, 1, 1)})
    rows.append({"run": "Ray Train, 2 workers (0.5 CPU each, 1 thread)",
                 **ray_train(root, args.steps // 2, args.batch_size, 2, 0.5, 1)})
    # Epochs of 10 steps: validation + checkpoint + a new Ray Data pass every 10 steps.
    short = max(1, 10 * args.batch_size)
    rows.append({"run": "Ray Train, 1 worker, epochs of 10 steps (epoch-end costs included)",
                 **ray_train(root, args.steps, args.batch_size, 1, 1, 1, limit_rows=short)})
    ray.shutdown()
    settings = {**vars(args), "images": images, "train_pairs": train_pairs}
    base = rows[0]["samples_per_s"]
    for row in rows:
        row["ratio vs plain"] = row["samples_per_s"] / base
    write_result("train_overhead", {"settings": settings, "rows": rows})
    print(markdown_table(rows, ["run", "samples_per_s", "ratio vs plain", "wall_s"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
