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
