#!/usr/bin/env python
"""Round-1 stalls of the main job on this machine: the code of an earlier commit against this
tree's, started the same way on the same data, seed by seed.

For each data seed: ProductWorld at the embedded default's size (1,600 mall + 1,000 live
images) is prepared once; then ``pipelines/pgda.py`` (one round, progress every 10 steps) runs
from the earlier commit's tree (``before``, a ``git archive`` in a temporary folder) and from this
tree (``after``), interleaved, each watched until step 30. A run counts as stalled when no step
line comes for ``--stall-s`` seconds after its training loop began (or the run passes
``--limit-s``); it is then killed. The step rate is steps 10 -> 30 over their wall time, so the two
trees' throughput is compared on the same seeds, in the same hour.

  python bench/stall.py                                  # 20 after-runs, 10 before-runs: ~1 hour on 2 CPUs
  python bench/stall.py --runs 3 --before-runs 3 --before 70fcbe3
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import write_result

ROOT = Path(__file__).resolve().parents[1]
STEP = re.compile(r"\[train\] step (\d+)/")
#: the commit whose stalls issue 33 reported (its round 1 hung on 2 CPUs)
BEFORE = "70fcbe3"


def prepare(tree: Path, out: Path, seed: int) -> None:
    """ProductWorld of the embedded default's size for ``seed`` (skipped when present)."""
    if (out / "_summary.json").exists():
        return
    subprocess.run([sys.executable, str(tree / "pipelines" / "prepare.py"), "synth", "--mall", "1600", "--live", "1000",
                    "--seed", str(seed), "--out", str(out)], check=True, stdout=subprocess.DEVNULL, env=_env(tree))


def _env(tree: Path, tmp: Path | None = None) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(tree))  # Ray's workers import this tree's date_core too
    if tmp is not None:
        env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}", RAY_TMPDIR=str(tmp))
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
    os.set_blocking(proc.stdout.fileno(), False)
    seen: dict[int, float] = {}
    loop_started = None
    outcome, buf, tail = "error", "", []
    try:
        while True:
            now = time.monotonic()
            chunk = proc.stdout.read() or ""
            buf += chunk
            *lines, buf = buf.split("\n")
            for line in lines:
                tail = (tail + [line])[-5:]
                if "EMA teacher" in line:
                    loop_started = now
                m = STEP.search(line)
                if m:
                    seen[int(m.group(1))] = now
            if seen and max(seen) >= steps:
                outcome = "ok"
                break
            last = max([loop_started or 0.0, *seen.values()])
            if (last and now - last > stall_s) or now - t0 > limit_s:
                outcome = "stall"
                break
            if proc.poll() is not None and not chunk:
                break
            time.sleep(0.5)
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
    ap.add_argument("--before-runs", type=int, default=10, help="before-runs: the first seeds only (stalls cost --stall-s each)")
    ap.add_argument("--before", default=BEFORE, help="the earlier commit")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--stall-s", type=float, default=180.0, help="no step line for this long = a stall")
    ap.add_argument("--limit-s", type=float, default=600.0, help="a run's wall-time limit (counted as a stall)")
    ap.add_argument("--work", default=str(ROOT / "bench" / "_work" / "stall"), help="prepared data (kept for reruns)")
    args = ap.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    before_commit = subprocess.run(["git", "rev-parse", args.before], cwd=ROOT, capture_output=True, text=True,
                                   check=True).stdout.strip()
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="dstall-") as scratch:
        old = Path(scratch) / "before"
        old.mkdir()
        archive = subprocess.run(["git", "archive", before_commit], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        for seed in range(args.runs):
            data = work / f"data-seed{seed}"
            prepare(ROOT, data, seed)
            for label, tree in (("before", old), ("after", ROOT)):
                if label == "before" and seed >= args.before_runs:
                    continue
                tmp = Path(scratch) / f"{label}-{seed}"
                tmp.mkdir()
                result = {"seed": seed, **start_round(tree, data, tmp, args.steps, args.stall_s, args.limit_s)}
                shutil.rmtree(tmp, ignore_errors=True)
                runs[label].append(result)
                print(f"[stall] seed {seed} {label}: {result['outcome']} at step {result['steps']} "
                      f"in {result['seconds']:.0f}s" + (f", {result['rate']:.3f} steps/s" if result["rate"] else ""),
                      flush=True)
    out = {"before": {**summarise(runs["before"]), "commit": before_commit},
           "after": summarise(runs["after"]),
           "step_rate": rate_ratio(runs["before"], runs["after"]),
           "setup": {"cpus": os.cpu_count(), "steps": args.steps, "stall_s": args.stall_s,
                     "data": "ProductWorld 1600 mall + 1000 live, data seed = run index", "round": 1}}
    path = write_result("stall", out)
    print(f"[stall] before: {out['before']['stalls']}/{out['before']['runs']} stalled; after: "
          f"{out['after']['stalls']}/{out['after']['runs']} stalled; step rate after/before "
          f"{out['step_rate'].get('ratio', float('nan')):.3f}; {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
