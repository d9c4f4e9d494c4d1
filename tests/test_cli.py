"""The stage commands: every ``[project.scripts]`` entry is installed and names a stage's
``main``; a stage prints where its config came from in one line, and the whole config only on
``--dry-run`` (as YAML another run can take with ``--config``)."""
from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from date_core.cli import config_summary

ROOT = Path(__file__).resolve().parents[1]


def _scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_every_stage_has_an_installed_command():
    scripts = _scripts()
    stages = {p.stem for p in (ROOT / "pipelines").glob("*.py") if not p.stem.startswith("_")}
    assert {name.removeprefix("date-") for name in scripts} == stages
    bin_dir = Path(sys.executable).parent
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), target
        assert (bin_dir / name).exists(), f"{name} is not installed: pip install -e . again"


def test_dry_run_prints_the_config_others_take_with_config(tmp_path):
    out = subprocess.run([str(Path(sys.executable).parent / "date-pgda"), "--set", "adapt.rounds=3", "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["adapt"]["rounds"] == 3 and cfg["model"]["preset"] == "lite"
    (tmp_path / "run.yaml").write_text(out.stdout)
    again = subprocess.run([sys.executable, str(ROOT / "pipelines" / "pgda.py"), "--config", str(tmp_path / "run.yaml"),
                            "--dry-run"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and yaml.safe_load(again.stdout) == cfg, again.stderr


def test_config_summary_is_one_line():
    line = config_summary("my.yaml", ["adapt.rounds=3", "train.seed=1"])
    assert line.startswith("config: the defaults + my.yaml + 2 overrides (adapt.rounds=3, train.seed=1)")
    assert "\n" not in line and config_summary(None, []).startswith("config: the defaults (")
