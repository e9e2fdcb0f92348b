"""What each entry point loads: `trolley-etl status` must stay a cheap read of a checkpoint.

`status` on a large checkpoint is a benchmark target, and most of its time used to be spent
importing pydicom (with numpy), requests, structlog and tqdm, none of which it uses. These
tests run the command in a fresh interpreter and look at `sys.modules` afterwards; they fail
when a module-level import brings one of those back onto the path.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from trolley_etl.core.model import InstanceReference
from trolley_etl.runner.checkpoint import StudyRow, open_checkpoint

#: Modules that `status` (and building the argument parser) must not import.
HEAVY = (
    "numpy",
    "pydicom",
    "pynetdicom",
    "requests",
    "structlog",
    "tqdm",
    "trolley_etl.backends.http",
    "trolley_etl.core.storage",
    "trolley_etl.core.trolley",
    "trolley_etl.runner.run",
)

STUDY = "1.2.826.0.1.3680043.8.498.10"
SERIES = "1.2.826.0.1.3680043.8.498.11"


def loaded_after(code: str) -> tuple[list[str], str]:
    """Run `code` in a fresh interpreter; the HEAVY modules it left loaded, and its stdout."""
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    *output, last = done.stdout.splitlines()
    return json.loads(last), "\n".join(output)


def write_status_fixture(folder: Path, layout: str = "") -> tuple[Path, Path]:
    """A manifest and a checkpoint with two done items and one failed one."""
    root = folder / "data"
    manifest = folder / "pull.yaml"
    manifest.write_text(
        "version: 1\n"
        "name: status-imports\n"
        "source:\n"
        "  search: {backend: qido-rs, url: 'http://127.0.0.1:9/dicom-web'}\n"
        "queries:\n"
        "  - name: cohort\n"
        f"    study_uids: [{STUDY}]\n"
        "  - name: by-date\n"
        "    filters: {StudyDate: 20240101-20240131, ModalitiesInStudy: [CT, MR]}\n"
        f"storage: {{root: ./data{', layout: ' + repr(layout) if layout else ''}}}\n",
        encoding="utf-8",
    )
    checkpoint = open_checkpoint(root)
    try:
        refs = [InstanceReference(STUDY, SERIES, f"{SERIES}.{n}") for n in range(1, 4)]
        checkpoint.save_resolution("fixture", [StudyRow(STUDY, "cohort")], refs)
        checkpoint.start_run("20240101T000000Z-000000", "fixture")
        for item in checkpoint.items():
            if item.reference == refs[-1]:
                checkpoint.mark_failed(item.item_id, "HTTP 404")
            else:
                checkpoint.mark_done(item.item_id)
        checkpoint.finish_run("20240101T000000Z-000000", "failed", checkpoint.counts())
    finally:
        checkpoint.close()
    return manifest, root


def status_code(manifest: Path, root: Path, *extra: str) -> str:
    argv = ["status", str(manifest), "--root", str(root), "--quiet", *extra]
    return f"from trolley_etl.cli import main\nprint('exit', main({argv!r}))"


@pytest.mark.subprocess
def test_status_loads_neither_pydicom_nor_the_runner(tmp_path) -> None:
    manifest, root = write_status_fixture(tmp_path)
    loaded, output = loaded_after(status_code(manifest, root))
    assert loaded == []
    assert "status-imports: 2 done, 0 pending, 1 failed" in output
    assert f"instance {SERIES}.3 after 1 attempt(s): HTTP 404" in output
    assert output.endswith("exit 1")  # an item failed


@pytest.mark.subprocess
def test_status_with_a_custom_layout_loads_neither(tmp_path) -> None:
    manifest, root = write_status_fixture(tmp_path, "{PatientID}/{StudyDate}/{SOPInstanceUID}.dcm")
    assert "layout: '{PatientID}/" in manifest.read_text(encoding="utf-8")
    loaded, output = loaded_after(status_code(manifest, root))
    assert loaded == []
    assert "status-imports: 2 done, 0 pending, 1 failed" in output


@pytest.mark.subprocess
def test_status_json_loads_neither_pydicom_nor_the_runner(tmp_path) -> None:
    manifest, root = write_status_fixture(tmp_path)
    loaded, output = loaded_after(status_code(manifest, root, "--format", "json"))
    assert loaded == []
    status = json.loads(output.removesuffix("exit 1"))
    assert status["counts"]["done"] == 2 and status["counts"]["failed"] == 1
    assert status["last_run"]["status"] == "failed"


@pytest.mark.subprocess
def test_building_the_parser_loads_no_command_code() -> None:
    code = "from trolley_etl.cli.main import build_parser\nbuild_parser().parse_args(['--help'])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0 and "status" in done.stdout
    loaded, _ = loaded_after("from trolley_etl.cli.main import build_parser\nbuild_parser()")
    assert loaded == []


@pytest.mark.subprocess
def test_an_uncommon_keyword_is_still_checked_with_pydicom(tmp_path) -> None:
    """Keywords outside the built-in table load pydicom's dictionary, on demand."""
    manifest, root = write_status_fixture(tmp_path)
    text = manifest.read_text(encoding="utf-8")
    manifest.write_text(text.replace("ModalitiesInStudy", "InstitutionAddress"), encoding="utf-8")
    loaded, output = loaded_after(status_code(manifest, root))
    assert "pydicom" in loaded and "trolley_etl.runner.run" not in loaded
    assert "status-imports: 2 done" in output


@pytest.mark.parametrize(
    "code",
    [
        "import trolley_etl",
        "import trolley_etl.runner",
        "import trolley_etl.runner.checkpoint",
        "from trolley_etl.manifest import load_manifest",
        "from trolley_etl import Query, QueryLevel, InstanceReference",
    ],
)
@pytest.mark.subprocess
def test_light_imports_stay_light(code: str) -> None:
    assert loaded_after(code)[0] == []


@pytest.mark.subprocess
def test_public_names_are_loaded_on_first_use() -> None:
    loaded, _ = loaded_after("from trolley_etl import StorageDir")
    assert "trolley_etl.core.storage" in loaded and "pydicom" in loaded
    assert "trolley_etl.runner.run" not in loaded and "trolley_etl.core.trolley" not in loaded


def test_public_names_still_import() -> None:
    import trolley_etl
    from trolley_etl import Query, QueryLevel, StorageDir, Trolley, TrolleyError
    from trolley_etl.core.storage import StorageDir as Storage
    from trolley_etl.core.trolley import Trolley as TheTrolley
    from trolley_etl.runner import Runner, RunOptions, RunResult

    assert StorageDir is Storage and Trolley is TheTrolley
    assert Query(StudyDate="20240101").filters == {"StudyDate": "20240101"}
    assert QueryLevel("series") is QueryLevel.SERIES and issubclass(TrolleyError, Exception)
    assert {Runner.__name__, RunOptions.__name__, RunResult.__name__} == {
        "Runner",
        "RunOptions",
        "RunResult",
    }
    assert set(trolley_etl.__all__) <= set(dir(trolley_etl))
    for name in trolley_etl.__all__:
        assert getattr(trolley_etl, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        trolley_etl.Nothing  # noqa: B018
    with pytest.raises(ImportError):
        from trolley_etl import Nothing  # noqa: F401
