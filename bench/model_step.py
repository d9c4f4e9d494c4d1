"""Training-step throughput of the DATE model presets: samples/s, peak memory, FLOPs.

    python bench/model_step.py                 # CPU: lite, tiny and small (+ baselines); GPU rows if one is present
    python bench/model_step.py --quick         # fewer timed steps
    python bench/model_step.py --skip-cpu --gpu-presets lite base --gpu-batches 64 256   # GPU rows only

CPU: ``lite`` (as the preset: frozen encoders; and with its last encoder layers trained),
``tiny`` and ``small`` in float32 through ``engine.train_step``, beside a bare baseline loop
per preset (forward, loss, backward, optimiser step written out by hand: the engine must cost
nothing) and the hybrid conv-stem variant of tiny. GPU (when ``torch.cuda.is_available()``):
``lite``, ``tiny``, ``small`` and ``base`` (``--gpu-presets``) under bf16 autocast at the fastest of the
power-of-two batches that fit (or of ``--gpu-batches``), their achieved TFLOP/s against the GPU's
dense bf16 peak, and the same batch in float32 as the baseline. Each configuration runs in its own subprocess so that peak memory is its own.
Writes ``bench/results/model_step.json`` and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _common import gpu_description, hardware_string, markdown_table, write_result


ROOT = Path(__file__).resolve().parents[1]
#: ``lite`` with its last 6 image blocks and 2 text layers trained (what a GPU user would unfreeze)
LITE_TRAINED_TOP = {"vision_frozen_blocks": 5, "text_frozen_layers": 4}
#: The CPU baseline: the hybrid conv-stem backbone tiny was first designed with (the preset
#: now uses the plain ViT, which learned as fast; this row shows what the stem would cost).
HYBRID_TINY = {"stem_channels": [32, 64], "coord_channels": True, "patch_size": 3, "vision_layers": 2,
               "vision_mlp": 256, "text_mlp": 256, "fusion_mlp": 256}

#: Dense bf16 tensor-core peak (TFLOP/s) by GPU name fragment (vendor datasheets, no sparsity).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0,
                    "A100": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0, "A10G": 70.0, "A10": 125.0,
                    "RTX 4090": 165.0, "RTX 3090": 71.0, "V100": 0.0, "T4": 0.0}


def bf16_peak(name: str) -> float | None:
    for frag, peak in BF16_PEAK_TFLOPS.items():
        if frag in name:
            return peak or None  # V100/T4 have no bf16 tensor cores
    return None


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _batch(cfg, b: int, device):
    import torch

    from date_core import batch as B
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(b, 2, generator=g) * 0.5 + 0.25
    wh = torch.rand(b, 2, generator=g) * 0.3 + 0.1
    out = {
        B.PIXEL_VALUES: torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g),
        B.INPUT_IDS: torch.randint(5, cfg.vocab_size, (b, cfg.max_text_len), generator=g),
        B.ATTENTION_MASK: torch.ones(b, cfg.max_text_len, dtype=torch.long),
        B.BOXES: torch.cat([xy, wh], 1), B.HAS_BOX: torch.ones(b), B.BOX_WEIGHT: torch.ones(b),
        B.ITEM_KEY: torch.arange(b),
    }
    return {k: v.to(device) for k, v in out.items()}


def measure_one(preset: str, overrides: dict, batch_size: int, device: str, dtype: str | None,
                steps: int, min_seconds: float, bare: bool = False) -> dict:
    """One configuration in this process -> samples/s, step time, FLOPs per step, peak memory.

    ``bare``: the baseline loop (forward, loss, backward, AdamW step written out by hand) instead
    of :func:`date_core.training.engine.train_step`, to show what the engine's bookkeeping costs.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from date_core import build_model
    from date_core.training.engine import build_optimizer, train_step
    from date_core.training.losses import DateCriterion

    idle_rss = _rss_mib()
    torch.manual_seed(0)
    model = build_model(preset, **overrides).to(device)
    crit = DateCriterion()
    opt = build_optimizer(model, {"lr": 1e-4})
    batch = _batch(model.config, batch_size, device)
    autocast = getattr(torch, dtype) if dtype else None
    cuda = device.startswith("cuda")

    def step():
        if bare:
            out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
            crit.total(crit(out, batch)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            train_step(model, crit, batch, opt, autocast_dtype=autocast, device=device)

    step()  # warm-up (allocator, kernels)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    if cuda:
        torch.cuda.synchronize()
    n, start = 0, time.perf_counter()
    while n < steps or time.perf_counter() - start < min_seconds:
        step()
        n += 1
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"preset": preset, "device": device, "dtype": dtype or "float32", "batch": batch_size,
           "params_M": sum(p.numel() for p in model.parameters()) / 1e6, "steps": n,
           "step_s": elapsed / n, "samples_per_s": batch_size * n / elapsed,
           "gflop_per_step": flops / 1e9, "achieved_tflops": flops * n / elapsed / 1e12}
    if cuda:
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    else:
        out["peak_rss_mib"] = peak_rss
        out["peak_above_idle_mib"] = peak_rss - idle_rss
    return out


