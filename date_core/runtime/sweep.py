"""Sweeps: Ray Tune over PG-DA's adaptation knobs, driver side.

Recipe (Ray Train V2's pattern: a Tune *function* trainable that launches Train runs; a
trainer is never handed to the Tuner itself)::

    sweep (MLflow parent run)
      trial = Tune function trainable (its own resources, e.g. 1 CPU)
        run_pgda(trial config)            the same rounds as pipelines/pgda.py, an MLflow run
          round r: Ray Train run (TorchTrainer) -> labelling -> selection metrics on target val
                   -> ray.tune.report({"round": r + 1, target_val/..., proxy/...}, checkpoint)
      ASHA (time attribute = round) stops weak trials after a round
    end: best config -> YAML that pipelines/pgda.py --config runs; proxy-vs-labelled Spearman

Every trial reports both selection criteria each round (:mod:`date_core.evaluation.selection`);
``select_by`` picks which one Tune ranks by. Re-running a sweep with the same name restores it
(``Tuner.restore``): finished trials stay, unfinished ones continue from their last finished
round (their ``pgda_state.json``; the small Tune checkpoint says which rounds Tune has seen).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import yaml

from date_core.data import storage
from date_core.runtime import tracking
from date_core.runtime.space import Space, param_space, trial_config
from date_core.evaluation.selection import PROXY, TARGET_VAL, spearman
from date_core.config_types import to_dict

SELECT_BY = (TARGET_VAL, PROXY)
PROXY_METRIC = f"{PROXY}/reliability"


class SweepError(RuntimeError):
    """A sweep that cannot start (one line)."""


def selection_metric(space: Space, select_by: str) -> tuple[str, str]:
    """(Tune metric name, mode) for ``select_by``."""
    if select_by == TARGET_VAL:
        return f"{TARGET_VAL}/{space.metric}", space.mode
    return PROXY_METRIC, "max"


def check_target_labels(cfg: Mapping[str, Any]) -> None:
    """``--select-by target_val`` needs boxes on the target validation split: refuse before Ray
    starts when it has none."""
    import pyarrow.parquet as pq

    from date_core.data import io

    data = cfg["data"]
    uri = io.pairs_uri(data["root"], data["target_domain"], data["val_split"])
    if not storage.exists(uri):
        raise SweepError(f"no target validation split at {uri}")
    fs, _ = storage.resolve_filesystem(uri)
    columns = [pq.ParquetFile(fs.open_input_file(f)).read(columns=["box"]).column("box") for f in io.parquet_files(uri)]
    boxes = sum(len(c) - c.null_count for c in columns)
    if boxes == 0:
        raise SweepError(f"--select-by target_val needs boxes on {uri} (labels you supply for a few hundred target "
                         f"pairs); without them use --select-by proxy")


def fit_trials(cfg: Mapping[str, Any], space: Space, cluster_cpus: float) -> dict[str, Any]:
    """``cfg`` with each trial's data-stream CPUs (``runtime.data_cpus``) set so that the
    concurrent trials' drivers, Train workers and data streams fit ``cluster_cpus`` together;
    raises :class:`SweepError` (one line) when they cannot.

    With ``runtime.data_cpus`` null, the CPUs the trials' drivers and trainers leave are split
    equally between the concurrent trials; a trial's labelling actor runs after its training, in
    the CPUs its trainer and streams hand back.
    """
    from date_core.runtime.budget import MIN_STREAM_CPUS, trainer_cpus

    streams = 2  # source and target: a PG-DA round's budgeted streams
    concurrent = max(1, int(space.max_concurrent_trials))
    driver = float({k.lower(): v for k, v in space.resources.items()}.get("cpu", 0.0))
    trainer = trainer_cpus(cfg)
    configured = cfg["runtime"].get("data_cpus")
    data = (float(configured) if configured is not None
            else (cluster_cpus - concurrent * (driver + trainer)) / concurrent)
    need = concurrent * (driver + trainer + data)
    if data < streams * MIN_STREAM_CPUS or need > cluster_cpus + 1e-9:
        raise SweepError(
            f"{concurrent} concurrent trial(s) need {concurrent} x ({driver:g} driver + {trainer:g} Train workers + "
            f"{max(data, streams * MIN_STREAM_CPUS):g} data streams) CPUs, the cluster has {cluster_cpus:g}; lower "
            f"max_concurrent_trials in the space, runtime.cpus_per_worker or runtime.data_cpus")
    label = float(cfg["adapt"]["label_cpus"]) if not cfg["runtime"]["use_gpu"] else 0.0
    if label > trainer + data + 1e-9:
        raise SweepError(f"a trial's labelling actor asks for adapt.label_cpus={label:g} CPU, more than the "
                         f"{trainer + data:g} its training hands back; lower adapt.label_cpus")
    out = to_dict(cfg)
    out["runtime"]["data_cpus"] = round(data, 4)
    return out


# ---------------------------------------------------------------------------------- trial
AWAITING_MARKER = "awaiting_scheduler"


def _report(round_index: int, metrics: Mapping[str, float], trial_dir: str) -> None:
    """One round to Tune, with a small checkpoint naming the rounds Tune has seen.

    Tune's report blocks until the scheduler decides; when it stops the trial, the report never
    returns (the trial's process ends). A marker written before and removed after the report
    therefore stays only on a trial the scheduler stopped, which tells an early stop from a trial
    of an interrupted sweep (killed mid-round, marker gone)."""
    import ray.tune

    marker = storage.join(trial_dir, AWAITING_MARKER)
    storage.write_bytes(marker, str(round_index + 1).encode())
    with tempfile.TemporaryDirectory(prefix="date-tune-") as tmp:
        Path(tmp, "rounds.json").write_text(json.dumps({"reported": round_index + 1}))
        ray.tune.report({**metrics, "round": round_index + 1}, checkpoint=ray.tune.Checkpoint.from_directory(tmp))
    fs, path = storage.resolve_filesystem(marker)
    fs.delete_file(path)


def _reported_rounds() -> int:
    import ray.tune

    ckpt = ray.tune.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as folder:
        return int(json.loads(Path(folder, "rounds.json").read_text())["reported"])


def trial_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def run_trial(params: dict[str, Any], base: dict[str, Any], sweep: dict[str, str]) -> None:
    """The Tune function trainable: one PG-DA job through :func:`run_pgda` (as pipelines/pgda.py),
    reporting both selection criteria to Tune after every round."""
    import ray.tune

    from date_core.runtime.pgda import load_state, run_pgda
    from date_core.evaluation.selection import selection_metrics

    os.environ["MLFLOW_TRACKING_URI"] = sweep["tracking_uri"]  # the driver's server, in this actor too
    name = trial_name(sweep["name"], ray.tune.get_context().get_trial_id())
    cfg = trial_config(base, params)
    cfg["runtime"]["run_name"] = name
    cfg["runtime"]["storage"] = sweep["trial_storage"]
    trial_dir = storage.join(sweep["trial_storage"], name)
    done = load_state(cfg, name)["rounds"]
    for record in done[_reported_rounds():]:  # a restored trial: rounds finished but never reported
        _report(record["round"], record.get("select", {}), trial_dir)

    last = int(cfg["adapt"]["rounds"]) - 1
    final: dict[str, float] = {}

    def on_round(r: int, record: dict, model_dir: Path, run_id: str) -> dict[str, float]:
        metrics = selection_metrics(model_dir, cfg)
        tracking.log_metrics(run_id, metrics, r)  # before reporting: ASHA may stop the trial there
        if r < last:
            _report(r, metrics, trial_dir)
        else:  # ASHA stops every trial that reaches max_t: report once the run has closed
            final.update(metrics)
        return metrics

    run_pgda(cfg, name, parent_run_id=sweep["parent_run_id"], on_round=on_round, register=False)
    if final:
        _report(last, final, trial_dir)


# --------------------------------------------------------------------------------- driver
def build_tuner(cfg: Mapping[str, Any], space: Space, name: str, select_by: str, parent_run_id: str):
    """A new ``Tuner`` for the sweep called ``name``, or the interrupted one restored."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    from date_core.runtime.trainer import storage_location

    root = str(cfg["runtime"]["storage"])
    sweep = {"name": name, "parent_run_id": parent_run_id, "tracking_uri": tracking.tracking_uri(),
             "trial_storage": storage.join(root, name, "trials")}
    resources = {k.lower() if k.lower() in ("cpu", "gpu") else k: v for k, v in space.resources.items()}
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=dict(cfg), sweep=sweep), resources)
    path = storage.join(root, name)
    if tune.Tuner.can_restore(path):
        print(f"[sweep] restoring the interrupted sweep at {path}", flush=True)
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    metric, mode = selection_metric(space, select_by)
    rounds = int(cfg["adapt"]["rounds"])
    if space.scheduler.get("type", "asha") == "asha":
        scheduler = ASHAScheduler(time_attr="round", max_t=rounds, grace_period=int(space.scheduler.get("grace_period", 1)),
                                  reduction_factor=float(space.scheduler.get("reduction_factor", 2)))
    else:
        scheduler = FIFOScheduler()
    return tune.Tuner(
        trainable, param_space=param_space(space),
        tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=space.num_samples, scheduler=scheduler,
                                    # the generator enforces the concurrency limit (Tune's own is for Searchers)
                                    search_alg=BasicVariantGenerator(random_state=int(space.search.get("seed", 0)),
                                                                     max_concurrent=space.max_concurrent_trials)),
        run_config=tune.RunConfig(name=name, **storage_location(root),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=1),
    )


