#!/usr/bin/env python
"""Round-1 stalls of the main job on this machine: the code of an earlier commit against this
tree's, started the same way on the same data, seed by seed.

For each data seed: ProductWorld at the embedded default's size (1,600 mall + 1,000 live
images, in the style of the stall's reproduction, ``../shared/repro/stall/world.yaml``) is
prepared once; then ``pipelines/pgda.py`` (one round, progress every 10 steps) runs from the
earlier commit's tree (``before``, a ``git archive`` in a temporary folder) and from this tree
(``after``), each watched until step 30. A run counts as stalled when no step line comes for
``--stall-s`` seconds after its training loop began (or the run passes ``--limit-s``); it is
then killed. The step rate (steps 10 -> 30 over their wall time) of both trees is compared on
the embedded default's own style for the first ``--rate-seeds`` seeds (runs to step
``--rate-steps``), interleaved, in the same hour.

  python bench/stall.py                 # 20 after-runs, 6 before-runs, 3 rate pairs: ~70 min on 2 CPUs
  python bench/stall.py --runs 3 --before-runs 3 --rate-seeds 1 --before 70fcbe3
  python bench/stall.py --seeds 7 --rate-seeds 0 --name stall_seed7     # the reproduction's own seed
"""
from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from _common import write_result

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"\[train\] step (\d+)/")
#: the commit whose stalls issue 33 reported (its round 1 hung on 2 CPUs)
BEFORE = "70fcbe3"


def prepare(tree: Path, out: Path, seed: int, world: Path | None) -> None:
    """ProductWorld of the embedded default's size for ``seed`` (skipped when present)."""
    if (out / "_summary.json").exists():
        return
    extra = ["--world-config", str(world)] if world else []
    with tempfile.TemporaryDirectory(prefix="dprep-") as tmp:  # Ray's session files
        subprocess.run([sys.executable, str(tree / "pipelines" / "prepare.py"), "synth", "--mall", "1600", "--live",
                        "1000", "--seed", str(seed), *extra, "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**_env(tree), "RAY_TMPDIR": tmp})


def _env(tree: Path, tmp: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(tree))  # Ray's workers import this tree's date_core too
    if tmp is not None:
        env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}", RAY_TMPDIR=str(tmp), TMPDIR=str(tmp))
    return env


def start_round(tree: Path, data: Path, tmp: Path, steps: int, stall_s: float, limit_s: float) -> dict:
    """One round-1 start from ``tree``: ``{"outcome": ok | stall | error, "steps": last step seen,
    "rate": steps/s between steps 10 and ``steps``, "seconds": wall time}``."""
    cmd = [sys.executable, str(tree / "pipelines" / "pgda.py"), "--set", f"data.root={data}",
           "--set", f"runtime.storage={tmp / 'ray'}", "--set", "adapt.rounds=1", "--set", "train.log_every=10",
           "--set", "runtime.run_name=stall-bench"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp,
                            env=_env(tree, tmp), start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put((time.monotonic(), ln)) for ln in proc.stdout], daemon=True).start()
    seen: dict[int, float] = {}
    loop_started = None
    outcome, tail = "error", []
    try:
        while True:
            try:
                at, line = lines.get(timeout=0.5)
            except queue.Empty:
                at, line = None, None
            if line is not None:
                tail = (tail + [line.rstrip()[:300]])[-5:]
                if "EMA teacher" in line:
                    loop_started = at
                m = STEP.search(line)
                if m:
                    seen[int(m.group(1))] = at
                if seen and max(seen) >= steps:
                    outcome = "ok"
                    break
            now = time.monotonic()
            last = max([loop_started or 0.0, *seen.values()])
            if (last and now - last > stall_s) or now - t0 > limit_s:
                outcome = "stall"
                break
            if line is None and proc.poll() is not None and lines.empty():
                break
    finally:
        _kill(proc)
    rate = None
    if 10 in seen and steps in seen:
        rate = (steps - 10) / max(seen[steps] - seen[10], 1e-9)
    return {"outcome": outcome, "steps": max(seen) if seen else 0, "rate": rate,
            "seconds": round(time.monotonic() - t0, 1), **({"tail": tail} if outcome == "error" else {})}


