"""De-identification: the profile table, keyed pseudonyms, the burned-in gate, and whole runs
against a real Orthanc, scanning every exported byte for the cohort's identifying values."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import re
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from trolley_etl._harness.dicomgen import (
    DEID_IDENTIFIERS,
    DEID_PATIENTS,
    DEID_SAFE_PRIVATE,
    PRIVATE_LO_VALUE,
    deid_cohort,
    make_instance,
    test_uid,
)
from trolley_etl._harness.orthanc import OrthancServer
from trolley_etl.deid.engine import build_policy
from trolley_etl.deid.gate import DeviceRegions
from trolley_etl.deid.keys import Pseudonymizer
from trolley_etl.deid.profile import KEEP, load_table, resolve_action
from trolley_etl.deid.stream import deidentify_file
from trolley_etl.manifest.models import Deid

SECRET_A, SECRET_B = "correct horse battery staple", "another project's key"
UID_PATTERN = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")


# --- fast, in process -------------------------------------------------------------------------


def test_pseudonyms_are_keyed_stable_and_valid_uids() -> None:
    a, again, b = Pseudonymizer(b"one"), Pseudonymizer(b"one"), Pseudonymizer(b"two")
    uid = a.uid("1.2.840.1234.5")
    assert uid == again.uid("1.2.840.1234.5") != b.uid("1.2.840.1234.5")
    assert UID_PATTERN.match(uid) and len(uid) <= 64
    assert a.patient_id("TRL001") == again.patient_id("TRL001") != b.patient_id("TRL001")
    assert a.fingerprint() != b.fingerprint() and "one" not in a.fingerprint()
    offsets = {a.date_offset(f"P{i}") for i in range(50)}
    assert all(-730 <= o <= -1 for o in offsets) and len(offsets) > 10


def test_profile_table_comes_with_its_option_columns() -> None:
    table = load_table()
    assert len(table.rules) > 500
    study_date, sex = table.rule_for(0x00080020), table.rule_for(0x00100040)
    assert resolve_action(study_date, frozenset()) == "Z"
    assert resolve_action(study_date, frozenset({"retain_longitudinal_modified_dates"})) == "C"
    assert resolve_action(study_date, frozenset({"retain_longitudinal_full_dates"})) == KEEP
    assert resolve_action(sex, frozenset({"retain_patient_characteristics"})) == KEEP
    assert resolve_action(table.rule_for(0x60003000), frozenset()) == "X"  # overlay data
    assert resolve_action(table.rule_for(0x00081140), frozenset()) == "U"  # X/Z/U*: kept, remapped


def _one(tmp_path: Path, config: Deid, secret: bytes = b"k", **instance: object):
    defaults: dict[str, object] = dict(
        patient_id="PID77",
        patient_name="Doe^John",
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        sop_uid="1.2.3.4.5",
        modality="CT",
        study_date="20200202",
        accession_number="ACC77",
    )
    source = make_instance(**{**defaults, **instance})  # type: ignore[arg-type]
    path = tmp_path / "in.dcm"
    path.write_bytes(source.data)
    out = io.BytesIO()
    result = deidentify_file(
        path,
        out,
        build_policy(config, secret),
        allow_burned_in=config.allow_burned_in,
        devices=tuple(
            DeviceRegions(d.manufacturer, d.model, tuple(d.regions)) for d in config.blank_regions
        ),
    )
    return source, result, out.getvalue()


def test_keep_remove_and_private_allow_list_override_the_profile(tmp_path: Path) -> None:
    config = Deid(
        secret_env="S",
        options=["retain_safe_private"],
        keep=["StudyDescription"],
        remove=["Manufacturer"],
        keep_private=['(0011,"TROLLEY TEST",01)'],
    )
    _source, result, data = _one(tmp_path, config, private=True, study_description="KEEP ME")
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.StudyDescription == "KEEP ME" and "Manufacturer" not in ds
    block = ds.private_block(0x0011, "TROLLEY TEST")
    assert block[0x01].value == PRIVATE_LO_VALUE  # allow-listed by the project
    assert (block.block_start + 0x02) not in ds  # not listed: removed
    codes = [item.CodeValue for item in ds.DeidentificationMethodCodeSequence]
    assert codes == ["113100", "113111"] and ds.PatientIdentityRemoved == "YES"
    assert result.outcome.counts[("kept", '(0011,"TROLLEY TEST",01)')] == 1
    assert b"PID77" not in data and b"ACC77" not in data and b"Doe" not in data


def test_blanking_regions_zeroes_only_those_pixels(tmp_path: Path) -> None:
    config = Deid.model_validate(
        {
            "secret_env": "S",
            "blank_regions": [
                {"manufacturer": "trolley test generator", "regions": [[0, 0, 10, 5]]}
            ],
        }
    )
    source, result, data = _one(tmp_path, config, modality="OT", extra={"BurnedInAnnotation": ""})
    assert not result.quarantined
    before = pydicom.dcmread(io.BytesIO(source.data)).pixel_array
    after = pydicom.dcmread(io.BytesIO(data)).pixel_array
    assert (after[:5, :10] == 0).all() and (before[:5, :10] != 0).any()
    after[:5, :10] = before[:5, :10]
    assert (after == before).all()
    _, compressed, out = _one(
        tmp_path, config, modality="OT", compressed=True, extra={"BurnedInAnnotation": "YES"}
    )
    assert "uncompressed" in compressed.quarantined and out == b""


def test_large_multiframe_streams_with_bounded_memory(tmp_path: Path) -> None:
    import tracemalloc

    big = make_instance(
        patient_id="BIG1",
        patient_name="Big^Bertha",
        study_uid="1.9",
        series_uid="1.9.1",
        sop_uid="1.9.1.1",
        modality="OT",
        study_date="20200101",
        accession_number="BIGACC",
        rows=512,
        columns=512,
        frames=96,
    )
    source = tmp_path / "big.dcm"
    source.write_bytes(big.data)
    del big
    policy = build_policy(Deid(secret_env="S"), b"k")
    target = tmp_path / "out.dcm"
    tracemalloc.start()
    with target.open("wb") as out:
        result = deidentify_file(source, out, policy)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert source.stat().st_size > 48 << 20 and peak < 8 << 20, peak
    assert result.size == target.stat().st_size
    assert result.sha256 == hashlib.sha256(target.read_bytes()).hexdigest()
    before = pydicom.dcmread(source, defer_size=1024)
    after = pydicom.dcmread(target, defer_size=1024)
    assert after.PixelData == before.PixelData and after.NumberOfFrames == 96


def test_implicit_vr_files_keep_their_syntax_and_pixels(tmp_path: Path) -> None:
    from pydicom.uid import ImplicitVRLittleEndian

    source = make_instance(
        patient_id="IMP1",
        patient_name="Imp^Lisa",
        study_uid="1.8",
        series_uid="1.8.1",
        sop_uid="1.8.1.1",
        modality="CT",
        study_date="20200101",
        accession_number="IMPACC",
    )
    ds = pydicom.dcmread(io.BytesIO(source.data))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    path = tmp_path / "implicit.dcm"
    ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=True)
    out = io.BytesIO()
    deidentify_file(path, out, build_policy(Deid(secret_env="S"), b"k"))
    result = pydicom.dcmread(io.BytesIO(out.getvalue()))
    assert result.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert result.PixelData == ds.PixelData and result.PatientID != "IMP1"
    assert b"IMPACC" not in out.getvalue() and b"Lisa" not in out.getvalue()


@pytest.mark.parametrize(
    ("deid", "message"),
    [
        ({"secret_env": "S", "options": ["retain_everything"]}, "deid.options[0]: Input should be"),
        ({"secret_env": "S", "keep": ["NoSuchKeyword"]}, "unknown DICOM keyword"),
        ({"secret_env": "S", "keep_private": ["(0010,'X',01)"]}, "not a private tag"),
        ({"secret_env": "S", "pseudonym_map": "data/map.csv"}, "outside storage.root"),
        ({"options": []}, "secret_env"),
    ],
)
def test_manifest_checks_the_deid_section(tmp_path: Path, deid: dict, message: str) -> None:
    _check_refused(tmp_path, {"deid": deid}, message)


def test_deid_refuses_metadata_only_json_files(tmp_path: Path) -> None:
    download = {
        "backend": "wado-rs",
        "url": "http://127.0.0.1:9",
        "metadata_only": True,
        "format": "json",
    }
    _check_refused(
        tmp_path,
        {"deid": {"secret_env": "S"}, "download": download},
        "de-identification works on Part 10 files",
    )


def _check_refused(tmp_path: Path, extra: dict, message: str) -> None:
    from trolley_etl.core.errors import ManifestError
    from trolley_etl.manifest import load_manifest

    path = tmp_path / "m.yaml"
    source: dict = {"search": {"backend": "qido-rs", "url": "http://127.0.0.1:9"}}
    if "download" in extra:
        source["download"] = extra["download"]
    path.write_text(
        json.dumps(
            {
                "version": 1,
                "name": "d",
                "source": source,
                "queries": [{"name": "q", "filters": {"PatientID": "X"}}],
                "storage": {"root": "data"},
                "deid": extra["deid"],
            }
        )
    )
    with pytest.raises(ManifestError, match=re.escape(message)):
        load_manifest(path)


# --- whole runs against a real archive ----------------------------------------------------


@pytest.fixture(scope="module")
def cohort():
    return deid_cohort()


@pytest.fixture(scope="module")
def archive(tmp_path_factory, cohort) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-deid")).start()
    try:
        server.upload_many(c.data for c in cohort)
        yield server
    finally:
        server.stop()


def manifest(folder: Path, url: str, extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "deid.yaml"
    path.write_text(f"""\
