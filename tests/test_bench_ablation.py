"""The adaptation benchmark runs every row, the control included, through the pipeline's round
engine (a smoke run of bench/pgda_ablation.py on a few rendered images)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from date_core.adapt.round import RoundEngine

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_quick_ablation_runs_every_row_with_the_control(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("pgda_ablation", None)
    import pgda_ablation

    calls = []
    real_step = RoundEngine.step

    def counting_step(engine, batch, target_batch, micro_step):
        calls.append(target_batch is not None)
        return real_step(engine, batch, target_batch, micro_step)

    monkeypatch.setattr(RoundEngine, "step", counting_step)
    out = pgda_ablation.main(["--quick", "--threads", "1", "--name", "quick", "--results-dir", str(tmp_path),
                              "--protocol", "dev"])
    rows = out["benchmarks"]["productworld"]["rows"]
    # the frozen protocol's dev data, recorded by the file's hash
    assert out["args"]["protocol"] == "dev" and out["args"]["data_seed"] == 0
    assert out["args"]["protocol_sha256"] == hashlib.sha256((BENCH / "protocol.yaml").read_bytes()).hexdigest()
    # per-pair IoU of every test pair with a box, which acc@0.5 thresholds (paired bootstrap input)
    for run in out["runs"]:
        pairs = run["target_test/pairs"]
        assert len(pairs["iou"]) == len(pairs["pair_key"]) == run["target_test/pg/n_boxes"]
        assert np.mean(np.asarray(pairs["iou"]) >= 0.5) == pytest.approx(run["target_test/pg/acc@0.5"], abs=1e-6)
    assert list(rows) == list(pgda_ablation.ROWS)          # the control row target_pairs included
    assert all(len(v["acc@0.5"]) == 1 for v in rows.values())
    # every row x 6 steps, all through the round engine; every row but source_only carries target pairs
    n = len(pgda_ablation.ROWS)
    assert len(calls) == n * 6 and sum(calls) == (n - 1) * 6
    control = [r for r in out["runs"] if r["row"] == "target_pairs"][0]
    assert control["rounds"] == [] and control["loss_weights"]["align_marginal_image"] == 0.0
    pseudo = [r for r in out["runs"] if r["row"] == "pseudo_only"][0]
    assert len(pseudo["rounds"]) == 1 and "precision@0.5" in pseudo["rounds"][0]
    saved = json.loads((tmp_path / "quick.json").read_text())
    assert set(saved["benchmarks"]["productworld"]["rows"]) == set(pgda_ablation.ROWS)


def test_late_alignment_labels_as_pseudo_only_and_aligns_only_after(tmp_path, monkeypatch):
    """``adapt.align_from_round=1``: full DATE's first round is pseudo-labels-only's first round
    (the same teacher labels the same pairs), and the aligner runs only in the second round."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("pgda_ablation", None)
    import pgda_ablation

    aligned = []
    real_step = RoundEngine.step

    def recording_step(engine, batch, target_batch, micro_step):
        if engine.aligner is not None or aligned:
            aligned.append(engine.aligner is not None)
        return real_step(engine, batch, target_batch, micro_step)

    monkeypatch.setattr(RoundEngine, "step", recording_step)
    out = pgda_ablation.main(["--quick", "--threads", "1", "--rows", "pseudo_only,full_date", "--name", "late",
                              "--set", "adapt.align_from_round=1", "--results-dir", str(tmp_path)])
    runs = {r["row"]: r for r in out["runs"]}
    first = [runs[row]["rounds"][0] for row in ("pseudo_only", "full_date")]
    for key in ("n_kept", "reliability_mean", "agreement_mean", "centre_precision"):
        assert first[0][key] == pytest.approx(first[1][key], abs=1e-6), key
    # quick: 6 steps, labelled after 3: the aligner is in exactly the last 3 of full DATE's steps
    assert aligned == [True, True, True]
    assert runs["full_date"]["loss_weights"]["align_conditional"] == 1.0


