"""The download engine shared by Trolley.download and the runner: bounded, lazy, honest."""

from __future__ import annotations

import threading
import time

import pytest

from trolley_etl.core.engine import execute


def test_at_most_workers_run_and_the_source_is_read_lazily() -> None:
    lock = threading.Lock()
    running = peak = taken = 0
    ahead: list[int] = []
    done: list[int] = []

    def source():
        nonlocal taken
        for unit in range(40):
            taken += 1
            ahead.append(taken - len(done))
            yield unit

    def work(unit: int) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.005)
        with lock:
            running -= 1

    execute(source(), work, workers=3, on_done=lambda unit, error: done.append(unit))
    assert sorted(done) == list(range(40))
    assert peak <= 3
    assert max(ahead) <= 2 * 3  # never more than 2 x workers taken and not finished


def test_errors_go_to_on_done_or_are_raised() -> None:
    def work(unit: int) -> None:
        if unit == 2:
            raise ValueError("unit 2 broke")

    seen: dict[int, BaseException | None] = {}
    execute(range(5), work, workers=2, on_done=lambda u, e: seen.__setitem__(u, e))
    assert isinstance(seen.pop(2), ValueError) and set(seen.values()) == {None}
    with pytest.raises(ValueError, match="unit 2 broke"):
        execute(range(5), work, workers=2)


def test_interrupt_sets_stop_and_waits_for_running_units() -> None:
    stop = threading.Event()
    finished: list[int] = []

    def source():
        yield 0
        yield 1
        raise KeyboardInterrupt  # as a SIGINT arriving while units run

    def work(unit: int) -> None:
        stop.wait(2)
        finished.append(unit)

    told: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        execute(source(), work, workers=2, stop=stop, on_interrupt=told.append)
    assert stop.is_set() and sorted(finished) == [0, 1] and told == [2]