version: 1
name: deid-test
source:
  search: {{backend: qido-rs, url: "{url}/dicom-web"}}
queries:
  - name: patients
    filters: {{PatientID: [DEID001, DEID002]}}
storage:
  root: ./export
  layout: "{{PatientID}}/{{StudyInstanceUID}}/{{SeriesInstanceUID}}/{{SOPInstanceUID}}.dcm"
run: {{workers: 2, retries: 1}}
deid:
  profile: basic
  options: [retain_longitudinal_modified_dates, clean_descriptors, retain_safe_private]
  secret_env: TROLLEY_DEID_SECRET
  pseudonym_map: ./private/pseudonyms.csv
{extra}""")
    return path


def run(path: Path, secret: str | None, *args: str, command: str = "run"):
    env = {k: v for k, v in os.environ.items() if k != "TROLLEY_DEID_SECRET"}
    if secret is not None:
        env["TROLLEY_DEID_SECRET"] = secret
    return subprocess.run(
        [sys.executable, "-m", "trolley_etl", command, str(path), "--log-format", "json", *args],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )


def exported(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*.dcm"))
        if ".trolley" not in p.parts
    }


def identifying_values(cohort) -> set[bytes]:
    values: set[str] = set(DEID_IDENTIFIERS.values()) | {"19610203"}
    for pid, name in DEID_PATIENTS.items():
        values |= {pid, name, *name.split("^")}
    for inst in cohort:
        values |= {
            inst.accession_number,
            inst.study_uid,
            inst.series_uid,
            inst.sop_uid,
            inst.study_date,
            test_uid("for", inst.study_uid),
        }
        values.add("Referrer")
    parts = {v.split("^")[0] for v in DEID_IDENTIFIERS.values()}
    return {v.encode() for v in values | parts if len(v) >= 4}


@pytest.fixture(scope="module")
def first_run(archive, cohort, tmp_path_factory):
    folder = tmp_path_factory.mktemp("deid-a")
    path = manifest(folder, archive.url)
    done = run(path, SECRET_A)
    assert done.returncode == 0, done.stderr[-3000:]
    return folder, done


def test_export_holds_no_identifying_value_and_links_up(first_run, cohort) -> None:
    folder, _ = first_run
    files = exported(folder / "export")
    at_risk = [c for c in cohort if "BurnedInAnnotation" not in pydicom.dcmread(io.BytesIO(c.data))]
    assert len(files) == len(cohort) - len(at_risk) == 8
    secrets = identifying_values(cohort)
    everything = {  # the DICOM files and whatever else the export holds (BagIt manifest)
        p.relative_to(folder / "export").as_posix(): p.read_bytes()
        for p in (folder / "export").rglob("*")
        if p.is_file() and ".trolley" not in p.parts
    }
    assert set(files) < set(everything)
    for name, data in everything.items():
        leaked = [v for v in secrets if v in data or v in name.encode()]
        assert not leaked, f"{name} holds {leaked}"
    datasets = [pydicom.dcmread(io.BytesIO(d)) for d in files.values()]
    sops = {str(ds.SOPInstanceUID) for ds in datasets}
    references = 0
    for ds in datasets:
        assert UID_PATTERN.match(ds.SOPInstanceUID) and len(ds.StudyInstanceUID) <= 64
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        for seq in ("ReferencedImageSequence", "SourceImageSequence"):
            for item in ds.get(seq, []):
                assert item.ReferencedSOPInstanceUID in sops  # references resolve in the export
                references += 1
    assert references == 2
    studies = {(str(ds.PatientID), str(ds.StudyInstanceUID)) for ds in datasets}
    assert len(studies) == 3 and len({p for p, _ in studies}) == 2
    # the layout uses the pseudonym, the export has the pixel data as it was
    by_new_uid = {Pseudonymizer(SECRET_A.encode()).uid(c.sop_uid): c for c in cohort}
    for name, ds in zip(files, datasets, strict=True):
        assert name.startswith(str(ds.PatientID) + "/")
        source = pydicom.dcmread(io.BytesIO(by_new_uid[str(ds.SOPInstanceUID)].data))
        assert ds.PixelData == source.PixelData
        assert ds.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID


def test_dates_shift_per_patient_and_keep_intervals(first_run) -> None:
    folder, _ = first_run
    dates: dict[str, set[str]] = {}
    for data in exported(folder / "export").values():
        ds = pydicom.dcmread(io.BytesIO(data))
        dates.setdefault(str(ds.PatientID), set()).add(str(ds.StudyDate))
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    two = next(sorted(d) for d in dates.values() if len(d) == 2)
    day = [dt.datetime.strptime(d, "%Y%m%d") for d in two]
    assert (day[1] - day[0]).days == 45  # 20220301 -> 20220415 in the source
    assert "20220301" not in two


def test_safe_private_kept_unsafe_removed(first_run, cohort) -> None:
    folder, _ = first_run
    group, creator, element, _, value = DEID_SAFE_PRIVATE
    kept = 0
    for data in exported(folder / "export").values():
        ds = pydicom.dcmread(io.BytesIO(data))
        assert not [e for e in ds if e.tag.is_private and "TROLLEY" in str(e.value)]
        with contextlib.suppress(KeyError):
            kept += str(ds.private_block(group, creator)[element].value) == value
        assert PRIVATE_LO_VALUE.encode() not in data
    assert kept == 1


def test_audit_quarantine_and_pseudonym_map(first_run, cohort) -> None:
    folder, _ = first_run
    root = folder / "export"
    reports = sorted((root / ".trolley" / "reports").glob("*.json"))
    report = json.loads(reports[-1].read_text())
    section = report["deid"]
    (one_run,) = section["runs"]
    assert one_run["options"] == sorted(
        ["retain_longitudinal_modified_dates", "clean_descriptors", "retain_safe_private"]
    )
    assert one_run["secret_fingerprint"] == Pseudonymizer(SECRET_A.encode()).fingerprint()
    assert one_run["attributes"]["removed"]["OtherPatientIDs"] == 8
    assert one_run["attributes"]["replaced"]["PatientID"] == 8
    assert SECRET_A not in reports[-1].read_text()
    (held,) = section["quarantined"]
    assert "BurnedInAnnotation absent" in held["reason"]
    db = sqlite3.connect(root / ".trolley" / "checkpoint.sqlite")
    hashes = dict(db.execute("SELECT sop_instance_uid, source_sha256 FROM deid_files"))
    by_uid = {c.sop_uid: c for c in cohort}
    for uid, source_sha in hashes.items():
        assert source_sha == hashlib.sha256(by_uid[uid].data).hexdigest()
    stored = dict(db.execute("SELECT sop_instance_uid, sha256 FROM files"))
    deid = dict(db.execute("SELECT sop_instance_uid, deid_sha256 FROM deid_files"))
    assert stored == deid and set(stored) <= set(by_uid)  # checkpoint keys: source UIDs
    mapping = folder / "private" / "pseudonyms.csv"
    assert stat.S_IMODE(mapping.stat().st_mode) == 0o600
    rows = mapping.read_text().splitlines()
    assert f"PatientID,DEID001,{Pseudonymizer(SECRET_A.encode()).patient_id('DEID001')}" in rows
    assert run(folder / "deid.yaml", SECRET_A).returncode == 0  # a rerun: nothing to do
    printed = run(folder / "deid.yaml", None, command="report")
    assert printed.returncode == 0 and len(json.loads(printed.stdout)["deid"]["runs"]) == 2


def test_same_secret_same_bytes_other_secret_other_pseudonyms(first_run, archive, tmp_path) -> None:
    folder, _ = first_run
    again = manifest(tmp_path / "again", archive.url)
    assert run(again, SECRET_A).returncode == 0
    assert exported(tmp_path / "again" / "export") == exported(folder / "export")
    # verify checks the de-identified files; a repair brings back the very same bytes
    assert run(again, SECRET_A, command="verify").returncode == 0
    lost = sorted((tmp_path / "again" / "export").rglob("*.dcm"))[0]
    original = lost.read_bytes()
    lost.unlink()
    repaired = run(again, SECRET_A, "--repair", command="verify")
    assert repaired.returncode == 0, repaired.stderr[-2000:]
    assert lost.read_bytes() == original
    other = manifest(tmp_path / "other", archive.url)
    assert run(other, SECRET_B).returncode == 0
    names_a = {n.split("/")[0] for n in exported(folder / "export")}
    names_b = {n.split("/")[0] for n in exported(tmp_path / "other" / "export")}
    assert names_a.isdisjoint(names_b)
    # a root filled under one secret refuses another, and no secret at all
    changed = run(again, SECRET_B)
    assert changed.returncode == 2 and "changed" in changed.stderr
    assert "(the secret)" in changed.stderr
    assert SECRET_B not in changed.stderr
    missing = run(manifest(tmp_path / "nosecret", archive.url), None)
    assert missing.returncode == 2 and "TROLLEY_DEID_SECRET" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_python_api_writes_the_same_export(first_run, archive, tmp_path, monkeypatch) -> None:
    from trolley_etl import Query, StorageDir, Trolley
    from trolley_etl.backends import QidoRS, WadoRS
    from trolley_etl.deid.engine import make_deidentifier

    folder, _ = first_run
    monkeypatch.setenv("TROLLEY_DEID_SECRET", SECRET_A)
    deid = make_deidentifier(
        {
            "secret_env": "TROLLEY_DEID_SECRET",
            "options": [
                "retain_longitudinal_modified_dates",
                "clean_descriptors",
                "retain_safe_private",
            ],
        },
        pseudonym_map=tmp_path / "private" / "map.csv",
    )
    layout = "{PatientID}/{StudyInstanceUID}/{SeriesInstanceUID}/{SOPInstanceUID}.dcm"
    storage = StorageDir(tmp_path / "api", layout, deid=deid)
    url = f"{archive.url}/dicom-web"
    with Trolley(searcher=QidoRS(url), downloader=WadoRS(url), storage=storage) as trolley:
        stored = trolley.download(trolley.find_studies(Query(PatientID="DEID00*")))
    deid.close()
    assert len(stored) == 8 and deid.quarantined == 1
    assert exported(tmp_path / "api") == exported(folder / "export")
    assert stat.S_IMODE((tmp_path / "private" / "map.csv").stat().st_mode) == 0o600


def test_kept_private_uids_are_remapped_and_lone_creators_dropped(tmp_path: Path) -> None:
    config = Deid(
        secret_env="S", options=["retain_safe_private"], keep_private=['(0011,"TROLLEY TEST",03)']
    )
    source = make_instance(
        patient_id="PRV1",
        patient_name="Priv^Ada",
        study_uid="1.7",
        series_uid="1.7.1",
        sop_uid="1.7.1.1",
        modality="CT",
        study_date="20200101",
        accession_number="PRVACC",
        private=True,
    )
    ds = pydicom.dcmread(io.BytesIO(source.data))
    ds.private_block(0x0011, "TROLLEY TEST").add_new(0x03, "UI", "1.7.1")
    ds.private_block(0x0013, "OTHER VENDOR", create=True).add_new(0x01, "LO", "secret note")
    path = tmp_path / "private.dcm"
    ds.save_as(path, enforce_file_format=True)
    out = io.BytesIO()
    deidentify_file(path, out, build_policy(config, b"k"))
    result = pydicom.dcmread(io.BytesIO(out.getvalue()))
    kept = result.private_block(0x0011, "TROLLEY TEST")[0x03].value
    assert kept == Pseudonymizer(b"k").uid("1.7.1") == result.SeriesInstanceUID
    assert not [e for e in result if e.tag.group == 0x0013]  # no element kept: creator gone
    assert b"secret note" not in out.getvalue()


def test_a_plain_export_is_never_mixed_with_a_deidentified_one(archive, tmp_path) -> None:
    path = manifest(tmp_path, archive.url)
    deid_part = path.read_text().index("deid:")
    text = path.read_text()
    path.write_text(text[:deid_part])  # the same manifest without its deid section
    assert run(path, None).returncode == 0
    path.write_text(text)
    refused = run(path, SECRET_A)
    assert refused.returncode == 2 and "without de-identification" in refused.stderr
