"""Manifest validation: every mistake names FILE:LINE:COL, the field path and the problem."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from trolley_etl.cli import main
from trolley_etl.core.errors import ManifestError
from trolley_etl.manifest import Manifest, load_manifest
from trolley_etl.manifest.schema import manifest_json_schema_text

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "manifests").glob("*.yaml"))

BASE = """\
version: 1
name: study-pull
source:
  search:
    backend: qido-rs
    url: https://pacs.example.org/dicom-web
    auth: {type: basic, username_env: TEST_PACS_USER, password_env: TEST_PACS_PASSWORD}
  download:
    backend: wado-rs
    url: https://pacs.example.org/dicom-web
queries:
  - name: ct-2024
    filters: {ModalitiesInStudy: CT, StudyDate: 20240101-20241231}
    limit: 100
  - name: cohort
    from_csv: {path: cohort.csv, column: AccessionNumber}
select:
  series: {Modality: [CT]}
storage:
  root: ./out
  layout: "{StudyInstanceUID}/{SOPInstanceUID}.dcm"
run:
  workers: 4
  retries: 2
"""

COHORT_CSV = "AccessionNumber,Note\nA1,first\nA2,second\n"

DIMSE_SOURCE = """\
source:
  search:
    backend: dicom-qr
    host: pacs.local
    port: 104
    called_aet: PACS
  download:
    backend: c-move
    host: pacs.local
    port: 104
    called_aet: PACS
    move_destination: {aet: TROLLEY, port: 11113}
