"""PG-DA ablation on ProductWorld (mall -> live): what each part of DATE's adaptation buys.

Every row trains the tiny preset from the same initial seed for the same number of optimiser
steps on the same source batches, then reports grounding on the *target test* split:

  source_only   mall boxes only (the plain baseline; gains are reported against it)
  target_pairs  + live image-query pairs in the batch (retrieval loss only, no live boxes)
  marginal      + marginal alignment of the image and query concentrated features
  conditional   + conditional alignment of the fused features (JMMD with the boxes)
  pseudo_only   target_pairs + pseudo boxes from self-training rounds (no alignment)
  full          conditional + pseudo boxes: full DATE
  oracle        target_pairs + the live train boxes (the ceiling)

Self-training rows split the steps into ``--rounds`` rounds; after each round but the last the
live train split is labelled (views, reliability, kept fraction from ``adapt.keep_schedule``)
and the pseudo-label precision at IoU 0.5 against the hidden live boxes is recorded. One
optimiser and one LR schedule span all rounds, so rows differ only in their losses and targets.

    python bench/pgda_ablation.py                   # every row, 2 seeds (hours on 2 CPU cores)
    python bench/pgda_ablation.py --quick           # a few minutes: smoke test of the whole path
    python bench/pgda_ablation.py --rows source_only,oracle --name pgda_calibration
    python bench/pgda_ablation.py --data runs/data/productworld --device cuda --amp
    # the recorded table: two processes of one thread each, then one table
    python bench/pgda_ablation.py --rows oracle,marginal,conditional --seeds 1 --steps 800 --n-source 2000 \
        --n-target 1000 --n-test 300 --eval-source --threads 1 \
        --pw-config bench/configs/productworld_calibrated.yaml --name pgda_ablation_a &
    python bench/pgda_ablation.py --rows source_only,pseudo_only,full ...same... --name pgda_ablation_b
    python bench/pgda_ablation.py --merge bench/results/pgda_ablation_a.json bench/results/pgda_ablation_b.json

Runs through the library alone (no Ray, no MLflow). Writes ``bench/results/<name>.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from _common import markdown_table, write_result  # noqa: E402
from date_core import batch as B  # noqa: E402
from date_core import build_model  # noqa: E402
from date_core.adapt import attach_pseudo_boxes, build_aligner_for_model, build_views, label_target_set  # noqa: E402
from date_core.config import default_config  # noqa: E402
from date_core.data.io import read_table, to_numpy_batch  # noqa: E402
from date_core.data.transforms import BatchTransform  # noqa: E402
from date_core.engine import build_optimizer, build_scheduler, evaluate, train_step  # noqa: E402
from date_core.losses import build_criterion  # noqa: E402
from date_core.text import train_wordpiece  # noqa: E402

MARGINAL = ("align_marginal_image", "align_marginal_query")
ALL_ALIGN = MARGINAL + ("align_conditional",)
#: name -> (label, uses target pairs, alignment terms, pseudo boxes, target boxes)
ROWS = {
    "source_only": ("source only", False, (), False, False),
    "target_pairs": ("+ target pairs (retrieval only)", True, (), False, False),
    "marginal": ("+ marginal alignment", True, MARGINAL, False, False),
    "conditional": ("+ conditional alignment", True, ALL_ALIGN, False, False),
    "pseudo_only": ("pseudo-labels only", True, (), True, False),
    "full": ("full DATE (align + pseudo)", True, ALL_ALIGN, True, False),
    "oracle": ("target oracle (live boxes)", True, (), False, True),
}
QUICK = dict(n_source=80, n_target=60, n_test=40, steps=8, rounds=2, seeds=1, batch_size=8)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {list(ROWS)}")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per row (model init and batch order)")
    ap.add_argument("--steps", type=int, default=600, help="optimiser steps per row")
    ap.add_argument("--rounds", type=int, default=3, help="self-training rounds of the pseudo-label rows")
    ap.add_argument("--first-label", type=float, default=None, metavar="FRAC",
                    help="self-training rows label the target first after this fraction of the steps "
                         "(later labellings split the rest evenly); default: all rounds equally long")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (learning curve)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast (GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--aligner", default="mmd", choices=["mmd", "adversarial"])
    ap.add_argument("--align-weight", type=float, default=None, help="weight of each alignment term "
                    "(default 1.0 for mmd, 0.1 for adversarial)")
    ap.add_argument("--data", default=None, help="prepared dataset root (pipelines/prepare.py); "
                    "default: render ProductWorld in memory")
    ap.add_argument("--source", default="mall")
    ap.add_argument("--target", default="live")
    ap.add_argument("--n-source", type=int, default=2000, help="source train images rendered (or pairs read)")
    ap.add_argument("--n-target", type=int, default=1000, help="target train images rendered (or pairs read)")
    ap.add_argument("--n-test", type=int, default=500, help="target test images rendered (or pairs read)")
    ap.add_argument("--eval-source", action="store_true", help="also evaluate on the source test split")
    ap.add_argument("--pw-config", default=None, help="ProductWorldConfig knobs, JSON text or a YAML/JSON file")
    ap.add_argument("--data-seed", type=int, default=0)
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="adapt.* override, e.g. --set keep_schedule=[0.2,0.4]")
    ap.add_argument("--name", default="pgda_ablation", help="result file name under bench/results/")
    ap.add_argument("--quick", action="store_true", help=f"tiny smoke run: {QUICK}")
    ap.add_argument("--merge", nargs="+", default=None, metavar="RESULT.json",
                    help="combine result files of runs with the same settings (rows run in parallel "
                         "processes) into one table under --name, instead of training")
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    if args.steps < args.rounds:
        ap.error("--steps must be at least --rounds")
    if args.first_label is not None and not 0.0 < args.first_label < 1.0:
        ap.error("--first-label must lie strictly between 0 and 1")
    return args


# --------------------------------------------------------------------------- data
def _pw_config(text: str | None):
    from date_core.data.productworld import ProductWorldConfig

    if not text:
        return None, {}
    if Path(text).exists():
        knobs = yaml.safe_load(Path(text).read_text(encoding="utf-8"))
    else:
        knobs = json.loads(text)
    return ProductWorldConfig.from_dict(knobs), knobs


def load_tables(args) -> tuple[dict[str, pa.Table], dict]:
    """source train, target train and target test as contract tables."""
    if args.data:
        tables = {"source_train": read_table(args.data, args.source, "train"),
                  "target_train": read_table(args.data, args.target, "train"),
                  "target_test": read_table(args.data, args.target, "test")}
        caps = {"source_train": args.n_source, "target_train": args.n_target, "target_test": args.n_test}
        if args.eval_source:
            tables["source_test"] = read_table(args.data, args.source, "test")
            caps["source_test"] = args.n_test
        return {k: t.slice(0, caps[k]) for k, t in tables.items()}, {}
    from date_core.data.productworld import render_images

    cfg, knobs = _pw_config(args.pw_config)
    s, t, n = args.n_source, args.n_target, args.n_test
    # Disjoint image indices: the target test images are never seen in training.
    parts = {"source_train": (args.source, range(0, s)), "target_train": (args.target, range(0, t)),
             "target_test": (args.target, range(t, t + n))}
    if args.eval_source:
        parts["source_test"] = (args.source, range(s, s + n))
    return {k: pa.Table.from_pylist(render_images(d, idx, args.data_seed, cfg)) for k, (d, idx) in parts.items()}, knobs


def encode(table: pa.Table, transform: BatchTransform, chunk: int = 256) -> dict[str, np.ndarray]:
    """Contract rows -> model batch arrays for the whole table (pixels kept as float16)."""
    parts = []
    for start in range(0, table.num_rows, chunk):
        enc = transform(to_numpy_batch(table.slice(start, chunk)))
        enc[B.PIXEL_VALUES] = enc[B.PIXEL_VALUES].astype(np.float16)
        parts.append(enc)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def take(data: dict[str, np.ndarray], idx: np.ndarray, hide_boxes: bool = False) -> dict[str, torch.Tensor]:
    out = {k: torch.from_numpy(v[idx]) for k, v in data.items()}
    out[B.PIXEL_VALUES] = out[B.PIXEL_VALUES].float()
    if hide_boxes:  # unsupervised target: no box ever reaches the loss
        out[B.BOXES] = torch.zeros_like(out[B.BOXES])
        out[B.HAS_BOX] = torch.zeros_like(out[B.HAS_BOX])
        out[B.ALT_MASK] = torch.zeros_like(out[B.ALT_MASK])
    return out


def hflip(batch: dict[str, torch.Tensor], rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Training augmentation on the letterboxed tensors: mirror half of the pairs with their
    boxes (ProductWorld queries carry no left/right words)."""
    flip = torch.from_numpy(rng.random(batch[B.PIXEL_VALUES].shape[0]) < 0.5)
    out = dict(batch)
    out[B.PIXEL_VALUES] = torch.where(flip[:, None, None, None], batch[B.PIXEL_VALUES].flip(-1), batch[B.PIXEL_VALUES])
    for key in (B.BOXES, B.ALT_BOXES):
        boxes = batch[key].clone()
        mirrored = boxes[..., 0].clone()
        mirrored = torch.where(boxes[..., 2] > 0, 1.0 - mirrored, mirrored)  # empty slots stay zero
        sel = flip.view(-1, *([1] * (boxes.dim() - 2)))
        boxes[..., 0] = torch.where(sel, mirrored, boxes[..., 0])
        out[key] = boxes
    return out


