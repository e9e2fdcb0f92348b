"""Reading one column of a CSV file into a list of values for query sets."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path


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
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return [], [CsvProblem(1, f"{path.name} is empty")]
        names = [h.strip() for h in header]
        if column not in names:
            return [], [CsvProblem(1, f"no column {column!r} (columns: {', '.join(names)})")]
        index = names.index(column)
        values: list[tuple[int, str]] = []
        problems: list[CsvProblem] = []
        first_seen: dict[str, int] = {}
        for row_number, row in enumerate(reader, start=2):
            value = row[index].strip() if index < len(row) else ""
            if not value:
                if any(cell.strip() for cell in row):
                    problems.append(CsvProblem(row_number, f"empty {column}"))
                else:
                    problems.append(CsvProblem(row_number, "empty row"))
                continue
            if value in first_seen:
                problems.append(
                    CsvProblem(
                        row_number, f"duplicate {value!r} (first on row {first_seen[value]})"
                    )
                )
                continue
            first_seen[value] = row_number
            values.append((row_number, value))
    if not values and not problems:
        problems.append(CsvProblem(1, f"{path.name} has no values in column {column!r}"))
    return values, problems
