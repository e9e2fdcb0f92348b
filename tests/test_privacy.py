"""Private by default: owner-only files and folders whatever the umask (issue 13)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from trolley_etl._harness.dicomgen import make_instance, test_uid
from trolley_etl._harness.orthanc import OrthancServer

STUDY = test_uid("privacy", "study")


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-privacy")).start()
    try:
        for number in range(2):
            server.upload(
                make_instance(
                    patient_id="P",
                    patient_name="N",
                    study_uid=STUDY,
                    series_uid=test_uid("privacy", "s"),
                    sop_uid=test_uid("privacy", number),
                    modality="CT",
                    study_date="20240101",
                    accession_number="A1",
                ).data
            )
        yield server
    finally:
        server.stop()


def run_with_umask_000(tmp_path: Path, url: str, permissions: str) -> Path:
    manifest = tmp_path / "pull.yaml"
    manifest.write_text(f"""\
version: 1
name: privacy
source:
  search: {{backend: qido-rs, url: "{url}/dicom-web"}}
queries:
  - name: q
    study_uids: ["{STUDY}"]
storage:
  root: ./data
  permissions: {permissions}
""")
    result = subprocess.run(
        [sys.executable, "-m", "trolley_etl", "run", str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: os.umask(0),
    )
    assert result.returncode == 0, result.stderr
    return tmp_path / "data"


def modes(root: Path) -> dict[str, int]:
    return {
        path.relative_to(root).as_posix(): stat.S_IMODE(path.stat().st_mode)
        for path in [root, *root.rglob("*")]
    }


def test_everything_is_owner_only_whatever_the_umask(archive, tmp_path: Path) -> None:
    root = run_with_umask_000(tmp_path, archive.url, "private")
    found = modes(root)
    state = {p: m for p, m in found.items() if p.startswith(".trolley")}
    assert {".trolley/checkpoint.sqlite", ".trolley/logs", ".trolley/reports"} <= set(state)
    for path, mode in found.items():
        wanted = 0o700 if (root / path).is_dir() else 0o600
        assert mode == wanted, f"{path} is {oct(mode)}"


def test_group_mode_shares_the_data_but_not_the_state(archive, tmp_path: Path) -> None:
    root = run_with_umask_000(tmp_path, archive.url, "group")
    for path, mode in modes(root).items():
        is_dir = (root / path).is_dir()
        if path == ".trolley" or path.startswith(".trolley/"):
            assert mode == (0o700 if is_dir else 0o600), f"{path} is {oct(mode)}"
        elif path.endswith(".dcm") or is_dir:
            assert mode == (0o750 if is_dir else 0o640), f"{path} is {oct(mode)}"


def test_an_existing_state_folder_is_tightened(archive, tmp_path: Path) -> None:
    root = run_with_umask_000(tmp_path, archive.url, "private")
    (root / ".trolley").chmod(0o755)
    (root / ".trolley" / "checkpoint.sqlite").chmod(0o644)
    run_with_umask_000(tmp_path, archive.url, "private")
    assert stat.S_IMODE((root / ".trolley").stat().st_mode) == 0o700
    assert stat.S_IMODE((root / ".trolley" / "checkpoint.sqlite").stat().st_mode) == 0o600