def run_sweep(cfg: Mapping[str, Any], space: Space, name: str, select_by: str, out: Path) -> dict[str, Any]:
    """Run (or continue) the sweep called ``name``; writes the best config to ``out``."""
    if select_by not in SELECT_BY:
        raise SweepError(f"--select-by must be one of {', '.join(SELECT_BY)}, got {select_by!r}")
    import ray

    cfg = fit_trials(cfg, space, float(ray.cluster_resources().get("CPU", 0.0)))  # refuse before anything starts
    experiment_id = tracking.setup(cfg["runtime"]["experiment"])
    uri = tracking.tracking_uri()
    parent_id, resumed = tracking.start_or_resume(experiment_id, name, "sweep", uri=uri)
    client = tracking._client(uri)
    if not resumed:
        tracking.log_config(parent_id, cfg, uri)
        for key, value in {"sweep.space": space.path, "sweep.select_by": select_by,
                           "sweep.params": json.dumps(space.params)}.items():
            client.set_tag(parent_id, key, value)
    metric, mode = selection_metric(space, select_by)
    print(f"[sweep] {name}: {space.num_samples} trial(s) of {space.path}, {space.max_concurrent_trials} at once "
          f"({cfg['runtime']['data_cpus']:g} CPU of data streams each), selecting by {metric} ({mode}); "
          f"MLflow parent run {parent_id}", flush=True)
    try:
        grid = build_tuner(cfg, space, name, select_by, parent_id).fit()
    except Exception:
        tracking.end_run(parent_id, "FAILED", uri)
        raise
    trial_storage = storage.join(str(cfg["runtime"]["storage"]), name, "trials")
    rows = trial_rows(grid, name, int(cfg["adapt"]["rounds"]), metric, trial_storage)
    if any(r["status"] == "interrupted" for r in rows):  # Ctrl-C or a lost driver: Tune saved its state; the MLflow runs stay open
        raise SweepError(f"sweep {name} was interrupted before all trials finished; run the same command again "
                         f"to resume it (Tuner.restore)")
    _close_trial_runs(client, experiment_id, parent_id, rows)
    summary = summarise(rows, metric, mode, space.metric)
    if summary["best"] is None:
        tracking.end_run(parent_id, "FAILED", uri)
        raise SweepError(f"no trial of sweep {name} finished all rounds")
    best_cfg = trial_config(cfg, summary["best"]["params"])
    best_cfg["runtime"]["run_name"] = None  # pgda.py --config best.yaml starts a fresh run
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# best config of sweep {name} ({space.path}), trial {summary['best']['trial_id']}: "
              f"{metric} = {summary['best']['value']:.4f} ({mode}); run with\n"
              f"#   python pipelines/pgda.py --config {out}\n")
    out.write_text(header + yaml.safe_dump(best_cfg, sort_keys=False))
    tracking.log_metrics(parent_id, {k: v for k, v in summary.items() if isinstance(v, float)}, 0, uri)
    with tempfile.TemporaryDirectory(prefix="date-sweep-") as tmp:
        Path(tmp, "trials.json").write_text(json.dumps(rows, indent=1, default=str))
        Path(tmp, "best.yaml").write_text(out.read_text())
        client.log_artifacts(parent_id, tmp)
    tracking.end_run(parent_id, "FINISHED", uri)
    print(format_trials(rows, metric), flush=True)
    print(f"[sweep] best trial {summary['best']['trial_id']}: {metric} {summary['best']['value']:.4f}; "
          f"config written to {out}", flush=True)
    print(f"[sweep] proxy vs labelled ({TARGET_VAL}/{space.metric}) Spearman rank correlation: "
          f"round 1 over {summary['n_round1']} trials {summary['spearman_round1']:.3f}; final round over "
          f"{summary['n_final']} finished trials {summary['spearman_final']:.3f}", flush=True)
    return {"rows": rows, "summary": summary, "parent_run_id": parent_id, "best_config": str(out)}


