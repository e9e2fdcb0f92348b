"""The cohort as a table of header values, read from the stored files (not the archive).

One row per instance, series or study. The rows are built from the checkpoint's list of
stored files (path, size, SHA-256) and each file's header, read from its first bytes with the
same fast reader storing uses (pydicom only for what it does not handle), so pixel data is
never read. At series and study level one header is read per series or study (its first file
by path); the row then carries the instance count, the total size, the common folder and a
SHA-256 over the sorted `sha256  path` lines of its files, which changes whenever any of its
files does.

Rows are produced one at a time and written as they come: CSV line by line, Parquet in
record batches, so memory stays flat however large the cohort.
"""

from __future__ import annotations

import csv
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from trolley_etl.core.errors import MetadataError

LEVELS = ("instance", "series", "study")
#: Keywords shown when the user names none: what a researcher filters a cohort by.
DEFAULT_FIELDS: dict[str, tuple[str, ...]] = {
    "instance": (
        "PatientID",
        "AccessionNumber",
        "StudyDate",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "Modality",
        "SeriesNumber",
        "InstanceNumber",
        "Rows",
        "Columns",
        "NumberOfFrames",
    ),
    "series": (
        "PatientID",
        "AccessionNumber",
        "StudyDate",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "SeriesDescription",
        "BodyPartExamined",
    ),
    "study": (
        "PatientID",
        "PatientSex",
        "PatientBirthDate",
        "AccessionNumber",
        "StudyDate",
        "StudyInstanceUID",
        "StudyDescription",
    ),
}
#: Columns every row has after the keywords, per level.
EXTRA_COLUMNS: dict[str, tuple[str, ...]] = {
    "instance": ("path", "size", "sha256"),
    "series": ("instances", "size", "path", "sha256"),
    "study": ("modalities", "series", "instances", "size", "path", "sha256"),
}
#: How many first bytes of a file are read for its header; longer headers go to pydicom.
HEADER_PREFIX = 64 * 1024
PARQUET_BATCH = 4096


@dataclass(frozen=True)
class StoredFile:
    """One file of the checkpoint, as the table needs it."""

    path: str
    size: int
    sha256: str
    study_uid: str
    series_uid: str
    modality: str = ""


def parse_fields(text: str | None, level: str) -> list[str]:
    """The keywords of `--fields` (comma-separated), checked against the DICOM dictionary."""
    from pydicom.datadict import tag_for_keyword

    if not text:
        return list(DEFAULT_FIELDS[level])
    fields = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [f for f in fields if tag_for_keyword(f) is None]
    if unknown:
        raise MetadataError(
            f"--fields: not DICOM keywords: {', '.join(unknown)} (use keywords such as "
            "PatientID or SeriesDescription, as in the DICOM standard part 6)"
        )
    if not fields:
        raise MetadataError("--fields: name at least one keyword")
    return list(dict.fromkeys(fields))


def columns(level: str, fields: list[str]) -> list[str]:
    return [*fields, *(c for c in EXTRA_COLUMNS[level] if c not in fields)]


if TYPE_CHECKING:
    from trolley_etl.core.objectstore import ObjectStore


def read_file_values(path: Path, size: int, fields: list[str]) -> dict[str, str]:
    """The `fields` of one stored file's header, as text ("" where absent or unreadable)."""
    from trolley_etl.core.errors import StorageError
    from trolley_etl.core.storage import read_header_facts

    try:
        with path.open("rb") as handle:
            prefix = handle.read(HEADER_PREFIX)
        facts = read_header_facts(path, fields, prefix, size)
    except (OSError, StorageError):
        return dict.fromkeys(fields, "")
    return {f: facts.text(f) for f in fields}


read_values = read_file_values  # the name other modules know


def read_object_values(
    objects: ObjectStore, relative: str, size: int, fields: list[str]
) -> dict[str, str]:
    """`read_values` for an object in a bucket (issue 19): its first bytes with a ranged GET;
    the whole object, streamed to a private temp file, only where the header is unusual."""
    from trolley_etl.core.errors import StorageError, TrolleyError
    from trolley_etl.core.header_scan import scan_header
    from trolley_etl.core.storage import read_header_facts

    try:
        prefix = b"".join(objects.iter_bytes(relative, limit=min(HEADER_PREFIX, max(size, 1))))
        facts = scan_header(prefix, fields, complete=len(prefix) >= size >= 0)
        if facts is None:
            with tempfile.NamedTemporaryFile(prefix="trolley-meta-") as temp:  # 0600
                for chunk in objects.iter_bytes(relative):
                    temp.write(chunk)
                temp.flush()
                facts = read_header_facts(Path(temp.name), fields)
    except (OSError, TrolleyError, StorageError):
        return dict.fromkeys(fields, "")
    return {f: facts.text(f) for f in fields}


