"""Structured logs with structlog: JSON lines to a file always, and to stderr as JSON or text.

Every event carries a timestamp, level, event name, run_id, manifest name and step; the
other fields say what the event is about (UIDs, counts, durations, error type). Keys that
could hold a secret are masked by a processor, whatever code logged them.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog
from tqdm import tqdm

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
SECRET_KEYS = ("password", "token", "authorization", "secret", "cookie")


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if any(marker in key.lower() for marker in SECRET_KEYS):
            event[key] = "***"
    return event


class TeeLogger:
    """Writes each event to several outputs, each with its own rendering and level."""

    def __init__(self, outputs: list[tuple[TextIO, str, int]]) -> None:
        self._outputs = outputs  # (stream, "json" | "console", minimum level)
        self._console = structlog.dev.ConsoleRenderer(colors=False)
        self._lock = threading.Lock()

    def msg(self, **event: Any) -> None:
        level = LEVELS.get(str(event.get("level", "info")), 20)
        with self._lock:
            for stream, style, minimum in self._outputs:
                if level < minimum:
                    continue
                if style == "json":
                    stream.write(json.dumps(event, default=str, sort_keys=False) + "\n")
                    stream.flush()
                    continue
                line = self._console(None, "", dict(event))
                with tqdm.external_write_mode(file=stream):  # keep a progress bar intact
                    stream.write(line + "\n")
                    stream.flush()

    debug = info = warning = warn = error = critical = exception = msg


class RunLog:
    """Owns the log file of one command and the structlog logger that writes to it."""

    def __init__(
        self,
        *,
        log_file: Path | None,
        stderr_format: str | None = None,
        quiet: bool = False,
        extra_file: Path | None = None,
        stderr: TextIO | None = None,
    ) -> None:
        stream = stderr or sys.stderr
        style = stderr_format or ("console" if stream.isatty() else "json")
        outputs: list[tuple[TextIO, str, int]] = [
            (stream, style, LEVELS["warning"] if quiet else LEVELS["info"])
        ]
        self._files: list[TextIO] = []
        self._bound: dict[str, Any] = {}
        for path in (log_file, extra_file):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                handle = path.open("a", encoding="utf-8")
                self._files.append(handle)
                outputs.append((handle, "json", LEVELS["debug"]))
        self.logger = structlog.wrap_logger(
            TeeLogger(outputs),
            processors=[
                self._merge_bound,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                redact_secrets,
                structlog.processors.format_exc_info,
                _to_kwargs,
            ],
            cache_logger_on_first_use=False,
        )

    def bind(self, **values: Any) -> None:
        """Fields every later event carries, from any thread (run_id, manifest, step)."""
        self._bound.update(values)

    def _merge_bound(
        self, _: Any, __: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in self._bound.items():
            event.setdefault(key, value)
        return event

    def close(self) -> None:
        for handle in self._files:
            handle.close()


def _to_kwargs(_: Any, __: str, event: MutableMapping[str, Any]) -> dict[str, Any]:
    ordered: dict[str, Any] = {
        key: event.pop(key) for key in ("timestamp", "level", "event") if key in event
    }
    ordered.update(event)
    return ordered
