"""BENCHMARKS.md's "Current figures" block is what ``bench/report.py`` computes from
``bench/results/*.json``, and ``--check`` catches a figure edited by hand."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "bench" / "report.py"
BEGIN, END = "<!-- report:begin -->", "<!-- report:end -->"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPORT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_benchmarks_page_matches_the_result_files():
    out = _run("--check")
    assert out.returncode == 0, out.stderr


def _tampered(page: str) -> str:
    """The page with the first digit of the first table row of the block changed."""
    lines = page.split("\n")
    start, end = lines.index(BEGIN), lines.index(END)
    k = next(i for i in range(start, end) if lines[i].startswith("| ") and re.search(r"\d", lines[i])
             and not lines[i].startswith("| figure"))
    m = re.search(r"\d", lines[k])
    digit = str((int(m.group()) + 1) % 10)
    lines[k] = lines[k][:m.start()] + digit + lines[k][m.end():]
    return "\n".join(lines)


def test_check_catches_a_changed_figure(tmp_path):
    copy = tmp_path / "BENCHMARKS.md"
    copy.write_text(_tampered((ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")), encoding="utf-8")
    out = _run("--check", "--page", str(copy))
    assert out.returncode != 0
    message = out.stderr.strip()
    assert len(message.splitlines()) == 1 and "line" in message, message


def test_rewriting_a_tampered_copy_restores_it(tmp_path):
    page = (ROOT / "BENCHMARKS.md").read_text(encoding="utf-8")
    copy = tmp_path / "BENCHMARKS.md"
    copy.write_text(_tampered(page), encoding="utf-8")
    assert _run("--page", str(copy)).returncode == 0
    assert copy.read_text(encoding="utf-8") == page
    assert _run("--check", "--page", str(copy)).returncode == 0
