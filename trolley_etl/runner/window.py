"""Time windows: when a run may contact the archive (e.g. nights and weekends only).

A window is a daily span of wall-clock time (`19:00-07:00` crosses midnight) on some days of
the week, in a time zone. A span belongs to the day it starts on: `days: [fri]` with
`19:00-07:00` is Friday 19:00 to Saturday 07:00. `start == end` is the whole day.

The runner asks its WindowGate before it searches and before each unit it starts: outside
the window the units in flight finish, the gate logs until when it waits, notes it in the
storage root for `status`, and sleeps (interruptibly) until the window opens.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from trolley_etl.core.errors import ConfigurationError, OutsideWindowError

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: The file in the storage root's state folder that says a run is waiting for its window.
WAITING_FILE = "window-wait.json"
#: Longest single sleep; the gate looks at the clock again after it (clock changes, DST).
MAX_SLEEP = 60.0


def parse_clock(text: str) -> dt.time | None:
    """`HH:MM` or `HH:MM:SS` (24:00 is the end of the day, returned as None)."""
    parts = text.strip().split(":")
    if len(parts) not in (2, 3) or not all(p.isdigit() and len(p) == 2 for p in parts):
        raise ConfigurationError(f"{text!r} is not a time of day (HH:MM)")
    hour, minute, second = (int(p) for p in (*parts, "00")[:3])
    if (hour, minute, second) == (24, 0, 0):
        return None
    if hour > 23 or minute > 59 or second > 59:
        raise ConfigurationError(f"{text!r} is not a time of day (00:00 to 24:00)")
    return dt.time(hour, minute, second)


def load_zone(name: str | None) -> dt.tzinfo:
    """The IANA time zone `name`, or this machine's local zone for None."""
    if name is None:
        local = dt.datetime.now().astimezone().tzinfo
        assert local is not None
        return local
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigurationError(
            f"unknown time zone {name!r} (an IANA name such as Europe/Amsterdam)"
        ) from None


@dataclass(frozen=True)
class TimeWindow:
    start: dt.time
    end: dt.time | None  # None: midnight at the end of the day
    days: frozenset[int]  # Monday is 0
    zone: dt.tzinfo

    @classmethod
    def parse(
        cls, hours: str, days: list[str] | None = None, timezone: str | None = None
    ) -> TimeWindow:
        """From the manifest's `hours: "19:00-07:00"`, `days: [mon, ...]` and `timezone`."""
        first, sep, last = hours.partition("-")
        if not sep:
            raise ConfigurationError(f"hours {hours!r} must be a span such as 19:00-07:00")
        start = parse_clock(first)
        if start is None:
            raise ConfigurationError(f"hours {hours!r} cannot start at 24:00")
        names = [d.lower() for d in (days or DAY_NAMES)]
        unknown = [d for d in names if d not in DAY_NAMES]
        if unknown or not names:
            raise ConfigurationError(f"days must be some of {', '.join(DAY_NAMES)}")
        return cls(
            start,
            parse_clock(last),
            frozenset(DAY_NAMES.index(d) for d in names),
            load_zone(timezone),
        )

    def _span(self, day: dt.date) -> tuple[dt.datetime, dt.datetime]:
        """The window that starts on `day` (whether or not `day` is one of the days)."""
        begin = dt.datetime.combine(day, self.start, tzinfo=self.zone)
        end_time = self.end or dt.time(0)
        end_day = day if self.end is not None and self.end > self.start else day + dt.timedelta(1)
        return begin, dt.datetime.combine(end_day, end_time, tzinfo=self.zone)

    def current(self, now: dt.datetime) -> tuple[dt.datetime, dt.datetime] | None:
        """The span `now` falls in, or None outside the window."""
        local = now.astimezone(self.zone).date()
        for day in (local - dt.timedelta(1), local):
            if day.weekday() in self.days:
                begin, end = self._span(day)
                if begin <= now < end:
                    return begin, end
        return None

    def is_open(self, now: dt.datetime) -> bool:
        return self.current(now) is not None

    def next_open(self, now: dt.datetime) -> dt.datetime:
        """`now` inside the window, else the moment it opens next."""
        if self.is_open(now):
            return now
        local = now.astimezone(self.zone).date()
        for offset in range(9):
            day = local + dt.timedelta(offset)
            begin, _ = self._span(day)
            if day.weekday() in self.days and begin > now:
                return begin
        raise AssertionError("a window with at least one day opens within 8 days")


