"""A search cache in the checkpoint database, in front of any searcher.

During a run the same study can be expanded more than once (the expand step, then again
when a downloader that batches plans its retrieval, then again after a crash and resume).
With the cache each distinct query reaches the archive once per checkpoint; `run --refresh`
empties it, so a refresh sees the archive as it is now.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from pydicom import Dataset

from trolley_etl.core.backend import Searcher
from trolley_etl.core.model import Instance, Series, Study
from trolley_etl.core.query import Query

SCHEMA = """
CREATE TABLE IF NOT EXISTS search_cache (
    query TEXT PRIMARY KEY, result TEXT NOT NULL, stored_at TEXT NOT NULL
)
"""


def _dataset_json(data: Dataset) -> dict[str, Any]:
    return data.to_json_dict(bulk_data_threshold=1 << 30)


def study_to_json(study: Study) -> dict[str, Any]:
    return {
        "uid": study.uid,
        "data": _dataset_json(study.data),
        "series": None
        if study.series is None
        else [
            {
                "uid": s.uid,
                "data": _dataset_json(s.data),
                "instances": None
                if s.instances is None
                else [{"uid": i.uid, "data": _dataset_json(i.data)} for i in s.instances],
            }
            for s in study.series
        ],
    }


def study_from_json(value: dict[str, Any]) -> Study:
    study = Study(value["uid"], data=Dataset.from_json(value["data"]))
    if value["series"] is not None:
        study.series = []
        for s in value["series"]:
            series = Series(s["uid"], study.uid, data=Dataset.from_json(s["data"]))
            if s["instances"] is not None:
                series.instances = [
                    Instance(i["uid"], series.uid, study.uid, Dataset.from_json(i["data"]))
                    for i in s["instances"]
                ]
            study.series.append(series)
    return study


class CachingSearcher(Searcher):
    """Answers a query from the cache when it was asked before; else asks `inner`."""

    def __init__(self, inner: Searcher, database: Path) -> None:
        self.inner = inner
        self._lock = threading.Lock()
        self._db = sqlite3.connect(database, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.execute(SCHEMA)
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(query: Query) -> str:
        return query.model_dump_json()

    def search(self, query: Query) -> list[Study]:
        key = self.key(query)
        with self._lock:
            row = self._db.execute(
                "SELECT result FROM search_cache WHERE query = ?", (key,)
            ).fetchone()
        if row is not None:
            self.hits += 1
            return [study_from_json(item) for item in json.loads(row[0])]
        self.misses += 1
        studies = self.inner.search(query)
        payload = json.dumps([study_to_json(s) for s in studies])
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO search_cache VALUES (?, ?, datetime('now'))", (key, payload)
            )
        return studies

    def clear(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM search_cache")

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self.inner.close()
