"""Run logs: structlog's immutable bound loggers, handed down to the parts of a run."""

from __future__ import annotations

import io
import json

from trolley_etl.runner.logs import RunLog


def test_a_logger_handed_down_keeps_its_context_and_follows_the_step() -> None:
    stream = io.StringIO()
    log = RunLog(log_file=None, stderr_format="json", stderr=stream)
    log.bind(run_id="r1", manifest="m", step="search")
    backend_log = log.logger.bind(role="download")  # what build_backends hands a backend
    log.bind(step="download", run_id="r2")
    backend_log.info("backend.wait", seconds=1)
    log.logger.info("item.done")
    waited, done = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (waited["run_id"], waited["role"], waited["step"]) == ("r1", "download", "download")
    assert (done["run_id"], done["step"]) == ("r2", "download") and "role" not in done
