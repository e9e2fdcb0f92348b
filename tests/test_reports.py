"""What people read, against a real pull from Orthanc: the metadata table (CSV, Parquet),
the HTML report in headless Chromium, the Markdown summary and the plan table."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pydicom
import pytest

from trolley_etl._harness.orthanc import OrthancServer
from trolley_etl.core.errors import MetadataError
from trolley_etl.runner.checkpoint import Checkpoint

PATIENTS = "TRL00*"  # the three regular patients, not the hostile study


def trolley(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trolley_etl", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **(env or {})},
    )


def write_manifest(folder: Path, url: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pull.yaml"
    path.write_text(
        f"""\
version: 1
name: reports-test
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
"""
    )
    return path


@pytest.fixture(scope="module")
def pulled(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest whose pull completed; returns the manifest path (data in ./data)."""
    manifest = write_manifest(tmp_path_factory.mktemp("reports"), orthanc.url)
    result = trolley("run", str(manifest), "--log-format", "json")
    assert result.returncode == 0, result.stderr
    return manifest


def stored(manifest: Path) -> list[dict]:
    checkpoint = Checkpoint(manifest.parent / "data" / ".trolley" / "checkpoint.sqlite")
    try:
        return list(checkpoint.files())
    finally:
        checkpoint.close()


# --- metadata ---------------------------------------------------------------------------------


def test_metadata_instance_rows_match_the_stored_headers(pulled: Path) -> None:
    fields = "PatientID,AccessionNumber,SOPInstanceUID,Modality,Rows,InstanceNumber"
    result = trolley("metadata", str(pulled), "--fields", fields)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    files = stored(pulled)
    assert len(rows) == len(files) > 0
    root = pulled.parent / "data"
    for row in rows:
        path = root / row["path"]
        data = path.read_bytes()
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert int(row["size"]) == len(data)
        ds = pydicom.dcmread(path)
        assert row["PatientID"] == ds.PatientID
        assert row["AccessionNumber"] == ds.AccessionNumber
        assert row["SOPInstanceUID"] == ds.SOPInstanceUID
        assert row["Modality"] == ds.Modality
        assert row["Rows"] == str(ds.Rows)
        assert row["InstanceNumber"] == str(ds.InstanceNumber)
    assert list(rows[0]) == [
        "PatientID",
        "AccessionNumber",
        "SOPInstanceUID",
        "Modality",
        "Rows",
        "InstanceNumber",
        "path",
        "size",
        "sha256",
    ]


def test_metadata_series_and_study_levels_count_what_is_stored(pulled: Path) -> None:
    files = stored(pulled)
    series = trolley("metadata", str(pulled), "--level", "series")
    assert series.returncode == 0, series.stderr
    rows = list(csv.DictReader(io.StringIO(series.stdout)))
    per_series = Counter(f["series_uid"] for f in files)
    assert {r["SeriesInstanceUID"]: int(r["instances"]) for r in rows} == per_series
    size = {r["SeriesInstanceUID"]: int(r["size"]) for r in rows}
    for uid in per_series:
        assert size[uid] == sum(f["size"] for f in files if f["series_uid"] == uid)

    study = trolley("metadata", str(pulled), "--level", "study")
    assert study.returncode == 0, study.stderr
    rows = list(csv.DictReader(io.StringIO(study.stdout)))
    per_study = Counter(f["study_uid"] for f in files)
    assert {r["StudyInstanceUID"]: int(r["instances"]) for r in rows} == per_study
    ct_mr = next(r for r in rows if r["AccessionNumber"] == "ACC1003")
    assert ct_mr["modalities"] == "CT\\MR" and ct_mr["series"] == "2"


