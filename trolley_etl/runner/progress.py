"""What a person sees while a run downloads: one display, not a scroll of log lines.

On a terminal it is one tqdm bar redrawn in place: items done of the total, instances,
bytes, rate and ETA (by bytes when the total size is known, else by items), and the current
step or wait (a retry's back-off, an outage, a time window). For terminals that cannot redraw
(`run --no-progress`) the same facts come as one plain line every LINE_INTERVAL seconds.
Per-item events go to the JSON log only; `runner.logs` routes the waits here.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any, TextIO

from tqdm import tqdm

#: Seconds between two plain progress lines (`--no-progress` on a terminal).
LINE_INTERVAL = 15.0


def _size(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """Counts what is stored; draws a bar (`enabled`) or prints plain lines (`lines`)."""

    def __init__(
        self,
        total_items: int,
        *,
        enabled: bool,
        lines: bool = False,
        total_bytes: int | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.instances = 0
        self.bytes = 0
        self.items = 0
        self.total_items = total_items
        self.total_bytes = total_bytes
        self.status = ""
        self._stream = stream or sys.stderr
        self._started = time.monotonic()
        self._last_line = self._started
        self._lines = lines and not enabled and total_items > 0
        self._lock = threading.Lock()
        self._bar = (
            tqdm(
                total=total_items,
                unit="item",
                file=self._stream,
                dynamic_ncols=True,
                smoothing=0.1,
                leave=False,
                bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} items {postfix}",
            )
            if enabled and total_items
            else None
        )

    # --- what the runner reports -------------------------------------------------------------

    def instance_stored(self, size: int) -> None:
        with self._lock:
            self.instances += 1
            self.bytes += size
            self._refresh()

    def item_finished(self) -> None:
        with self._lock:
            self.items += 1
            if self._bar is not None:
                self._bar.update(1)
            self._refresh()

    def set_status(self, text: str) -> None:
        """The current step or wait; "" when there is none."""
        with self._lock:
            self.status = text
            self._refresh(force=True)

    def on_event(self, event: dict[str, Any]) -> None:
        """A log event: waits and retries become the status (they are in the log anyway)."""
        name = str(event.get("event", ""))
        if name == "item.retry":
            self.set_status(
                f"retrying after {event.get('error_type', 'an error')} "
                f"(attempt {event.get('attempt', '?')})"
            )
        elif name.endswith(".wait") or name.endswith(".waiting"):
            seconds = event.get("seconds") or event.get("wait_s")
            reason = event.get("reason") or name.removesuffix(".wait").removesuffix(".waiting")
            self.set_status(f"waiting: {reason}" + (f" ({seconds} s)" if seconds else ""))
        elif name in ("item.done", "step.start") and self.status:
            self.set_status("")

    # --- rendering ---------------------------------------------------------------------------

    def describe(self) -> str:
        """Instances, bytes, rate and ETA as one short text."""
        elapsed = max(time.monotonic() - self._started, 1e-6)
        rate = self.bytes / elapsed
        text = f"{self.instances} instances, {_size(self.bytes)}, {_size(rate)}/s"
        eta = None
        if self.total_bytes and self.bytes and rate > 0:
            eta = max(self.total_bytes - self.bytes, 0) / rate
        elif self.items and self.total_items:
            eta = (self.total_items - self.items) * elapsed / self.items
        if eta is not None:
            text += f", ETA {_duration(eta)}"
        if self.status:
            text += f" | {self.status}"
        return text

    def _refresh(self, *, force: bool = False) -> None:
        if self._bar is not None:
            self._bar.set_postfix_str(self.describe(), refresh=force)
            return
        now = time.monotonic()  # plain lines: never more often than LINE_INTERVAL
        if self._lines and now - self._last_line >= LINE_INTERVAL:
            self._last_line = now
            self._stream.write(
                f"progress: {self.items}/{self.total_items} items, {self.describe()}\n"
            )
            self._stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