def batches(data: dict[str, np.ndarray], size: int, hide_boxes: bool = False):
    n = data[B.PAIR_KEY].shape[0]
    for start in range(0, n, size):
        yield take(data, np.arange(start, min(n, start + size)), hide_boxes)


# --------------------------------------------------------------------------- one run
class Progress:
    """Wall-clock ETA over all runs; a step that also carries a target batch costs ~2 units."""

    def __init__(self, total_units: float) -> None:
        self.total, self.done, self.start = total_units, 0.0, time.perf_counter()

    def tick(self, units: float) -> None:
        self.done += units

    def eta(self) -> str:
        elapsed = time.perf_counter() - self.start
        if self.done <= 0:
            return f"elapsed {elapsed / 60:.1f} min"
        left = elapsed / self.done * (self.total - self.done)
        return f"elapsed {elapsed / 60:.1f} min, ETA {left / 60:.1f} min"


def label_units(n_pairs: int, args) -> float:
    # A training step on B pairs costs about 3 forward passes of B (forward + backward); labelling
    # runs one forward per view (3 by default) over the target train split.
    return n_pairs / args.batch_size


def eval_units(n_pairs: int, args) -> float:
    return n_pairs / args.batch_size / 3


def _curve_point(model, data: dict, step: int, args, amp) -> dict:
    t = time.perf_counter()
    point = {"step": step}
    for split, domain in (("target_test", args.target), ("source_test", args.source)):
        if split in data:
            m = evaluate(model, batches(data[split], 128), device=args.device, autocast_dtype=amp)
            point.update({f"{domain}/acc@0.5": m["pg/acc@0.5"], f"{domain}/mIoU": m["pg/mIoU"],
                          f"{domain}/R@1": m["pr/R@1"]})
    point["eval_s"] = time.perf_counter() - t
    return point


