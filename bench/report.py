#!/usr/bin/env python
"""The "Current figures" block of BENCHMARKS.md, generated from ``bench/results/*.json`` only.

    python bench/report.py                      # rewrite the block between the two marker lines
    python bench/report.py --check              # exit 1 (one line naming the first difference)
                                                # when the page's block is not what the JSON gives
    python bench/report.py --check --page COPY  # the same against another copy of the page

Every number in the block is read from a result file and rounded by a fixed rule per figure,
so the output is deterministic. Standard library only (no torch, no ray): it runs in a second.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
PAGE = ROOT / "BENCHMARKS.md"
BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"
TEST_DATA = "chosen on test data; to be replaced by the protocol of issue 26"


@dataclass(frozen=True)
class Row:
    """One line of the table: what, how much, and where it comes from."""

    figure: str
    value: str
    files: tuple[str, ...]  # result file names under bench/results, the row's own first
    record: dict[str, Any]  # the JSON record (a file or a sub-record) giving date, commit, machine


@lru_cache(maxsize=None)
def load(name: str) -> dict[str, Any]:
    """``bench/results/<name>`` parsed (cached)."""
    with open(RESULTS / name, encoding="utf-8") as fh:
        return json.load(fh)


def f(x: float, digits: int = 3) -> str:
    """Fixed decimals."""
    return f"{x:.{digits}f}"


def n(x: float) -> str:
    """A whole number with thousands separators."""
    return f"{x:,.0f}"


def mean_std(values: list[float], digits: int = 3) -> str:
    """``mean ± sample std (N seeds)``."""
    return f"{f(statistics.mean(values), digits)} ± {f(statistics.stdev(values), digits)} (mean ± std, {len(values)} seeds)"


def seeds_span(runs: list[dict[str, Any]]) -> str:
    """``data seeds A-B`` of a list of per-run records."""
    seeds = [r["seed"] for r in runs]
    return f"data seeds {min(seeds)}-{max(seeds)}"


def stall() -> list[Row]:
    """Round-1 stalls before and after per-stream placement groups, and the step-rate ratio."""
    d = load("stall.json")
    b, a, r = d["before"], d["after"], d["step_rate"]
    lo, hi = r["ci95"]
    return [
        Row("Round-1 stalls, before -> after",
            f"{b['stalls']} of {b['runs']} runs ({seeds_span(b['per_run'])}) -> {a['stalls']} of {a['runs']} "
            f"({seeds_span(a['per_run'])})", ("stall.json",), d),
        Row("Round-1 step rate, after / before",
            f"{f(r['ratio'])} (95% interval {f(lo)}-{f(hi)}, bootstrap over {r['seeds']} seeds; "
            f"{f(r['after_steps_per_s'])} vs {f(r['before_steps_per_s'])} steps/s)", ("stall.json",), d),
    ]


def search() -> list[Row]:
    """Exact and approximate top-k search against numpy brute force."""
    d = load("search.json")
    c = d["cpu"]
    scale = f"{n(c['gallery'])} x {c['dim']}, top-{c['k']} for {n(c['queries'])} queries"
    return [
        Row(f"Catalogue search, exact_search vs numpy ({scale})",
            f"{f(c['exact_x_numpy'], 2)}x numpy ({f(c['exact_qps'], 1)} vs {f(c['numpy_qps'], 1)} queries/s), "
            f"identical results {f(c['exact_identical_to_numpy'], 2)}", ("search.json",), d),
        Row("Catalogue search, FAISS HNSW vs numpy (clustered gallery)",
            f"{c['ann_x_numpy_same_run']:.0f}x numpy, recall@10 {f(c['ann_recall@10'])}", ("search.json",), d),
    ]


def instance() -> list[Row]:
    """Product1M-style instance retrieval: the best row and DATE."""
    d = load("instance_retrieval.json")
    rows = d["rows"]
    return [
        Row(f"Instance retrieval, mAP@10 (official), {label}", mean_std(rows[key]["mAP@10"], 4),
            ("instance_retrieval.json",), d)
        for key, label in (("dual_encoder", "plain dual encoder"), ("date", "DATE"))
    ]


def data_path() -> list[Row]:
    """Ray Data's actor pool against the plain PIL loop."""
    d = load("data_throughput.json")
    base = next(r for r in d["read"] if r["path"].endswith("(baseline)"))
    pool = next(r for r in d["read"] if "actors" in r["path"])
    return [Row(f"Data path, Ray Data actor pool ({pool['cpus']} CPUs) vs plain loop",
                f"{f(pool['steady vs baseline'], 2)}x after the first batch ({pool['rows/s after first batch']:.0f} vs "
                f"{base['rows/s']:.0f} rows/s); {f(pool['vs baseline'], 2)}x with start-up",
                ("data_throughput.json",), d)]