"""


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_PACS_USER", "reader")
    monkeypatch.setenv("TEST_PACS_PASSWORD", "very-secret")


def write(tmp_path: Path, text: str, csv: str = COHORT_CSV) -> Path:
    (tmp_path / "cohort.csv").write_text(csv)
    path = tmp_path / "m.yaml"
    path.write_text(text)
    return path


def replace(old: str, new: str, text: str = BASE) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def with_source(source: str) -> str:
    start, end = BASE.index("source:\n"), BASE.index("queries:\n")
    return BASE[:start] + source + BASE[end:]


def errors_of(path: Path) -> list[str]:
    with pytest.raises(ManifestError) as info:
        load_manifest(path)
    return [str(issue) for issue in info.value.issues]


INVALID = [
    # (id, manifest text, csv text or None, expected first error without the file name)
    (
        "yaml-syntax",
        replace("20240101-20241231}", "20240101-20241231"),
        None,
        "14:10: YAML syntax error: expected ',' or '}', but got ':'",
    ),
    (
        "duplicate-key",
        replace("  root: ./out\n", "  root: ./out\n  root: ./other\n"),
        None,
        "21:3: storage.root: duplicate key 'root' (first defined on line 20)",
    ),
    (
        "not-a-mapping",
        "- version: 1\n",
        None,
        "1:1: a manifest is a YAML mapping (version, name, source, ...)",
    ),
    (
        "empty-file",
        "# nothing here\n",
        None,
        "1:1: a manifest is a YAML mapping (version, name, source, ...)",
    ),
    (
        "unknown-top-key",
        replace("queries:", "queris:"),
        None,
        "11:1: queris: unknown key 'queris' (did you mean queries?)",
    ),
    (
        "unknown-nested-key",
        replace("    limit: 100", "    limmit: 100"),
        None,
        "14:5: queries[0].limmit: unknown key 'limmit' (did you mean limit?)",
    ),
    (
        "version-2",
        replace("version: 1", "version: 2"),
        None,
        "1:1: version: unsupported manifest version 2: this trolley-etl reads version 1",
    ),
    (
        "version-missing",
        replace("version: 1\n", ""),
        None,
        "1:1: version: required field is missing",
    ),
    (
        "bad-name",
        replace("name: study-pull", "name: study pull!"),
        None,
        "2:1: name: String should match pattern '^[A-Za-z0-9][A-Za-z0-9._-]*$'",
    ),
    (
        "unknown-backend",
        replace("backend: qido-rs", "backend: qido"),
        None,
        "5:5: source.search.backend: unknown backend 'qido': expected one of 'qido-rs', 'dicom-qr', 'mint', 'local'",
    ),
    (
        "missing-url",
        replace("    url: https://pacs.example.org/dicom-web\n    auth", "    auth"),
        None,
        "4:3: source.search.url: required field is missing",
    ),
    (
        "ftp-url",
        replace(
            "    url: https://pacs.example.org/dicom-web\n    auth",
            "    url: ftp://pacs.example.org/\n    auth",
        ),
        None,
        "6:5: source.search.url: not an http(s) URL: 'ftp://pacs.example.org/'",
    ),
    (
        "credentials-in-url",
        replace(
            "    url: https://pacs.example.org/dicom-web\n    auth",
            "    url: https://bob:pw@pacs.example.org/dicom-web\n    auth",
        ),
        None,
        "6:5: source.search.url: credentials in the URL are not allowed: use auth with username_env/password_env",
    ),
    (
        "literal-password",
        replace("password_env: TEST_PACS_PASSWORD", "password: hunter2"),
        None,
        "7:55: source.search.auth.password: secrets are never written in a manifest: put the value in an environment variable and give its name instead, e.g. `password_env: PACS_PASSWORD`",
    ),
    (
        "unknown-auth-type",
        replace("{type: basic,", "{type: digest,"),
        None,
        "7:12: source.search.auth.type: unknown type 'digest': expected one of 'none', 'basic', 'bearer', 'vitrea', 'impax', 'oauth2', 'command'",
    ),
    (
        "bearer-without-token",
        replace(
            "{type: basic, username_env: TEST_PACS_USER, password_env: TEST_PACS_PASSWORD}",
            "{type: bearer}",
        ),
        None,
        "7:5: source.search.auth.token_env: required field is missing",
    ),
    (
        "missing-env",
        replace("password_env: TEST_PACS_PASSWORD", "password_env: TEST_NOT_SET_ANYWHERE"),
        None,
        "7:55: source.search.auth.password_env: environment variable TEST_NOT_SET_ANYWHERE is not set",
    ),
    (
        "no-queries",
        replace(BASE[BASE.index("  - name: ct-2024") : BASE.index("select:")], " []\n").replace(
            "queries:\n []", "queries: []"
        ),
        None,
        "11:1: queries: List should have at least 1 item after validation, not 0",
    ),
    (
        "empty-query-set",
        replace("    filters: {ModalitiesInStudy: CT, StudyDate: 20240101-20241231}\n", ""),
        None,
        "12:5: queries[0]: a query set needs filters, from_csv or study_uids; an empty query would pull the whole archive",
    ),
    (
        "unknown-dicom-keyword",
        replace("{ModalitiesInStudy: CT,", "{ModalityInStudy: CT,"),
        None,
        "13:15: queries[0].filters.ModalityInStudy: unknown DICOM keyword 'ModalityInStudy' (did you mean ModalitiesInStudy?)",
    ),
    (
        "malformed-date",
        replace("20240101-20241231", "2024.01.31"),
        None,
        "13:38: queries[0].filters.StudyDate: malformed date '2024.01.31', expected YYYYMMDD",
    ),
    (
        "reversed-range",
        replace("20240101-20241231", "20241231-20240101"),
        None,
        "13:38: queries[0].filters.StudyDate: range '20241231-20240101' ends before it starts",
    ),
    (
        "wildcard-in-uid",
        replace("{ModalitiesInStudy: CT,", "{StudyInstanceUID: '1.2.*', ModalitiesInStudy: CT,"),
        None,
        "13:15: queries[0].filters.StudyInstanceUID: '1.2.*' is not a valid UID",
    ),
    (
        "bad-uid-in-list",
        replace(
            "    from_csv: {path: cohort.csv, column: AccessionNumber}\n",
            "    study_uids: [1.2.3, 1.2.x]\n",
        ),
        None,
        "16:25: queries[1].study_uids[1]: '1.2.x' is not a valid UID",
    ),
    (
        "duplicate-query-name",
        replace("name: cohort", "name: ct-2024"),
        None,
        "15:5: queries[1].name: query set name 'ct-2024' is already used by queries[0]",
    ),
    (
        "limit-zero",
        replace("limit: 100", "limit: 0"),
        None,
        "14:5: queries[0].limit: Input should be greater than or equal to 1",
    ),
    (
        "csv-missing-column",
        BASE,
        "Accession,Note\nA1,x\n",
        "16:16: queries[1].from_csv.path: cohort.csv:1: no column 'AccessionNumber' (columns: Accession, Note)",
    ),
    (
        "csv-empty-and-duplicate-rows",
        BASE,
        "AccessionNumber,Note\nA1,x\n,no value\nA1,again\n,\nA2,y\n",
        "16:16: queries[1].from_csv.path: cohort.csv:3: empty AccessionNumber; cohort.csv:4: duplicate 'A1' (first on row 2); cohort.csv:5: empty row",
    ),
    (
        "csv-missing-file",
        replace("path: cohort.csv", "path: missing.csv"),
        None,
        "16:16: queries[1].from_csv.path: cannot read missing.csv: No such file or directory",
    ),
    (
        "csv-column-not-a-keyword",
        replace("column: AccessionNumber", "column: Accession"),
        "Accession\nA1\n",
        "16:34: queries[1].from_csv.column: column name: unknown DICOM keyword 'Accession' (did you mean AccessionNumber?)",
    ),
    (
        "select-unknown-keyword",
        replace("{Modality: [CT]}", "{Modalty: [CT]}"),
        None,
        "18:12: select.series.Modalty: unknown DICOM keyword 'Modalty' (did you mean Modality?)",
    ),
    (
        "layout-unknown-keyword",
        replace("{StudyInstanceUID}/{SOPInstanceUID}.dcm", "{StudyUID}/{SOPInstanceUID}.dcm"),
        None,
        "21:3: storage.layout: layout '{StudyUID}/{SOPInstanceUID}.dcm': unknown DICOM keyword 'StudyUID' (did you mean StudyID?)",
    ),
    (
        "layout-unbalanced",
        replace(
            "{StudyInstanceUID}/{SOPInstanceUID}.dcm", "{StudyInstanceUID/{SOPInstanceUID}.dcm"
        ),
        None,
        "21:3: storage.layout: layout '{StudyInstanceUID/{SOPInstanceUID}.dcm': expected '}' before end of string (unbalanced braces?)",
    ),
    (
        "storage-root-missing",
        replace("  root: ./out\n", ""),
        None,
        "19:1: storage.root: required field is missing",
    ),
    (
        "workers-zero",
        replace("workers: 4", "workers: 0"),
        None,
        "23:3: run.workers: Input should be greater than or equal to 1",
    ),
    (
        "run-unknown-key",
        replace("workers: 4", "worker: 4"),
        None,
        "23:3: run.worker: unknown key 'worker' (did you mean workers?)",
    ),
    (
        "dimse-port",
        with_source(
            replace(
                "    port: 104\n    called_aet: PACS\n  download",
                "    port: 70000\n    called_aet: PACS\n  download",
                DIMSE_SOURCE,
            )
        ),
        None,
        "7:5: source.search.port: Input should be less than or equal to 65535",
    ),
    (
        "ae-title-too-long",
        with_source(
            replace(
                "called_aet: PACS\n  download",
                "called_aet: PACS_ARCHIVE_NUMBER1\n  download",
                DIMSE_SOURCE,
            )
        ),
        None,
        "8:5: source.search.called_aet: String should have at most 16 characters",
    ),
    (
        "c-move-without-destination",
        with_source(
            replace("    move_destination: {aet: TROLLEY, port: 11113}\n", "", DIMSE_SOURCE)
        ),
        None,
        "9:3: source.download.move_destination: required field is missing",
    ),
    (
        "mint-without-download",
        with_source(
            "source:\n  search:\n    backend: mint\n    url: https://mint.example.org/MINTApi\n"
        ),
        None,
        "5:5: source.search.backend: a mint search implies no downloader: add download (wado-rs or rad69)",
    ),
    (
        "local-search-with-wado",
        with_source(
            "source:\n  search: {backend: local, path: ./dicom}\n  download:\n    backend: wado-rs\n    url: https://pacs.example.org/dicom-web\n"
        ),
        None,
        "6:5: source.download.backend: a local search cannot be paired with a wado-rs download: the local backend searches and copies the same folder",
    ),
]


@pytest.mark.parametrize(
    ("text", "csv", "expected"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID]
)
def test_invalid_manifest_names_file_line_field_and_problem(
    tmp_path: Path, text: str, csv: str | None, expected: str
) -> None:
    path = write(tmp_path, text, csv if csv is not None else COHORT_CSV)
    assert errors_of(path)[0] == f"{path}:{expected}"


def test_at_least_thirty_distinct_invalid_manifests() -> None:
    assert len({case[1] + str(case[2]) for case in INVALID}) >= 30


def test_every_error_is_reported_not_just_the_first(tmp_path: Path) -> None:
    text = replace("workers: 4", "workers: 0", replace("limit: 100", "limit: 0"))
    path = write(tmp_path, text)
    assert errors_of(path) == [
        f"{path}:14:5: queries[0].limit: Input should be greater than or equal to 1",
        f"{path}:23:3: run.workers: Input should be greater than or equal to 1",
    ]


def test_missing_secret_is_named_but_other_values_never_printed(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("TEST_PACS_PASSWORD")
    path = write(tmp_path, BASE)
    (message,) = errors_of(path)
    assert "TEST_PACS_PASSWORD is not set" in message
    assert "reader" not in message  # the user name's value is not shown either
    assert load_manifest(path, check_env=False).name == "study-pull"


def test_yaml_dates_and_numbers_become_dicom_values(tmp_path: Path) -> None:
    text = replace("StudyDate: 20240101-20241231", "StudyDate: 2024-01-31, SeriesNumber: 3")
    manifest = load_manifest(write(tmp_path, text))
    assert manifest.queries[0].filters["StudyDate"] == "20240131"
    assert manifest.queries[0].filters["SeriesNumber"] == "3"


def test_valid_manifest_resolves_paths_and_csv(tmp_path: Path) -> None:
    manifest = load_manifest(write(tmp_path, BASE))
    assert manifest.storage_root == (tmp_path / "out").resolve()
    assert manifest.queries[1].csv_values == ["A1", "A2"]
    assert manifest.queries[0].filters == {
        "ModalitiesInStudy": "CT",
        "StudyDate": "20240101-20241231",
    }
    assert manifest.source.effective_download.backend == "wado-rs"


def test_implied_downloads(tmp_path: Path) -> None:
    qido_only = replace(
        "  download:\n    backend: wado-rs\n    url: https://pacs.example.org/dicom-web\n", ""
    )
    download = load_manifest(write(tmp_path, qido_only)).source.effective_download
    assert (download.backend, download.url, download.auth.type) == (
        "wado-rs",
        "https://pacs.example.org/dicom-web",
        "basic",
    )
    dimse = with_source(DIMSE_SOURCE[: DIMSE_SOURCE.index("  download:")])
    download = load_manifest(write(tmp_path, dimse)).source.effective_download
    assert (download.backend, download.host, download.called_aet) == ("c-get", "pacs.local", "PACS")


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_examples_validate_and_round_trip(example: Path, monkeypatch, tmp_path: Path) -> None:
    for name in ("PACS_USER", "PACS_PASSWORD", "PACS_TOKEN", "VNA_TOKEN"):
        monkeypatch.setenv(name, "x")
    manifest = load_manifest(example)
    assert example.read_text().startswith(
        "# yaml-language-server: $schema=../schemas/manifest.schema.json"
    )
    again = Manifest.model_validate(
        manifest.model_dump(mode="json", exclude_unset=True), context={"base_dir": example.parent}
    )
    assert again == manifest
    assert again.model_dump() == manifest.model_dump()


def test_committed_schema_matches_the_models() -> None:
    committed = (ROOT / "schemas" / "manifest.schema.json").read_text()
    assert committed == manifest_json_schema_text(), (
        "run `trolley-etl schema -o schemas/manifest.schema.json`"
    )
    schema = json.loads(committed)
    assert schema["properties"]["source"]["$ref"] == "#/$defs/Source"


def test_cli_validate_exit_codes(tmp_path: Path, capsys) -> None:
    good = write(tmp_path, BASE)
    assert main(["validate", str(good)]) == 0
    assert "valid (study-pull, 2 query sets)" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(replace("workers: 4", "workers: 0"))
    assert main(["validate", str(good), str(bad)]) == 2
    assert f"{bad}:23:3: run.workers:" in capsys.readouterr().err
    assert main(["validate", str(tmp_path / "absent.yaml")]) == 2
    assert "cannot read the file: No such file or directory" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2


def test_cli_schema_output(tmp_path: Path, capsys) -> None:
    assert main(["schema"]) == 0
    assert capsys.readouterr().out == manifest_json_schema_text()
    target = tmp_path / "schema.json"
    assert main(["schema", "--output", str(target)]) == 0
    assert target.read_text() == manifest_json_schema_text()


def test_examples_copy_elsewhere_still_resolve_csv(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PACS_TOKEN", "x")
    for name in ("cohort-from-csv.yaml", "cohort.csv"):
        shutil.copy(ROOT / "manifests" / name, tmp_path / name)
    manifest = load_manifest(tmp_path / "cohort-from-csv.yaml")
    assert manifest.queries[0].csv_values == ["ACC1001", "ACC1003", "ACC1004"]
    assert manifest.storage_root == (tmp_path / "data" / "cohort-2024-lung").resolve()
