"""No silent fallback to synthetic data: ProductWorld is generated only at the embedded
default's root or when asked with ``data.synth.generate``; any other root without a dataset,
and a dataset without a domain or split the stage reads, stops with one line."""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from date_core.config import resolve_config
from date_core.data.schema import DataError
from date_core.runtime.dataset import default_root, plan_dataset, required_parts



def _fake_dataset(root: Path, parts=(("mall", "train"), ("mall", "val"), ("mall", "test"),
                                     ("live", "train"), ("live", "test"))) -> Path:
    # the guard looks at which <domain>/<split> folders hold Parquet files, not inside them
    for domain, split in parts:
        (root / domain / split).mkdir(parents=True)
        (root / domain / split / "part-0.parquet").write_bytes(b"PAR1")
    return root


def _plan(stage: str, *overrides: str) -> str:
    cfg = resolve_config(None, list(overrides))
    return plan_dataset(cfg, required_parts(cfg, stage))


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def test_default_root_generates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default root is relative to the working directory
    assert default_root() == str(tmp_path / "runs" / "data" / "productworld")
    assert _plan("pgda") == "generate"
    assert _plan("train") == "generate"


def test_other_root_without_dataset_stops(tmp_path):
    typo = tmp_path / "productwrld"
    with pytest.raises(DataError) as err:
        _plan("pgda", f"data.root={typo}")
    line = _one_line(err.value)
    assert str(typo) in line and "pipelines/prepare.py" in line and "data.synth.generate=true" in line
    assert not typo.exists()


def test_explicit_flag_generates_anywhere(tmp_path):
    assert _plan("pgda", f"data.root={tmp_path / 'mine'}", "data.synth.generate=true") == "generate"


def test_complete_dataset_is_ready(tmp_path):
    root = _fake_dataset(tmp_path / "pw")
    assert _plan("pgda", f"data.root={root}") == "ready"
    assert _plan("train", f"data.root={root}") == "ready"


@pytest.mark.parametrize("override, missing", [
    ("data.test_split=holdout", "mall/holdout, live/holdout"),
    ("data.target_domain=stream", "stream/train, stream/test"),
    ("data.source_domain=shop", "shop/train, shop/val, shop/test"),
])
def test_missing_split_or_domain_stops(tmp_path, override, missing):
    root = _fake_dataset(tmp_path / "pw")
    # the flag never fills a gap in an existing dataset
    with pytest.raises(DataError) as err:
        _plan("pgda", f"data.root={root}", override, "data.synth.generate=true")
    line = _one_line(err.value)
    assert str(root) in line and f"has no {missing} " in line and "pipelines/prepare.py" in line


def test_missing_split_at_default_root_stops(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fake_dataset(tmp_path / "runs" / "data" / "productworld", parts=(("mall", "train"), ("mall", "val")))
    assert _plan("train") == "ready"
    with pytest.raises(DataError, match="has no mall/test, live/train, live/test"):
        _plan("pgda")


@pytest.mark.integration
def test_s3_typo_stops(s3_endpoint):
    with pytest.raises(DataError) as err:
        _plan("pgda", "data.root=s3://date-test/no-such-prefix")
    assert "s3://date-test/no-such-prefix" in _one_line(err.value)
    with pytest.raises(DataError) as err:
        _plan("pgda", "data.root=s3://no-such-bucket-date/pw")
    assert "s3://no-such-bucket-date/pw" in _one_line(err.value)


@pytest.mark.parametrize("stage", ["pgda", "train"])
def test_cli_exits_with_one_line(stage, tmp_path, capsys):
    module = importlib.import_module(f"date_pipelines.{stage}")
    typo = tmp_path / "typo"
    with pytest.raises(SystemExit) as exit_:
        module.main(["--set", f"data.root={typo}", "--set", f"runtime.storage={tmp_path / 'ray'}"])
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith(f"{stage}: {typo}: no prepared dataset here")
    assert "\n" not in message
    assert not typo.exists() and not (tmp_path / "ray").exists()