def test_metadata_parquet_has_the_same_rows_as_csv(pulled: Path, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet", reason="the parquet extra")
    out = tmp_path / "cohort.parquet"
    result = trolley("metadata", str(pulled), "--format", "parquet", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o600"
    table = pq.read_table(out).to_pylist()
    as_csv = list(csv.DictReader(io.StringIO(trolley("metadata", str(pulled)).stdout)))
    assert len(table) == len(as_csv) == len(stored(pulled))
    assert [{k: str(v) for k, v in row.items()} for row in table] == as_csv
    assert all(isinstance(row["size"], int) for row in table)


def test_metadata_refuses_unknown_keywords(pulled: Path) -> None:
    result = trolley("metadata", str(pulled), "--fields", "PatientID,NotAKeyword")
    assert result.returncode == 2
    assert "NotAKeyword" in result.stderr and "Traceback" not in result.stderr


def test_parquet_without_pyarrow_says_which_extra_to_install(monkeypatch) -> None:
    from trolley_etl.reports import metadata

    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(MetadataError, match=r"trolley-etl\[parquet\]"):
        metadata.write_table(iter([]), ["path"], "parquet", Path("x.parquet"), sys.stdout)


# --- HTML and Markdown reports ------------------------------------------------------------------


@pytest.fixture
def with_failure(pulled: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the pulled root where one study's item failed: (manifest, its accession)."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(pulled.parent, copy)
    checkpoint = Checkpoint(copy / "data" / ".trolley" / "checkpoint.sqlite")
    try:
        study = next(r for r in checkpoint.study_rows() if r.accession_number == "ACC1004")
        item = next(i for i in checkpoint.items() if i.reference.study_uid == study.study_uid)
        checkpoint.mark_failed(item.item_id, "HTTPError: 503 Service Unavailable")
    finally:
        checkpoint.close()
    return copy / "pull.yaml", "ACC1004"


def test_html_report_renders_offline_in_chromium_with_the_checkpoint_numbers(
    with_failure: tuple[Path, str], tmp_path: Path
) -> None:
    from trolley_etl._harness.browser import Page, find_chromium

    if find_chromium() is None and not os.environ.get("CI"):
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    manifest, failed_accession = with_failure
    page_file = tmp_path / "report.html"
    result = trolley("report", str(manifest), "--format", "html", "--output", str(page_file))
    assert result.returncode == 0, result.stderr
    text = page_file.read_text()
    assert "<link" not in text and " src=" not in text and "@import" not in text  # self-contained
    files = stored(manifest)
    checkpoint = Checkpoint(manifest.parent / "data" / ".trolley" / "checkpoint.sqlite")
    try:
        studies = {r.study_uid: r for r in checkpoint.study_rows()}
    finally:
        checkpoint.close()
    per_study = Counter(f["study_uid"] for f in files)

    with Page() as page:
        page.open(page_file)
        js = page.evaluate
        assert int(js("document.getElementById('total-instances').textContent")) == len(files)
        rows = js("""Array.from(document.querySelectorAll('#studies tbody tr')).map(r => (
            {uid: r.dataset.study, cells: Array.from(r.cells).map(c => c.textContent)}))""")
        assert {r["uid"] for r in rows} == set(studies)
        for row in rows:
            accession, patient, date, _, _, instances, _, status, query_set = row["cells"]
            study = studies[row["uid"]]
            assert (accession, patient, date, query_set) == (
                study.accession_number,
                study.patient_id,
                study.study_date,
                study.query_set,
            )
            stored_count, _, expected_count = instances.partition(" / ")  # stored / expected
            assert int(stored_count) == per_study[row["uid"]]
            assert expected_count == "" or int(expected_count) >= int(stored_count)
            assert status == ("failed" if accession == failed_accession else "stored")
        funnel = js("""Object.fromEntries(Array.from(document.querySelectorAll('[data-funnel]'))
                       .map(c => [c.dataset.funnel, c.textContent]))""")
        assert funnel["stored"] == str(len(studies) - 1) and funnel["failed"] == "1"
        assert funnel["selected"] == str(len(studies)) and funnel["requested"] == "unknown"
        modality_chart = js("""Object.fromEntries(Array.from(document.querySelectorAll(
            'figure:first-child svg text.value')).map(t => [t.dataset.label, t.textContent]))""")
        assert modality_chart == {
            m: str(n) for m, n in Counter(f["modality"] for f in files).items()
        }
        failures = js(
            "Array.from(document.querySelectorAll('#failures tbody tr'))"
            ".map(r => r.cells[0].textContent + ' ' + r.cells[5].textContent)"
        )
        assert failures == [f"{failed_accession} HTTPError: 503 Service Unavailable"]
        assert int(js("document.getElementById('shown').textContent")) == len(studies)
        # filter, then sort by date descending (two clicks), as a person would
        js("""(() => {const f = document.getElementById('filter'); f.value = 'TRL002';
              f.dispatchEvent(new Event('input'));})()""")
        visible = js(
            "Array.from(document.querySelectorAll('#studies tbody tr'))"
            ".filter(r => !r.hidden).map(r => r.cells[1].textContent)"
        )
        assert visible and set(visible) == {"TRL002"}
        assert len(visible) == sum(1 for s in studies.values() if s.patient_id == "TRL002")
        js("document.querySelectorAll('#studies th')[2].click()")
        js("document.querySelectorAll('#studies th')[2].click()")
        dates = js(
            "Array.from(document.querySelectorAll('#studies tbody tr'))"
            ".map(r => r.cells[2].textContent)"
        )
        assert dates == sorted((s.study_date for s in studies.values()), reverse=True)
        runs = js("document.querySelectorAll('#runs tbody tr').length")
        assert runs == 1 and js("document.querySelectorAll('svg polyline').length") == 1
        assert page.errors == []
        assert [m for m in page.console if m["type"] in ("error", "warning", "assert")] == []


def test_markdown_summary_goes_to_stdout_and_the_ci_job_summary(
    with_failure: tuple[Path, str], tmp_path: Path
) -> None:
    manifest, failed_accession = with_failure
    summary_file = tmp_path / "step-summary.md"
    summary_file.write_text("earlier step\n")
    result = trolley(
        "report", str(manifest), "--format", "md", env={"GITHUB_STEP_SUMMARY": str(summary_file)}
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    files = stored(manifest)
    assert f"{len(files)} instances" in text
    assert "| requested | found | selected | stored | incomplete | failed |" in text
    assert "| unknown | 5 | 5 | 4 | 0 | 1 |" in text
    failed_line = next(
        line for line in text.splitlines() if line.startswith(f"| {failed_accession}")
    )
    assert "| TRL002 | failed | HTTPError: 503 Service Unavailable |" in failed_line
    assert summary_file.read_text() == "earlier step\n" + text + "\n"
    assert len(text) < 3000


# --- plan -------------------------------------------------------------------------------------


def test_plan_table_json_and_csv_show_counts_and_unknowns(
    orthanc: OrthancServer, cohort, tmp_path: Path
) -> None:
    manifest = write_manifest(tmp_path, orthanc.url)
    expected = [c for c in cohort if c.patient_id.startswith("TRL00")]
    per_study = Counter(c.accession_number for c in expected)
    series = {
        a: len({c.series_uid for c in expected if c.accession_number == a}) for a in per_study
    }

    as_json = trolley("plan", str(manifest), "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    plan = json.loads(as_json.stdout)
    rows = {r["accession_number"]: r for r in plan["studies"]}
    assert {a: r["instances"] for a, r in rows.items()} == per_study
    assert {a: r["series_total"] for a, r in rows.items()} == series
    assert rows["ACC1003"]["modalities"] == "CT\\MR" and rows["ACC1003"]["patient_id"] == "TRL002"
    assert plan["totals"]["instances"] == len(expected)
    # nothing pulled into this root yet: no basis for a size estimate
    assert plan["totals"]["estimated_bytes"] is None
    assert all(r["estimated_bytes"] is None for r in rows.values())

    table = trolley("plan", str(manifest))
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "query",
        "set",
        "accession",
        "patient",
        "ID",
        "date",
        "modalities",
        "series",
        "instances",
        "est.",
        "size",
    ]
    dates = [line.split()[3] for line in lines if line.startswith("trial ")]
    assert dates == sorted(dates) and len(dates) == len(per_study)  # by date, as people scan
    acc = next(line for line in lines if "ACC1001" in line).split()
    assert acc[:4] == ["trial", "ACC1001", "TRL001", "20230115"]
    assert acc[-2:] == [str(per_study["ACC1001"]), "unknown"]
    total = next(line for line in lines if line.startswith("total")).split()
    assert total[-2:] == [str(len(expected)), "unknown"] and " 0 " not in f" {' '.join(total)} "
    assert lines[-1] == f"{len(per_study)} studies, {len(per_study)} retrieval items"

    as_csv = list(
        csv.DictReader(io.StringIO(trolley("plan", str(manifest), "--format", "csv").stdout))
    )
    assert {r["accession_number"]: int(r["instances"]) for r in as_csv} == per_study
    assert all(r["estimated_bytes"] == "" for r in as_csv)


def test_plan_estimates_sizes_from_an_earlier_pull(pulled: Path) -> None:
    files = stored(pulled)
    average = sum(f["size"] for f in files) / len(files)
    plan = json.loads(trolley("plan", str(pulled), "--format", "json").stdout)
    for row in plan["studies"]:
        assert row["estimated_bytes"] == round(row["instances"] * average)


# --- a run's own report -------------------------------------------------------------------------


def test_a_runs_saved_report_holds_its_changes_not_every_instance(pulled: Path) -> None:
    reports = pulled.parent / "data" / ".trolley" / "reports"
    (first,) = [p for p in reports.glob("*.json") if not p.name.startswith("report-")]
    files = stored(pulled)
    report = json.loads(first.read_text())
    assert "instances" not in report and report["not_stored"] == []
    assert report["changed"]["instances"] == len(files)
    assert report["changed"]["bytes"] == sum(f["size"] for f in files)
    assert report["summary"]["instances"] == len(files) and len(report["runs"]) == 1

    rerun = trolley("run", str(pulled), "--log-format", "json")
    assert rerun.returncode == 0, rerun.stderr
    run_id = json.loads(rerun.stderr.splitlines()[0])["run_id"]
    again = reports / f"{run_id}.json"
    noop = json.loads(again.read_text())
    assert noop["changed"] == {"instances": 0, "bytes": 0, "studies": {}}
    assert noop["status"] == "complete" and noop["runs"][0]["run_id"] == run_id
    full = trolley("report", str(pulled)).stdout
    assert again.stat().st_size < len(full) / 2  # the summary, not another copy of every row


# --- CI examples --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["github-actions.yml", "gitlab-ci.yml"])
def test_ci_examples_are_valid_yaml_with_commands_that_parse(name: str) -> None:
    import shlex

    import yaml

    from trolley_etl.cli.main import build_parser

    path = Path(__file__).resolve().parents[1] / "examples" / "ci" / name
    pipeline = yaml.safe_load(path.read_text())
    assert isinstance(pipeline, dict)
    text = path.read_text()
    assert "PACS_PASSWORD" in text  # secrets come from the CI's store, never as values
    assert all("secrets." in line for line in text.splitlines() if "PASSWORD:" in line)
    commands = [
        line.strip().removeprefix("- ").removeprefix("run: ")
        for line in text.splitlines()
        if "trolley-etl " in line and not line.strip().startswith("#")
    ]
    used = set()
    for command in commands:
        words = shlex.split(command[command.index("trolley-etl ") :])[1:]
        words = [w.replace("$MANIFEST", "m.yaml").replace("$ROOT", "/r") for w in words]
        if "*" in " ".join(words):
            words = [w for w in words if "*" not in w] + ["m.yaml"]
        args = build_parser().parse_args(words)  # exits (fails the test) on a bad option
        used.add((args.command, getattr(args, "format", None)))
    assert {("validate", None), ("run", None), ("report", "html"), ("report", "md")} <= used