def model_step() -> list[Row]:
    """The engine's overhead on the CPU, and bf16 on the GPU."""
    d = load("model_step.json")
    rows = {r["config"]: r for r in d["rows"]}
    eng, bare, bf16 = rows["lite"], rows["lite bare loop (baseline)"], rows["lite bf16"]
    gpu = d["gpu_run"]
    return [
        Row("Model step, engine.train_step vs bare loop (lite, CPU)",
            f"{f(eng['vs_baseline'], 2)}x ({f(eng['samples_per_s'], 1)} vs {f(bare['samples_per_s'], 1)} samples/s, "
            f"batch {eng['batch']})", ("model_step.json",), d),
        Row("Model step, lite with bf16 autocast on one GPU",
            f"{n(bf16['samples_per_s'])} samples/s, {f(bf16['vs_baseline'], 2)}x fp32 (batch {bf16['batch']}, "
            f"{f(100 * bf16['mfu'], 1)}% of bf16 peak)", ("model_step.json",), gpu),
    ]


def train_overhead() -> list[Row]:
    """Ray Train against the plain PyTorch loop."""
    d = load("train_overhead.json")
    rows = d["rows"]
    plain = next(r for r in rows if r["run"].startswith("plain"))
    one = next(r for r in rows if r["run"].startswith("Ray Train, 1 worker (1"))
    two = next(r for r in rows if r["run"].startswith("Ray Train, 2 workers"))
    return [Row("Ray Train vs plain loop, steady state",
                f"1 worker {f(one['ratio vs plain'], 2)}x ({f(one['samples_per_s'], 1)} vs "
                f"{f(plain['samples_per_s'], 1)} samples/s); 2 workers {f(two['ratio vs plain'], 2)}x",
                ("train_overhead.json",), d)]


def groceries() -> list[Row]:
    """Freiburg groceries, 10 minutes of training, val split."""
    out = []
    for name in ("real_groceries_lite.json", "real_groceries.json"):
        d = load(name)
        v, args = d["final_val"], d["args"]
        last = d["curve"][-1]
        budget = f"{args['minutes']:.0f} min" if args.get("minutes") else f"{n(args['steps'])} steps"
        out.append(Row(f"Real groceries (Freiburg val), {args['preset']}, {budget}",
                       f"acc@0.5 {f(v['pg/acc@0.5'])}, R@1 {f(v['pr/R@1'])} ({n(last['step'])} steps, seed {args['seed']})",
                       (name,), d))
    return out


def rerank() -> list[Row]:
    """Re-ranking by grounding confidence: the best weight against retrieval alone."""
    d = load("rerank.json")
    out = []
    for bench, label in (("productworld", "ProductWorld"), ("freiburg", "Freiburg")):
        sub = d["benchmarks"][bench]
        rows = sub["rows"]
        base = next(r for r in rows if r["weight"] == 0)
        best = max((r for r in rows if r["weight"] > 0), key=lambda r: (r["R@1 - R@1(w=0)"], -r["weight"]))
        out.append(Row(f"Re-ranking, {label}: R@1 at the best W vs W = 0",
                       f"{best['R@1 - R@1(w=0)']:+.3f} ± {f(best['paired se'])} (paired s.e.) at W = {best['weight']:g}, "
                       f"over {f(base['R@1'])}", ("rerank.json",), {**d, "date": sub.get("date", d["date"])}))
    return out


def learning_curve() -> list[Row]:
    """acc@0.5 at the end of a 10-minute schedule, 3 seeds."""
    out = []
    for name, label in (("learning_curve_bf16_3seeds.json", "lite (frozen encoders)"),
                        ("learning_curve_lite_ft_3seeds.json", "lite-ft (top encoder layers trained)")):
        d = load(name)
        end = [run["curve"][-1]["acc@0.5"] for run in d["runs"].values()]
        out.append(Row(f"Learning curve, {label}, val acc@0.5 after {d['settings']['minutes']:.0f} min",
                       mean_std(end), (name,), d))
    return out


def adaptation() -> list[Row]:
    """The adaptation table's best full-DATE rows and the share of the source -> oracle gap they close."""
    src, orc = load("pgda_focus.json"), load("pgda_focus_oracle.json")
    out = []
    for name, bench, label in (("pgda_freiburg_rounds4.json", "freiburg", "Freiburg live"),
                               ("pgda_pw_rounds3.json", "productworld", "ProductWorld live")):
        d = load(name)
        acc = d["benchmarks"][bench]["rows"]["full_date"]["acc@0.5"]
        s = statistics.mean(src["benchmarks"][bench]["rows"]["source_only"]["acc@0.5"])
        o = statistics.mean(orc["benchmarks"][bench]["rows"]["oracle"]["acc@0.5"])
        gap = (statistics.mean(acc) - s) / (o - s)
        a = d["args"]
        out.append(Row(f"Adaptation, {label}: full DATE, {a['rounds']} rounds, alignment {a['align_weight']:g} "
                       f"({TEST_DATA})",
                       f"acc@0.5 {mean_std(acc)}; {100 * gap:.0f}% of the gap closed (source only {f(s)}, "
                       f"oracle {f(o)})", (name, "pgda_focus.json", "pgda_focus_oracle.json"), d))
    return out