def run_sub(args_list: list[str], timeout: float) -> dict | None:
    """Run ``--one`` in a fresh interpreter (clean peak memory); None on OOM / failure."""
    proc = subprocess.run([sys.executable, __file__, *args_list], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout)[-400:]
    print(f"  configuration {args_list} failed: {tail}", file=sys.stderr)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer timed steps")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")),
                    help="torch CPU threads (1 is faster on a shared, oversubscribed machine)")
    ap.add_argument("--skip-cpu", action="store_true", help="GPU rows only (the CPU rows are this machine's, "
                    "and a GPU host's CPU is another machine)")
    ap.add_argument("--gpu-presets", nargs="+", default=["lite", "tiny", "small", "base"])
    ap.add_argument("--gpu-batches", nargs="+", type=int, default=None,
                    help="bf16 batch sizes to try per preset (default: doubling from 32 until memory is 45%% full)")
    ap.add_argument("--name", default="model_step", help="result name (<results-dir>/<name>.json)")
    ap.add_argument("--results-dir", default=None, help="write the result here instead of bench/results/")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: JSON spec of one configuration
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.one:
        spec = json.loads(args.one)
        print(json.dumps(measure_one(**spec)))
        return

    steps, min_s = (2, 3.0) if args.quick else (5, 15.0)
    rows = []
    cpu_configs = [("lite", {}, 32, "lite", False), ("lite", {}, 32, "lite bare loop (baseline)", True),
                   ("lite", LITE_TRAINED_TOP, 32, "lite, last encoder layers trained", False),
                   ("tiny", {}, 32, "tiny", False), ("tiny", {}, 32, "tiny bare loop (baseline)", True),
                   ("tiny", HYBRID_TINY, 32, "tiny hybrid stem", False), ("small", {}, 16, "small", False)]
    for preset, overrides, bs, label, bare in ([] if args.skip_cpu else cpu_configs):
        spec = dict(preset=preset, overrides=overrides, batch_size=bs, device="cpu", dtype=None,
                    steps=steps, min_seconds=min_s, bare=bare)
        print(f"cpu: {label} batch {bs} ...", flush=True)
        res = run_sub(["--one", json.dumps(spec), "--threads", str(args.threads)], timeout=1800)
        if res:
            res["config"] = label
            rows.append(res)
    for preset in ("lite", "tiny"):  # each preset against its own bare loop
        base = next((r for r in rows if "baseline" in r["config"] and r["preset"] == preset), None)
        for r in rows:
            if base and r["device"] == "cpu" and r["preset"] == preset:
                r["vs_baseline"] = r["samples_per_s"] / base["samples_per_s"]

    gpu = gpu_description()
    gpu_note = None
    if gpu is None:
        gpu_note = "No GPU was available on this machine: the GPU rows (tiny/small/base in bf16) were not measured."
        print(gpu_note)
    else:
        name = torch.cuda.get_device_name(0)
        peak = bf16_peak(name)
        total = torch.cuda.get_device_properties(0).total_memory / 2**30
        for preset in args.gpu_presets:
            best = None
            # the largest power-of-two batch that fits (doubling while under 45% of memory), or the given ladder
            ladder = args.gpu_batches or [32 * 2 ** i for i in range(8)]
            for bs in ladder:
                spec = dict(preset=preset, overrides={}, batch_size=bs, device="cuda", dtype="bfloat16",
                            steps=steps, min_seconds=min_s / 3)
                res = run_sub(["--one", json.dumps(spec)], timeout=900)
                if res is None:
                    break
                if best is None or res["samples_per_s"] > best["samples_per_s"]:
                    best = res
                if args.gpu_batches is None and res["peak_mem_gib"] > 0.45 * total:
                    break  # doubling again would not fit
            if best is None:
                continue
            best["config"] = f"{preset} bf16"
            best["bf16_peak_tflops"] = peak
            best["mfu"] = best["achieved_tflops"] / peak if peak else None
            rows.append(best)
            spec = dict(preset=preset, overrides={}, batch_size=best["batch"], device="cuda", dtype=None,
                        steps=steps, min_seconds=min_s / 3)
            fp32 = run_sub(["--one", json.dumps(spec)], timeout=900)
            if fp32:
                fp32["config"] = f"{preset} fp32 (baseline)"
                rows.append(fp32)
                best["vs_baseline"] = best["samples_per_s"] / fp32["samples_per_s"]

    cols = ["config", "device", "dtype", "batch", "params_M", "samples_per_s", "vs_baseline", "step_s",
            "gflop_per_step", "achieved_tflops", "mfu", "peak_rss_mib", "peak_above_idle_mib", "peak_mem_gib"]
    print(markdown_table(rows, cols))
    load = os.getloadavg()
    path = write_result(args.name, {
        "what": "train-step throughput (forward, loss, backward, AdamW) per preset; CPU rows float32",
        "threads": args.threads, "load_average_1_5_15": load, "quick": args.quick,
        "gpu_note": gpu_note, "hybrid_overrides": HYBRID_TINY, "rows": rows,
        "hardware_note": hardware_string()}, args.results_dir)
    print(f"load average {load[0]:.1f} on {os.cpu_count()} CPUs; wrote {path}")


if __name__ == "__main__":
    main()
