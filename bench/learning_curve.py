"""How fast does each preset learn? Validation Acc@0.5 (and R@1) against wall-clock and
optimiser steps on ProductWorld ``mall`` rows, single process on the CPU.

    python bench/learning_curve.py                            # lite (pretrained) beside tiny (from scratch), 10 min each
    python bench/learning_curve.py --variants lite            # any of: lite, tiny, no-focus, hybrid
    python bench/learning_curve.py --variants lite --precision bf16 --planned-steps 1200   # bf16 autocast
    python bench/learning_curve.py --variants lite-ft --precision bf16 --planned-steps 1000 --seeds 3
    python bench/learning_curve.py --merge a.json b.json --name c   # one table of single-seed runs

Rows are rendered by ``date_core.data.productworld``, turned into batches by the data layer's
``BatchTransform`` (letterbox at the preset's image size; the pretrained text encoder's own
tokenizer, or a WordPiece trained on the training queries for presets built from scratch) once,
cached under ``bench/_work/``, then trained step by step by the round engine that ``train.py``'s
workers run (:class:`date_core.adapt.round.RoundEngine`: the config's criterion, optimiser,
warm-up + cosine schedule and step, with the default config's scale augmentation). Evaluation
time is excluded from the training clock. The machine is shared, so steps are reported beside
seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from _common import hardware_string, markdown_table, write_result

from date_core import build_model
from date_core.adapt.round import RoundEngine
from date_core.config import resolve_config
from date_core.training.engine import PRECISIONS, autocast_dtype, evaluate


ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "_work"
#: Named variants: model overrides and loss weights on top of the preset. ``no-focus`` is the
#: baseline: the same model trained without the box_focus term (the seeker must then find the
#: target from the box losses alone, as the design measured before this preset did).
#: ``hybrid`` is the conv-stem backbone that tiny was first designed with.
VARIANTS = {
    "lite": ("lite", {}, {}),
    # lite with the last two stride-16 MBConv blocks and the last two MiniLM layers trained (at
    # train.encoder_lr_mult of the learning rate); its step rate against the frozen lite: docs/experiments.md
    "lite-ft": ("lite", {"vision_frozen_blocks": 9, "text_frozen_layers": 4}, {}),
    "tiny": ("tiny", {}, {}),
    "no-focus": ("tiny", {}, {"box_focus": 0.0}),
    "hybrid": ("tiny", {"stem_channels": [32, 64], "coord_channels": True, "patch_size": 3, "vision_layers": 2,
                        "vision_mlp": 256, "text_mlp": 256, "fusion_mlp": 256}, {}),
}


def preset_inputs(preset: str, overrides: dict | None = None) -> tuple[int, str | None]:
    """(image size, pretrained tokenizer folder or None) of a preset."""
    from date_core.model import pretrained_tokenizer_dir, resolve_model_config

    cfg = resolve_model_config(preset, **(overrides or {}))
    tok = pretrained_tokenizer_dir(cfg)
    return cfg.image_size, None if tok is None else str(tok)


def make_data(domain: str, n_images: int, seed: int, image_size: int, max_len: int, tok=None):
    """Render ``n_images`` ProductWorld images -> (numpy batch columns, tokenizer); ``tok``: a
    tokenizer, or None to train a WordPiece on the rendered queries."""
    from date_core.data.productworld import render_images
    from date_core.data.transforms import BatchTransform
    from date_core.text import train_wordpiece

    rows = render_images(domain, range(n_images), seed)
    if tok is None:
        tok = train_wordpiece([r["query"] for r in rows], vocab_size=4000)
    cols = {k: np.array([r[k] for r in rows], dtype=object) for k in ("image", "query", "item_id",
                                                                      "image_id", "pair_id")}
    cols["box"] = np.array([r["box"] for r in rows], dtype=object)
    cols["alt_boxes"] = np.array([r["alt_boxes"] for r in rows], dtype=object)
    out = BatchTransform(tok, image_size, max_len)(cols)
    return out, tok


def cached(domain: str, n_images: int, seed: int, image_size: int, max_len: int, tok=None,
           pretrained_tok: str | None = None):
    """``make_data`` cached under ``bench/_work``; ``pretrained_tok``: a pretrained tokenizer folder."""
    WORK.mkdir(parents=True, exist_ok=True)
    tag = "pre" if pretrained_tok else "wp"
    path = WORK / f"pw_{domain}_{n_images}_{seed}_{image_size}_{max_len}_{tag}.npz"
    tok_dir = Path(pretrained_tok) if pretrained_tok else WORK / f"tok_{domain}_{n_images}_{seed}"
    if pretrained_tok and tok is None:
        from date_core.text import load_tokenizer
        tok = load_tokenizer(tok_dir)
    if path.exists() and (tok is not None or tok_dir.is_dir()):
        from date_core.text import load_tokenizer
        data = dict(np.load(path))
        return data, tok if tok is not None else load_tokenizer(tok_dir)
    data, tok2 = make_data(domain, n_images, seed, image_size, max_len, tok)
    np.savez(path, **data)
    if tok is None:
        tok2.save_pretrained(str(tok_dir))
    return data, tok2


def batches(data: dict, batch_size: int, rng: np.random.Generator | None = None):
    n = len(data["input_ids"])
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for i in range(0, n - (batch_size - 1 if rng is not None else 0), batch_size):
        idx = order[i:i + batch_size]
        yield {k: torch.from_numpy(v[idx]) for k, v in data.items()}


def run(name: str, preset: str, overrides: dict, weights: dict, train, val, tok, args) -> dict:
    torch.manual_seed(args.seed)
    model = build_model(preset, vocab_size=len(tok), max_text_len=args.max_len, **overrides)
    n_params = sum(p.numel() for p in model.parameters())
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # the criterion, optimiser, schedule and step train.py's workers build from the config
    # (the default config's scale augmentation unless --no-zoom)
    sets = [f"train.lr={args.lr}", f"train.encoder_lr_mult={args.encoder_lr_mult}", f"train.warmup_steps={args.warmup}",
            f"train.max_steps={args.planned_steps}", f"train.precision={args.precision}"]
    sets += [f"loss.{k}={v}" for k, v in weights.items()] + (["train.zoom_out=null"] if args.no_zoom else [])
    amp = autocast_dtype("cpu", args.precision)  # train.precision on this CPU (evaluation stays float32)
    engine = RoundEngine.build(resolve_config(None, sets), model, args.planned_steps, target=False, align=False,
                               autocast_dtype=amp, gather=False)
    rng = np.random.default_rng(args.seed)
    curve, step, train_s = [], 0, 0.0
    next_eval = 0.0
    stop = min(args.planned_steps, args.stop_at_step or args.planned_steps)
    while train_s < args.minutes * 60 and step < stop:
        for batch in batches(train, args.batch_size, rng):
            t0 = time.perf_counter()
            engine.step(batch, None, 0)
            train_s += time.perf_counter() - t0
            step += 1
            by_steps = args.eval_every_steps and step % args.eval_every_steps == 0
            if by_steps or (not args.eval_every_steps and train_s >= next_eval) or train_s >= args.minutes * 60 \
                    or step >= stop:
                m = evaluate(model, list(batches(val, 128)))
                point = {"run": name, "step": step, "train_s": round(train_s, 1),
                         "acc@0.5": m["pg/acc@0.5"], "mIoU": m["pg/mIoU"], "R@1": m["pr/R@1"]}
                curve.append(point)
                print(json.dumps(point), flush=True)
                next_eval += args.eval_every_s
            if train_s >= args.minutes * 60 or step >= stop:
                break
    pairs_s = step * args.batch_size / train_s
    print(f"{name}: {n_params / 1e6:.2f} M parameters ({n_trainable / 1e6:.2f} M trained), {step} steps, "
          f"{pairs_s:.1f} pairs/s ({'bf16 autocast' if amp is not None else 'float32'})")
    return {"preset": preset, "curve": curve, "params_M": n_params / 1e6, "trainable_M": n_trainable / 1e6,
            "steps": step, "train_s": train_s, "precision": "bf16" if amp is not None else "fp32",
            "pairs_per_s": pairs_s, "overrides": overrides, "loss_weights": weights}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="training wall-clock budget per run")
    ap.add_argument("--train-images", type=int, default=3000)
    ap.add_argument("--val-images", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--encoder-lr-mult", type=float, default=0.1,
                    help="learning-rate factor of the (unfrozen) encoder layers, train.encoder_lr_mult")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--planned-steps", type=int, default=3000, help="cosine schedule length")
    ap.add_argument("--stop-at-step", type=int, default=0, help="stop early (the schedule still spans --planned-steps)")
    ap.add_argument("--eval-every-s", type=float, default=60.0)
    ap.add_argument("--eval-every-steps", type=int, default=0, help="evaluate by steps instead of seconds")
    ap.add_argument("--max-len", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=PRECISIONS, default="auto",
                    help="train.precision of the training step (auto = float32 on a CPU; bf16 pays off where "
                         "the CPU has AMX)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=1, help="runs per variant, seeds --seed .. --seed+N-1 "
                    "(model init and batch order; the data stay the same)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="RESULT.json",
                    help="combine result files (e.g. one per seed) into one result under --name, with the summary")
    ap.add_argument("--set", action="append", default=[], help="model override key=value (YAML value)")
    ap.add_argument("--variants", default="lite,tiny", help=f"comma-separated, of {sorted(VARIANTS)}")
    ap.add_argument("--no-zoom", action="store_true", help="without the default train.zoom_out augmentation")
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--name", default="learning_curve", help="result file bench/results/<name>.json")
    args = ap.parse_args()
    if args.merge:
        return merge(args)
    torch.set_num_threads(args.threads)
    import yaml
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}

    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {sorted(VARIANTS)}")
    runs = {}
    for name in names:
        preset, model_over, weights = VARIANTS[name]
        model_over = {**model_over, **overrides}
        t0 = time.perf_counter()
        size, pre_tok = preset_inputs(preset, model_over)
        train, tok = cached("mall", args.train_images, 0, size, args.max_len, pretrained_tok=pre_tok)
        val, _ = cached("mall", args.val_images, 1, size, args.max_len, tok, pretrained_tok=pre_tok)
        print(f"{name}: {len(train['input_ids'])} train / {len(val['input_ids'])} val pairs at {size} px "
              f"({time.perf_counter() - t0:.0f}s)", flush=True)
        for seed in range(args.seed, args.seed + args.seeds):
            key = name if args.seeds == 1 else f"{name}/seed{seed}"
            runs[key] = {**run(key, preset, model_over, weights, train, val, tok,
                               argparse.Namespace(**{**vars(args), "seed": seed})), "seed": seed}
    rows = [p for r in runs.values() for p in r["curve"]]
    print(markdown_table(rows, ["run", "step", "train_s", "acc@0.5", "mIoU", "R@1"]))
    summary = summarise(runs)
    print(markdown_table(list(summary.values()), ["variant", "seeds", "end acc@0.5", "best acc@0.5", "steps"]))
    load = os.getloadavg()
    print(f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    if not args.no_write:
        path = write_result(args.name, {
            "what": "val acc@0.5 / mIoU / R@1 vs training wall-clock (evaluation excluded) and steps, "
                    f"ProductWorld mall, single process, CPU, train.precision {args.precision}",
            "settings": dict(vars(args)), "overrides": overrides, "runs": runs, "summary": summary,
            "load_average_1_5_15_at_end": load, "hardware_note": hardware_string()})
        print(f"wrote {path}")


def summarise(runs: dict) -> dict:
    """Per variant (the run key before ``/seed``): the end-of-schedule and best val acc@0.5 of
    each seed and their mean ± std (std over seeds, ddof 1)."""
    groups: dict[str, list[dict]] = {}
    for key, r in runs.items():
        groups.setdefault(key.split("/seed")[0], []).append(r)

    def stat(values: list[float]) -> str:
        sd = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
        return f"{np.mean(values):.3f} ± {sd:.3f}" if len(values) > 1 else f"{values[0]:.3f}"

    out = {}
    for variant, rs in groups.items():
        end = [r["curve"][-1]["acc@0.5"] for r in rs]
        best = [max(p["acc@0.5"] for p in r["curve"]) for r in rs]
        out[variant] = {"variant": variant, "seeds": len(rs), "end acc@0.5": stat(end), "best acc@0.5": stat(best),
                        "steps": ", ".join(str(r["steps"]) for r in rs), "end": end, "best": best}
    return out


def merge(args) -> None:
    """``--merge``: runs of several result files (same settings but seed and name) under one name;
    a run is keyed ``<variant>/seed<seed>``, the variant being the file's ``--variants``."""
    parts = [(f, json.loads(Path(f).read_text(encoding="utf-8"))) for f in args.merge]
    ignore = ("seed", "seeds", "name", "merge", "no_write")
    first = {k: v for k, v in parts[0][1]["settings"].items() if k not in ignore}
    runs = {}
    for f, part in parts:
        same = {k: v for k, v in part["settings"].items() if k not in ignore}
        diff = sorted(k for k in set(first) | set(same) if first.get(k, None) != same.get(k, None))
        if diff:
            raise SystemExit(f"{f}: settings differ from {args.merge[0]} in {diff}; not merged")
        # a --set override is part of the variant's name (lite+vision_frozen_blocks=9 is not lite)
        extra = "+" + ",".join(part["settings"].get("set") or []) if part["settings"].get("set") else ""
        for key, r in part["runs"].items():
            seed = r.get("seed", part["settings"]["seed"])
            runs[f"{key.split('/seed')[0]}{extra}/seed{seed}"] = {**r, "seed": seed, "from": f, "commit": part.get("commit"),
                                                               "date": part.get("date")}
    summary = summarise(runs)
    print(markdown_table(list(summary.values()), ["variant", "seeds", "end acc@0.5", "best acc@0.5", "steps"]))
    path = write_result(args.name, {"what": parts[0][1]["what"], "settings": parts[0][1]["settings"],
                                    "overrides": parts[0][1].get("overrides", {}), "runs": runs,
                                    "summary": summary, "merged_from": args.merge,
                                    "hardware_note": hardware_string()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
