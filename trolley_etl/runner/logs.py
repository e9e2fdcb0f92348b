"""Structured logs with structlog: JSON lines to a file always, and to stderr as JSON or text.

Every event carries a timestamp, level, event name, run_id, manifest name and step; the
other fields say what the event is about (UIDs, counts, durations, error type). Keys that
could hold a secret are masked by a processor, whatever code logged them.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, MutableMapping
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


#: On a terminal by default ("people" style) the console shows warnings and errors, and of
#: the info events only these, briefly; everything else is in the JSON log file.
PEOPLE_EVENTS = frozenset({"step.start", "checkpoint.resume", "lock.matches", "lock.written"})
#: Per-item events that a progress display shows as its status instead of a line.
STATUS_EVENTS = frozenset({"item.retry"})
#: Fields every event has that a person reading the terminal does not need again.
_PEOPLE_HIDDEN = frozenset({"timestamp", "level", "event", "run_id", "manifest", "step"})
PEOPLE_WIDTH = 160


def people_line(event: dict[str, Any]) -> str:
    """`warning item.failed study_uid=1.2.3 error=...`: short, one line, no timestamp."""
    level = str(event.get("level", "info"))
    name = str(event.get("event", ""))
    if name == "step.start":
        name = f"{event.get('step', '')}..."
    fields = " ".join(f"{k}={v}" for k, v in event.items() if k not in _PEOPLE_HIDDEN)
    prefix = "" if level == "info" else f"{level}: "
    line = f"{prefix}{name} {fields}".rstrip().replace("\n", " ")
    return line if len(line) <= PEOPLE_WIDTH else line[: PEOPLE_WIDTH - 3] + "..."


class TeeLogger:
    """Writes each event to several outputs, each with its own rendering and level."""

    def __init__(self, outputs: list[tuple[TextIO, str, int]]) -> None:
        self._outputs = outputs  # (stream, "json" | "console" | "people", minimum level)
        self._console = structlog.dev.ConsoleRenderer(colors=False)
        self._lock = threading.Lock()
        #: A progress display that shows waits and retries (see runner.progress).
        self.status: Callable[[dict[str, Any]], None] | None = None

    def msg(self, **event: Any) -> None:
        level = LEVELS.get(str(event.get("level", "info")), 20)
        with self._lock:
            status = self.status
            if status is not None:
                status(event)
            for stream, style, minimum in self._outputs:
                if style == "people":
                    shown = level >= minimum or (
                        minimum <= LEVELS["warning"] and event.get("event") in PEOPLE_EVENTS
                    )  # with --quiet (minimum "error") not even the steps
                    if not shown:
                        continue
                    if status is not None and event.get("event") in STATUS_EVENTS:
                        continue  # the display shows it
                    with tqdm.external_write_mode(file=stream):
                        stream.write(people_line(event) + "\n")
                        stream.flush()
                    continue
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
        # default on a terminal: "people" (a progress display, warnings, errors, a summary);
        # `--log-format console` asks for every event as text, as before
        style = stderr_format or ("people" if stream.isatty() else "json")
        level = LEVELS["warning"] if style == "people" else LEVELS["info"]
        if quiet:  # only errors (and the closing summary the command prints)
            level = LEVELS["error"] if style == "people" else LEVELS["warning"]
        self.style = style
        outputs: list[tuple[TextIO, str, int]] = [(stream, style, level)]
        self._files: list[TextIO] = []
        self._step: str | None = None
        for path in (log_file, extra_file):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                handle = path.open("a", encoding="utf-8")
                self._files.append(handle)
                outputs.append((handle, "json", LEVELS["debug"]))
        self._tee = TeeLogger(outputs)
        #: The command's logger, bound to the context so far (see `bind`). Parts of a run
        #: that log on their own (backends, the run window) are handed a logger bound to
        #: their own context, which later binds here do not change.
        self.logger: Any = structlog.wrap_logger(
            self._tee,
            processors=[
                self._add_step,
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                redact_secrets,
                structlog.processors.format_exc_info,
                _to_kwargs,
            ],
            cache_logger_on_first_use=False,
        )

    def show_status_in(self, progress: Any | None) -> None:
        """Route waits and retries to a progress display (None: back to lines)."""
        self._tee.status = progress.on_event if progress is not None else None

    def bind(self, **values: Any) -> None:
        """Fields every later event of `logger` carries (run_id, manifest, step).

        structlog's bound loggers are immutable: this replaces `logger` with a newly bound
        one, and loggers handed out before keep the context they were given. The step is
        the exception: it is where the run is now, so every event gets the current one,
        whichever logger it went through and whichever thread sent it.
        """
        if "step" in values:
            self._step = values.pop("step")
        if values:
            self.logger = self.logger.bind(**values)

    def _add_step(
        self, _: Any, __: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if self._step is not None:
            event.setdefault("step", self._step)
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