def now_utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class WindowGate:
    """Holds a run while its window is closed; `stop` ends the wait early (interruption).

    With `no_wait` a closed window raises OutsideWindowError instead (after the units in
    flight finished), so a scheduled run stops and the next one resumes.
    """

    def __init__(
        self,
        window: TimeWindow,
        *,
        log: Any,
        state_dir: Path,
        run_id: str,
        stop: threading.Event | None = None,
        clock: Callable[[], dt.datetime] = now_utc,
        no_wait: bool = False,
    ) -> None:
        self.window = window
        self.log = log
        self.state_file = state_dir / WAITING_FILE
        self.run_id = run_id
        self.stop = stop or threading.Event()
        self.clock = clock
        self.no_wait = no_wait
        self.waited_s = 0.0

    def is_open(self) -> bool:
        return self.window.is_open(self.clock())

    def hold(self, drain: Callable[[], None] | None = None) -> None:
        """Return at once inside the window; else let `drain` finish the units in flight,
        then wait until the window opens."""
        if self.is_open():
            return
        if drain is not None:
            drain()
        until = self.window.next_open(self.clock())
        since = self.clock()
        if self.no_wait:
            self.log.warning("window.closed", until=until.isoformat(), waiting=False)
            raise OutsideWindowError(
                f"the time window closed; it opens again at {until.isoformat(timespec='minutes')}"
                "; the run stopped after the units in flight (run again to resume)"
            )
        self.log.warning(
            "window.closed",
            until=until.isoformat(),
            waiting_s=round((until - since).total_seconds()),
        )
        self._note_waiting(until, since)
        try:
            while not self.is_open():
                remaining = (self.window.next_open(self.clock()) - self.clock()).total_seconds()
                if self.stop.wait(min(MAX_SLEEP, max(0.05, remaining))):
                    return  # interrupted: the caller sees the stop too
        finally:
            with contextlib.suppress(OSError):
                self.state_file.unlink()
        self.waited_s += (self.clock() - since).total_seconds()
        self.log.info("window.open", waited_s=round((self.clock() - since).total_seconds(), 1))

    def _note_waiting(self, until: dt.datetime, since: dt.datetime) -> None:
        payload = {"run_id": self.run_id, "until": until.isoformat(), "since": since.isoformat()}
        with contextlib.suppress(OSError):
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            self.state_file.write_text(json.dumps(payload))


def gate_for(
    config: Any,
    *,
    ignore: bool,
    log: Any,
    state_dir: Path,
    run_id: str,
    stop: threading.Event,
    no_wait: bool = False,
) -> WindowGate | None:
    """The gate for a manifest's `run.window`; None without one or with --ignore-window."""
    if config is None or ignore:
        return None
    window = TimeWindow.parse(config.hours, config.days, config.timezone)
    return WindowGate(
        window, log=log, state_dir=state_dir, run_id=run_id, stop=stop, no_wait=no_wait
    )


def check_no_wait(config: Any, *, ignore: bool, now: dt.datetime | None = None) -> None:
    """For `run --no-wait`: raise OutsideWindowError when the window is closed now."""
    if config is None or ignore:
        return
    window = TimeWindow.parse(config.hours, config.days, config.timezone)
    now = now or now_utc()
    if not window.is_open(now):
        opens = window.next_open(now).isoformat(timespec="minutes")
        raise OutsideWindowError(
            f"outside the time window ({config.hours}); it opens at {opens} "
            "(run without --no-wait to wait for it, or with --ignore-window)"
        )


def waiting_state(state_dir: Path) -> dict[str, str] | None:
    """What `status` shows: the run waiting for its window, if one is (and still alive)."""
    path = state_dir / WAITING_FILE
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict) or not _run_alive(state_dir):
        return None
    return {str(k): str(v) for k, v in payload.items()}


def _run_alive(state_dir: Path) -> bool:
    """A run holds the root's run lock while it lives (see `runner.run.root_lock`)."""
    try:
        with (state_dir / "run.lock").open("a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except OSError:
        return False