def _digest(files: Iterable[StoredFile]) -> str:
    lines = sorted(f"{f.sha256}  {f.path}\n" for f in files)
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def _common_folder(files: list[StoredFile]) -> str:
    folders = [Path(f.path).parent.as_posix() for f in files]
    common = os.path.commonpath(folders) if folders else ""
    return "" if common == "." else common


def iter_rows(
    root: Path,
    files: Iterable[StoredFile],
    level: str,
    fields: list[str],
    *,
    objects: ObjectStore | None = None,
) -> Iterator[dict[str, Any]]:
    """The table's rows; `files` must come sorted by study, then series, then path.

    With `objects`, the files are read from that bucket prefix (an s3:// root, issue 19).
    """

    def read_values(path: Path, size: int, fields: list[str]) -> dict[str, str]:
        if objects is not None:
            return read_object_values(objects, path.relative_to(root).as_posix(), size, fields)
        return read_file_values(path, size, fields)

    if level not in LEVELS:
        raise MetadataError(f"--level must be one of {', '.join(LEVELS)}")
    if level == "instance":
        for f in files:
            yield {
                **read_values(root / f.path, f.size, fields),
                "path": f.path,
                "size": f.size,
                "sha256": f.sha256,
            }
        return
    key = (lambda f: (f.study_uid, f.series_uid)) if level == "series" else (lambda f: f.study_uid)
    for _, group in groupby(files, key=key):
        members = list(group)  # the files of one series or study: paths, not data
        first = members[0]
        row: dict[str, Any] = read_values(root / first.path, first.size, fields)
        if level == "study":
            row["modalities"] = "\\".join(sorted({m.modality for m in members if m.modality}))
            row["series"] = len({m.series_uid for m in members})
        row.update(
            instances=len(members),
            size=sum(m.size for m in members),
            path=_common_folder(members),
            sha256=_digest(members),
        )
        yield row


def stored_files(checkpoint: Any) -> Iterator[StoredFile]:
    """The checkpoint's files in study, series, path order (what `iter_rows` needs)."""
    records = sorted(checkpoint.files(), key=lambda r: (r["study_uid"], r["series_uid"], r["path"]))
    for r in records:
        yield StoredFile(
            r["path"],
            r["size"],
            r["sha256"],
            r["study_uid"],
            r["series_uid"],
            r.get("modality") or "",
        )


# --- writers ----------------------------------------------------------------------------------


def write_csv(rows: Iterable[dict[str, Any]], names: list[str], out: TextIO) -> int:
    writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    count = 0
    for row in rows:
        writer.writerow(row)
        count += 1
    return count


def require_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise MetadataError(
            "--format parquet needs pyarrow, which is not installed: "
            "pip install 'trolley-etl[parquet]' (or use --format csv)"
        ) from None
    return pyarrow


def write_parquet(rows: Iterable[dict[str, Any]], names: list[str], path: Path) -> int:
    """Record batches of PARQUET_BATCH rows; numbers as int64, everything else as text."""
    pa = require_pyarrow()
    import pyarrow.parquet as pq

    numeric = {"size", "instances", "series"}
    schema = pa.schema([(n, pa.int64() if n in numeric else pa.string()) for n in names])
    count = 0
    with pq.ParquetWriter(str(path), schema) as writer:
        batch: list[dict[str, Any]] = []
        for row in rows:
            batch.append(row)
            if len(batch) >= PARQUET_BATCH:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
                count += len(batch)
                batch = []
        if batch or count == 0:
            writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schema))
            count += len(batch)
    return count


def write_table(
    rows: Iterable[dict[str, Any]],
    names: list[str],
    style: str,
    output: Path | None,
    stdout: TextIO,
) -> int:
    """Write the rows; to `output` through a private temp file renamed at the end (a reader
    never sees half a table), or CSV to `stdout`. Returns the row count."""
    if style == "parquet":
        require_pyarrow()
        if output is None:
            raise MetadataError("--format parquet writes a file: give --output FILE")
    if output is None:
        return write_csv(rows, names, stdout)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    temp = Path(name)  # mkstemp creates it 0600: the table names patients
    try:
        if style == "parquet":
            os.close(fd)
            count = write_parquet(rows, names, temp)
        else:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
                count = write_csv(rows, names, handle)
        os.replace(temp, output)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return count