def ablation() -> list[Row]:
    """The whole ablation table of ``pgda_ablation.json``, one row per benchmark."""
    d = load("pgda_ablation.json")
    seeds = sorted({run["seed"] for run in d["runs"]})
    out = []
    for bench, label in (("productworld", "ProductWorld live"), ("freiburg", "Freiburg live")):
        rows = d["benchmarks"][bench]["rows"]
        value = ", ".join(f"{name.replace('_', ' ')} {f(statistics.mean(rows[name]['acc@0.5']))}"
                          for name in ("source_only", "target_pairs", "marginal", "conditional", "pseudo_only",
                                       "full_date", "oracle") if name in rows)
        out.append(Row(f"Adaptation ablation, {label}, acc@0.5 (seed{'s' if len(seeds) > 1 else ''} "
                       f"{', '.join(map(str, seeds))}; {d['args']['steps']} steps; the benchmark's loop before the "
                       f"round engine; defaults {TEST_DATA})",
                       value, ("pgda_ablation.json",), d))
    return out


SECTIONS: tuple[Callable[[], list[Row]], ...] = (
    stall, search, instance, data_path, model_step, train_overhead, groceries, rerank, learning_curve, adaptation,
    ablation)


def machine(record: dict[str, Any]) -> str:
    """The GPU, else the CPUs, of a record."""
    hw = record.get("hardware")
    if isinstance(hw, dict):
        return hw["gpu"] if hw.get("gpu") else f"{hw['usable_cpus']} CPUs ({hw['cpu']})"
    return str(record.get("hardware_summary", hw)).split(", ")[0]


def cell(text: str) -> str:
    """Table-safe text."""
    return text.replace("|", "\\|")


def block() -> list[str]:
    """The generated lines, markers included."""
    lines = [
        BEGIN,
        "## Current figures",
        "",
        "Generated by `python bench/report.py` from `bench/results/*.json`; do not edit by hand "
        "(`python bench/report.py --check` fails when this block and the result files disagree). "
        "Date, commit and machine are those recorded in the result file. Conditions, baselines and "
        "caveats of each figure are in its dated section of [docs/experiments.md](docs/experiments.md).",
        "",
        "| figure | value | result file | date | commit | machine |",
        "|---|---|---|---|---|---|",
    ]
    for section in SECTIONS:
        for row in section():
            files = ", ".join(f"[`{name}`](bench/results/{name})" for name in row.files)
            lines.append("| " + " | ".join(cell(x) for x in (
                row.figure, row.value, files, str(row.record["date"])[:10], str(row.record["commit"])[:7],
                machine(row.record))) + " |")
    lines += [
        "",
        "Adaptation rows: the number of rounds, the alignment weight and the teacher's zoom were picked "
        "after seeing these target test scores, so read them as optimistic until the protocol of issue 26 "
        "replaces them.",
        END,
    ]
    return lines


def split_page(text: str) -> tuple[list[str], list[str], list[str]]:
    """(lines before the block, the block with its markers, lines after); ValueError without markers."""
    lines = text.split("\n")
    try:
        i, j = lines.index(BEGIN), lines.index(END)
    except ValueError:
        raise ValueError(f"markers {BEGIN} / {END} not found") from None
    if j < i:
        raise ValueError(f"{END} comes before {BEGIN}")
    return lines[:i], lines[i:j + 1], lines[j + 1:]


def check(page: Path) -> str | None:
    """``None`` when the page's block is what the JSON gives, else a one-line description of the first difference."""
    before, have, _ = split_page(page.read_text(encoding="utf-8"))
    want = block()
    for k, (h, w) in enumerate(zip(have, want)):
        if h != w:
            return f"{page.name} line {len(before) + k + 1} differs from the JSON: page has {h!r}, JSON gives {w!r}"
    if len(have) != len(want):
        return f"{page.name}: the block has {len(have)} lines, the JSON gives {len(want)}"
    return None


def main(argv: list[str] | None = None) -> int:
    """Rewrite or check the block; the exit status is 0 when the page matches the JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    ap.add_argument("--page", type=Path, default=PAGE, help="the page to rewrite or check (default: BENCHMARKS.md)")
    args = ap.parse_args(argv)
    try:
        if args.check:
            problem = check(args.page)
            if problem:
                print(f"{problem}; run python bench/report.py", file=sys.stderr)
                return 1
            print(f"{args.page.name}: current figures match bench/results")
            return 0
        before, _, after = split_page(args.page.read_text(encoding="utf-8"))
        args.page.write_text("\n".join(before + block() + after), encoding="utf-8")
    except (OSError, ValueError, KeyError, StopIteration) as exc:
        print(f"report.py: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the current figures to {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
