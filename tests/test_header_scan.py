"""The fast header reader gives exactly what pydicom gives, or gives up and lets pydicom read.

Every case compares `scan_header` with pydicom on the same bytes, and also says whether the
fast path must have been taken, so a reader that silently always gave up would fail here.
"""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from trolley_etl import StorageDir
from trolley_etl.core.backend import write_instance
from trolley_etl.core.header_scan import facts_from_dataset, scan_header
from trolley_etl.core.storage import HEADER_KEYWORDS, HEADER_PREFIX_BYTES, read_header_facts

KEYWORDS = sorted({*HEADER_KEYWORDS, "PatientName", "StudyDescription"})
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _dataset(**values: object) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT_IMAGE
    ds.SOPInstanceUID = "1.2.3.4.5.6"
    ds.StudyDate = "20240102"
    ds.AccessionNumber = "ACC-1"
    ds.Modality = "CT"
    ds.StudyDescription = "Chest"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P-001"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = "1.2.3.4.5"
    ds.SeriesNumber = 3
    ds.Rows, ds.Columns = 2, 2
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00" * 8
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def _part10(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", CT_IMAGE)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "1.2.3")
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _by_pydicom(data: bytes, keywords: list[str] = KEYWORDS):
    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    return facts_from_dataset(ds, keywords)


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _with_sequences(undefined_lengths: bool = True) -> Dataset:
    """Sequences before the wanted tags: nested, empty, with private elements; written with
    undefined lengths (delimiters to find) or defined ones (lengths to skip)."""
    inner = _item(CodeValue="1", CodingSchemeDesignator="DCM", CodeMeaning="x")
    outer = _item(ReferencedSOPClassUID=CT_IMAGE, ReferencedSOPInstanceUID="1.2.9")
    outer.PurposeOfReferenceCodeSequence = Sequence([inner, inner])
    ds = _dataset()
    ds.ReferencedImageSequence = Sequence([outer, _item()])  # (0008,1140)
    ds.ProcedureCodeSequence = Sequence([])  # (0008,1032), empty
    ds.AnatomicRegionSequence = Sequence([_item(CodeValue="T-D3000")])  # (0008,2218)
    block = ds.private_block(0x0009, "TROLLEY TEST", create=True)
    block.add_new(0x01, "LO", "private text")
    block.add_new(0x02, "SQ", Sequence([_item(PatientID="not this one")]))
    if undefined_lengths:
        for element in (ds[0x00081140], outer[0x0040A170], ds[0x00081032], ds[0x00091002]):
            element.is_undefined_length = True
        for item in (outer, inner, ds.AnatomicRegionSequence[0], ds[0x00091002].value[0]):
            item.is_undefined_length_sequence_item = True
    return ds


# (name, bytes, must the fast reader handle it?)
FAST_CASES = {
    "explicit little endian": lambda: _part10(_dataset()),
    "implicit little endian": lambda: _part10(_dataset(), ImplicitVRLittleEndian),
    "encapsulated syntax (explicit header)": lambda: _part10(
        _dataset(PixelData=encapsulate([b"\x00" * 8])), RLELossless
    ),
    "multi-valued and padded values": lambda: _part10(
        _dataset(Modality=["CT", "PT"], PatientID="P 1 ", AccessionNumber="A1\\A2 ")
    ),
    "empty and missing values": lambda: _part10(_dataset(AccessionNumber="", PatientID=None)),
    "no SOPClassUID (meta gives it)": lambda: _part10(_dataset(SOPClassUID=None)),
    "sequences, explicit": lambda: _part10(_with_sequences()),
    "sequences, implicit": lambda: _part10(_with_sequences(), ImplicitVRLittleEndian),
    "sequences, defined lengths": lambda: _part10(_with_sequences(False)),
    "multi-valued person name": lambda: _part10(_dataset(PatientName=["A^B", "C^D"])),
    "control characters kept": lambda: _part10(_dataset(StudyDescription="a\tb")),
}

SLOW_CASES = {
    "big endian": lambda: _part10(_dataset(), ExplicitVRBigEndian),
    "deflated": lambda: _part10(_dataset(), DeflatedExplicitVRLittleEndian),
    "non-ASCII text": lambda: _part10(_dataset(PatientName="Müller^Jürgen")),
    "escape sequence": lambda: _part10(
        _dataset(SpecificCharacterSet=["", "ISO 2022 IR 87"], PatientID="A\x1b$B")
    ),
}


@pytest.mark.parametrize("case", sorted(FAST_CASES))
def test_fast_reader_matches_pydicom(case: str) -> None:
    data = FAST_CASES[case]()
    fast = scan_header(data, KEYWORDS, complete=True)
    assert fast is not None, "the fast reader gave up on a case it must handle"
    assert fast == _by_pydicom(data)


@pytest.mark.parametrize("case", sorted(SLOW_CASES))
def test_fast_reader_gives_up_where_pydicom_must_read(case: str) -> None:
    assert scan_header(SLOW_CASES[case](), KEYWORDS, complete=True) is None


def test_the_values_are_the_ones_written() -> None:
    fast = scan_header(_part10(_dataset(Modality=["CT", "PT"])), KEYWORDS, complete=True)
    assert fast is not None
    assert fast.get("StudyInstanceUID") == "1.2.3.4"
    assert fast.get("Modality") == ("CT", "PT") and fast.text("Modality") == "CT\\PT"
    assert fast.get("PatientName") == "Doe^Jane"
    assert fast.transfer_syntax == ExplicitVRLittleEndian


def test_a_number_keyword_is_left_to_pydicom() -> None:
    """IS/DS text is reformatted by pydicom, so asking for SeriesNumber means pydicom reads."""
    data = _part10(_dataset())
    assert scan_header(data, ["SeriesNumber"], complete=True) is None
    assert scan_header(data, ["SeriesInstanceUID"], complete=True) is not None


def test_undefined_lengths_are_really_in_the_bytes() -> None:
    data = _part10(_with_sequences())
    assert data.count(b"\xfe\xff\xdd\xe0") == 4  # sequence delimiters
    assert data.count(b"\xfe\xff\x0d\xe0") == 5  # item delimiters (one item twice)
    assert b"\xfe\xff\xdd\xe0" not in _part10(_with_sequences(False))


def test_a_prefix_that_ends_before_the_wanted_tags_is_not_trusted() -> None:
    data = _part10(_with_sequences())
    cut = data.index(b"1.2.3.4.5\x00") - 20  # inside the header, before SeriesInstanceUID
    assert scan_header(data[:cut], KEYWORDS, complete=False) is None
    assert scan_header(data[:cut], KEYWORDS, complete=True) is None  # truncated element
    assert scan_header(data, KEYWORDS, complete=False) is not None  # pixel data is reached


def test_a_header_without_pixel_data_ends_with_the_bytes() -> None:
    ds = _dataset(
        PixelData=None,
        Rows=None,
        Columns=None,
        BitsAllocated=None,
        SeriesNumber=None,
        SeriesInstanceUID=None,
    )
    data = _part10(ds)
    assert scan_header(data, KEYWORDS, complete=False) is None  # more might have followed
    fast = scan_header(data, KEYWORDS, complete=True)
    assert fast is not None and fast == _by_pydicom(data)
    assert fast.get("SeriesInstanceUID") is None


@pytest.mark.parametrize(
    "data",
    [b"", b"not dicom at all", b"\x00" * 128 + b"DICM", b"\x00" * 128 + b"DICM" + b"\x02\x00"],
)
def test_garbage_is_left_to_pydicom(data: bytes) -> None:
    assert scan_header(data, KEYWORDS, complete=True) is None


def test_storage_falls_back_to_pydicom_with_the_same_result(tmp_path: Path) -> None:
    """A big-endian object is stored where pydicom's reading of it says."""
    storage = StorageDir(tmp_path, "{PatientID}/{Modality}/{SOPInstanceUID}.dcm")
    data = _part10(_dataset(), ExplicitVRBigEndian)
    write_instance(storage, data)
    stored = tmp_path / "P-001" / "CT" / "1.2.3.4.5.6.dcm"
    assert stored.read_bytes() == data


def test_a_long_header_is_read_from_the_file(tmp_path: Path) -> None:
    """Wanted tags beyond the bytes kept in memory: pydicom reads the file, same facts."""
    ds = _dataset()
    ds.DerivationDescription = "z" * 60_000  # (0008,2111), before the UIDs
    ds.PatientComments = "y" * 60_000  # (0010,4000)
    data = _part10(ds)
    path = tmp_path / "long.dcm"
    path.write_bytes(data)
    assert scan_header(data[:HEADER_PREFIX_BYTES], KEYWORDS, complete=False) is None
    facts = read_header_facts(path, KEYWORDS, data[:HEADER_PREFIX_BYTES], len(data))
    assert facts == _by_pydicom(data)
    assert facts.get("SeriesInstanceUID") == "1.2.3.4.5"


def test_damaged_headers_never_raise() -> None:
    """Whatever an archive sends, the reader answers or gives up; it never raises or loops."""
    import random

    from trolley_etl.core.header_scan import HeaderFacts

    rng = random.Random(20261125)
    originals = [_part10(_with_sequences()), _part10(_with_sequences(), ImplicitVRLittleEndian)]
    for _ in range(400):
        data = bytearray(rng.choice(originals))
        for _ in range(rng.randint(1, 6)):
            position = rng.randrange(128, len(data))
            data[position] = rng.randrange(256)
        cut = rng.choice([len(data), rng.randrange(132, len(data))])
        result = scan_header(bytes(data[:cut]), KEYWORDS, complete=rng.random() < 0.5)
        assert result is None or isinstance(result, HeaderFacts)
