"""The end of a run reads the checkpoint's file records page by page and keeps none of them:
its own report is gathered row by row, so memory does not grow with the root."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trolley_etl.manifest import load_manifest
from trolley_etl.reports.run_report import RunChanges, run_report
from trolley_etl.runner import checkpoint as checkpoint_module
from trolley_etl.runner import report
from trolley_etl.runner.checkpoint import open_checkpoint
from trolley_etl.testing import FakeArchive, make_dataset, run_manifest


def _pulled(tmp_path: Path, files: int = 7) -> tuple[Path, Path]:
    manifest = tmp_path / "pull.yaml"
    manifest.write_text(
        "version: 1\nname: streaming\nsource:\n"
        "  search: {backend: qido-rs, url: 'http://127.0.0.1:9/dicom-web'}\n"
        "queries:\n  - {name: q, filters: {PatientID: 'P*'}}\n"
        "storage: {root: ./data}\n"
    )
    datasets = [
        make_dataset(study_uid=f"1.2.9.{n % 3}", series_uid=f"1.2.9.{n % 3}.1", PatientID="P1")
        for n in range(files)
    ]
    assert run_manifest(manifest, FakeArchive(datasets)).status == "complete"
    return manifest, tmp_path / "data"


def test_file_records_come_page_by_page_in_path_order(tmp_path, monkeypatch) -> None:
    _, root = _pulled(tmp_path)
    monkeypatch.setattr(checkpoint_module, "FILE_PAGE", 2)
    checkpoint = open_checkpoint(root)
    try:
        paths = [record.path for record in checkpoint.files()]
        first = next(iter(checkpoint.files()))  # a listing left unfinished is harmless
        assert first.path == paths[0]
        checkpoint.set_meta("still", "writable")  # the reader holds no lock of the writer's
    finally:
        checkpoint.close()
    assert len(paths) == 7
    assert paths == sorted(paths)


def test_the_runs_own_report_keeps_only_the_rows_not_stored(tmp_path: Path) -> None:
    manifest_path, root = _pulled(tmp_path)
    (root / sorted(p.relative_to(root) for p in root.rglob("*.dcm"))[0]).unlink()  # missing
    manifest = load_manifest(manifest_path)
    checkpoint = open_checkpoint(root)
    try:
        full = report.build_report(checkpoint, manifest, manifest_path, root)
        seen: list[dict] = []
        lean = report.build_report(
            checkpoint, manifest, manifest_path, root, all_instances=False, on_row=seen.append
        )
    finally:
        checkpoint.close()
    assert len(full["instances"]) == len(seen) == 7
    assert [row["status"] for row in lean["instances"]] == ["missing"]
    assert lean["summary"] == full["summary"]
    run_id = full["instances"][0]["run_id"]
    changes = RunChanges(run_id)
    for row in seen:
        changes.add(row)
    gathered, computed = run_report(lean, run_id, changes), run_report(full, run_id)
    for made in (gathered, computed):
        made.pop("generated_at")
    assert json.dumps(gathered, sort_keys=True) == json.dumps(computed, sort_keys=True)


@pytest.mark.parametrize("problems", [0, 3])
def test_run_changes_cap_the_rows_listed_but_count_them_all(problems: int, monkeypatch) -> None:
    from trolley_etl.reports import run_report as module

    monkeypatch.setattr(module, "MAX_PROBLEM_ROWS", 2)
    changes = RunChanges("r")
    for _ in range(problems):
        changes.add({"status": "missing", "study_uid": "1", "run_id": "r", "sha256": "x"})
    assert changes.problem_total == problems
    assert len(changes.problems) == min(problems, 2)
