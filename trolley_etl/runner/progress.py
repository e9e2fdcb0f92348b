"""A progress bar on a terminal: items, instances, bytes, rate and ETA (tqdm)."""

from __future__ import annotations

import sys
import threading

from tqdm import tqdm


class Progress:
    """Counts what is stored; draws a bar only when enabled (a terminal and not --quiet)."""

    def __init__(self, total_items: int, *, enabled: bool) -> None:
        self.instances = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._bar = (
            tqdm(total=total_items, unit="item", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
            if enabled and total_items
            else None
        )

    def instance_stored(self, size: int) -> None:
        with self._lock:
            self.instances += 1
            self.bytes += size
            if self._bar is not None:
                self._bar.set_postfix_str(
                    f"{self.instances} instances, {self.bytes / 2**20:.1f} MiB", refresh=False
                )

    def item_finished(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
