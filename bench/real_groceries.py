"""DATE on real photos: the Freiburg groceries (Pascal VOC boxes) from ``../shared/data``.

Ingests the shared VOC folder with the project's own ``prepare voc`` (deterministic split by a
hash of the image id: train 0.8 / val 0.1 / test 0.1), trains a preset from scratch on the
train split as ``train.py`` does (the config's round engine, loop skeleton, transform and
augmentation: :func:`date_core.adapt.round.train_round`, in-process), and reports on the val split:

  PG  Acc@0.5 / mIoU: the predicted box is right when it overlaps any box of the image's class
  PR  R@1 / R@5: the class phrase ("a pack of coffee") against the gallery of val images,
      relevance = same class

beside the baselines in the same run:

  constant box    the query-blind box with the best train Acc@0.5 (a grid of centred and
                  off-centre boxes): what grounding gets without looking at anything
  whole image     the box covering the image
  random ranking  the retrieval metrics of random embeddings (mean over 20 draws)

    python bench/real_groceries.py                 # tiny preset, 1,500 steps
    python bench/real_groceries.py --steps 300     # shorter
    python bench/real_groceries.py --preset lite --steps 850 --threads 1 --name real_groceries_lite

Skips (exit 0, with the reason) when ``../shared/data/freiburg_groceries_voc`` is absent.
Writes ``bench/results/real_groceries.json``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from _common import markdown_table, write_result
from pgda_ablation import batches, encode
from date_core import batch as B
from date_core.adapt.round import train_round
from date_core.config import resolve_config
from date_core.data.io import read_table
from date_core.data.transforms import BatchTransform
from date_core.model import resolve_model_config
from date_core.training.engine import evaluate
from date_core.evaluation.metrics import grounding_metrics, retrieval_metrics
from date_core.text import load_tokenizer


ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "freiburg_groceries_voc"
DOMAIN = "grocery"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--voc", default=str(SHARED), help="the VOC folder (default: ../shared/data/...)")
    ap.add_argument("--data", default=str(ROOT / "bench" / "_work" / "groceries"),
                    help="prepared dataset folder (made with 'prepare voc' when missing)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=1500, help="optimiser steps (train.max_steps; the cosine schedule's length)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=250, help="val evaluation every N optimiser steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="real_groceries", help="result name (bench/results/<name>.json)")
    return ap.parse_args(argv)


def prepare(voc: Path, out: Path) -> None:
    """``prepare voc`` once; later runs reuse the folder (its ``_summary.json`` marks it done)."""
    if (out / "_summary.json").is_file():
        return
    cmd = [sys.executable, str(ROOT / "pipelines" / "prepare.py"), "voc", str(voc), "--domain", DOMAIN,
           "--out", str(out), "--overwrite", "--num-cpus", "2"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def constant_box_baselines(train: dict, val: dict) -> list[dict]:
    """Query-blind boxes: the best of a grid on train (scored on val), and the whole image."""
    def score(data: dict, box: list[float]) -> dict[str, float]:
        n = data[B.BOXES].shape[0]
        pred = torch.tensor(box, dtype=torch.float32).expand(n, 4)
        return grounding_metrics(pred, torch.from_numpy(data[B.BOXES]), torch.from_numpy(data[B.ALT_BOXES]),
                                 torch.from_numpy(data[B.ALT_MASK]))

    grid = [[cx, cy, w, h] for cx in (0.4, 0.5, 0.6) for cy in (0.4, 0.5, 0.6)
            for w in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0) for h in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    best = max(grid, key=lambda b: score(train, b)["pg/acc@0.5"])
    rows = []
    for name, box in ((f"constant box {[round(v, 2) for v in best]} (best on train)", best),
                      ("whole image", [0.5, 0.5, 1.0, 1.0])):
        m = score(val, box)
        rows.append({"method": name, "PG Acc@0.5": m["pg/acc@0.5"], "mIoU": m["pg/mIoU"], "R@1": None, "R@5": None})
    return rows


def random_ranking(val: dict, draws: int = 20) -> dict:
    """Retrieval metrics of random embeddings, with the real gallery (unique val images)."""
    item = torch.from_numpy(val[B.ITEM_KEY].astype(np.int64))
    _, first = np.unique(val[B.IMAGE_KEY], return_index=True)
    g_item = item[torch.from_numpy(first)]
    gen = torch.Generator().manual_seed(0)
    acc: dict[str, float] = {}
    for _ in range(draws):
        q = torch.nn.functional.normalize(torch.randn(len(item), 64, generator=gen), dim=-1)
        g = torch.nn.functional.normalize(torch.randn(len(g_item), 64, generator=gen), dim=-1)
        for k, v in retrieval_metrics(q, item, g, g_item).items():
            acc[k] = acc.get(k, 0.0) + v / draws
    return {"method": "random ranking", "PG Acc@0.5": None, "mIoU": None, "R@1": acc["pr/R@1"], "R@5": acc["pr/R@5"]}


def train(tables: dict, val: dict, tok, args) -> tuple[dict, list[dict], int, float]:
    """The supervised stage's training (train.py's workers), in-process: the config's engine and
    loop over the train rows, ``--steps`` optimiser steps, val evaluated every ``--eval-every``."""
    cfg = resolve_config(None, [f"model.preset={args.preset}", f"train.lr={args.lr}", f"train.batch_size={args.batch_size}",
                                f"train.seed={args.seed}", f"train.max_steps={args.steps}"])
    curve, t0, clock = [], time.perf_counter(), {"eval_s": 0.0}

    def on_step(engine, logs) -> None:
        done = engine.steps_done
        if logs["stepped"] and (done % args.eval_every == 0 or done == engine.total_steps):
            t = time.perf_counter()
            m = evaluate(engine.output, batches(val, 128))
            clock["eval_s"] += time.perf_counter() - t
            train_min = (time.perf_counter() - t0 - clock["eval_s"]) / 60
            curve.append({"step": done, "train_min": round(train_min, 2), "acc@0.5": m["pg/acc@0.5"],
                          "mIoU": m["pg/mIoU"], "R@1": m["pr/R@1"], "R@5": m["pr/R@5"]})
            print(f"  step {done} ({train_min:.1f} min) loss {logs['loss/total']:.3f} | val " +
                  " ".join(f"{k}={v:.3f}" for k, v in curve[-1].items() if k not in ("step", "train_min")), flush=True)

    engine = train_round(cfg, len(tok), tables["train"], None, tok, on_step=on_step)
    train_s = time.perf_counter() - t0 - clock["eval_s"]
    return evaluate(engine.output, batches(val, 128)), curve, engine.steps_done, train_s


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    voc = Path(args.voc)
    if not (voc / "annotations").is_dir():
        print(f"skipped: {voc} is absent (the shared Freiburg groceries VOC data)")
        return 0
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    out_dir = Path(args.data)
    prepare(voc, out_dir)
    tok = load_tokenizer(out_dir / "tokenizer")
    model_cfg = resolve_model_config(args.preset)
    size = model_cfg.image_size
    transform = BatchTransform(tok, size, model_cfg.max_text_len, train=False)
    tables = {s: read_table(str(out_dir), DOMAIN, s) for s in ("train", "val")}
    data = {s: encode(t, transform) for s, t in tables.items()}
    sizes = {s: int(d[B.PAIR_KEY].shape[0]) for s, d in data.items()}
    classes = len(set(tables["train"].column("item_id").to_pylist()))
    print(f"data ({time.perf_counter() - t0:.0f}s): {sizes} pairs, {classes} classes, {size}px", flush=True)

    rows = constant_box_baselines(data["train"], data["val"]) + [random_ranking(data["val"])]
    final, curve, steps, train_s = train(tables, data["val"], tok, args)
    rows.append({"method": f"DATE {args.preset}, {steps} steps ({train_s / 60:.1f} min)",
                 "PG Acc@0.5": final["pg/acc@0.5"], "mIoU": final["pg/mIoU"],
                 "R@1": final["pr/R@1"], "R@5": final["pr/R@5"]})
    print(markdown_table(rows))
    result = {"args": vars(args), "pairs": sizes, "classes": classes, "table": rows, "curve": curve,
              "final_val": final, "wall_s": time.perf_counter() - t0}
    print(f"wrote {write_result(args.name, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
