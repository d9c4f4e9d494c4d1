"""Helpers shared by every benchmark in ``bench/``: hardware description, date, result files
and Markdown tables.

Every benchmark writes ``bench/results/<name>.json`` through :func:`write_result`, which stamps
the date, the hardware and the software versions, so numbers in BENCHMARKS.md can always be
traced back to the machine that produced them.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def today() -> str:
    """The current UTC date and time, ISO 8601 (seconds)."""
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_gib() -> float | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _nvidia_smi_gpus() -> str | None:
    """``name (N GiB), ...`` from ``nvidia-smi``; ``None`` where it is absent or fails."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        rows = [line.rsplit(",", 1) for line in out.strip().splitlines() if "," in line]
        return ", ".join(f"{name.strip()} ({float(mib) / 1024:.0f} GiB)" for name, mib in rows) or None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def gpu_description() -> str | None:
    """Name and memory of each visible CUDA GPU, or ``None`` when there is none.

    Where this process has not used CUDA yet, ``nvidia-smi`` answers: even
    ``torch.cuda.is_available()`` registers PyTorch's fork guard, after which every CUDA call in
    a worker forked later fails ("Cannot re-initialize CUDA in forked subprocess"), and
    ``pgda_ablation.py --jobs N --device cuda`` forks its workers after writing a partial result.
    """
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_initialized():
        smi = _nvidia_smi_gpus()
        if smi is not None or shutil.which("nvidia-smi"):
            return smi
    if not torch.cuda.is_available():
        return None
    parts = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        parts.append(f"{p.name} ({p.total_memory / 2**30:.0f} GiB)")
    return ", ".join(parts)


def hardware() -> dict[str, Any]:
    """Machine facts a reader needs to interpret a timing: CPU, cores, memory, GPU, versions."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "usable_cpus": _usable_cpus(),
        "mem_gib": _mem_gib(),
        "gpu": gpu_description(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return info


def hardware_string() -> str:
    """One line, e.g. ``2 CPUs (Intel Xeon ...), 23.4 GiB RAM, no GPU, torch 2.x``."""
    h = hardware()
    gpu = h["gpu"] or "no GPU"
    mem = f", {h['mem_gib']} GiB RAM" if h["mem_gib"] else ""
    torch_v = f", torch {h['torch']}" if "torch" in h else ""
    return f"{h['usable_cpus']} CPUs ({h['cpu']}){mem}, {gpu}{torch_v}"


def git_commit() -> str | None:
    """The repository's HEAD commit (short), or ``None`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_result(name: str, result: Mapping[str, Any], results_dir: str | Path | None = None) -> Path:
    """Write ``result`` to ``bench/results/<name>.json`` with date, hardware and commit added.

    Returns the path written. ``result`` must be JSON-serialisable (numpy scalars are converted).
    """
    out_dir = Path(results_dir) if results_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "date": today(),
        "hardware": hardware(),
        "hardware_summary": hardware_string(),
        "commit": git_commit(),
        **dict(result),
    }
    path = out_dir / f"{name}.json"
    # strict JSON: undefined metrics (NaN) are written as null, as date_core.evaluation.metrics.metrics_json does
    from date_core.evaluation.metrics import json_safe

    text = json.dumps(json_safe(json.loads(json.dumps(payload, default=_json_default))), indent=2, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _json_default(obj: Any) -> Any:
    # numpy scalars/arrays and paths show up in results; everything else is a bug worth seeing
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (ValueError, TypeError):
            pass
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Iterable[str] | None = None) -> str:
    """Rows of dicts -> a GitHub Markdown table (columns in first-seen order unless given)."""
    if not rows:
        return "(no rows)"
    if columns is None:
        cols: list[str] = []
        for row in rows:
            for key in row:
                if key not in cols:
                    cols.append(key)
    else:
        cols = list(columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)
