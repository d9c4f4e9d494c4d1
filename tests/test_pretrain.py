"""CAPTURE-style pretraining: masking, the three loss terms on a fixed batch, the in-process
loop, ``model.init_from`` (weights loaded, clear errors), and one pipelines/pretrain.py run on
Ray with a local MLflow store that registers the pretrained model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from date_core import batch as B
from date_core import build_model
from date_core.training.engine import build_optimizer
from date_core.training.pretrain import (IGNORE, CaptureCriterion, TokenSpec, build_pretrainer, mask_patches, mask_tokens,
                                pretrain_loop, pretrain_step)

from _model_synth import overfit_pairs, rows_to_batch, tokenizer_for

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(max_text_len=8, vision_layers=1, text_layers=1, fusion_layers=1)


@pytest.fixture(scope="module")
def data():
    rows = overfit_pairs(n_images=4, seed=1)
    tok = tokenizer_for(rows)
    return tok, rows_to_batch(rows, tok, max_len=8)


def _model(tok, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model("tiny", vocab_size=len(tok), **{**TINY, **overrides})


def test_mask_tokens_touches_only_real_non_special_tokens(data):
    tok, batch = data
    spec = TokenSpec.from_tokenizer(tok)
    ids = batch[B.INPUT_IDS].repeat(64, 1)
    attn = batch[B.ATTENTION_MASK].repeat(64, 1)
    masked, labels = mask_tokens(ids, attn, spec, prob=0.5, generator=torch.Generator().manual_seed(0))
    special = torch.isin(ids, torch.tensor(spec.special_ids))
    chosen = labels != IGNORE
    assert not (chosen & (special | ~attn.bool())).any()           # never [CLS], [SEP], padding
    assert ((masked != ids) <= chosen).all()                         # only chosen tokens change
    assert (labels[chosen] == ids[chosen]).all()
    assert chosen.any(dim=1).all()                                   # at least one per caption
    assert not torch.isin(masked[masked != ids], torch.tensor([i for i in spec.special_ids if i != spec.mask_id])).any()
    share = chosen.sum() / (attn.bool() & ~special).sum()
    assert 0.4 < float(share) < 0.65
    as_mask = (masked[chosen] == spec.mask_id).float().mean()
    kept = (masked[chosen] == ids[chosen]).float().mean()
    assert 0.7 < float(as_mask) < 0.9 and 0.04 < float(kept) < 0.2   # BERT's 80/10/10


def test_mask_patches_blanks_whole_cells():
    pixels = torch.randn(3, 3, 96, 96) + 5.0
    blanked, mask = mask_patches(pixels, grid=8, ratio=0.25, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (3, 64) and (mask.sum(1) == 16).all()
    cells = (blanked == 0).all(dim=1).view(3, 8, 12, 8, 12).all(dim=4).all(dim=2)  # [3, 8, 8] cell fully zero
    assert torch.equal(cells.flatten(1), mask)


def test_each_term_is_finite_and_falls_on_a_fixed_batch(data):
    tok, batch = data
    model = _model(tok)
    pretrainer, criterion = build_pretrainer(model, tok, {"mlm_prob": 0.3})
    optimizer = build_optimizer(pretrainer.model, {"lr": 5e-4, "weight_decay": 0.0}, extra_modules=[pretrainer.heads])
    history = []
    for _ in range(20):  # the same masks every step: the fixed batch can be learned
        logs = pretrain_step(pretrainer, criterion, batch, optimizer, generator=torch.Generator().manual_seed(3))
        history.append(logs)
    first, last = history[0], history[-1]
    for term in ("mlm", "mpm", "itc"):
        values = [h[f"loss/{term}"] for h in history]
        assert all(torch.isfinite(torch.tensor(values))), term
        assert min(values[-3:]) < 0.75 * values[0], (term, values)  # itc's floor is ln 2 (2 queries an image)
    assert last["mlm_acc"] > first["mlm_acc"]
    assert first["loss/total"] == pytest.approx(first["loss/mlm"] + first["loss/mpm"] + first["loss/itc"], rel=1e-5)


def test_criterion_weights_switch_terms_off_and_refuse_unknown_names(data):
    tok, batch = data
    pretrainer, criterion = build_pretrainer(_model(tok), tok, {"loss": {"mlm": 0.0, "mpm": 2.0, "itc": 1.0}})
    terms, _ = pretrainer(batch)
    assert set(terms) == {"mpm", "itc"}
    with torch.no_grad():
        assert float(criterion.total(terms)) == pytest.approx(float(2 * terms["mpm"] + terms["itc"]))
    with pytest.raises(KeyError, match="unknown pretraining loss term"):
        CaptureCriterion({"mrm": 1.0})
    with pytest.raises(ValueError, match="every pretraining loss weight is 0"):
        CaptureCriterion({"mlm": 0, "mpm": 0, "itc": 0})


def test_pretrain_loop_trains_the_model_in_place(data):
    tok, batch = data
    model = _model(tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    history: list = []
    out = pretrain_loop(model, lambda: [batch, batch], 3, {"train": {"lr": 1e-3}}, tokenizer=tok, history=history)
    assert out is model and not out.training
    assert [h["step"] for h in history] == [1.0, 2.0, 3.0]
    assert {"loss/mlm", "loss/mpm", "loss/itc", "loss/total", "lr"} <= set(history[0])
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("query_aggregator.") for k in changed) and any(k.startswith("vision.") for k in changed)


def _tiny_cfg(**overrides):
    return {"model": {"preset": "tiny", "overrides": {**TINY, **overrides}, "init_from": None}}


def test_init_from_loads_the_pretrained_weights_and_refuses_others(data, tmp_path):
    from date_core.inference import save_checkpoint
    from date_core.runtime.trainer import init_model

    tok, batch = data
    pretrained = pretrain_loop(_model(tok, seed=1), lambda: [batch], 2, tokenizer=tok)
    folder = save_checkpoint(pretrained, tmp_path / "pre", tok)
    fresh = init_model(_tiny_cfg(), len(tok))
    assert not all(torch.equal(v, pretrained.state_dict()[k]) for k, v in fresh.state_dict().items())
    loaded = init_model(_tiny_cfg(), len(tok), str(folder))
    for key, value in pretrained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    with pytest.raises(ValueError, match="does not fit the configured model"):
        init_model(_tiny_cfg(hidden_size=64, aggregator_heads=4, fusion_heads=4), len(tok), str(folder))
    with pytest.raises(FileNotFoundError):
        init_model(_tiny_cfg(), len(tok), str(tmp_path / "nowhere"))


def test_a_stage_with_an_unfit_init_from_fails_before_ray_and_logs_its_source(pw_dataset, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from date_core.config import resolve_config
    from date_core.inference import save_checkpoint
    from date_core.runtime import tracking
    from date_core.runtime.supervised import run_stage
    from date_core.text import load_tokenizer

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tok = load_tokenizer(pw_dataset / "tokenizer")
    other = save_checkpoint(build_model("tiny", vocab_size=len(tok), hidden_size=64, aggregator_heads=4,
                                        fusion_heads=4), tmp_path / "other", tok)
    cfg = resolve_config(None, [f"data.root={pw_dataset}", "model.preset=tiny", f"model.init_from={other}",
                                f"runtime.storage={tmp_path / 'ray'}", "runtime.experiment=test-init"])
    exp = tracking.setup("test-init")
    with pytest.raises(ValueError, match="does not fit the configured model"):
        run_stage(cfg, "bad-init", experiment_id=exp, out_dir=tmp_path / "out")
    run = MlflowClient(tracking_uri=uri).search_runs([exp])[0]
    assert run.info.status == "FAILED" and run.data.params["init_from.source"] == str(other)


@pytest.mark.integration
def test_pretrain_pipeline_on_ray_registers_a_model_that_init_from_loads(pw_dataset, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from date_core.config import resolve_config
    from date_core.inference import load_model
    from date_core.runtime import session
    from date_core.runtime.trainer import init_model

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [f"data.root={pw_dataset}", "model.preset=tiny", f"runtime.storage={tmp_path / 'ray'}",
            "runtime.experiment=test-pretrain", "runtime.registered_model=test-seeker", "runtime.run_name=pre",
            "runtime.cpus_per_worker=0.5", "runtime.object_store_mb=256", "train.batch_size=8",
            "pretrain.registered_model=test-pretrained", "pretrain.train.max_steps=3",
            "pretrain.train.warmup_steps=0", "pretrain.train.log_every=1", "pretrain.train.checkpoint_every=2"]
    cmd = [sys.executable, str(ROOT / "pipelines" / "pretrain.py"), "--out", str(tmp_path / "out")]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "RAY_ADDRESS": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout[proc.stdout.rindex("\n{\n") + 1:])  # the closing summary
    assert summary["registered_version"] == "1"

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version("test-pretrained", "1")
    run = client.get_run(summary["mlflow_run_id"])
    assert version.run_id == run.info.run_id and run.info.status == "FINISHED"
    assert run.data.tags["date.stage"] == "pretrain"
    history = client.get_metric_history(run.info.run_id, "pretrain/loss/mlm")
    assert sorted({m.step for m in history}) == [1, 2, 3] and all(m.value == m.value for m in history)
    for term in ("mpm", "itc", "total"):
        assert f"pretrain/loss/{term}" in run.data.metrics

    # the registered version starts training: model.init_from=models:/test-pretrained/1
    out_model = tmp_path / "out" / "model"
    assert (out_model / "pretrain_heads.safetensors").is_file()
    saved = load_model(out_model)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = resolve_config(None, sets + ["model.init_from=models:/test-pretrained/1"])
    loaded = init_model(cfg, session.vocab_size(session.tokenizer_dir(cfg)), cfg["model"]["init_from"], uri)
    for key, value in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_config_keeps_an_mlflow_init_from_and_is_off_by_default():
    from date_core.config import resolve_config

    assert resolve_config(None, [])["model"]["init_from"] is None
    cfg = resolve_config(None, ["model.init_from=models:/date-pretrained/3"])
    assert cfg["model"]["init_from"] == "models:/date-pretrained/3"  # not made a local path
