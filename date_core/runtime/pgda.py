"""PG-DA, the main job: self-training rounds that carry grounding from the annotated source
domain to the unannotated target domain, driver side.

Recipe (each round its own Ray Train run and MLflow child run under one parent run)::

    round r:  train on source boxes + target pairs (+ alignment where its weights are
              non-zero) (+ the pseudo boxes of round r-1), starting from round r-1's
              output, with an EMA teacher following the student (the round's output)
              -> label the target train split with the teacher on a Ray Data actor pool
              -> commit the pseudo-labels (Parquet, temp prefix then commit marker)
              -> record the round in <storage>/<run>/pgda_state.json
    end:      evaluate the final model on the target (and source) test split, register it,
              print the results table

Killed at any point, the same command with the same ``runtime.run_name`` continues: finished
rounds are skipped (the state file), a round killed mid-training resumes from its last Ray
Train checkpoint, and pseudo-labels of a round are either committed whole or written again.
"""
from __future__ import annotations

import functools
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

from date_core.data import storage
from date_core.evaluation.evaluate import evaluate_split
from date_core.evaluation.metrics import metrics_json
from date_core.runtime import session, tracking
from date_core.runtime.dataset import ensure_dataset
from date_core.runtime.labeling import atomic_write, commit_pseudo, label_target, read_pseudo, target_with_pseudo
from date_core.runtime.supervised import run_stage
from date_core.adapt.round import alignment_terms, round_config

STATE_FILE = "pgda_state.json"
#: ``on_round(round_index, record, model_dir, run_id) -> metrics``: called after each round's
#: model is evaluated, before the round is recorded as done (``run_id``: the job's MLflow run);
#: the metrics it returns are kept in the round's record (``select``). A sweep's trial measures,
#: logs and reports to Tune here (where ASHA may stop it)
RoundHook = Callable[[int, dict, Path, str], Mapping[str, float] | None]


def _state_uri(cfg: Mapping[str, Any], name: str) -> str:
    return storage.join(str(cfg["runtime"]["storage"]), name, STATE_FILE)