def round_bounds(steps: int, rounds: int, first_label: float | None) -> np.ndarray:
    """Step at which each round starts, plus ``steps``: ``[0, b1, ..., steps]``. Labelling a
    model that cannot yet ground the target gives noise, so ``first_label`` lets round 0 (source
    + alignment only) run longer than the later rounds."""
    if rounds <= 1 or first_label is None:
        return np.linspace(0, steps, rounds + 1).round().astype(int)
    first = int(round(first_label * steps))
    return np.concatenate([[0], np.linspace(first, steps, rounds).round().astype(int)])


def run_one(row: str, seed: int, data: dict, vocab: int, max_len: int, args, progress: Progress) -> dict:
    _, use_target, align, pseudo, oracle = ROWS[row]
    device = torch.device(args.device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_model(args.preset, vocab_size=vocab, max_text_len=max_len).to(device)
    adapt = dict(default_config()["adapt"])
    adapt["aligner"] = args.aligner
    for text in args.overrides:
        key, value = text.split("=", 1)
        adapt[key.strip()] = yaml.safe_load(value)
    weights = dict(default_config()["loss"])
    aligner = None
    if align:
        w = args.align_weight if args.align_weight is not None else (1.0 if args.aligner == "mmd" else 0.1)
        if args.aligner == "mmd":
            weights.update({t: w for t in align})
        else:  # one adversarial term; the conditional row adds the conditional discriminator
            parts = {"image": 1.0, "query": 1.0, "conditional": 1.0 if "align_conditional" in align else 0.0}
            adapt["discriminator"] = {**dict(adapt.get("discriminator") or {}), "parts": parts,
                                      "grl_max_steps": args.steps}
            weights["adversarial"] = w
        aligner = build_aligner_for_model(adapt, model).to(device)
    criterion = build_criterion(weights, gather=False)
    cfg_train = {"lr": args.lr, "weight_decay": 0.05}
    optimizer = build_optimizer(model, cfg_train, extra_modules=[aligner] if aligner is not None else [])
    scheduler = build_scheduler(optimizer, warmup_steps=max(1, args.steps // 20), total_steps=args.steps,
                                min_lr_ratio=0.05)
    amp = torch.bfloat16 if args.amp else None
    views = build_views(adapt["views"])
    rounds = args.rounds if pseudo else 1
    bounds = round_bounds(args.steps, rounds, args.first_label)
    n_src, n_tgt = data["source_train"][B.PAIR_KEY].shape[0], data["target_train"][B.PAIR_KEY].shape[0]
    labels, round_log, curve, step, t0 = None, [], [], 0, time.perf_counter()
    for r in range(rounds):
        if r > 0:
            t_label = time.perf_counter()
            rnd = label_target_set(model, batches(data["target_train"], 128), views, r - 1, adapt,
                                   keep_annotations=True)
            labels = rnd.labels
            # which signal would have picked right boxes at this round's kept fraction (monitoring)
            by_signal = rnd.signal_precision(rnd.fraction, adapt)
            round_log.append({**rnd.summary(), "seconds": time.perf_counter() - t_label,
                              "precision_by_signal": by_signal})
            s = round_log[-1]
            print(f"    labelled round {r - 1}: kept {int(s['n_kept'])}/{int(s['n_pairs'])}, precision@0.5 "
                  f"{s['precision@0.5']:.3f} (all pairs {s['all_precision@0.5']:.3f}); top {rnd.fraction:.0%} by "
                  + ", ".join(f"{k} {v:.3f}" for k, v in by_signal.items() if k != "all"), flush=True)
            progress.tick(label_units(n_tgt, args))
        for step in range(bounds[r], bounds[r + 1]):
            src = hflip(take(data["source_train"], rng.choice(n_src, args.batch_size, replace=False)), rng)
            tgt = None
            if use_target:
                tgt = take(data["target_train"], rng.choice(n_tgt, args.batch_size, replace=False),
                           hide_boxes=not oracle)
                if labels is not None:
                    tgt = attach_pseudo_boxes(tgt, labels)
                tgt = hflip(tgt, rng)
            logs = train_step(model, criterion, src, optimizer, scheduler, target_batch=tgt, aligner=aligner,
                              device=device, autocast_dtype=amp)
            progress.tick(2.0 if use_target else 1.0)
            if args.eval_every and (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
                curve.append(_curve_point(model, data, step + 1, args, amp))
                print(f"    eval @{step + 1}: " + " ".join(f"{k}={v:.3f}" for k, v in curve[-1].items()
                                                          if k != "step"), flush=True)
            if (step + 1) % max(1, args.steps // 6) == 0:
                align_txt = " ".join(f"{k[len('loss/'):]}={v:.3g}" for k, v in logs.items()
                                     if k[len("loss/"):] in align or k == "loss/adversarial")
                print(f"    step {step + 1}/{args.steps} loss {logs['loss/total']:.3f} {align_txt} "
                      f"| {progress.eta()}", flush=True)
    train_s = time.perf_counter() - t0 - sum(c["eval_s"] for c in curve)
    metrics = evaluate(model, batches(data["target_test"], 128), device=device, autocast_dtype=amp)
    progress.tick(eval_units(data["target_test"][B.PAIR_KEY].shape[0], args))
    out = {"row": row, "seed": seed, "train_s": train_s, "rounds": round_log, "curve": curve,
           **{f"{args.target}_test/{k}": v for k, v in metrics.items()}}
    if "source_test" in data:
        src_metrics = evaluate(model, batches(data["source_test"], 128), device=device, autocast_dtype=amp)
        out.update({f"{args.source}_test/{k}": v for k, v in src_metrics.items()})
        progress.tick(eval_units(data["source_test"][B.PAIR_KEY].shape[0], args))
    return out


# --------------------------------------------------------------------------- table
def summarise(results: list[dict], rows: list[str], target: str, source: str) -> list[dict]:
    acc_key, miou_key = f"{target}_test/pg/acc@0.5", f"{target}_test/pg/mIoU"
    base = [r[acc_key] for r in results if r["row"] == "source_only"]
    base_acc = float(np.mean(base)) if base else None
    table = []
    for row in rows:
        runs = [r for r in results if r["row"] == row]
        if not runs:
            continue
        acc = np.array([r[acc_key] for r in runs])
        miou = np.array([r[miou_key] for r in runs])
        pl = []
        for i in range(max(len(r["rounds"]) for r in runs)):
            prec = np.mean([r["rounds"][i]["precision@0.5"] for r in runs])
            kept = np.mean([r["rounds"][i]["kept_fraction"] for r in runs])
            pl.append(f"r{i}: {prec:.2f} @ {kept:.0%}")
        table.append({
            "row": ROWS[row][0], "Acc@0.5": float(acc.mean()), "± (seeds)": float(acc.std()),
            "mIoU": float(miou.mean()), "R@1": float(np.mean([r[f"{target}_test/pr/R@1"] for r in runs])),
            "Δ Acc vs source only": None if base_acc is None else float(acc.mean() - base_acc),
            "pseudo-label precision@0.5 (kept)": ", ".join(pl) or "-",
            f"{source} test Acc@0.5": (float(np.mean([r[f"{source}_test/pg/acc@0.5"] for r in runs]))
                                       if f"{source}_test/pg/acc@0.5" in runs[0] else None),
            "train min/run": float(np.mean([r["train_s"] for r in runs]) / 60),
        })
    return table


def merge(args) -> dict:
    """One table from result files whose runs differ only in ``rows`` (e.g. two processes)."""
    parts = [json.loads(Path(f).read_text(encoding="utf-8")) for f in args.merge]
    same = {k: v for k, v in parts[0]["args"].items() if k not in ("rows", "name", "merge")}
    for f, part in zip(args.merge, parts):
        other = {k: v for k, v in part["args"].items() if k not in ("rows", "name", "merge")}
        if other != same:
            diff = sorted(k for k in same if same.get(k) != other.get(k))
            raise SystemExit(f"{f}: settings differ from {args.merge[0]} in {diff}; not merged")
    results = [r for part in parts for r in part["runs"]]
    rows = [r for r in ROWS if any(run["row"] == r for run in results)]
    table = summarise(results, rows, same["target"], same["source"])
    print(markdown_table(table))
    out = {"args": {**same, "rows": ",".join(rows), "merged_from": args.merge},
           "productworld_knobs": parts[0].get("productworld_knobs"), "data_pairs": parts[0].get("data_pairs"),
           "runs": results, "table": table, "wall_s": max(p.get("wall_s", 0.0) for p in parts)}
    print(f"wrote {write_result(args.name, out)}")
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = args.rows.split(",")
    t0 = time.perf_counter()
    tables, knobs = load_tables(args)
    queries = [str(q) for k in ("source_train", "target_train") for q in tables[k].column("query").to_pylist()]
    tok = train_wordpiece(queries, vocab_size=4000)
    max_len = 24
    size = build_model(args.preset, vocab_size=len(tok), max_text_len=max_len).config.image_size
    transform = BatchTransform(tok, size, max_len, train=False)
    data = {k: encode(t, transform) for k, t in tables.items()}
    sizes = {k: int(v[B.PAIR_KEY].shape[0]) for k, v in data.items()}
    print(f"data ({time.perf_counter() - t0:.0f}s): {sizes}, vocab {len(tok)}, image {size}px", flush=True)
    n_tgt, n_test = sizes["target_train"], sizes["target_test"]
    n_evals = 2 if "source_test" in sizes else 1
    per_run = {r: args.steps * (2.0 if ROWS[r][1] else 1.0) + n_evals * eval_units(n_test, args)
               + (args.rounds - 1) * label_units(n_tgt, args) * ROWS[r][3] for r in rows}
    total = args.seeds * sum(per_run.values())
    progress = Progress(total)
    results = []
    for seed in range(args.seeds):
        for row in rows:
            print(f"[{row} seed {seed}] {ROWS[row][0]}", flush=True)
            res = run_one(row, seed, data, len(tok), max_len, args, progress)
            print(f"  -> {args.target}_test acc@0.5 {res[f'{args.target}_test/pg/acc@0.5']:.3f} "
                  f"mIoU {res[f'{args.target}_test/pg/mIoU']:.3f} | {progress.eta()}", flush=True)
            results.append(res)
    table = summarise(results, rows, args.target, args.source)
    md = markdown_table(table)
    print(md)
    out = {"args": vars(args), "productworld_knobs": knobs, "data_pairs": sizes, "runs": results, "table": table,
           "wall_s": time.perf_counter() - t0}
    print(f"wrote {write_result(args.name, out)}")
    return out


if __name__ == "__main__":
    main()
