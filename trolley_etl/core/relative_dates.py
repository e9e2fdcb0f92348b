"""Relative date filters for scheduled pulls: `StudyDate: {last: 7d}`.

A manifest that runs every night should not need editing every night. `{last: N<unit>}`
(unit d, w, m or y) stands for the DICOM date range from N days, weeks, months or years
before today up to today, both included: on 2024-03-31 `{last: 1m}` is `20240229-20240331`
(a month back from the 31st clamps to the last day of February).

The range is resolved when the search runs, from the local date (or from the environment
variable TROLLEY_ETL_TODAY, YYYY-MM-DD, to replay a past scheduled run). "Today" is read once
per process, so every query of a run, its log, report and lock agree even across midnight.
The manifest keeps the relative form, so the checkpoint does not count a new day as a
manifest change: `run --refresh` then adds the new studies and skips those already done.
"""

from __future__ import annotations

import calendar
import datetime as dt
import functools
import os
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from trolley_etl.core.errors import ConfigurationError

TODAY_ENV = "TROLLEY_ETL_TODAY"
RELATIVE_SPEC = re.compile(r"^([1-9][0-9]{0,4})([dwmy])$")


class RelativeDate(BaseModel):
    """`{last: 7d}`: the last N days (d), weeks (w), months (m) or years (y), up to today."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    last: str = Field(pattern=RELATIVE_SPEC.pattern, description="N and d, w, m or y: 7d")

    def start(self, today: dt.date) -> dt.date:
        match = RELATIVE_SPEC.match(self.last)
        assert match is not None  # the field pattern guarantees it
        count, unit = int(match.group(1)), match.group(2)
        if unit in "dw":
            return today - dt.timedelta(days=count * (7 if unit == "w" else 1))
        months = count * (12 if unit == "y" else 1)
        year, month = divmod(today.year * 12 + today.month - 1 - months, 12)
        month += 1
        day = min(today.day, calendar.monthrange(year, month)[1])
        return dt.date(year, month, day)

    def resolve(self, today: dt.date) -> str:
        """The DICOM date range, e.g. `20240324-20240331`."""
        return f"{self.start(today):%Y%m%d}-{today:%Y%m%d}"


@functools.lru_cache(maxsize=1)
def today() -> dt.date:
    """Today's local date, once per process; TROLLEY_ETL_TODAY (YYYY-MM-DD) overrides it."""
    fixed = os.environ.get(TODAY_ENV)
    if fixed:
        try:
            return dt.date.fromisoformat(fixed)
        except ValueError:
            raise ConfigurationError(
                f"{TODAY_ENV} must be a date as YYYY-MM-DD, not {fixed!r}"
            ) from None
    return dt.date.today()


def resolve_filters(filters: Mapping[str, Any], on: dt.date | None = None) -> dict[str, Any]:
    """The filters with every relative date replaced by its range (others unchanged)."""
    day = on or today()
    return {k: v.resolve(day) if isinstance(v, RelativeDate) else v for k, v in filters.items()}


def resolved_ranges(manifest: Any, on: dt.date | None = None) -> dict[str, dict[str, str]]:
    """Query set -> keyword -> resolved range, for the relative filters of a manifest
    (empty when it has none): what the log, the report and the lock record."""
    day = on or today()
    ranges = {}
    for query_set in manifest.queries:
        relative = {k: v for k, v in query_set.filters.items() if isinstance(v, RelativeDate)}
        if relative:
            ranges[query_set.name] = {k: v.resolve(day) for k, v in relative.items()}
    return ranges
