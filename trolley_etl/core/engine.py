"""The one download engine: units of work run by a bounded pool of threads.

`Trolley.download` and the runner both fetch through it, so scheduling behaves the same in
the library and on the command line: at most `workers` units run at a time and at most
`2 x workers` are taken from the (possibly lazy) source of units, so planning can continue
while the first units download and memory stays flat whatever the cohort size. On
KeyboardInterrupt the units already running are waited for (they see `stop` and end between
files) before the interrupt goes on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Generic, TypeVar

Unit = TypeVar("Unit")

#: How often a waiting engine wakes up to notice an interrupt.
POLL_SECONDS = 0.5


def execute(
    units: Iterable[Unit],
    work: Callable[[Unit], object],
    *,
    workers: int,
    on_done: Callable[[Unit, BaseException | None], None] | None = None,
    stop: threading.Event | None = None,
    on_interrupt: Callable[[int], None] | None = None,
    before_each: Callable[[Callable[[], None]], None] | None = None,
    name: str = "fetch",
) -> None:
    """Run `work(unit)` for every unit, `workers` at a time.

    `on_done(unit, error)` is called in this thread as each unit ends (error None on
    success); without it an error raised by `work` is raised here. `on_interrupt(running)`
    is told how many units are still running when an interrupt arrives. `before_each(drain)`
    is called before a unit starts and may call `drain()` to let every running unit finish
    first (a time window that closed waits there).
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    running: _Running[Unit] = _Running(on_done)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name) as pool:
        try:
            for unit in units:
                if before_each is not None:
                    before_each(running.drain)
                running.futures[pool.submit(work, unit)] = unit
                while len(running.futures) >= 2 * workers:
                    running.collect()
            running.drain()
        except KeyboardInterrupt:
            if stop is not None:
                stop.set()
            if on_interrupt is not None:
                on_interrupt(len(running.futures))
            wait(running.futures)
            raise


class _Running(Generic[Unit]):
    """The units submitted and not collected yet, and what to do as each one ends."""

    def __init__(self, on_done: Callable[[Unit, BaseException | None], None] | None) -> None:
        self.futures: dict[Future[object], Unit] = {}
        self.on_done = on_done

    def collect(self) -> None:
        """Wait (briefly, so an interrupt is noticed) for units to end and report them."""
        finished, _ = wait(self.futures, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
        for future in finished:
            unit = self.futures.pop(future)
            error = future.exception()
            if self.on_done is not None:
                self.on_done(unit, error)
            elif error is not None:
                raise error

    def drain(self) -> None:
        """Let every running unit finish."""
        while self.futures:
            self.collect()