def _kill(proc: subprocess.Popen) -> None:
    """The job and the local Ray it started (one process group)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            time.sleep(2)  # Ray's own processes leave after the driver
        except subprocess.TimeoutExpired:
            continue


def summarise(runs: list[dict]) -> dict:
    return {"runs": len(runs), "stalls": sum(r["outcome"] == "stall" for r in runs),
            "errors": sum(r["outcome"] == "error" for r in runs), "per_run": runs}


def rate_ratio(before: list[dict], after: list[dict], n_boot: int = 2000) -> dict:
    """after / before step rate over the seeds where both reached the last step, with a
    bootstrap 95% interval over those seeds."""
    b = {r["seed"]: r["rate"] for r in before if r["rate"]}
    a = {r["seed"]: r["rate"] for r in after if r["rate"]}
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return {"seeds": 0}
    x, y = np.array([b[s] for s in seeds]), np.array([a[s] for s in seeds])
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(seeds), (n_boot, len(seeds)))
    boot = y[idx].mean(1) / x[idx].mean(1)
    return {"seeds": len(seeds), "before_steps_per_s": float(x.mean()), "after_steps_per_s": float(y.mean()),
            "ratio": float(y.mean() / x.mean()), "ci95": [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="after-runs: data seeds 0 .. runs-1")
    ap.add_argument("--before-runs", type=int, default=6, help="before-runs: the first seeds only (stalls cost --stall-s each)")
    ap.add_argument("--seeds", type=int, nargs="+", help="these data seeds only, both trees each (instead of --runs)")
    ap.add_argument("--name", default="stall", help="the result file: bench/results/NAME.json")
    ap.add_argument("--before", default=BEFORE, help="the earlier commit")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--stall-s", type=float, default=120.0, help="no step line for this long = a stall")
    ap.add_argument("--limit-s", type=float, default=600.0, help="a run's wall-time limit (counted as a stall)")
    ap.add_argument("--world-config", default=str(ROOT.parent / "shared" / "repro" / "stall" / "world.yaml"),
                    help="ProductWorld style of the stall runs (default: the stall's reproduction, live JPEG quality 40-60)")
    ap.add_argument("--rate-seeds", type=int, default=3,
                    help="also start both trees on the default style for these seeds: the step-rate pairs")
    ap.add_argument("--rate-steps", type=int, default=70, help="the step-rate pairs run to this step (rate: 10 -> it)")
    ap.add_argument("--work", default=str(ROOT / "bench" / "_work" / "stall"), help="prepared data (kept for reruns)")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    before_commit = subprocess.run(["git", "rev-parse", args.before], cwd=ROOT, capture_output=True, text=True,
                                   check=True).stdout.strip()
    world = Path(args.world_config) if args.world_config else None
    if world is not None and not world.is_file():
        print(f"[stall] {world} not found: the default ProductWorld style instead", flush=True)
        world = None
    runs: dict[str, list[dict]] = {"before": [], "after": [], "rate_before": [], "rate_after": []}
    with tempfile.TemporaryDirectory(prefix="dstall-") as scratch:
        old = Path(scratch) / "before"
        old.mkdir()
        archive = subprocess.run(["git", "archive", before_commit], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)

        def start(label: str, tree: Path, data: Path, seed: int) -> None:
            tmp = Path(scratch) / f"{label}-{seed}"
            tmp.mkdir()
            steps = args.rate_steps if label.startswith("rate_") else args.steps
            result = {"seed": seed, **start_round(tree, data, tmp, steps, args.stall_s, args.limit_s)}
            shutil.rmtree(tmp, ignore_errors=True)
            runs[label].append(result)
            print(f"[stall] seed {seed} {label}: {result['outcome']} at step {result['steps']} "
                  f"in {result['seconds']:.0f}s" + (f", {result['rate']:.3f} steps/s" if result["rate"] else ""),
                  flush=True)

        for seed in (args.seeds if args.seeds is not None else range(args.runs)):
            data = work / (f"stallworld-seed{seed}" if world else f"data-seed{seed}")
            prepare(ROOT, data, seed, world)
            if seed < args.before_runs or args.seeds is not None:
                start("before", old, data, seed)
            start("after", ROOT, data, seed)
            if seed < args.rate_seeds:  # throughput pairs on the embedded default's own style
                plain = work / f"data-seed{seed}"
                prepare(ROOT, plain, seed, None)
                start("rate_before", old, plain, seed)
                start("rate_after", ROOT, plain, seed)
    out = {"before": {**summarise(runs["before"]), "commit": before_commit},
           "after": summarise(runs["after"]),
           "step_rate": {**rate_ratio(runs["rate_before"], runs["rate_after"]),
                         "data": "the embedded default's ProductWorld style, data seeds 0 .. rate_seeds-1",
                         "per_run": {"before": runs["rate_before"], "after": runs["rate_after"]}},
           "setup": {"cpus": os.cpu_count(), "steps": args.steps, "rate_steps": args.rate_steps,
                     "stall_s": args.stall_s, "round": 1,
                     "data": "ProductWorld 1600 mall + 1000 live, data seed = run index",
                     "seeds": args.seeds,
                     "world_config": str(world.resolve().relative_to(ROOT.parent)) if world else None}}
    path = write_result(args.name, out)
    rate = out["step_rate"]
    rate_line = f"step rate after/before {rate['ratio']:.3f}" if rate.get("seeds") else "no step-rate pairs"
    print(f"[stall] before: {out['before']['stalls']}/{out['before']['runs']} stalled; after: "
          f"{out['after']['stalls']}/{out['after']['runs']} stalled; {rate_line}; {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
