"""The prepare command line as users run it (a subprocess): --help explains every option, and a
structural error exits 2 with one line naming the file and the problem, never a traceback.
None of these runs reaches Ray: structure is checked before any work is scheduled."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
PREPARE = ROOT / "pipelines" / "prepare.py"

pytestmark = pytest.mark.integration


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(PREPARE), *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=cwd)


def test_help_explains_every_option():
    from date_pipelines import prepare

    parser = prepare.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert set(subparsers) == {"synth", "manifest", "voc", "product1m"}
    for name, sub in subparsers.items():
        for action in sub._actions:
            assert action.help, f"{name}: option {action.option_strings or action.dest} has no help"
    res = run("synth", "--help")
    assert res.returncode == 0
    for opt in ("--mall", "--live", "--seed", "--out", "--splits", "--tokenizer", "--shard-mb", "474000"):
        assert opt in res.stdout, opt


def _one_line_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.startswith("prepare: error")]
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_structural_errors_exit_2_with_one_line(tmp_path):
    pq.write_table(pa.table({"image": ["a.jpg"], "query": ["q"], "item_id": ["i"]}), tmp_path / "m.parquet")
    _one_line_error(run("manifest", str(tmp_path / "m.parquet"), "--out", str(tmp_path / "o1")),
                    "m.parquet", "missing column(s) domain")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.jpg", "query": "q", "domain": "d"}) + "\n")
    _one_line_error(run("manifest", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "o2")),
                    "m.jsonl", "item_id")
    _one_line_error(run("manifest", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o3")),
                    "nope.jsonl", "file not found")
    (tmp_path / "dir.jsonl").mkdir()
    _one_line_error(run("manifest", str(tmp_path / "dir.jsonl"), "--out", str(tmp_path / "o3b")),
                    "dir.jsonl", "unreadable")
    _one_line_error(run("voc", str(tmp_path), "--domain", "mall", "--out", str(tmp_path / "o4")),
                    str(tmp_path), "not a Pascal VOC dataset")
    _one_line_error(run("product1m", str(tmp_path / "m.jsonl"), "--images", str(tmp_path / "none"),
                        "--out", str(tmp_path / "o5")), "none", "images folder not found")
    _one_line_error(run("synth", "--mall", "1", "--live", "1", "--splits", "train=0.9", "--out", str(tmp_path / "o6")),
                    "split fractions must sum to 1")


def test_existing_output_is_not_mixed_into(tmp_path):
    out = tmp_path / "ds"
    (out / "mall" / "train").mkdir(parents=True)
    (out / "mall" / "train" / "part-0.parquet").write_bytes(b"old")
    (tmp_path / "m.jsonl").write_text("")
    _one_line_error(run("manifest", str(tmp_path / "m.jsonl"), "--out", str(out)),
                    str(out), "--overwrite")
    assert (out / "mall" / "train" / "part-0.parquet").read_bytes() == b"old"


def test_instance_mode_options_and_structural_errors(tmp_path):
    res = run("synth", "--out", str(tmp_path / "o0"))
    assert res.returncode == 2 and "--mall and --live are required (or --instance)" in res.stderr
    res = run("voc", str(tmp_path), "--out", str(tmp_path / "o0"))
    assert res.returncode == 2 and "--domain is required (or --instance)" in res.stderr
    for sub, opts in (("synth", ("--instance", "--queries", "--items", "--distractors", "--single-per-item")),
                      ("voc", ("--instance", "--queries", "--gallery-per-class", "--seed"))):
        res = run(sub, "--help")
        assert res.returncode == 0 and all(o in res.stdout for o in opts), sub
    _one_line_error(run("synth", "--instance", "--queries", "10", "--items", "2", "--out", str(tmp_path / "o1")),
                    "items (the query pool) must be in [4, 1800]")
    _one_line_error(run("voc", str(tmp_path), "--instance", "--out", str(tmp_path / "o2")),
                    str(tmp_path), "not a Pascal VOC dataset")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
