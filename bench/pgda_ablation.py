"""PG-DA ablation: what each part of DATE's adaptation buys, on two benchmarks.

  productworld  ProductWorld mall -> the generator's default live (what the embedded default runs)
  freiburg      Freiburg groceries photos -> "Freiburg live" frames (bench/freiburg_live.py)

Every row trains the same preset (``lite`` by default) from the same initial weights for the
same number of optimiser steps, each round exactly as the pipeline runs it: the round's config
(:func:`date_core.adapt.round.round_config`), a :class:`~date_core.adapt.round.RoundEngine`
(criterion, aligner, optimiser, schedule, EMA teacher, clocks) built afresh from the previous
round's output, the Ray workers' loop skeleton (:func:`date_core.training.loop.run_epochs`), the
pipeline's data transform and augmentation on the contract rows, and the one pseudo-label table
and join. Only where batches come from differs: in-process shards here
(:class:`date_core.data.shard.TableShard`), Ray Data there. The round's output (the EMA teacher
in rows with target data, else the student) is evaluated on the *target test* split:

  source_only   source boxes only
  target_pairs  + target image-query pairs (retrieval loss only, no target boxes): the control
  marginal      + marginal MMD alignment of the image and query concentrated features
  conditional   + conditional alignment of the fused features (JMMD with the boxes)
  pseudo_only   target_pairs + pseudo boxes from self-training rounds (no alignment)
  full_date     conditional + pseudo boxes
  marginal_pseudo  marginal + pseudo boxes (DATE without the conditional term)
  oracle        target_pairs + the target train boxes (the ceiling)

Self-training rows run ``adapt.rounds`` rounds: round 1 gets ``--first-label`` of the steps, the
later rounds split the rest (``adapt.round_train.max_steps``). After each round but the last the
round's output labels the target train split through :func:`date_core.adapt.label_target_set`
(views, reliability, the ``adapt.keep_schedule`` fraction); the pseudo-label precision at IoU 0.5
against the hidden target boxes is recorded per reliability signal. Without Ray or MLflow.

    python bench/pgda_ablation.py                              # both benchmarks, every row, 3 seeds
    python bench/pgda_ablation.py --quick                      # a smoke run of the whole path
    python bench/pgda_ablation.py --benchmarks productworld --rows source_only,oracle --seeds 1
    python bench/pgda_ablation.py --jobs 2                     # two processes of one thread each
    python bench/pgda_ablation.py --rows full_date --set adapt.align_from_round=1   # align after the first labels
    python bench/pgda_ablation.py --rows full_date --set adapt.align_until_round=1  # align only the first teacher
    python bench/pgda_ablation.py --merge bench/results/a.json bench/results/b.json
    python bench/pgda_ablation.py --protocol dev ...           # the frozen protocol's data (bench/protocol.yaml)
    python bench/pgda_ablation.py --protocol report --seeds 8 --benchmarks freiburg   # a report table, once

``--protocol`` takes the data from ``bench/protocol.yaml``: ``dev`` (settings, round counts and
thresholds may be chosen on it) or ``report`` (data no earlier table used; touched once per table,
every row with at least ``min_seeds`` seeds); the result records the file's sha256. Every run keeps
its per-pair test IoU (``target_test/pairs``) for paired bootstrap intervals.

Writes ``bench/results/<name>.json``: ``{"benchmarks": {"<name>": {"rows": {"<row>":
{"acc@0.5": [per seed], "mIoU": [...], ...}}, "table": [...]}}, "runs": [...], "args": ...}``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the data is encoded before forking

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from _common import markdown_table, write_result  # noqa: E402
from date_core import batch as B  # noqa: E402
from date_core.adapt import concat_predictions, select_round, target_rows  # noqa: E402
from date_core.adapt.selftrain import RowLabeler  # noqa: E402
from date_core.adapt.round import round_config, train_round  # noqa: E402
from date_core.config import resolve_config  # noqa: E402
from date_core.config_types import to_dict  # noqa: E402
from date_core.data.io import to_numpy_batch  # noqa: E402
from date_core.data.transforms import BatchTransform  # noqa: E402
from date_core.model import pretrained_tokenizer_dir, resolve_model_config  # noqa: E402
from date_core.text import load_tokenizer, train_wordpiece  # noqa: E402
from date_core.training.engine import (autocast_dtype, evaluate, metrics_from_predictions, pair_ious,  # noqa: E402
                                       predict)

MARGINAL = ("align_marginal_image", "align_marginal_query")
ALL_ALIGN = MARGINAL + ("align_conditional",)
#: name -> (label, uses target pairs, alignment terms, pseudo boxes, target boxes)
ROWS = {
    "source_only": ("source only", False, (), False, False),
    "target_pairs": ("+ target pairs (retrieval only)", True, (), False, False),
    "marginal": ("+ marginal alignment", True, MARGINAL, False, False),
    "conditional": ("+ conditional alignment", True, ALL_ALIGN, False, False),
    "pseudo_only": ("pseudo-labels only", True, (), True, False),
    "full_date": ("full DATE (align + pseudo)", True, ALL_ALIGN, True, False),
    "marginal_pseudo": ("marginal alignment + pseudo-labels", True, MARGINAL, True, False),
    "oracle": ("target oracle (target boxes)", True, (), False, True),
}
BENCHMARKS = ("productworld", "freiburg")
PROTOCOL = Path(__file__).resolve().parent / "protocol.yaml"
QUICK = dict(n_source=60, n_target=40, n_test=30, steps=6, seeds=1, batch_size=8, preset="tiny",
             benchmarks="productworld")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmarks", default=",".join(BENCHMARKS), help=f"comma-separated subset of {BENCHMARKS}")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {list(ROWS)}")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per row (model init and batch order): 0..N-1")
    ap.add_argument("--seed-list", default=None, help="explicit seeds, e.g. 1,2 (instead of --seeds)")
    ap.add_argument("--steps", type=int, default=150, help="optimiser steps per row")
    ap.add_argument("--rounds", type=int, default=None,
                    help="self-training rounds of the pseudo-label rows (default: adapt.rounds, after --set)")
    ap.add_argument("--first-label", type=float, default=0.5, metavar="FRAC",
                    help="self-training rows label the target first after this fraction of the steps "
                         "(later labellings split the rest evenly)")
    ap.add_argument("--batch-size", type=int, default=16, help="source pairs per step (and as many target pairs)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (learning curve)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--amp", action="store_true", help="bfloat16 autocast: train.precision bf16 (else fp32)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel processes (each --threads threads)")
    ap.add_argument("--preset", default="lite")
    ap.add_argument("--aligner", default="mmd", choices=["mmd", "adversarial"])
    ap.add_argument("--align-weight", type=float, default=None, help="weight of each alignment term "
                    "(default 1.0 for mmd, 0.1 for adversarial)")
    ap.add_argument("--n-source", type=int, default=1400, help="ProductWorld source train images")
    ap.add_argument("--n-target", type=int, default=600, help="ProductWorld target train images")
    ap.add_argument("--n-test", type=int, default=420, help="ProductWorld target test images (~1.5 pairs each)")
    ap.add_argument("--eval-source", action="store_true", help="also evaluate on a source test split")
    ap.add_argument("--pw-config", default=None, help="ProductWorldConfig knobs, JSON text or a YAML/JSON file")
    ap.add_argument("--data-seed", type=int, default=None,
                    help="ProductWorld data seed / Freiburg-live degradation seed (default 0; with --protocol, its data)")
    ap.add_argument("--protocol", choices=["dev", "report"], default=None,
                    help="the data of bench/protocol.yaml: dev (choices may be made on it) or report (touched "
                         "once per table, >= min_seeds seeds); the result records the protocol's sha256")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="adapt.* or loss.* override, e.g. --set adapt.keep_schedule=[0.2,0.4]")
    ap.add_argument("--label-filter", choices=["none", "right"], default="none",
                    help="diagnostic only: 'right' keeps just the kept pseudo boxes that are right at IoU 0.5 "
                         "(reads the hidden target boxes): do right pseudo boxes help at all?")
    ap.add_argument("--oracle-weights", choices=["source", "pseudo"], default="source",
                    help="the oracle row's target-box weights: the source's (the ceiling) or the pseudo terms' "
                         "(diagnostic: what the pseudo loss does with every target box right)")
    ap.add_argument("--name", default="pgda_ablation", help="result file name under bench/results/")
    ap.add_argument("--results-dir", default=None, help="write the result file here instead of bench/results/")
    ap.add_argument("--quick", action="store_true", help=f"tiny smoke run: {QUICK}")
    ap.add_argument("--merge", nargs="+", default=None, metavar="RESULT.json",
                    help="combine result files of runs with the same settings into one table under --name")
    args = ap.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    for name, choices in (("rows", ROWS), ("benchmarks", BENCHMARKS)):
        unknown = [r for r in getattr(args, name).split(",") if r not in choices]
        if unknown:
            ap.error(f"unknown {name} {unknown}; choose from {list(choices)}")
    if not 0.0 < args.first_label < 1.0:
        ap.error("--first-label must lie strictly between 0 and 1")
    args.split_salt, args.protocol_sha256 = "", None
    if args.protocol:
        if args.data_seed is not None:
            ap.error("--data-seed and --protocol both name the data; give one")
        spec, args.protocol_sha256 = load_protocol(args.protocol)
        n_seeds = len(args.seed_list.split(",")) if args.seed_list else args.seeds
        if args.protocol == "report" and n_seeds < int(spec.get("min_seeds", 1)) and not args.merge:
            ap.error(f"--protocol report runs every row with >= {spec['min_seeds']} seeds (got {n_seeds})")
        benches = args.benchmarks.split(",")
        if len({spec[b]["data_seed" if b == "productworld" else "degradation_seed"] for b in benches}) > 1:
            ap.error(f"the protocol's {args.protocol} data seeds differ between {benches}: run them one at a time")
        b = benches[0]
        args.data_seed = int(spec[b]["data_seed" if b == "productworld" else "degradation_seed"])
        args.split_salt = str(spec.get("freiburg", {}).get("split_salt", ""))
    elif args.data_seed is None:
        args.data_seed = 0
    return args


def load_protocol(split: str) -> tuple[dict, str]:
    """``split``'s section of bench/protocol.yaml and the file's sha256."""
    import hashlib

    raw = PROTOCOL.read_bytes()
    return yaml.safe_load(raw)[split], hashlib.sha256(raw).hexdigest()


# --------------------------------------------------------------------------- data
def _pw_config(text: str | None):
    from date_core.data.productworld import ProductWorldConfig

    if not text:
        return None, {}
    knobs = yaml.safe_load(Path(text).read_text(encoding="utf-8")) if Path(text).exists() else json.loads(text)
    return ProductWorldConfig.from_dict(knobs), knobs


def load_tables(benchmark: str, args) -> tuple[dict[str, pa.Table], dict]:
    """source train, target train, target test (and source test) as contract tables."""
    if benchmark == "freiburg":
        from freiburg_live import LIVE, load_tables as freiburg_tables

        tables = freiburg_tables(args.data_seed, args.split_salt)
        if args.quick:
            tables = {k: t.slice(0, {"source_train": 60, "target_train": 40, "target_test": 30}[k])
                      for k, t in tables.items()}
        return tables, {"freiburg_live": {k: list(v) if isinstance(v, tuple) else v for k, v in LIVE.items()}}
    from date_core.data.productworld import render_images

    cfg, knobs = _pw_config(args.pw_config)
    s, t, n = args.n_source, args.n_target, args.n_test
    # Disjoint image indices: the target test images are never seen in training.
    parts = {"source_train": ("mall", range(0, s)), "target_train": ("live", range(0, t)),
             "target_test": ("live", range(t, t + n))}
    if args.eval_source:
        parts["source_test"] = ("mall", range(s, s + n))
    return {k: pa.Table.from_pylist(render_images(d, idx, args.data_seed, cfg)) for k, (d, idx) in parts.items()}, knobs


def encode(table: pa.Table, transform: BatchTransform, chunk: int = 256) -> dict[str, np.ndarray]:
    """Contract rows -> model batch arrays for the whole table (pixels kept as float16)."""
    parts = []
    for start in range(0, table.num_rows, chunk):
        enc = transform(to_numpy_batch(table.slice(start, chunk)))
        enc[B.PIXEL_VALUES] = enc[B.PIXEL_VALUES].astype(np.float16)
        parts.append(enc)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def tokenizer_for(preset: str, tables: dict[str, pa.Table]):
    """The preset's pretrained tokenizer, or a WordPiece trained on the training queries."""
    own = pretrained_tokenizer_dir(resolve_model_config(preset))
    if own is not None:
        return load_tokenizer(own)
    queries = [str(q) for k in ("source_train", "target_train") for q in tables[k].column("query").to_pylist()]
    return train_wordpiece(queries, vocab_size=4000)