def load_state(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    uri = _state_uri(cfg, name)
    if storage.exists(uri):
        return json.loads(storage.read_bytes(uri))
    return {"rounds": []}


def describe_round(cfg: Mapping[str, Any], r: int) -> str:
    """What round ``r`` trains on, in the words of the results table (only what runs)."""
    parts = ["source", "target pairs"]
    terms = alignment_terms(round_config(cfg, r))
    if terms:
        parts.append(f"align ({cfg['adapt'].get('aligner', 'mmd')}: "
                     + ", ".join(t.replace("align_", "") for t in terms) + ")")
    if r > 0:
        parts.append("pseudo")
    return " + ".join(parts)


def run_pgda(cfg: Mapping[str, Any], name: str, *, parent_run_id: str | None = None,
             on_round: RoundHook | None = None, register: bool = True) -> dict[str, Any]:
    """Run (or continue) the PG-DA job called ``name``; returns the results table's rows.
    ``parent_run_id``: the MLflow run this job's run nests under (a sweep's); ``on_round``: see
    :data:`RoundHook`; ``register``: register the final model (a sweep's trials do not)."""
    data, adapt = cfg["data"], cfg["adapt"]
    ensure_dataset(cfg, "pgda")
    experiment_id = tracking.setup(cfg["runtime"]["experiment"])
    uri = tracking.tracking_uri()
    parent_id, resumed = tracking.start_or_resume(experiment_id, name, "pgda", parent_run_id, uri=uri)
    tracking.log_config(parent_id, cfg, uri)
    state = load_state(cfg, name)
    rounds = int(adapt["rounds"])
    print(f"[pgda] run {name}: {rounds} round(s), {data['source_domain']} -> {data['target_domain']}; "
          f"MLflow parent run {parent_id} ({'resumed' if resumed else 'new'}); "
          f"{len(state['rounds'])} round(s) already done", flush=True)
    tok = session.tokenizer_dir(cfg)
    base = storage.join(str(cfg["runtime"]["storage"]), name)
    # local copies of each round's model live only as long as this call (the kept copy is in
    # storage); one folder per run name, so a killed run's leftovers go when it is continued
    work = Path(tempfile.gettempdir()) / f"date-pgda-{name}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        return _run_rounds(cfg, name, state, experiment_id, parent_id, uri, tok, base, work, on_round, register)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_rounds(cfg, name, state, experiment_id, parent_id, uri, tok, base, work: Path,
                on_round: RoundHook | None = None, register: bool = True) -> dict[str, Any]:
    data, adapt = cfg["data"], cfg["adapt"]
    rounds = int(adapt["rounds"])
    for r in range(len(state["rounds"]), rounds):
        prev = state["rounds"][-1] if state["rounds"] else None
        labels = read_pseudo(prev["pseudo"]) if prev else None
        print(f"[pgda] round {r + 1}/{rounds}: {describe_round(cfg, r)}"
              + (f" ({int(labels['kept'].to_numpy().sum())} pseudo boxes of round {r})" if labels is not None else ""),
              flush=True)
        round_cfg = round_config(cfg, r)
        stage = run_stage(
            round_cfg, f"{name}-round{r}", stage="pgda-round", experiment_id=experiment_id,
            parent_run_id=parent_id, target=functools.partial(target_with_pseudo, cfg, labels),
            align=bool(alignment_terms(round_cfg)),
            init_from=prev["model"] if prev else None, register=False,  # round 1: model.init_from, if set
            out_dir=work / f"round-{r}",
        )
        model_uri = storage.join(base, f"round-{r}", "model")
        _upload_dir(stage.model_dir, model_uri)
        record: dict[str, Any] = {"round": r, "model": model_uri, "run_id": stage.run_id,
                                  "trained_on": describe_round(cfg, r)}
        if r < rounds - 1 or adapt["label_last_round"]:
            rnd = label_target(cfg, str(stage.model_dir), tok, r)
            record["pseudo"] = storage.join(base, "pseudo", f"round-{r}")
            commit_pseudo(rnd.table(), record["pseudo"])
            record["labels"] = {k: float(v) for k, v in rnd.summary().items()}
            # which reliability signal picks right boxes (hidden target boxes: monitoring only)
            record["labels"].update({f"precision@0.5/{k}": float(v)
                                     for k, v in rnd.signal_precision(rnd.fraction, adapt).items()})
            tracking.log_metrics(stage.run_id, {f"pseudo/{k}": v for k, v in record["labels"].items()}, r, uri)
            tracking.log_metrics(parent_id, {f"pseudo/{k}": v for k, v in record["labels"].items()}, r, uri)
            print(f"[pgda] round {r + 1} pseudo-labels: {int(record['labels']['n_kept'])}/"
                  f"{int(record['labels']['n_pairs'])} kept, mean reliability "
                  f"{record['labels']['reliability_mean']:.3f}"
                  + (f", precision@0.5 {record['labels']['precision@0.5']:.3f}, centred on the target "
                     f"{record['labels']['centre_precision']:.3f}" if "precision@0.5" in record["labels"] else ""),
                  flush=True)
        record["test"] = evaluate_split(stage.model_dir, data["root"], data["target_domain"], data["test_split"]).metrics
        tracking.log_metrics(parent_id, record["test"], r, uri)
        if on_round is not None:
            record["select"] = dict(on_round(r, record, stage.model_dir, parent_id) or {})
        state["rounds"].append(record)
        atomic_write(_state_uri(cfg, name), metrics_json(state, indent=1).encode())

    final = state["rounds"][-1]
    final_dir = work / "final"
    _download_dir(final["model"], final_dir)
    metrics = dict(final["test"])
    metrics.update(evaluate_split(final_dir, data["root"], data["source_domain"], data["test_split"]).metrics)
    tracking.log_metrics(parent_id, metrics, rounds, uri)
    version = state.get("registered_version")
    if version is None and register:
        version = tracking.log_and_register(parent_id, final_dir, cfg["runtime"]["registered_model"], metrics, uri)
        state["registered_version"] = version
        atomic_write(_state_uri(cfg, name), metrics_json(state, indent=1).encode())
    tracking.end_run(parent_id, "FINISHED", uri)
    rows = results_rows(state, data["target_domain"], data["test_split"])
    print(format_results(rows, f"{data['target_domain']}_{data['test_split']}"), flush=True)
    print("[pgda] final model: " + (f"registered {cfg['runtime']['registered_model']} version {version}; "
                                     if version is not None else "not registered; ") +
          f"{data['source_domain']}_{data['test_split']} pg/acc@0.5 "
          f"{metrics.get(data['source_domain'] + '_' + data['test_split'] + '/pg/acc@0.5', float('nan')):.3f}", flush=True)
    return {"rows": rows, "version": version, "parent_run_id": parent_id, "metrics": metrics}


def _download_dir(uri: str, local: Path) -> None:
    import pyarrow.fs as pafs

    fs, path = storage.resolve_filesystem(uri)
    local.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def _upload_dir(local: Path, uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = storage.resolve_filesystem(uri)
    if not storage.is_s3(uri):
        Path(path).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def results_rows(state: Mapping[str, Any], domain: str, split: str) -> list[dict[str, Any]]:
    tag = f"{domain}_{split}"
    rows = []
    for rec in state["rounds"]:
        labels = rec.get("labels", {})
        rows.append({
            "round": rec["round"] + 1,
            "trained on": rec.get("trained_on", "-"),
            "acc@0.5": rec["test"].get(f"{tag}/pg/acc@0.5"), "mIoU": rec["test"].get(f"{tag}/pg/mIoU"),
            "R@1": rec["test"].get(f"{tag}/pr/R@1"),
            "pseudo kept": labels.get("n_kept"), "pseudo precision@0.5": labels.get("precision@0.5"),
            "pseudo centre on target": labels.get("centre_precision"),
        })
    return rows


def format_results(rows: list[dict[str, Any]], tag: str) -> str:
    head = list(rows[0]) if rows else []
    lines = [f"PG-DA results on {tag}", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) > 1 else f"{value:.3f}"
    return str(value)
