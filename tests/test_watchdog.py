"""The stall watchdog (no Ray): a stream that stops delivering fails in one line, within its
timeout; a slow but moving stream never does; errors and the end of a stream pass through."""
from __future__ import annotations

import threading
import time

import pytest

from date_core.runtime.watchdog import StallError, find_cause, one_line, watched


def _blocks_after(n: int, release: threading.Event):
    yield from range(n)
    release.wait()  # a read that never returns (until the test ends)
    yield n


def test_a_blocked_stream_fails_within_its_timeout_naming_the_stream():
    release = threading.Event()
    got = []
    t0 = time.monotonic()
    with pytest.raises(StallError) as info:
        for item in watched(_blocks_after(3, release), "target", 0.5, first_timeout_s=5.0, scale=1.0,
                            resources=lambda: "Ray reports CPU 0 of 2 free", hint="resume it"):
            got.append(item)
    waited = time.monotonic() - t0
    release.set()
    assert got == [0, 1, 2]
    assert 0.5 <= waited < 4.0  # the timeout, not the first item's allowance
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("stalled: no batch from the target stream for ")
    assert "CPU 0 of 2 free" in message and message.endswith("; resume it")


def test_the_first_item_gets_its_own_allowance():
    release = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(StallError, match="no batch from the train stream for 1s"):
        next(watched(_blocks_after(0, release), "train", 0.2, first_timeout_s=1.0, resources=lambda: "-"))
    release.set()
    assert time.monotonic() - t0 >= 1.0


def test_a_slow_stream_is_not_a_stall_the_timeout_grows_with_the_step():
    def slow():
        for i in range(4):
            time.sleep(0.3 if i < 3 else 0.9)  # the last wait: 3x the usual gap, over the 0.5 s floor
            yield i

    # 0.3 s cycles -> the limit becomes 5 x 0.3 = 1.5 s, so the 0.9 s wait passes
    assert list(watched(slow(), "train", 0.5, first_timeout_s=5.0, scale=5.0, resources=lambda: "-")) == [0, 1, 2, 3]


def test_errors_and_the_end_pass_through_and_break_stops_the_reader():
    def broken():
        yield 1
        raise ValueError("unreadable Parquet")

    with pytest.raises(ValueError, match="unreadable Parquet"):
        list(watched(broken(), "val", 5.0, resources=lambda: "-"))

    pulled = []

    def counting():
        for i in range(1000):
            pulled.append(i)
            yield i

    for item in watched(counting(), "train", 5.0, resources=lambda: "-"):
        if item == 2:
            break
    time.sleep(1.0)
    assert len(pulled) <= 5  # one slot of read-ahead, then the helper thread stops


def test_find_cause_digs_through_ray_train_failures():
    from ray.train.v2.api.exceptions import WorkerGroupError

    stall = StallError("stalled: no batch from the target stream for 300s; Ray reports CPU 0 of 2 free")
    failure = WorkerGroupError("Training failed due to worker errors:\n[Rank 0]\nTraceback ...",
                               worker_failures={0: stall})
    try:
        try:
            raise failure
        except WorkerGroupError as exc:
            raise RuntimeError("stage pgda-round0 failed") from exc
    except RuntimeError as outer:
        assert find_cause(outer, (StallError,)) is stall
    assert find_cause(ValueError("x"), (StallError,)) is None
    assert one_line(RuntimeError("first line\n  Traceback (most recent call last):\n ...")) == "first line"