def batches(data: dict[str, np.ndarray], size: int):
    """Evaluation / labelling batches of encoded arrays (unaugmented, annotations kept)."""
    n = data[B.PAIR_KEY].shape[0]
    for start in range(0, n, size):
        out = {k: torch.from_numpy(v[start:start + size]) for k, v in data.items()}
        out[B.PIXEL_VALUES] = out[B.PIXEL_VALUES].float()
        yield out


# --------------------------------------------------------------------------- one run
def round_steps(steps: int, rounds: int, first_label: float) -> tuple[int, int]:
    """(steps of round 1, steps of each later round): labelling a model that cannot yet ground
    the target gives noise, so round 1 (no pseudo boxes) runs ``first_label`` of the budget and
    the later rounds split the rest."""
    if rounds <= 1:
        return steps, 0
    first = int(round(first_label * steps))
    return first, max(1, int(round((steps - first) / (rounds - 1))))


def row_config(row: str, args, seed: int):
    """A row's run config, typed and checked: the defaults, then ``--set``, then the bench's
    budget (``train.lr``, ``batch_size``, ``seed``, the rounds' ``max_steps``) and the row's
    alignment terms (each at ``--align-weight``; zero unless the row aligns), all through the
    stages' override parser (an unknown key or a wrongly typed value is refused in one line)."""
    for text in args.overrides:
        if text.split("=", 1)[0].strip().split(".", 1)[0] not in ("adapt", "loss"):
            raise SystemExit(f"--set {text}: only adapt.* and loss.* can be set here")
    try:
        base = resolve_config(None, args.overrides)
    except ValueError as exc:
        raise SystemExit(f"--set: {exc}") from None
    _, _, align, pseudo, oracle = ROWS[row]
    rounds = (args.rounds if args.rounds is not None else int(base["adapt"]["rounds"])) if pseudo else 1
    first, later = round_steps(args.steps, rounds, args.first_label)
    sets = [f"model.preset={args.preset}", f"train.lr={args.lr}", f"train.batch_size={args.batch_size}",
            f"train.seed={seed}", f"train.max_steps={first}", f"train.precision={'bf16' if args.amp else 'fp32'}",
            f"adapt.rounds={rounds}", f"adapt.aligner={args.aligner}",
            "adapt.round_train=" + (json.dumps({"max_steps": later}) if later else "{}")]
    sets += [f"loss.{term}=0.0" for term in ALL_ALIGN + ("adversarial",)]
    if align:
        w = args.align_weight if args.align_weight is not None else (1.0 if args.aligner == "mmd" else 0.1)
        if args.aligner == "mmd":
            sets += [f"loss.{t}={w}" for t in align]
        else:
            sets += ["adapt.discriminator.parts.image=1.0", "adapt.discriminator.parts.query=1.0",
                     f"adapt.discriminator.parts.conditional={1.0 if 'align_conditional' in align else 0.0}",
                     f"loss.adversarial={w}"]
    if oracle and args.oracle_weights == "source":  # real labels: the source's weights
        sets += [f"loss.pseudo_{t}={base['loss'][t]}" for t in ("box_l1", "box_giou", "box_focus")]
    try:
        return resolve_config(None, list(args.overrides) + sets)
    except ValueError as exc:
        raise SystemExit(f"{row}: {exc}") from None


