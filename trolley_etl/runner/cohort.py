"""Cohort accounting: the attrition funnel of each query set, as a researcher publishes it.

Rows asked for (CSV rows, listed UIDs), matched and unmatched, studies found, studies and
series `select` dropped, then units planned, stored, incomplete and failed. The first part
is fixed when the manifest is resolved and kept in the checkpoint; the unit counts are read
from the checkpoint whenever a report or `status` asks. Light on imports: `status` uses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from trolley_etl.runner.checkpoint import (
    DONE,
    FAILED,
    INCOMPLETE,
    PENDING,
    STALE,
    Checkpoint,
)


@dataclass(frozen=True)
class Unmatched:
    row: int  # CSV row (header is row 1), or 1-based position in `study_uids`
    value: str

    def to_json(self) -> dict[str, Any]:
        return {"row": self.row, "value": self.value}


@dataclass(frozen=True)
class Dropped:
    """A study (series_uid "") or a series that `select` removed, and the rule that did."""

    study_uid: str
    series_uid: str
    rule: str

    def to_json(self) -> dict[str, Any]:
        level = "series" if self.series_uid else "study"
        return {
            "level": level,
            "study_uid": self.study_uid,
            "series_uid": self.series_uid,
            "rule": self.rule,
        }


@dataclass
class QuerySetAccount:
    """The attrition funnel of one query set, from the rows asked for to the studies kept."""

    requested: int = 0
    matched: int = 0
    unmatched: list[Unmatched] = field(default_factory=list)
    studies_found: int = 0
    empty_queries: int = 0  # filter queries that found nothing (a warning)
    dropped_by_select: list[Dropped] = field(default_factory=list)
    allow_unmatched: bool = False

    @property
    def refused_unmatched(self) -> bool:
        """Rows that matched no study and the query set does not allow it."""
        return bool(self.unmatched) and not self.allow_unmatched

    def to_json(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "matched": self.matched,
            "unmatched": [u.to_json() for u in self.unmatched],
            "studies_found": self.studies_found,
            "empty_queries": self.empty_queries,
            "dropped_by_select": [d.to_json() for d in self.dropped_by_select],
            "allow_unmatched": self.allow_unmatched,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuerySetAccount:
        return cls(
            requested=int(data.get("requested", 0)),
            matched=int(data.get("matched", 0)),
            unmatched=[
                Unmatched(int(u["row"]), str(u["value"])) for u in data.get("unmatched", [])
            ],
            studies_found=int(data.get("studies_found", 0)),
            empty_queries=int(data.get("empty_queries", 0)),
            dropped_by_select=[
                Dropped(str(d["study_uid"]), str(d.get("series_uid", "")), str(d.get("rule", "")))
                for d in data.get("dropped_by_select", [])
            ],
            allow_unmatched=bool(data.get("allow_unmatched", False)),
        )


Cohort = dict[str, QuerySetAccount]


def cohort_json(cohort: Cohort) -> str:
    return json.dumps({name: a.to_json() for name, a in cohort.items()}, sort_keys=True)


def cohort_from_json(text: str | None) -> Cohort:
    if not text:
        return {}
    return {name: QuerySetAccount.from_json(data) for name, data in json.loads(text).items()}


_NO_UNITS = {
    "units_planned": 0,
    "stored": 0,
    "incomplete": 0,
    "failed": 0,
    "pending": 0,
    "stored_instances": 0,
}


def cohort_report(
    checkpoint: Checkpoint, allowed: dict[str, bool] | None = None
) -> dict[str, dict[str, Any]]:
    """Per query set: the funnel recorded at resolution plus the units' states now."""
    cohort = cohort_from_json(checkpoint.get_meta("cohort"))
    for name, account in cohort.items():
        if allowed is not None and name in allowed:
            account.allow_unmatched = allowed[name]
    units: dict[str, dict[str, int]] = {}
    key = {DONE: "stored", INCOMPLETE: "incomplete", FAILED: "failed", PENDING: "pending"}
    item_totals, _files = checkpoint.totals_by_query_set()  # counted in SQL (issue 17)
    for name, state, count, stored in item_totals:
        if state == STALE:
            continue
        counts = units.setdefault(name, dict(_NO_UNITS))
        counts["units_planned"] += count
        counts[key.get(state, "pending")] += count
        counts["stored_instances"] += stored
    names = list(dict.fromkeys([*cohort, *(n for n in units if n)]))
    return {
        name: {**cohort.get(name, QuerySetAccount()).to_json(), **units.get(name, _NO_UNITS)}
        for name in names
    }


def refused_unmatched(
    checkpoint: Checkpoint, allowed: dict[str, bool] | None = None
) -> list[dict[str, Any]]:
    """Rows that matched no study in query sets that do not allow it.

    `allowed` (query set -> `allow_unmatched` of the manifest as it is now) overrides what
    was recorded at resolution: the setting changes the verdict, not what is pulled.
    """
    refused: list[dict[str, Any]] = []
    for name, account in cohort_from_json(checkpoint.get_meta("cohort")).items():
        if allowed is not None and name in allowed:
            account.allow_unmatched = allowed[name]
        if account.refused_unmatched:
            refused.extend({"query_set": name, **miss.to_json()} for miss in account.unmatched)
    return refused


def allowed_unmatched(query_sets: Any) -> dict[str, bool]:
    """`allow_unmatched` per query set of a manifest's `queries`."""
    return {q.name: q.allow_unmatched for q in query_sets}