def test_rounds_come_from_the_config_and_the_flag_wins(tmp_path, monkeypatch):
    """``--set adapt.rounds=3`` labels twice, as the pipeline's rounds would; ``--rounds`` overrides
    it; and each run records the rounds it ran in its ``adapt`` section."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("pgda_ablation", None)
    import pgda_ablation

    common = ["--quick", "--threads", "1", "--rows", "pseudo_only", "--results-dir", str(tmp_path)]
    by_set = pgda_ablation.main(common + ["--name", "r3", "--set", "adapt.rounds=3"])["runs"][0]
    assert len(by_set["rounds"]) == 2 and by_set["adapt"]["rounds"] == 3
    by_flag = pgda_ablation.main(common + ["--name", "r2", "--set", "adapt.rounds=3", "--rounds", "2"])["runs"][0]
    assert len(by_flag["rounds"]) == 1 and by_flag["adapt"]["rounds"] == 2


def test_gpu_description_does_not_touch_cuda_before_the_pool_forks(monkeypatch):
    """The ablation's parent writes a partial result (with the hardware) between forking pool
    workers; asking torch about CUDA there would break CUDA in every later worker."""
    import subprocess

    import torch

    monkeypatch.syspath_prepend(str(BENCH))
    import _common

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.cuda was queried before this process used CUDA")

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", forbidden)
    monkeypatch.setattr(torch.cuda, "device_count", forbidden)
    monkeypatch.setattr(_common.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout="NVIDIA H200, 143771\n", stderr=""))
    assert _common.gpu_description() == "NVIDIA H200 (140 GiB)"


def test_set_goes_through_the_stages_checked_parser(tmp_path, monkeypatch, capsys):
    """``--set`` is refused in one line for a misspelt key or a wrongly typed value, before any
    image is rendered, as a stage refuses it."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("pgda_ablation", None)
    import pgda_ablation

    base = ["--quick", "--threads", "1", "--results-dir", str(tmp_path)]
    for bad, words in (("adapt.keep_shedule=[0.2]", "did you mean 'adapt.keep_schedule'"),
                       ("adapt.rounds=two", "expects int"), ("train.lr=1", "only adapt.* and loss.*")):
        with pytest.raises(SystemExit) as exc:
            pgda_ablation.main(base + ["--set", bad])
        assert words in str(exc.value)
    assert not any(tmp_path.iterdir())


def test_the_report_protocol_takes_its_own_data_and_enough_seeds(tmp_path, monkeypatch):  # parses only
    """``--protocol report`` refuses fewer seeds than the protocol's minimum and a data seed of
    the user's own; its Freiburg split (a salted hash of the image id) is not the dev split."""
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("pgda_ablation", None)
    import pgda_ablation
    from freiburg_live import _bucket

    base = ["--threads", "1", "--results-dir", str(tmp_path), "--protocol", "report"]
    for extra, words in ((["--seeds", "3"], ">= 8 seeds"), (["--seeds", "8", "--data-seed", "3"], "give one")):
        with pytest.raises(SystemExit):
            pgda_ablation.parse_args(base + extra)
        assert words in capsys_text(pgda_ablation, base + extra)
    args = pgda_ablation.parse_args(base + ["--seeds", "8"])
    spec, _ = pgda_ablation.load_protocol("report")
    assert args.data_seed == spec["productworld"]["data_seed"] != 0 and args.split_salt == spec["freiburg"]["split_salt"]
    ids = [f"img{i}" for i in range(400)]
    dev = {i for i in ids if _bucket(i) >= 0.8}
    report = {i for i in ids if _bucket(i, args.split_salt) >= 0.8}
    assert 0.1 < len(report) / len(ids) < 0.3 and len(dev & report) < 0.5 * len(report)


def capsys_text(module, argv) -> str:
    """argparse's error line for ``argv`` (it prints to stderr, then exits)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
        module.parse_args(argv)
    return err.getvalue()