def trial_rows(grid, name: str, rounds: int, metric: str, trial_storage: str) -> list[dict[str, Any]]:
    """One row per trial: params, rounds reached, status (finished, stopped early by the
    scheduler, error, or interrupted) and the per-round metrics."""
    rows = []
    for result in grid:
        history = result.metrics_dataframe
        per_round = {} if history is None else {
            int(r["round"]): {k: _num(v) for k, v in r.items() if k.startswith((f"{TARGET_VAL}/", f"{PROXY}/"))}
            for r in history.to_dict("records") if "round" in r and r["round"] == r["round"]}
        reached = max(per_round, default=0)
        trial_id = str((result.metrics or {}).get("trial_id") or Path(result.path).name)
        stopped = storage.exists(storage.join(trial_storage, trial_name(name, trial_id), AWAITING_MARKER))
        status = ("error" if result.error else "finished" if reached >= rounds
                  else "stopped early" if stopped else "interrupted")
        rows.append({"trial_id": trial_id, "run_name": trial_name(name, trial_id),
                     "params": dict(result.config or {}), "rounds": reached, "status": status,
                     "value": per_round.get(reached, {}).get(metric, float("nan")), "per_round": per_round})
    return sorted(rows, key=lambda r: r["trial_id"])


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def summarise(rows: list[dict[str, Any]], metric: str, mode: str, labelled: str) -> dict[str, Any]:
    """The best finished trial, and how the proxy ranks trials against the labelled metric
    (Spearman) after round 1 (every trial) and at the final round (finished trials)."""
    finished = [r for r in rows if r["status"] == "finished" and math.isfinite(r["value"])]
    best = (max if mode == "max" else min)(finished, key=lambda r: r["value"]) if finished else None
    lab = f"{TARGET_VAL}/{labelled}"

    def pairs(selected: list[dict], rnd) -> tuple[list[float], list[float]]:
        got = [r["per_round"].get(rnd(r), {}) for r in selected]
        return [g.get(PROXY_METRIC, float("nan")) for g in got], [g.get(lab, float("nan")) for g in got]

    first = [r for r in rows if 1 in r["per_round"]]
    return {"best": best, "n_round1": len(first), "spearman_round1": spearman(*pairs(first, lambda r: 1)),
            "n_final": len(finished), "spearman_final": spearman(*pairs(finished, lambda r: r["rounds"])),
            "n_stopped": float(sum(r["status"] == "stopped early" for r in rows))}


def _close_trial_runs(client, experiment_id: str, parent_id: str, rows: list[dict[str, Any]]) -> None:
    """Tag each trial's MLflow run with its status; a trial ASHA stopped (or that failed) left
    its run open: close it."""
    for row in rows:
        run = tracking.find_run(experiment_id, row["run_name"], parent_id)
        if run is None:
            continue
        client.set_tag(run.info.run_id, "date.sweep.status", row["status"])
        if row["status"] != "finished" and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED" if row["status"] == "stopped early" else "FAILED")


def format_trials(rows: list[dict[str, Any]], metric: str) -> str:
    keys = sorted({k for r in rows for k in r["params"]})
    head = ["trial", *keys, "rounds", "status", metric, PROXY_METRIC]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        last = r["per_round"].get(r["rounds"], {})
        cells = [r["trial_id"], *(_cell(r["params"].get(k)) for k in keys), str(r["rounds"]), r["status"],
                 _cell(last.get(metric)), _cell(last.get(PROXY_METRIC))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4g}"
    return "-" if value is None else str(value)