def run_one(job: tuple) -> dict:
    """One (benchmark, row, seed) run; a picklable job for the process pool: the row's rounds
    (:func:`train_round`), each but the last followed by labelling with the round's output."""
    bench, row, seed, tables, tok, encoded, args = job
    if args.threads:
        torch.set_num_threads(args.threads)
    _, use_target, _, pseudo, oracle = ROWS[row]
    device = torch.device(args.device)
    cfg = row_config(row, args, seed)
    amp = autocast_dtype(device, str(cfg["train"]["precision"]))  # the trainer's rule (warns where a CPU emulates bf16)
    rounds = int(cfg["adapt"]["rounds"])
    target = None if not use_target else tables["target_train"] if oracle else target_rows(tables["target_train"])
    labels, round_log, curve, model, t0 = None, [], [], None, time.perf_counter()
    tag = f"[{bench} {row} s{seed}]"
    for r in range(rounds):
        rc = round_config(cfg, r)

        def on_step(engine, logs, r=r):
            done = engine.steps_done
            if logs["stepped"] and args.eval_every and done % args.eval_every == 0 and done < engine.total_steps:
                m = evaluate(engine.output, batches(encoded["target_test"], 64), device=device, autocast_dtype=amp)
                curve.append({"round": r, "step": done, "acc@0.5": m["pg/acc@0.5"], "mIoU": m["pg/mIoU"]})

        def progress(state, logs, r=r):
            print(f"  {tag} round {r + 1}/{rounds} step {state['step']} loss {logs['loss/total']:.3f} "
                  f"({(time.perf_counter() - t0) / 60:.1f} min)", flush=True)

        engine = train_round(rc, len(tok), tables["source_train"], target, tok, init=model, labels=labels,
                             device=device, amp=amp, on_step=on_step, progress=progress)
        model = engine.output
        if r < rounds - 1 or rc["adapt"]["label_last_round"]:
            t_label = time.perf_counter()
            # the labelling actors' work, in-process: every target train pair (hidden boxes kept
            # for the precision record only), then one selection over the whole set
            transform = BatchTransform(tok, model.config.image_size, model.config.max_text_len, train=False)
            labeler = RowLabeler.from_config(model, transform, rc["adapt"])
            step_rows, full = int(rc["adapt"]["label_batch_size"]), tables["target_train"]
            parts = [labeler(to_numpy_batch(full.slice(i, step_rows))) for i in range(0, full.num_rows, step_rows)]
            rnd = select_round(concat_predictions(parts), r, rc["adapt"])
            labels = rnd.table() if args.label_filter == "none" else right_only(rnd)
            by_signal = rnd.signal_precision(rnd.fraction, rc["adapt"])
            round_log.append({**rnd.summary(), "seconds": time.perf_counter() - t_label,
                              "precision_by_signal": by_signal})
            s = round_log[-1]
            print(f"  {tag} labelled: kept {int(s['n_kept'])}/{int(s['n_pairs'])}, precision@0.5 "
                  f"{s['precision@0.5']:.3f} (all {s['all_precision@0.5']:.3f}), centre on target "
                  f"{s['centre_precision']:.3f} (all {s['all_centre_precision']:.3f})", flush=True)
    train_s = time.perf_counter() - t0
    out = {"benchmark": bench, "row": row, "seed": seed, "train_s": train_s, "rounds": round_log, "curve": curve,
           "loss_weights": dict(cfg["loss"]), "adapt": to_dict(cfg)["adapt"], "train": to_dict(cfg)["train"]}
    for split in ("target_test", "source_test"):
        if split in encoded:
            pred = predict(model, batches(encoded[split], 64), device=device, autocast_dtype=amp)
            out.update({f"{split}/{k}": v for k, v in metrics_from_predictions(pred).items()})
            out[f"{split}/pairs"] = pair_ious(pred)  # per-pair IoU: paired bootstrap over pairs and seeds
    print(f"  {tag} -> target_test acc@0.5 {out['target_test/pg/acc@0.5']:.3f} "
          f"mIoU {out['target_test/pg/mIoU']:.3f} area ratio {out['target_test/pg/area_ratio']:.2f} "
          f"in {train_s / 60:.1f} min", flush=True)
    return out


