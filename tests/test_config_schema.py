"""The typed config schema: default.yaml and the schema agree key for key, and an unknown key or
a wrongly typed value is refused in a file, in a --set override and on the command line, with
one line naming the key and the nearest known one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from date_core.config import default_config, resolve_config
from date_core.config_schema import SCHEMA, ConfigError, Section, check, describe, flat_keys, validate

ROOT = Path(__file__).resolve().parents[1]


def _default_paths(node: dict, spec: Section = SCHEMA, prefix: str = "") -> set[str]:
    """Dotted paths of default.yaml, descending into the sections the schema declares as such."""
    out = set()
    for key, value in node.items():
        sub = spec.keys().get(key)
        if isinstance(value, dict) and isinstance(sub, Section) and not sub.partial:
            out |= _default_paths(value, sub, f"{prefix}{key}.")
        else:
            out.add(f"{prefix}{key}")
    return out


def test_every_default_key_is_in_the_schema_and_back():
    """A key added to default.yaml without a type (or declared without a default) fails here."""
    defaults = default_config()
    declared = set(flat_keys())
    in_yaml = _default_paths(defaults)
    assert in_yaml - declared == set(), "keys in default.yaml without a type in date_core/config_schema.py"
    assert declared - in_yaml == set(), "keys in date_core/config_schema.py without a default in default.yaml"
    validate(defaults, "default.yaml")  # and every default has its declared type
    # the keys given in a partial section's default (e.g. adapt.reliability) are its own keys
    for path, spec in flat_keys().items():
        if isinstance(spec, Section) and spec.partial:
            node = defaults
            for part in path.split("."):
                node = node[part]
            assert set(node or {}) <= set(spec.keys()), path


@pytest.mark.parametrize("override, message", [
    ("train.epoch=2", "unknown config key 'train.epoch' (in --set train.epoch=2); did you mean 'train.epochs'?"),
    ("trian.lr=1", "unknown config key 'trian' (in --set trian.lr=1); did you mean 'train'?"),
    ("train.epochs=two", "config key 'train.epochs' expects int, got 'two' (str) (in --set train.epochs=two)"),
    ("runtime.use_gpu=1", "config key 'runtime.use_gpu' expects bool, got 1 (int)"),
    ("adapt.aligner=mmmd", "config key 'adapt.aligner' expects one of mmd, adversarial"),
    ("adapt.reliability.confidnce=1", "did you mean 'adapt.reliability.confidence'?"),
    ("adapt.round_train.epoch=1", "did you mean 'adapt.round_train.epochs'?"),
    ("model.overrides.hiden_size=3", "did you mean 'model.overrides.hidden_size'?"),
    ("model.overrides.hidden_size=big", "config key 'model.overrides.hidden_size' expects int"),
    ("train.zoom_out=[a, 1]", "config key 'train.zoom_out' expects list of float or null"),
])
def test_bad_override_is_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        resolve_config(None, [override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_file_names_the_file(tmp_path):
    cfg = tmp_path / "my.yaml"
    cfg.write_text("train:\n  epoch: 2\n")
    with pytest.raises(ConfigError, match=rf"unknown config key 'train.epoch' \(in {cfg}\); did you mean 'train.epochs'"):
        resolve_config(cfg)
    cfg.write_text("adapt:\n  keep_schedule: 0.5\n")
    with pytest.raises(ConfigError, match="'adapt.keep_schedule' expects list of float, got 0.5"):
        resolve_config(cfg)


def test_values_are_coerced_where_yaml_falls_short():
    # YAML 1.1 reads 1e-4 (no dot) as text; a float key takes it as the number it means
    cfg = resolve_config(None, ["train.lr=1e-4", "runtime.worker_resources={slot: 1}",
                                "model.overrides.hidden_size=192", "train.max_steps=null"])
    assert cfg["train"]["lr"] == pytest.approx(1e-4) and isinstance(cfg["train"]["lr"], float)
    assert cfg["runtime"]["worker_resources"] == {"slot": 1}
    assert cfg["model"]["overrides"] == {"hidden_size": 192} and cfg["train"]["max_steps"] is None
    assert check("runtime.worker_resources.gpu_slot", 2) == 2  # free names inside a dict key
    with pytest.raises(ConfigError, match="expects float"):
        check("runtime.worker_resources.gpu_slot", "two")


def test_help_lists_every_key():
    text = describe()
    for path in flat_keys():
        assert f"  {path} (" in text, path


def test_cli_refuses_a_typo_before_ray(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "pipelines" / "pgda.py"), "--set", "train.epoch=2", "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert lines == ["pgda: bad configuration: unknown config key 'train.epoch' (in --set train.epoch=2); "
                     "did you mean 'train.epochs'?"], out.stderr
