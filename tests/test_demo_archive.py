"""`make demo-archive`: the seeded archive stays up for plan/run by hand, stops on Ctrl-C."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trolley_etl._harness.orthanc import free_port

ROOT = Path(__file__).resolve().parents[1]


def read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> str:
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0 and proc.poll() is None, f"no {marker!r} in time: {seen}"
        ready, _, _ = select.select([proc.stdout], [], [], left)
        if ready:  # raw reads: a buffered readline would hide the lines behind the first
            seen += os.read(proc.stdout.fileno(), 65536).decode("utf-8", "replace")
    return seen


@pytest.mark.archive
def test_demo_archive_serves_the_demo_manifest_until_interrupted(tmp_path: Path) -> None:
    http, dicom = free_port(), free_port()
    manifest = tmp_path / "demo.yaml"
    manifest.write_text(
        (ROOT / "manifests" / "demo.yaml")
        .read_text()
        .replace("127.0.0.1:18042", f"127.0.0.1:{http}")
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "trolley_etl._harness.demo_archive",
            "--manifest",
            str(manifest),
            "--http-port",
            str(http),
            "--dicom-port",
            str(dicom),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        banner = read_until(proc, "Ctrl-C here stops the archive", timeout=90)
        assert f"http://127.0.0.1:{http}" in banner and f"trolley-etl plan {manifest}" in banner
        plan = subprocess.run(
            [sys.executable, "-m", "trolley_etl", "plan", str(manifest)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert plan.returncode == 0, plan.stderr
        assert plan.stdout.splitlines()[-1].startswith("3 studies")  # CT studies of 2024
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "demo archive stopped" in proc.stdout.read()  # type: ignore[union-attr]
        with socket.socket() as probe:  # Orthanc is gone with it
            assert probe.connect_ex(("127.0.0.1", http)) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