def right_only(rnd):
    """Diagnostic: the round's table with only the kept pseudo boxes that are right at IoU 0.5
    against the hidden target boxes (an oracle's selection; never a result row's labels)."""
    table = rnd.table()
    right = np.asarray(rnd.best_iou() >= 0.5) & np.asarray(table["kept"])
    print(f"  --label-filter right: {int(right.sum())} of {int(rnd.keep.sum())} kept pseudo boxes are right", flush=True)
    return table.set_column(table.schema.get_field_index("kept"), "kept", pa.array(right))


# --------------------------------------------------------------------------- table
def _stats(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def summarise(results: list[dict], rows: list[str]) -> dict:
    """Per benchmark: per-row value lists (JSON) and a Markdown-ready table with mean ± std,
    the share of the source-only -> oracle gap closed and pseudo-label precision per round."""
    out: dict = {}
    for bench in dict.fromkeys(r["benchmark"] for r in results):
        runs = [r for r in results if r["benchmark"] == bench]
        per_row = {}
        for row in rows:
            rr = sorted((r for r in runs if r["row"] == row), key=lambda r: r["seed"])
            if rr:
                per_row[row] = {"acc@0.5": [r["target_test/pg/acc@0.5"] for r in rr],
                                "mIoU": [r["target_test/pg/mIoU"] for r in rr],
                                "R@1": [r.get("target_test/pr/R@1", float("nan")) for r in rr],
                                "seeds": [r["seed"] for r in rr],
                                "pseudo_precision@0.5": [[x["precision@0.5"] for x in r["rounds"]] for r in rr],
                                "precision_by_signal": [[x["precision_by_signal"] for x in r["rounds"]] for r in rr]}
        base = _stats(per_row["source_only"]["acc@0.5"])[0] if "source_only" in per_row else None
        ceil = _stats(per_row["oracle"]["acc@0.5"])[0] if "oracle" in per_row else None
        table = []
        for row, v in per_row.items():
            acc, acc_sd = _stats(v["acc@0.5"])
            miou, miou_sd = _stats(v["mIoU"])
            prec = [np.mean([p[i] for p in v["pseudo_precision@0.5"]]) for i in range(len(v["pseudo_precision@0.5"][0]))]
            gap = (acc - base) / (ceil - base) if base is not None and ceil is not None and ceil > base else None
            table.append({"row": ROWS[row][0], "acc@0.5": f"{acc:.3f} ± {acc_sd:.3f}", "mIoU": f"{miou:.3f} ± {miou_sd:.3f}",
                          "R@1": round(float(np.nanmean(v["R@1"])), 3) if not np.isnan(v["R@1"]).all() else None,
                          "gap closed": None if gap is None else round(gap, 2),
                          "pseudo precision@0.5 per round": ", ".join(f"{p:.2f}" for p in prec) or "-",
                          "seeds": len(v["acc@0.5"])})
        out[bench] = {"rows": per_row, "table": table}
    return out


def _write(name: str, args_dict: dict, results: list[dict], extra: dict, results_dir: str | None = None) -> dict:
    rows = [r for r in ROWS if any(x["row"] == r for x in results)]
    benches = summarise(results, rows)
    for bench, b in benches.items():
        print(f"\n{bench} (target test acc@0.5 of each row's output model: the EMA teacher where a row trains on target data; mean ± std over seeds)\n" + markdown_table(b["table"]))
    out = {"args": args_dict, "benchmarks": benches, "runs": results, **extra}
    print(f"wrote {write_result(name, out, results_dir)}")
    return out


def merge(args) -> dict:
    """One result from files whose runs differ only in rows or benchmarks (parallel processes)."""
    parts = [json.loads(Path(f).read_text(encoding="utf-8")) for f in args.merge]
    ignore = ("rows", "benchmarks", "name", "merge", "jobs", "threads", "seeds", "seed_list", "results_dir")
    if parts[0]["args"].get("protocol_sha256"):  # one protocol (compared below): its benchmarks' data seeds differ
        ignore += ("data_seed", "split_salt")
    # a setting a file lacks (it predates the flag) had the flag's default
    defaults = vars(parse_args([]))
    same = {k: parts[0]["args"].get(k, v) for k, v in defaults.items() if k not in ignore}
    for f, part in zip(args.merge, parts):
        diff = sorted(k for k, v in same.items() if part["args"].get(k, defaults[k]) != v)
        if diff:
            raise SystemExit(f"{f}: settings differ from {args.merge[0]} in {diff}; not merged")
    results = [r for part in parts for r in part["runs"]]
    return _write(args.name, {**same, "merged_from": args.merge}, results,
                  {"data": {k: v for p in parts for k, v in p.get("data", {}).items()}}, args.results_dir)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge(args)
    rows = args.rows.split(",")
    t0 = time.perf_counter()
    jobs, data_info = [], {}
    model_cfg = resolve_model_config(args.preset)
    max_len = int(model_cfg.max_text_len)
    for bench in args.benchmarks.split(","):
        tables, knobs = load_tables(bench, args)
        tok = tokenizer_for(args.preset, tables)
        transform = BatchTransform(tok, int(model_cfg.image_size), max_len, train=False)
        # evaluation reads encoded arrays; training and labelling read the rows through the
        # pipeline's transforms, so only the test splits are encoded here
        encoded = {k: encode(t, transform) for k, t in tables.items() if k not in ("source_train", "target_train")}
        sizes = {k: t.num_rows for k, t in tables.items()}
        data_info[bench] = {"pairs": sizes, "knobs": knobs}
        print(f"{bench} data ({time.perf_counter() - t0:.0f}s): {sizes}, {model_cfg.image_size}px", flush=True)
        seeds = [int(x) for x in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
        jobs += [(bench, row, seed, tables, tok, encoded, args) for seed in seeds for row in rows]
    if args.jobs > 1:
        # fork: the parent has run no torch kernels yet
        with mp.get_context("fork").Pool(args.jobs, maxtasksperchild=1) as pool:
            results = []
            for res in pool.imap_unordered(run_one, jobs, chunksize=1):
                results.append(res)  # a partial result file after every run: a long table survives a stop
                write_result(f"{args.name}.partial", {"args": vars(args), "runs": results}, args.results_dir)
    else:
        results = []
        for job in jobs:
            results.append(run_one(job))
            write_result(f"{args.name}.partial", {"args": vars(args), "runs": results}, args.results_dir)
    args_dict = {k: v for k, v in vars(args).items()}
    out = _write(args.name, args_dict, results, {"data": data_info, "wall_s": time.perf_counter() - t0},
                 args.results_dir)
    partial = Path(args.results_dir or Path(__file__).resolve().parent / "results") / f"{args.name}.partial.json"
    partial.unlink(missing_ok=True)
    return out


if __name__ == "__main__":
    main()
