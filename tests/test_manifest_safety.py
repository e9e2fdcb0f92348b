"""Manifests and cohort lists keep what the user wrote and cannot exhaust the machine (issue 13).

YAML 1.1 silently turns `0012345` into 5349 and `12:30:00` into 45000; a query must never
carry such a value. Aliases and size are bounded, and a cohort CSV cannot widen the pull.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from trolley_etl.core.errors import ManifestError
from trolley_etl.manifest import load_manifest

MANIFEST = """\
version: 1
name: safety
source:
  search: {backend: qido-rs, url: "http://127.0.0.1:9/dicom-web"}
queries:
  - name: q
    filters: {FILTERS}
storage: {root: ./out}
"""


def load(tmp_path: Path, filters: str, *, text: str = MANIFEST, csv: str | None = None):
    if csv is not None:
        (tmp_path / "cohort.csv").write_text(csv)
    path = tmp_path / "m.yaml"
    path.write_text(text.replace("{FILTERS}", filters))
    return load_manifest(path)


def errors(tmp_path: Path, filters: str, **kwargs: object) -> str:
    with pytest.raises(ManifestError) as info:
        load(tmp_path, filters, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


@pytest.mark.parametrize(
    ("written", "kept"),
    [
        ("0012345", "0012345"),
        ("0x1F", "0x1F"),
        ("yes", "yes"),
        ("on", "on"),
        (".nan", ".nan"),
        ("1_000", "1_000"),
        ("1e3", "1e3"),
        ("'007'", "007"),
        ("3", "3"),
    ],
)
def test_patient_ids_keep_the_text_yaml_would_have_changed(
    tmp_path: Path, written: str, kept: str
) -> None:
    manifest = load(tmp_path, f"{{PatientID: {written}}}")
    assert manifest.queries[0].filters["PatientID"] == kept


def test_list_items_are_kept_as_text_too(tmp_path: Path) -> None:
    manifest = load(tmp_path, "{PatientID: [0012, 0x1F], Modality: [CT, MR]}")
    assert manifest.queries[0].filters == {"PatientID": ["0012", "0x1F"], "Modality": ["CT", "MR"]}


def test_sexagesimal_time_is_refused_with_its_position(tmp_path: Path) -> None:
    message = errors(tmp_path, "{StudyTime: 12:30:00}")
    assert ":7:" in message and "StudyTime" in message and "malformed time '12:30:00'" in message


def test_impossible_iso_date_is_an_error_at_its_place(tmp_path: Path) -> None:
    message = errors(tmp_path, "{StudyDate: 2024-13-45}")
    assert "m.yaml:7:" in message and "2024-13-45" in message


def test_iso_dates_still_become_dicom_dates(tmp_path: Path) -> None:
    assert load(tmp_path, "{StudyDate: 2024-01-31}").queries[0].filters["StudyDate"] == "20240131"


def test_no_serializer_warnings_for_list_filters(tmp_path: Path, recwarn) -> None:
    from trolley_etl.runner.resolve import resolution_hash

    resolution_hash(load(tmp_path, "{Modality: [CT, MR]}"))
    assert [str(w.message) for w in recwarn] == []


def test_billion_laughs_is_refused_at_once(tmp_path: Path) -> None:
    laughs = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in "bcdefghi":
        previous = chr(ord(level) - 1)
        laughs.append(f"{level}: &{level} [" + ",".join([f"*{previous}"] * 9) + "]")
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(laughs) + "\n")
    assert path.stat().st_size < 1000
    started = time.monotonic()
    with pytest.raises(ManifestError, match="expands to more than"):
        load_manifest(path)
    assert time.monotonic() - started < 1


def test_oversized_and_deeply_nested_manifests_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("description: '" + "x" * (2 << 20) + "'\n")
    with pytest.raises(ManifestError, match="larger than 1 MiB"):
        load_manifest(path)
    path.write_text("a: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ManifestError, match="nested too deeply"):
        load_manifest(path)


CSV_TEXT = MANIFEST.replace(
    "    filters: {FILTERS}\n", "    from_csv: {path: cohort.csv, column: AccessionNumber}\n"
)


@pytest.mark.parametrize(
    ("csv", "message"),
    [
        ("AccessionNumber\nA1\n*\n", "cohort.csv:3: '*' holds a wildcard"),
        ("AccessionNumber\nA1\nA?\n", "cohort.csv:3: 'A?' holds a wildcard"),
        ('AccessionNumber\nA1\n"A\x01B"\n', "cohort.csv:3: 'A\\x01B' holds a control character"),
        ('AccessionNumber\nA1\n"A2\nA3\nA4\n', "cohort.csv:3: a quote opened here is never closed"),
        ("AccessionNumber\nA1\n" + "x" * 200_000 + "\n", "cohort.csv:3: a field is longer than"),
        ('AccessionNumber\nA1\n"A2"x\n', "cohort.csv:3: malformed CSV"),
    ],
    ids=["star", "question-mark", "control", "unterminated-quote", "huge-field", "bad-quote"],
)
def test_cohort_csv_problems_name_their_row(tmp_path: Path, csv: str, message: str) -> None:
    assert message in errors(tmp_path, "", text=CSV_TEXT, csv=csv)


def test_study_uids_with_wildcards_are_refused(tmp_path: Path) -> None:
    text = MANIFEST.replace("    filters: {FILTERS}\n", "    study_uids: ['1.2.*', 1.2]\n")
    message = errors(tmp_path, "", text=text)
    assert "study_uids[0]" in message and "not a valid UID" in message
