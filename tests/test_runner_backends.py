"""`trolley-etl run` with the other backends a manifest can name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from trolley_etl.testing.dicomgen import standard_cohort


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trolley_etl", *args],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )  # fmt: skip


def test_local_folder_is_reorganised_into_the_standard_layout(tmp_path: Path) -> None:
    """The example manifest, run on a messy folder: nested random names, non-DICOM files."""
    cohort = standard_cohort()
    messy = tmp_path / "incoming" / "scanner-export"
    for index, instance in enumerate(cohort):
        folder = messy / f"disk{index % 3}" / ("deep" * (index % 2)) / f"x{index % 5}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"IMG{index:04d}").write_bytes(instance.data)
    (messy / "README.txt").write_text("not DICOM")
    (messy / "disk0" / "thumb.jpg").write_bytes(b"\xff\xd8\xff\xe0 not dicom either")
    manifest = tmp_path / "local-reorganise.yaml"
    shutil.copy(Path(__file__).parents[1] / "manifests" / "local-reorganise.yaml", manifest)

    result = run_cli("run", str(manifest))
    assert result.returncode == 0, result.stderr
    root = tmp_path / "data" / "scanner-export-2024"
    expected = {c.sop_uid: c for c in cohort if c.study_date.startswith("2024")}
    stored = sorted(p for p in root.rglob("*.dcm") if ".trolley" not in p.parts)
    assert len(stored) == len(expected)
    for path in stored:
        source = expected[path.stem]
        assert path.relative_to(root).parts == (source.study_uid, source.series_uid, path.name)
        assert path.read_bytes() == source.data
    assert len(list(messy.rglob("IMG*"))) == len(cohort)  # the source folder is untouched

    again = run_cli("run", str(manifest))
    assert again.returncode == 0, again.stderr
    assert '"event": "item.done"' not in again.stderr
