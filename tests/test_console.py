"""Fast in-process checks of the terminal rendering: which events a person sees, the
progress display's status line, and `status` counting attempts as the log shows them."""

from __future__ import annotations

import io
import json
from pathlib import Path

from trolley_etl.core.model import SeriesReference
from trolley_etl.reports.status import build_status, render_status
from trolley_etl.runner.checkpoint import Checkpoint, StudyRow
from trolley_etl.runner.logs import RunLog
from trolley_etl.runner.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_steps_warnings_and_errors_but_no_item_events(tmp_path: Path) -> None:
    screen = Terminal()
    log = RunLog(log_file=tmp_path / "run.jsonl", stderr=screen)
    progress = Progress(3, enabled=False, stream=screen)
    log.show_status_in(progress)
    log.bind(run_id="r1", manifest="m", step="download")
    log.logger.info("step.start", items=3)
    log.logger.info("item.done", study_uid="1.2.3", instances=4, bytes=100)
    log.logger.warning("item.retry", study_uid="1.2.3", attempt=1, error_type="HTTPError")
    assert progress.status == "retrying after HTTPError (attempt 1)"
    assert "retrying after HTTPError" in progress.describe()
    log.logger.warning("item.failed", study_uid="1.2.4", error="HTTP 404")
    log.logger.info("item.done", study_uid="1.2.5", instances=1, bytes=10)
    assert progress.status == ""  # the wait is over
    log.logger.error("verify.bad_file", path="a/b.dcm", reason="missing")
    log.close()
    lines = screen.getvalue().splitlines()
    assert lines == [
        "download... items=3",
        "warning: item.failed study_uid=1.2.4 error=HTTP 404",
        "error: verify.bad_file path=a/b.dcm reason=missing",
    ]
    events = [
        json.loads(line)["event"] for line in (tmp_path / "run.jsonl").read_text().splitlines()
    ]
    assert events == [
        "step.start",
        "item.done",
        "item.retry",
        "item.failed",
        "item.done",
        "verify.bad_file",
    ]


def test_quiet_terminal_shows_errors_only(tmp_path: Path) -> None:
    screen = Terminal()
    log = RunLog(log_file=None, stderr=screen, quiet=True)
    log.logger.info("step.start")
    log.logger.warning("item.failed", study_uid="1")
    log.logger.error("run.failed", error="boom")
    assert screen.getvalue() == "error: run.failed error=boom\n"


def test_plain_progress_lines_are_rate_limited(monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr("trolley_etl.runner.progress.time.monotonic", lambda: clock[0])
    out = io.StringIO()
    progress = Progress(10, enabled=False, lines=True, stream=out)
    for _ in range(5):
        clock[0] += 1
        progress.instance_stored(2**20)
        progress.item_finished()
    assert out.getvalue() == ""  # 5 s: not yet
    clock[0] += 11
    progress.item_finished()
    (line,) = out.getvalue().splitlines()
    assert line.startswith("progress: 6/10 items, 5 instances, 5.0 MiB,") and "ETA" in line


def test_status_counts_attempts_as_the_logs_show_them(tmp_path: Path) -> None:
    root = tmp_path / "data"
    checkpoint = Checkpoint(root / ".trolley" / "checkpoint.sqlite")
    try:
        ref = SeriesReference("1.2.3", "1.2.3.4")
        checkpoint.save_resolution(
            "h", [StudyRow("1.2.3", "trial", "P1", "ACC9", "20240101")], [ref]
        )
        (item,) = checkpoint.items()
        checkpoint.mark_failed(item.item_id, "HTTPError: 503")  # one run: one attempt counted
        logs = root / ".trolley" / "logs"
        logs.mkdir(parents=True)
        events = [
            {"event": "item.retry", "study_uid": "1.2.3", "series_uid": "1.2.3.4"},
            {"event": "item.retry", "study_uid": "1.2.3", "series_uid": "1.2.3.4"},
            {"event": "item.failed", "study_uid": "1.2.3", "series_uid": "1.2.3.4"},
            {"event": "item.retry", "study_uid": "9.9", "series_uid": "9.9.9"},
        ]
        (logs / "r1.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        status = build_status("m", root, checkpoint)
    finally:
        checkpoint.close()
    (problem,) = status["not_done"]
    assert problem["attempts"] == 3 and problem["accession_number"] == "ACC9"
    assert status["query_sets"]["trial"]["items"] == {"failed": 1}
    text = render_status(status)
    assert "failed ACC9 P1 study 1.2.3 series 1.2.3.4 after 3 attempt(s): HTTPError: 503" in text
