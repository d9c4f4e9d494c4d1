"""CPU budgets for the data streams of a training stage: each stream gets its own placement group.

Why: Ray Data 2.60 gives every running dataset execution the resources that its autoscaling
coordinator *reserves* for it, first come first served. On a small cluster the source stream
(``train``) could reserve every CPU the trainers left before the target stream asked, and
the target stream then waited forever for a CPU while the training loop waited for it: the
round-1 stall. A placement group per stream is a reservation Ray core holds for the stream,
and Ray Data confines a dataset whose scheduling strategy names a placement group to that
group's bundles. With one group per stream and the groups' sum within what the trainers
leave, every stream can always run a task: starvation is impossible by construction.

``runtime.data_cpus`` sets the CPUs of all streams together (null: every CPU that Ray reports
free before the trainers start, less the trainers'); they are split equally between the
stage's streams. The unsplit ``val`` stream runs inside the ``train`` stream's group (it is
read between epochs).
"""
from __future__ import annotations

import contextlib
import math
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

#: A stream's share below this many CPUs is refused: it would be one task at a time at best.
MIN_STREAM_CPUS = 0.1


class BudgetError(RuntimeError):
    """The data streams' CPUs cannot be reserved (one line: what was asked, what Ray has)."""


def trainer_cpus(cfg: Mapping[str, Any]) -> float:
    """CPUs the stage's Train workers hold: ``num_workers x cpus_per_worker``."""
    rt = cfg["runtime"]
    return float(rt["num_workers"]) * float(rt["cpus_per_worker"])


def data_cpus(cfg: Mapping[str, Any], available: float | None = None) -> float:
    """CPUs for all data streams of a stage: ``runtime.data_cpus``, or (null) the CPUs Ray
    reports available now (``available``) less :func:`trainer_cpus`."""
    configured = cfg["runtime"].get("data_cpus")
    if configured is not None:
        return float(configured)
    if available is None:
        available = float(ray.available_resources().get("CPU", 0.0))
    return available - trainer_cpus(cfg)


def stream_bundles(cpus: float) -> tuple[list[dict[str, float]], float]:
    """The bundles of one stream's group and the CPUs of one task: ``ceil(cpus)`` equal bundles
    of at most one CPU (a task fits any bundle; a large budget spreads over nodes)."""
    n = max(1, math.ceil(cpus - 1e-9))
    per = cpus / n
    return [{"CPU": per} for _ in range(n)], per


@dataclass
class StreamBudgets:
    """Reserved groups by stream name; :meth:`task_cpus` for building a stream's datasets and
    :meth:`attach` to confine one to its group."""

    cpus: dict[str, float]
    task: dict[str, float]
    groups: dict[str, PlacementGroup] = field(default_factory=dict)
    #: streams that run inside another stream's group (``val`` -> ``train``)
    shares: dict[str, str] = field(default_factory=dict)

    def task_cpus(self, stream: str) -> float:
        return self.task[self.shares.get(stream, stream)]

    def attach(self, stream: str, ds: ray.data.Dataset) -> ray.data.Dataset:
        """``ds`` confined to ``stream``'s group (every task of its execution, reads included)."""
        strategy = PlacementGroupSchedulingStrategy(self.groups[self.shares.get(stream, stream)])
        with warnings.catch_warnings():
            # Ray 2.60 marks these fields deprecated ("Ray Data manages scheduling internally"),
            # yet a placement group is the only reservation its executor honours per dataset
            # (constraints.txt pins Ray; tests/test_stall.py fails if a later Ray drops it)
            warnings.filterwarnings("ignore", message=".*scheduling_strategy.* is deprecated")
            ds.context.scheduling_strategy = strategy
            ds.context.scheduling_strategy_large_args = strategy
        return ds

    def describe(self) -> str:
        return ", ".join(f"{name} {cpus:g} CPU" for name, cpus in self.cpus.items())


@contextlib.contextmanager
def reserve_streams(cfg: Mapping[str, Any], streams: Sequence[str], *, shares: Mapping[str, str] | None = None,
                    timeout_s: float | None = None) -> Iterator[StreamBudgets]:
    """Reserve one placement group per stream for the duration of the block, then remove them.

    Raises :class:`BudgetError` (before anything runs) when the streams' share is below
    :data:`MIN_STREAM_CPUS` or the groups are not placed within ``timeout_s`` (default
    ``runtime.stall_timeout_s``).
    """
    total = data_cpus(cfg)
    per_stream = total / max(1, len(streams))
    cluster = float(ray.cluster_resources().get("CPU", 0.0))
    if per_stream < MIN_STREAM_CPUS:
        raise BudgetError(
            f"the data streams ({', '.join(streams)}) need at least {MIN_STREAM_CPUS:g} CPU each beside the "
            f"trainers' {trainer_cpus(cfg):g}, but {max(total, 0):g} CPU are left of the {cluster:g} Ray has "
            f"({float(ray.available_resources().get('CPU', 0.0)):g} free); lower runtime.cpus_per_worker or "
            f"runtime.num_workers, or set runtime.data_cpus")
    budgets = StreamBudgets(cpus={}, task={}, shares=dict(shares or {}))
    timeout = float(timeout_s if timeout_s is not None else cfg["runtime"]["stall_timeout_s"])
    # named for `ray list placement-groups`; the suffix keeps concurrent trials' groups apart
    suffix = uuid.uuid4().hex[:8]
    try:
        for name in streams:
            bundles, per_task = stream_bundles(per_stream)
            budgets.groups[name] = placement_group(bundles, strategy="PACK", name=f"date-data-{name}-{suffix}")
            budgets.cpus[name], budgets.task[name] = per_stream, per_task
        for name, group in budgets.groups.items():
            ready, _ = ray.wait([group.ready()], timeout=timeout)
            if not ready:
                raise BudgetError(
                    f"could not reserve {per_stream:g} CPU for the {name} data stream within {timeout:g}s "
                    f"(Ray has {cluster:g} CPU, {float(ray.available_resources().get('CPU', 0.0)):g} free); "
                    f"lower runtime.data_cpus or free the cluster")
        yield budgets
    finally:
        for group in budgets.groups.values():
            with contextlib.suppress(Exception):
                remove_placement_group(group)


__all__ = ["BudgetError", "StreamBudgets", "data_cpus", "reserve_streams", "stream_bundles", "trainer_cpus"]
