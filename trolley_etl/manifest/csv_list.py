"""Reading one column of a CSV file into a list of values for query sets.

A cohort list names exact patients or studies, so its values are refused when they would
match more than themselves (`*`, `?` wildcards: a cell `*` would pull the whole archive) or
hold control characters. Quoting is strict: an unterminated quote is an error naming the row
where it opened instead of silently swallowing the rows after it, and a field longer than
the csv module's limit (128 KiB) is an error, not a traceback.
"""

from __future__ import annotations

import csv
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: Characters that make a cohort value match other values (DICOM wildcards).
WILDCARDS = ("*", "?")


@dataclass(frozen=True)
class CsvProblem:
    row: int  # 1-based line in the file; the header is row 1
    message: str


def read_column(
    path: Path, column: str, delimiter: str = ","
) -> tuple[list[tuple[int, str]], list[CsvProblem]]:
    """The non-empty values of `column` with their row numbers, and every problem found.

    Empty cells and repeated values are problems (each with its row), as is a missing column
    or file; the caller decides how to report them.
    """
    try:
        handle = path.open(newline="", encoding="utf-8-sig")
    except OSError as exc:
        return [], [CsvProblem(0, f"cannot read {path.name}: {exc.strerror or exc}")]
    with handle:
        reader = csv.reader(handle, delimiter=delimiter, strict=True)
        rows = _rows(reader)
        try:
            _, header = next(rows, (1, None))
        except _RowError as exc:
            return [], [CsvProblem(exc.line, exc.message)]
        if header is None:
            return [], [CsvProblem(1, f"{path.name} is empty")]
        names = [h.strip() for h in header]
        if column not in names:
            return [], [CsvProblem(1, f"no column {column!r} (columns: {', '.join(names)})")]
        index = names.index(column)
        values: list[tuple[int, str]] = []
        problems: list[CsvProblem] = []
        first_seen: dict[str, int] = {}
        while True:
            try:
                row_number, row = next(rows)
            except StopIteration:
                break
            except _RowError as exc:
                problems.append(CsvProblem(exc.line, exc.message))
                break  # the reader cannot go on after a quoting error
            value = row[index].strip() if index < len(row) else ""
            problem = _cell_problem(value, row, column, first_seen)
            if problem:
                problems.append(CsvProblem(row_number, problem))
                continue
            first_seen[value] = row_number
            values.append((row_number, value))
    if not values and not problems:
        problems.append(CsvProblem(1, f"{path.name} has no values in column {column!r}"))
    return values, problems


def _cell_problem(value: str, row: list[str], column: str, first_seen: dict[str, int]) -> str:
    """Why one cell cannot be used ("" when it can): empty, repeated, or not an exact value."""
    if not value:
        return f"empty {column}" if any(cell.strip() for cell in row) else "empty row"
    if value in first_seen:
        return f"duplicate {value!r} (first on row {first_seen[value]})"
    return refuse_value(value) or ""


def refuse_value(value: str) -> str | None:
    """Why a cohort value cannot be used as an exact match, or None if it can."""
    if any(mark in value for mark in WILDCARDS):
        return f"{value[:40]!r} holds a wildcard (* or ?); a cohort list names exact values"
    if any(unicodedata.category(ch) in ("Cc", "Cf") for ch in value):
        return f"{value[:40]!r} holds a control character (a line break inside quotes?)"
    return None


class _RowError(Exception):
    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line, self.message = line, message


def _rows(reader: Iterator[list[str]]) -> Iterator[tuple[int, list[str]]]:
    """(line where the row starts, row); a csv error becomes _RowError with that line."""
    while True:
        start = getattr(reader, "line_num", 0) + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as exc:
            raise _RowError(start, _csv_error(exc)) from None
        yield start, row


def _csv_error(exc: Exception) -> str:
    text = str(exc)
    if "unexpected end of data" in text:
        return "a quote opened here is never closed (unterminated quote)"
    if "field larger than field limit" in text:
        return f"a field is longer than {csv.field_size_limit()} characters (a missing quote?)"
    if isinstance(exc, UnicodeDecodeError):
        return "the file is not UTF-8 text"
    return f"malformed CSV: {text}"
