"""Promotion through the MLflow model registry: the alias ``challenger`` marks the version under
evaluation, and ``champion`` (what production search loads, ``models:/NAME@champion``) moves to
it only when it beats the current champion on the same evaluation data. Aliases only, never
the deprecated stages.

The gate (:class:`Gate`): the challenger must win the primary metric by at least ``margin``
and lose no guard metric by more than ``tolerance`` (all metrics higher-is-better).

Racing promotions: evaluating takes minutes, so it happens outside any lock; moving the alias is
a compare-and-set on the champion version, made atomic by a registry lock (creating a
registered model is atomic in MLflow: a second create of the same name fails). Under the lock
the champion is read again; if it moved while we evaluated, the lock is released and the
challenger is evaluated against the new champion (retried). So every champion has beaten the
version it replaced, which its ``date.promotion.replaced`` tag names (what ``rollback`` follows).
"""
from __future__ import annotations

import math
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from date_core.runtime import tracking

CHAMPION, CHALLENGER = "champion", "challenger"
TAG = "date.promotion"
LOCK_SUFFIX = ".promotion-lock"


class PromotionError(RuntimeError):
    """A refusal for something missing (model, version, alias, evaluation data): one line."""


@dataclass(frozen=True)
class Gate:
    """What the challenger must do to become champion (metric names without the split tag,
    e.g. ``pg/acc@0.5``)."""

    metric: str
    margin: float = 0.0
    guards: tuple[str, ...] = ()
    tolerance: float = 0.0

    @classmethod
    def from_config(cls, promote: Mapping[str, Any]) -> "Gate":
        return cls(str(promote["metric"]), float(promote["margin"]), tuple(promote.get("guards") or ()),
                   float(promote["tolerance"]))


@dataclass
class Decision:
    promote: bool
    reasons: list[str]
    challenger: str
    champion: str | None
    challenger_metrics: dict[str, Any] = field(default_factory=dict)
    champion_metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def word(self) -> str:
        return "promoted" if self.promote else "refused"


def _value(metrics: Mapping[str, Any], tag: str, name: str) -> float:
    value = metrics.get(f"{tag}/{name}")
    return float(value) if isinstance(value, (int, float)) else float("nan")


def decide(challenger: Mapping[str, Any], champion: Mapping[str, Any] | None, gate: Gate, tag: str) -> tuple[bool, list[str]]:
    """(promote?, reasons) for two metric sets of the same evaluation (keys ``<tag>/<metric>``)."""
    if champion is None:
        return True, ["no current champion"]
    reasons, ok = [], True
    new, old = _value(challenger, tag, gate.metric), _value(champion, tag, gate.metric)
    if math.isnan(new) or math.isnan(old):
        raise PromotionError(f"{tag}/{gate.metric} is undefined on the evaluation data (no boxes on that split? "
                             f"choose a labelled split with --split)")
    if new - old >= gate.margin:
        reasons.append(f"{gate.metric} {new:.4f} vs {old:.4f}: wins by {new - old:+.4f} (margin {gate.margin})")
    else:
        ok = False
        reasons.append(f"{gate.metric} {new:.4f} vs {old:.4f}: {new - old:+.4f} is below the margin {gate.margin}")
    for guard in gate.guards:
        g_new, g_old = _value(challenger, tag, guard), _value(champion, tag, guard)
        if math.isnan(g_new) or math.isnan(g_old):
            continue  # undefined on this split for both seekers alike (e.g. no retrieval pairs)
        if g_old - g_new > gate.tolerance:
            ok = False
            reasons.append(f"guard {guard} {g_new:.4f} vs {g_old:.4f}: loses {g_old - g_new:.4f} > tolerance {gate.tolerance}")
    return ok, reasons


# ------------------------------------------------------------------------------- registry
def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version an alias points at, or None when the alias is not set."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def _require_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        raise PromotionError(f"no registered model {name!r} at {tracking.tracking_uri()}") from exc


def resolve_version(client: MlflowClient, name: str, *, version: str | None = None, run_id: str | None = None) -> str:
    """The version to promote: ``version`` as given (checked), or the version registered from
    ``run_id`` (registering the run's logged ``model`` when none is)."""
    if version is not None:
        _require_model(client, name)
        try:
            return str(client.get_model_version(name, str(version)).version)
        except MlflowException as exc:
            raise PromotionError(f"registered model {name!r} has no version {version}") from exc
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        raise PromotionError(f"no MLflow run {run_id!r} at {tracking.tracking_uri()}") from exc
    found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if found:
        return str(max(int(v.version) for v in found))
    import mlflow

    try:
        with _quiet_stdout():
            return str(mlflow.register_model(f"runs:/{run_id}/{tracking.MODEL_ARTIFACT}", name).version)
    except MlflowException as exc:
        raise PromotionError(f"run {run_id} has no logged model to register ({exc.message.splitlines()[0]})") from exc


