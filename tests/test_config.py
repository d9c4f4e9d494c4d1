"""Config resolution: defaults, file, overrides, and local paths made absolute."""
from __future__ import annotations

from pathlib import Path

from date_core.config import absolute_paths, resolve_config


def test_relative_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_preset.yaml").write_text("name: mine\n")
    cfg = resolve_config(None, ["data.root=runs/data/pw", "runtime.storage=s3://bucket/runs",
                                "model.init_from=ckpt/model", "model.preset=my_preset.yaml"])
    assert cfg["data"]["root"] == str(tmp_path / "runs" / "data" / "pw")
    assert cfg["model"]["init_from"] == str(tmp_path / "ckpt" / "model")
    assert cfg["model"]["preset"] == str(tmp_path / "my_preset.yaml")
    assert cfg["runtime"]["storage"] == "s3://bucket/runs"   # URIs stay
    assert cfg["data"]["tokenizer"] is None                  # unset stays unset


def test_preset_names_and_absolute_paths_stay(tmp_path):
    cfg = {"data": {"root": "/abs/data", "tokenizer": ""}, "model": {"preset": "tiny", "init_from": None},
           "runtime": {"storage": "rel"}}
    out = absolute_paths(cfg, base=tmp_path)
    assert out["data"]["root"] == "/abs/data" and out["model"]["preset"] == "tiny"
    assert out["runtime"]["storage"] == str(tmp_path / "rel")
    assert cfg["runtime"]["storage"] == "rel"  # the input is not modified
    assert Path(out["runtime"]["storage"]).is_absolute()


def test_the_resolved_config_is_frozen_typed_and_reads_as_a_mapping():
    import dataclasses
    import pickle

    import pytest
    import yaml

    from date_core.config import flatten, with_values
    from date_core.config_schema import ConfigError, default_config
    from date_core.config_types import Config, to_dict

    cfg = resolve_config(None, ["train.lr=2e-4", "adapt.keep_schedule=[0.2,0.4]"])
    assert isinstance(cfg, Config) and dataclasses.is_dataclass(cfg.train)
    assert cfg.train.lr == cfg["train"]["lr"] == 2e-4 and cfg.adapt.mmd.estimator == "unbiased"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0
    with pytest.raises(TypeError):
        cfg["train"]["lr"] = 1.0
    # one section type per schema section; partial sections (only the given keys) stay dicts
    assert type(cfg.adapt.mmd).__name__ == "AdaptMmdConfig" and isinstance(cfg.adapt.reliability, dict)
    # default.yaml is the one source of values: the typed defaults hold exactly its keys and values
    defaults, typed_defaults = default_config(), to_dict(resolve_config())
    for section in ("loss", "train", "adapt", "pretrain", "promote"):  # (data and runtime: paths made absolute)
        assert typed_defaults[section] == defaults[section], section
    assert set(flatten(cfg)) == set(flatten(default_config()))
    # a changed copy goes through the schema; the original stays
    lower = with_values(cfg, {"train.lr": 1e-5})
    assert isinstance(lower, Config) and lower.train.lr == 1e-5 and cfg.train.lr == 2e-4
    with pytest.raises(ConfigError, match="did you mean 'train.epochs'"):
        with_values(cfg, {"train.epoch": 3})
    # what Ray and MLflow need: it pickles (by reference to its classes) and dumps as YAML
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert yaml.safe_load(yaml.safe_dump(to_dict(cfg))) == cfg
