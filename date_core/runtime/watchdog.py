"""A stall watchdog: a batch stream that delivers nothing for too long fails the job, in one line.

:func:`watched` pulls an iterable's items on a helper thread and hands them over through a
one-slot queue, so the consumer's wait for the next item is bounded: after ``timeout_s``
seconds without an item it raises :class:`StallError` naming the stream that is waiting and
the resources Ray reports. A blocked read cannot be interrupted from Python, so the helper
thread is left behind (a daemon); the error ends the worker or the job, which ends it too.

The timeout grows with the measured time between items, the consumer's step included (``scale``
x the slowest recent cycle), so a slow model or a large batch is never mistaken for a stall; the first item, which pays
for the stream's start-up, gets ``first_timeout_s`` (default twice the timeout).
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")

_DONE = object()


class StallError(RuntimeError):
    """No item from a stream within the watchdog's timeout (the message is one line)."""


def ray_resources() -> str:
    """What Ray reports: free / total CPUs (and GPUs), in words for an error line."""
    try:
        import ray

        if not ray.is_initialized():
            return "Ray is not running"
        total, free = ray.cluster_resources(), ray.available_resources()
        parts = [f"{k} {free.get(k, 0.0):g} of {total[k]:g} free" for k in ("CPU", "GPU") if total.get(k)]
        return "Ray reports " + ", ".join(parts) if parts else "Ray reports no CPU"
    except Exception as exc:  # the error line must still come out
        return f"Ray's resources unknown ({type(exc).__name__})"


def watched(items: Iterable[T], stream: str, timeout_s: float, *, what: str = "batch",
            first_timeout_s: float | None = None, scale: float = 20.0, hint: str = "",
            resources: Callable[[], str] = ray_resources) -> Iterator[T]:
    """``items``, one by one, failing with :class:`StallError` when the next one takes longer
    than ``max(timeout_s, scale x the slowest of the last 20 cycles between items)``.

    ``stream``: the name in the error (``train``, ``target``, ``labelling``); ``hint``: what the
    user can do, appended to the line. Closing the generator (``break``) stops the helper thread
    at its next item.
    """
    slot: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def pull() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        slot.put((True, item), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slot.put((True, _DONE))
        except BaseException as exc:  # re-raised on the consumer's side
            slot.put((False, exc))

    thread = threading.Thread(target=pull, name=f"watch-{stream}", daemon=True)
    thread.start()
    gaps: deque[float] = deque(maxlen=20)
    limit = float(first_timeout_s if first_timeout_s is not None else 2 * timeout_s)
    last = None
    try:
        while True:
            try:
                ok, item = slot.get(timeout=limit)
            except queue.Empty:
                raise StallError(
                    f"stalled: no {what} from the {stream} stream for {limit:.0f}s; {resources()}"
                    + (f"; {hint}" if hint else "")) from None
            if not ok:
                raise item
            if item is _DONE:
                return
            now = time.monotonic()
            if last is not None:  # one step's cycle: the consumer's work and the wait
                gaps.append(now - last)
            last = now
            yield item
            limit = max(float(timeout_s), scale * max(gaps, default=0.0))
    finally:
        stop.set()


def find_cause(exc: BaseException, kinds: tuple[type, ...]) -> BaseException | None:
    """The first exception of ``kinds`` behind ``exc``: its cause and context chain, a Train
    run's worker or controller failures, a Ray task error's cause."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kinds):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "controller_failure", None)]
        todo += list((getattr(e, "worker_failures", None) or {}).values())
    return None


def one_line(exc: BaseException) -> str:
    """The first line of an error's message (a worker's error arrives with its traceback)."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


__all__ = ["StallError", "find_cause", "one_line", "ray_resources", "watched"]
