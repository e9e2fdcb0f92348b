"""What a person sees on a terminal during `run`, on a real pseudo-terminal: one progress
display, no per-item lines, warnings still shown, a closing summary; `--quiet` and
`--no-progress`; the `status` table and its nested JSON."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from trolley_etl._harness.orthanc import OrthancServer

PATIENTS = "TRL00*"


def write_manifest(folder: Path, url: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pull.yaml"
    path.write_text(f"""\
version: 1
name: terminal-test
source:
  search: {{backend: qido-rs, url: "{url}/dicom-web"}}
queries:
  - name: trial
    filters: {{PatientID: "{PATIENTS}"}}
storage:
  root: ./data
run:
  workers: 2
  retries: 0
""")
    return path


def on_terminal(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """Run trolley-etl with stdout and stderr on a pseudo-terminal; (exit code, output)."""
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 x 120
    proc = subprocess.Popen(
        [sys.executable, "-m", "trolley_etl", *args],
        stdin=subprocess.DEVNULL,
        stdout=child,
        stderr=child,
        env={**os.environ, "COLUMNS": "120", **(env or {})},
    )
    os.close(child)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([main], [], [], 0.5)
            if ready:
                try:
                    chunk = os.read(main, 65536)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(main)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return code, output.decode("utf-8", "replace")


@pytest.fixture
def manifest(orthanc: OrthancServer, tmp_path: Path) -> Path:
    return write_manifest(tmp_path, orthanc.url)


def test_run_on_a_terminal_shows_a_bar_no_item_lines_and_a_summary(manifest: Path) -> None:
    code, out = on_terminal("run", str(manifest))
    assert code == 0, out
    assert "items" in out and "\r" in out.replace("\r\n", "")  # the bar, redrawn in place
    assert "%|" in out
    assert "item.done" not in out and "study_uid" not in out and "Traceback" not in out
    assert "search..." in out and "download..." in out  # the steps, briefly
    last = [line for line in out.replace("\r", "\n").splitlines() if line.strip()]
    summary = next(line for line in last if line.startswith("complete:"))
    assert re.search(r"complete: 5 studies, 10 series, 28 instances, [\d.]+ KiB in ", summary)
    assert last[-1].startswith("report: ") and ".trolley/reports/" in last[-1]
    for line in last:  # nothing of the 250-character log lines
        assert len(line.replace(str(manifest.parent), "DIR")) < 120, line
    # every item event is in the run's JSON log file instead
    (log_file,) = (manifest.parent / "data" / ".trolley" / "logs").glob("*.jsonl")
    events = [json.loads(line)["event"] for line in log_file.read_text().splitlines()]
    assert events.count("item.done") == 5


def test_quiet_prints_only_the_summary(manifest: Path) -> None:
    job_page = manifest.parent / "step-summary.md"
    code, out = on_terminal(
        "run", str(manifest), "--quiet", env={"GITHUB_STEP_SUMMARY": str(job_page)}
    )
    assert code == 0, out
    assert job_page.read_text().startswith("## ✅ trolley-etl: terminal-test")  # CI job page
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[0].startswith("complete: 5 studies") and "\r" not in out.replace("\r\n", "")
    assert len(lines) == 2 and lines[1].startswith("report: ")


def test_no_progress_never_redraws(manifest: Path) -> None:
    code, out = on_terminal("run", str(manifest), "--no-progress")
    assert code == 0, out
    assert "\r" not in out.replace("\r\n", "\n")
    assert "%|" not in out and "complete: 5 studies" in out


def test_status_is_a_table_and_its_json_is_nested(manifest: Path) -> None:
    code, _ = on_terminal("run", str(manifest), "--quiet")
    assert code == 0
    result = subprocess.run(
        [sys.executable, "-m", "trolley_etl", "status", str(manifest)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["query", "set"])
    row = lines[header + 2].split()
    assert row[0] == "trial" and row[1:4] == ["5", "5", "0"]  # studies, done, failed
    command = [sys.executable, "-m", "trolley_etl", "status", str(manifest), "--format", "json"]
    as_json = subprocess.run(command, capture_output=True, text=True, timeout=60)
    status = json.loads(as_json.stdout)
    run = status["last_run"]
    assert isinstance(run["summary"], dict) and isinstance(run["provenance"], dict)
    assert run["provenance"]["search"].startswith("qido-rs ")
    assert status["query_sets"]["trial"]["studies"] == 5
