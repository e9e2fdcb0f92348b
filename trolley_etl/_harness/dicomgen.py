"""Deterministic synthetic DICOM instances for tests (pydicom 3 + numpy).

Everything here is reproducible: UIDs come from :func:`test_uid` (``2.25.<sha256>`` built from
fixed strings) and pixel data from a numpy generator seeded with the SOP Instance UID, so two
runs produce byte-identical files.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

try:
    import numpy as np
except ImportError as exc:  # the test extra, not a runtime dependency
    raise ImportError(
        "the synthetic DICOM generator needs numpy, a test-only dependency: "
        "pip install 'trolley-etl[test]' (or run `make setup`)"
    ) from exc
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)

__all__ = [
    "COHORT_ACCESSIONS",
    "COHORT_PATIENTS",
    "COHORT_STUDIES",
    "CONTROL_CHAR_SERIES_DESCRIPTION",
    "HOSTILE",
    "HOSTILE_ACCESSION",
    "MULTIFRAME_FRAMES",
    "PRIVATE_CREATOR",
    "PRIVATE_GROUP",
    "GeneratedInstance",
    "SeriesSpec",
    "StudySpec",
    "large_series_instances",
    "make_instance",
    "standard_cohort",
    "test_uid",
]

PRIVATE_CREATOR = "TROLLEY TEST"
PRIVATE_GROUP = 0x0011
#: Value of the private LO element (0011,xx01) and of the 16-byte OB element (0011,xx02).
PRIVATE_LO_VALUE = "trolley private value"
PRIVATE_OB_VALUE = bytes(range(16))

_BITS_STORED = 12
_IMPLEMENTATION_VERSION = "TROLLEY_TEST"


def test_uid(*parts: object) -> str:
    """A deterministic UID (``2.25.<int>``) derived from ``parts``.

    Note: pydicom 3's ``generate_uid(prefix=None, entropy_srcs=...)`` ignores
    ``entropy_srcs`` and returns a random UUID-based UID, so the hash is done here.
    """
    text = "\x1f".join(["trolley-etl-test", *map(str, parts)])
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:16], "big")
    return f"2.25.{value}"


test_uid.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


@dataclass(frozen=True)
class GeneratedInstance:
    """One generated DICOM Part 10 file and the values needed to look it up."""

    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    transfer_syntax: str
    patient_id: str
    accession_number: str
    study_date: str
    modality: str
    data: bytes = field(repr=False)
    patient_name: str = ""
    study_time: str = ""
    study_description: str = ""
    series_description: str = ""
    series_number: int = 1
    instance_number: int = 1
    frames: int = 1
    private: bool = False

    @property
    def compressed(self) -> bool:
        return self.transfer_syntax == RLELossless

    @property
    def size(self) -> int:
        return len(self.data)


def _sop_class_for(modality: str, frames: int) -> str:
    if frames > 1:
        return str(MultiFrameGrayscaleWordSecondaryCaptureImageStorage)
    if modality == "CT":
        return str(CTImageStorage)
    if modality == "MR":
        return str(MRImageStorage)
    return str(SecondaryCaptureImageStorage)


def _pixels(seed_text: str, frames: int, rows: int, columns: int) -> np.ndarray:
    """uint16 pixels: a smooth gradient plus seeded noise, values < 2**12."""
    seed = int.from_bytes(hashlib.sha256(seed_text.encode()).digest()[:8], "big")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:columns]
    base = ((xx * 7 + yy * 5) % 3000).astype(np.uint16)
    shape = (frames, rows, columns)
    noise = rng.integers(0, 64, size=shape, dtype=np.uint16)
    offsets = (np.arange(frames, dtype=np.uint16) * 13).reshape(frames, 1, 1)
    arr = base[np.newaxis, :, :] + noise + offsets
    arr &= (1 << _BITS_STORED) - 1
    return arr if frames > 1 else np.asarray(arr[0])


def make_instance(
    *,
    patient_id: str,
    patient_name: str,
    study_uid: str,
    series_uid: str,
    sop_uid: str,
    modality: str,
    study_date: str,
    study_time: str = "120000",
    accession_number: str,
    study_description: str = "",
    series_description: str = "",
    series_number: int = 1,
    instance_number: int = 1,
    rows: int = 64,
    columns: int = 64,
    frames: int = 1,
    compressed: bool = False,
    private: bool = False,
    extra: dict[str, Any] | None = None,
) -> GeneratedInstance:
    """Build one valid DICOM Part 10 file.

    * SOP class: Multi-frame Grayscale Word SC when ``frames > 1``, else CT Image Storage
      for ``CT``, MR Image Storage for ``MR``, Secondary Capture for anything else.
    * Pixels: 16-bit allocated / 12 stored, unsigned, MONOCHROME2, deterministic.
    * Transfer syntax: Explicit VR Little Endian, or RLE Lossless when ``compressed``
      (pydicom's own RLE encoder; no extra package needed).
    * ``private=True`` adds a private block, creator ``"TROLLEY TEST"`` in group 0x0011:
      (0011,1001) LO :data:`PRIVATE_LO_VALUE` and (0011,1002) OB :data:`PRIVATE_OB_VALUE`.
    * ``extra`` maps DICOM keywords to values, applied last (may override anything).
    """
    if frames < 1:
        raise ValueError("frames must be >= 1")
    sop_class = _sop_class_for(modality, frames)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = study_date
    ds.InstanceCreationTime = study_time
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    # Study
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = study_date
    ds.StudyTime = study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = accession_number[-16:] if accession_number else "1"
    ds.AccessionNumber = accession_number
    ds.StudyDescription = study_description
    # Series / equipment
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description
    ds.Modality = modality
    ds.SeriesDate = study_date
    ds.SeriesTime = study_time
    ds.Manufacturer = "Trolley Test Generator"
    ds.InstanceNumber = instance_number
    ds.ContentDate = study_date
    ds.ContentTime = study_time
    ds.PatientOrientation = ""
    ds.BurnedInAnnotation = "NO"

    if sop_class in (CTImageStorage, MRImageStorage):
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.FrameOfReferenceUID = test_uid("for", study_uid)
        ds.PositionReferenceIndicator = ""
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 1.0
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(instance_number)]
        ds.SliceLocation = float(instance_number)
        ds.AcquisitionNumber = 1
    if sop_class == CTImageStorage:
        ds.KVP = 120
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
    elif sop_class == MRImageStorage:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 500
        ds.EchoTime = 15
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = 1.5
    else:  # Secondary Capture (single or multi-frame)
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.ConversionType = "WSD"
        if frames > 1:
            ds.FrameTime = 100.0
            ds.FrameIncrementPointer = 0x00181063  # FrameTime

    # Image pixel module
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = _BITS_STORED
    ds.HighBit = _BITS_STORED - 1
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    arr = _pixels(sop_uid, frames, rows, columns)
    if compressed:
        ds.compress(RLELossless, arr, encoding_plugin="pydicom", generate_instance_uid=False)
    else:
        ds.PixelData = arr.tobytes()
        ds["PixelData"].VR = "OW"

    if private:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(0x01, "LO", PRIVATE_LO_VALUE)
        block.add_new(0x02, "OB", PRIVATE_OB_VALUE)

    for keyword, value in (extra or {}).items():
        setattr(ds, keyword, value)

    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return GeneratedInstance(
        study_uid=study_uid,
        series_uid=series_uid,
        sop_uid=sop_uid,
        sop_class_uid=sop_class,
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        patient_id=patient_id,
        accession_number=accession_number,
        study_date=study_date,
        modality=modality,
        data=buf.getvalue(),
        patient_name=patient_name,
        study_time=study_time,
        study_description=study_description,
        series_description=series_description,
        series_number=series_number,
        instance_number=instance_number,
        frames=frames,
        private=private,
    )


# --------------------------------------------------------------------------- cohort
@dataclass(frozen=True)
class SeriesSpec:
    modality: str
    description: str
    count: int
    compressed: bool = False
    frames: int = 1
    private_instances: tuple[int, ...] = ()  # instance numbers carrying the private block


@dataclass(frozen=True)
class StudySpec:
    accession_number: str
    patient_id: str
    patient_name: str
    study_date: str
    study_time: str
    description: str
    series: tuple[SeriesSpec, ...]

    @property
    def study_uid(self) -> str:
        return test_uid("study", self.accession_number)

    def series_uid(self, index: int) -> str:
        """UID of the series at position ``index`` (0-based) in :attr:`series`."""
        return test_uid("series", self.accession_number, index)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(sorted({s.modality for s in self.series}))

    @property
    def instance_count(self) -> int:
        return sum(s.count for s in self.series)


#: Patients of the regular cohort: ID -> PatientName.
COHORT_PATIENTS: dict[str, str] = {
    "TRL001": "Doe^Jane",
    "TRL002": "Roe^Richard",
    "TRL003": "Smith^Anna",
}

MULTIFRAME_FRAMES = 8

#: Hostile values of the extra study (``HOSTILE_ACCESSION``), keyed by DICOM keyword.
HOSTILE: dict[str, str] = {
    "PatientID": "../TRL666",
    "PatientName": "../../etc^passwd",
    "AccessionNumber": "/abs/path",
    "StudyDescription": "../../../escape",
    # The backslash is the DICOM multi-value separator: pydicom reads this back as two
    # values ['a/b', 'c/../..'] while Orthanc keeps the raw string "a/b\\c/../..".
    "SeriesDescription": "a/b\\c/../..",
}
HOSTILE_ACCESSION = HOSTILE["AccessionNumber"]
#: Series description of the hostile study's second series: contains a BEL (0x07) and a TAB.
#: Orthanc 1.10 stores and returns it unchanged (checked in tests/test_harness.py).
CONTROL_CHAR_SERIES_DESCRIPTION = "ctl\x07bell\ttab"

COHORT_STUDIES: tuple[StudySpec, ...] = (
    StudySpec(
        "ACC1001",
        "TRL001",
        COHORT_PATIENTS["TRL001"],
        "20230115",
        "083000",
        "CT CHEST",
        (
            SeriesSpec("CT", "CT chest axial", 4),
            SeriesSpec("CT", "CT chest private", 3, private_instances=(1,)),
        ),
    ),
    StudySpec(
        "ACC1002",
        "TRL001",
        COHORT_PATIENTS["TRL001"],
        "20230620",
        "141500",
        "MR BRAIN",
        (
            SeriesSpec("MR", "MR T1", 3),
            SeriesSpec("MR", "MR T2 RLE", 3, compressed=True),
        ),
    ),
    StudySpec(
        "ACC1003",
        "TRL002",
        COHORT_PATIENTS["TRL002"],
        "20240110",
        "093000",
        "CT AND MR",
        (
            SeriesSpec("CT", "CT localizer", 3),
            SeriesSpec("MR", "MR survey", 2),
        ),
    ),
    StudySpec(
        "ACC1004",
        "TRL002",
        COHORT_PATIENTS["TRL002"],
        "20240125",
        "171000",
        "CT ABDOMEN",
        (
            SeriesSpec("CT", "CT abdomen", 4),
            SeriesSpec("OT", "Multi-frame capture", 1, frames=MULTIFRAME_FRAMES),
        ),
    ),
    StudySpec(
        "ACC1005",
        "TRL003",
        COHORT_PATIENTS["TRL003"],
        "20241105",
        "231500",
        "MR KNEE",
        (
            SeriesSpec("MR", "MR knee sag", 3),
            SeriesSpec("MR", "MR knee cor", 2),
        ),
    ),
    StudySpec(
        HOSTILE_ACCESSION,
        HOSTILE["PatientID"],
        HOSTILE["PatientName"],
        "20240715",
        "000001",
        HOSTILE["StudyDescription"],
        (
            SeriesSpec("CT", HOSTILE["SeriesDescription"], 2),
            SeriesSpec("CT", CONTROL_CHAR_SERIES_DESCRIPTION, 2),
        ),
    ),
)

#: Accession number -> study spec (includes the hostile study under "/abs/path").
COHORT_ACCESSIONS: dict[str, StudySpec] = {s.accession_number: s for s in COHORT_STUDIES}


def _study_instances(spec: StudySpec) -> Iterator[GeneratedInstance]:
    for s_index, series in enumerate(spec.series):
        series_uid = spec.series_uid(s_index)
        for number in range(1, series.count + 1):
            yield make_instance(
                patient_id=spec.patient_id,
                patient_name=spec.patient_name,
                study_uid=spec.study_uid,
                series_uid=series_uid,
                sop_uid=test_uid("sop", spec.accession_number, s_index, number),
                modality=series.modality,
                study_date=spec.study_date,
                study_time=spec.study_time,
                accession_number=spec.accession_number,
                study_description=spec.description,
                series_description=series.description,
                series_number=s_index + 1,
                instance_number=number,
                frames=series.frames,
                compressed=series.compressed,
                private=number in series.private_instances,
            )


def standard_cohort() -> list[GeneratedInstance]:
    """The standard test cohort: 6 studies, 4 patients, 32 small (64x64) instances.

    Five regular studies of three patients (:data:`COHORT_PATIENTS`), plus one hostile study:

    ========  =======  ========  ======  ==================  ===========================
    Acc.      Patient  Date      Time    Description         Series (modality x count)
    ========  =======  ========  ======  ==================  ===========================
    ACC1001   TRL001   20230115  083000  CT CHEST            CT x4, CT x3 (#1 private)
    ACC1002   TRL001   20230620  141500  MR BRAIN            MR x3, MR x3 RLE Lossless
    ACC1003   TRL002   20240110  093000  CT AND MR           CT x3, MR x2
    ACC1004   TRL002   20240125  171000  CT ABDOMEN          CT x4, OT x1 (8 frames)
    ACC1005   TRL003   20241105  231500  MR KNEE             MR x3, MR x2
    /abs/path ../TRL666 20240715 000001  ../../../escape     CT x2, CT x2
    ========  =======  ========  ======  ==================  ===========================

    * The private instance is instance 1 of ACC1001 series 2 (creator ``"TROLLEY TEST"``,
      group 0x0011, see :func:`make_instance`).
    * The RLE series is ACC1002 series 2 (transfer syntax 1.2.840.10008.1.2.5).
    * The multi-frame object is the single instance of ACC1004 series 2: Multi-frame
      Grayscale Word Secondary Capture, :data:`MULTIFRAME_FRAMES` frames, Modality ``OT``.
    * The hostile study uses the values in :data:`HOSTILE` (PatientName "../../etc^passwd",
      PatientID "../TRL666", AccessionNumber "/abs/path", StudyDescription
      "../../../escape", SeriesDescription "a/b\\c/../.." for series 1) and
      :data:`CONTROL_CHAR_SERIES_DESCRIPTION` (BEL and TAB) for series 2. UIDs stay valid.

    UIDs are deterministic: study ``test_uid("study", acc)``, series
    ``test_uid("series", acc, index0)``, SOP ``test_uid("sop", acc, index0, number1)``;
    :class:`StudySpec` exposes ``study_uid`` and ``series_uid(i)``. Instances come in study,
    series, instance order.
    """
    return [inst for spec in COHORT_STUDIES for inst in _study_instances(spec)]


# --------------------------------------------------------------------------- large data
def large_series_instances(
    total_bytes: int,
    *,
    study_uid: str | None = None,
    patient_id: str = "TRLBIG",
    patient_name: str = "Big^Study",
    accession_number: str = "ACCBIG",
    study_date: str = "20240601",
    study_time: str = "120000",
    modality: str = "OT",
    rows: int = 512,
    columns: int = 512,
    frames_per_instance: int = 8,
    series_count: int = 2,
    compressed: bool = False,
) -> Iterator[GeneratedInstance]:
    """Yield instances lazily, all in one study, until ``total_bytes`` have been produced.

    Defaults give 512x512x16-bit frames, 8 per instance (~4 MiB per file), spread over
    ``series_count`` (1 or 2) series: the first half of the instances in series 1, the rest
    in series 2. The study UID defaults to ``test_uid("study", accession_number)``.
    """
    if series_count not in (1, 2):
        raise ValueError("series_count must be 1 or 2")
    study = study_uid or test_uid("study", accession_number)
    approx = rows * columns * 2 * frames_per_instance + 2048
    planned = max(1, math.ceil(total_bytes / approx))
    produced = 0
    index = 0
    while produced < total_bytes or index == 0:
        s_index = min(series_count - 1, index * series_count // planned)
        inst = make_instance(
            patient_id=patient_id,
            patient_name=patient_name,
            study_uid=study,
            series_uid=test_uid("large-series", study, s_index),
            sop_uid=test_uid("large-sop", study, index),
            modality=modality,
            study_date=study_date,
            study_time=study_time,
            accession_number=accession_number,
            study_description="Large study",
            series_description=f"Large series {s_index + 1}",
            series_number=s_index + 1,
            instance_number=index + 1,
            rows=rows,
            columns=columns,
            frames=frames_per_instance,
            compressed=compressed,
        )
        produced += inst.size
        index += 1
        yield inst


# --------------------------------------------------------------------------- de-identification
#: Patients of :func:`deid_cohort`: ID -> name (identifying values a test scans exports for).
DEID_PATIENTS: dict[str, str] = {"DEID001": "Kowalski^Jan^Maria", "DEID002": "Nakamura^Yuki"}
#: Values only the de-identification cohort holds; none may appear in a de-identified export.
DEID_IDENTIFIERS = {
    "OtherPatientIDs": "OLDID4711",
    "InstitutionName": "St Elsewhere Hospital",
    "ReferringPhysicianName": "Referrer^Rupert",
    "PerformingPhysicianName": "Performer^Paula",
}
#: Safe private attribute (PS3.15 Table E.3.10-1) the cohort carries: B value 1000.
DEID_SAFE_PRIVATE = (0x0019, "SIEMENS MR HEADER", 0x0C, "IS", "1000")


def _with_changes(inst: GeneratedInstance, change: Any) -> GeneratedInstance:
    """The instance re-encoded after `change(dataset)` edited it."""
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(inst.data))
    change(ds)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return GeneratedInstance(**{**inst.__dict__, "data": buf.getvalue()})


def deid_cohort() -> list[GeneratedInstance]:
    """A small cohort for de-identification tests, 2 patients, 3 studies, 9 instances.

    * DEID001 (two studies 45 days apart: 20220301 and 20220415), DEID002 (20210101).
    * Identifying values everywhere: names, IDs, OtherPatientIDs, accession numbers,
      institution and physician names (:data:`DEID_IDENTIFIERS`), dates, UIDs.
    * Study 1 instance 1 carries the safe private B value (:data:`DEID_SAFE_PRIVATE`) and
      the unsafe "TROLLEY TEST" block; study 2 has an RLE series, a multi-frame object and a
      derived CT whose ReferencedImageSequence and SourceImageSequence point at study 1
      instance 1; study 3 holds a Secondary Capture without BurnedInAnnotation (at risk).
    """
    from pydicom.dataset import Dataset as _Dataset
    from pydicom.sequence import Sequence as _Sequence

    def common(ds: Dataset) -> None:
        ds.OtherPatientIDs = DEID_IDENTIFIERS["OtherPatientIDs"]
        ds.InstitutionName = DEID_IDENTIFIERS["InstitutionName"]
        ds.ReferringPhysicianName = DEID_IDENTIFIERS["ReferringPhysicianName"]
        ds.PerformingPhysicianName = DEID_IDENTIFIERS["PerformingPhysicianName"]
        ds.PatientBirthDate = "19610203"

    def base(acc: str, pid: str, date: str, series: int, number: int, **kw: Any) -> Any:
        return make_instance(
            patient_id=pid,
            patient_name=DEID_PATIENTS[pid],
            study_uid=test_uid("deid", acc),
            series_uid=test_uid("deid", acc, series),
            sop_uid=test_uid("deid", acc, series, number),
            study_date=date,
            study_time="101500",
            accession_number=acc,
            study_description=f"Study of {DEID_PATIENTS[pid].split('^')[0]}",
            series_description="series",
            series_number=series + 1,
            instance_number=number,
            **kw,
        )

    out: list[GeneratedInstance] = []
    first = base("DACC01", "DEID001", "20220301", 0, 1, modality="CT", private=True)

    def add_private(ds: Dataset) -> None:
        common(ds)
        group, creator, element, vr, value = DEID_SAFE_PRIVATE
        ds.private_block(group, creator, create=True).add_new(element, vr, value)

    out.append(_with_changes(first, add_private))
    out.append(_with_changes(base("DACC01", "DEID001", "20220301", 0, 2, modality="CT"), common))
    for number in (1, 2):
        rle = base("DACC02", "DEID001", "20220415", 0, number, modality="MR", compressed=True)
        out.append(_with_changes(rle, common))
    multi = base("DACC02", "DEID001", "20220415", 1, 1, modality="OT", frames=4)
    out.append(_with_changes(multi, common))

    def references(ds: Dataset) -> None:
        common(ds)
        ref = _Dataset()
        ref.ReferencedSOPClassUID = first.sop_class_uid
        ref.ReferencedSOPInstanceUID = first.sop_uid
        ds.ReferencedImageSequence = _Sequence([ref])
        source = _Dataset()
        source.ReferencedSOPClassUID = first.sop_class_uid
        source.ReferencedSOPInstanceUID = first.sop_uid
        ds.SourceImageSequence = _Sequence([source])
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]

    derived = base("DACC02", "DEID001", "20220415", 2, 1, modality="CT")
    out.append(_with_changes(derived, references))
    for number in (1, 2):
        out.append(
            _with_changes(base("DACC03", "DEID002", "20210101", 0, number, modality="CT"), common)
        )

    def unflagged(ds: Dataset) -> None:
        common(ds)
        del ds.BurnedInAnnotation

    screenshot = base("DACC03", "DEID002", "20210101", 1, 1, modality="OT")
    out.append(_with_changes(screenshot, unflagged))
    return out