@contextmanager
def _quiet_stdout() -> Iterator[None]:
    """mlflow.register_model prints progress lines; the CLI prints its own."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        yield


@contextmanager
def registry_lock(client: MlflowClient, name: str, timeout_s: float = 300.0) -> Iterator[None]:
    """Mutual exclusion between promotions of ``name``: holding it = having created the
    registered model ``<name>.promotion-lock`` (an atomic create). Held only while aliases move
    (seconds). A crashed holder leaves it behind; the error then says how to remove it."""
    lock = name + LOCK_SUFFIX
    holder = f"{socket.gethostname()}:{os.getpid()}"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.create_registered_model(lock, tags={"holder": holder, "since": str(int(time.time()))},
                                           description="held by pipelines/promote.py while it moves aliases")
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            if time.monotonic() > deadline:
                raise PromotionError(f"registry lock {lock!r} held for over {timeout_s:.0f}s; if no promotion is "
                                     f"running, delete that registered model") from exc
            time.sleep(0.2 + (os.getpid() % 7) / 20)
    try:
        yield
    finally:
        client.delete_registered_model(lock)


def _record(client: MlflowClient, name: str, d: Decision, evaluated_on: str, tag: str) -> None:
    """The decision and both metric sets on the challenger's version: tags and description."""
    tags = {f"{TAG}.decision": d.word, f"{TAG}.against": d.champion or "none", f"{TAG}.data": evaluated_on,
            f"{TAG}.at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), f"{TAG}.reasons": "; ".join(d.reasons)}
    if d.promote and d.champion:
        tags[f"{TAG}.replaced"] = d.champion
    names = sorted({k for k in (*d.challenger_metrics, *d.champion_metrics) if k.startswith(tag + "/")})
    for key in names:
        for who, metrics in (("challenger", d.challenger_metrics), ("champion", d.champion_metrics)):
            value = metrics.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                tags[f"{TAG}.{who}.{tracking.mlflow_key(key)}"] = f"{value:.6f}"
    for key, value in tags.items():
        client.set_model_version_tag(name, d.challenger, key, value)
    rows = [f"| {k} | {_fmt(d.challenger_metrics.get(k))} | {_fmt(d.champion_metrics.get(k))} |" for k in names]
    text = (f"Promotion: {d.word} against champion {d.champion or '(none)'} on {evaluated_on}.\n"
            + "\n".join(f"- {r}" for r in d.reasons)
            + "\n\n| metric | challenger | champion |\n|---|---|---|\n" + "\n".join(rows))
    client.update_model_version(name, d.challenger, description=text)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def promote(client: MlflowClient, name: str, version: str, gate: Gate, evaluate: Callable[[str], dict[str, Any]],
            tag: str, evaluated_on: str, retries: int = 3) -> Decision:
    """Set ``challenger`` to ``version``, evaluate it and the current champion with
    ``evaluate(model_uri) -> metrics`` (keys ``<tag>/...``), and move ``champion`` when the
    gate passes, as a compare-and-set on the champion version (see the module docstring)."""
    client.set_registered_model_alias(name, CHALLENGER, version)
    uri = f"models:/{name}/{version}"
    challenger_metrics = evaluate(uri)
    champion = alias_version(client, name, CHAMPION)
    cache: dict[str, dict[str, Any]] = {}
    for _ in range(retries):
        if champion == version:
            raise PromotionError(f"version {version} of {name!r} is already the champion")
        if champion is not None and champion not in cache:
            cache[champion] = evaluate(f"models:/{name}/{champion}")
        ok, reasons = decide(challenger_metrics, cache.get(champion) if champion else None, gate, tag)
        with registry_lock(client, name):
            now = alias_version(client, name, CHAMPION)
            if now != champion:  # moved while we evaluated: the comparison is stale, compare again
                champion = now
                continue
            decision = Decision(ok, reasons, version, champion, challenger_metrics, cache.get(champion, {}) if champion else {})
            if ok:
                client.set_registered_model_alias(name, CHAMPION, version)
            _record(client, name, decision, evaluated_on, tag)
            return decision
    raise PromotionError(f"the champion of {name!r} moved {retries} times during this promotion; run it again")


def rollback(client: MlflowClient, name: str) -> tuple[str, str]:
    """Point ``champion`` back at the version the current champion replaced; returns
    (demoted, restored)."""
    _require_model(client, name)
    with registry_lock(client, name):
        current = alias_version(client, name, CHAMPION)
        if current is None:
            raise PromotionError(f"registered model {name!r} has no alias {CHAMPION!r} to roll back")
        previous = client.get_model_version(name, current).tags.get(f"{TAG}.replaced")
        if not previous:
            raise PromotionError(f"champion version {current} of {name!r} replaced no earlier champion: nothing to roll back to")
        try:
            client.get_model_version(name, previous)
        except MlflowException as exc:
            raise PromotionError(f"version {previous} of {name!r} (the previous champion) no longer exists") from exc
        client.set_registered_model_alias(name, CHAMPION, previous)
        client.set_model_version_tag(name, current, f"{TAG}.decision", "rolled back")
        client.set_model_version_tag(name, current, f"{TAG}.rolled_back_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return current, previous
