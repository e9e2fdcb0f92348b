"""The benchmark's own set-up keeps working as the checkpoint changes (bench/ has no other test)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "run_bench.py"


def _load_bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("run_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("run_bench", module)  # its dataclasses look their module up
    sys.path.insert(0, str(BENCH.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH.parent))
    return module


@pytest.mark.subprocess
def test_the_status_checkpoint_fill_gives_a_done_root(tmp_path: Path) -> None:
    _load_bench().fill_checkpoint(tmp_path, 50)
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        "version: 1\nname: bench\nsource: {search: {backend: local, path: .}}\n"
        "queries: [{name: cohort, filters: {PatientID: X}}]\n"
        f"storage: {{root: {tmp_path}}}\n"
    )
    shown = subprocess.run(
        [sys.executable, "-m", "trolley_etl", "status", str(manifest), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    counts = json.loads(shown.stdout)["counts"]
    assert counts["done"] == 50 and counts["files"] == 50
