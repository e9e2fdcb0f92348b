"""The search cache answers repeated queries from the checkpoint database."""

from pathlib import Path

from pydicom import Dataset

from trolley_etl import Query, QueryLevel
from trolley_etl.core.backend import Searcher
from trolley_etl.core.model import Study, tree_from_rows
from trolley_etl.runner.search_cache import CachingSearcher


class FixedArchive(Searcher):
    """A searcher over a fixed list of instance rows, counting the queries it answers."""

    def __init__(self) -> None:
        self.calls = 0
        self.rows = []
        for n in range(3):
            row = Dataset()
            row.StudyInstanceUID = "1.2.3"
            row.SeriesInstanceUID = f"1.2.3.{n % 2}"
            row.SOPInstanceUID = f"1.2.3.{n % 2}.{n}"
            row.PatientID = "P1"
            row.PatientName = "Doe^Jane"
            self.rows.append(row)

    def search(self, query: Query) -> list[Study]:
        self.calls += 1
        return tree_from_rows(self.rows, query.query_level)


def test_each_distinct_query_reaches_the_archive_once(tmp_path: Path) -> None:
    archive = FixedArchive()
    cache = CachingSearcher(archive, tmp_path / "checkpoint.sqlite")
    query = Query(query_level=QueryLevel.INSTANCE, StudyInstanceUID="1.2.3")
    first = cache.search(query)
    second = cache.search(query)
    assert archive.calls == 1 and (cache.hits, cache.misses) == (1, 1)
    assert [i.uid for i in second[0].all_instances()] == [i.uid for i in first[0].all_instances()]
    assert str(second[0].data.PatientName) == "Doe^Jane"
    assert second[0].all_series()[0].instances is not None

    cache.search(query.with_level(QueryLevel.SERIES))
    assert archive.calls == 2
    studies = cache.search(query.with_level(QueryLevel.SERIES))
    assert studies[0].all_series()[0].instances is None  # "not searched" survives the cache

    # a second process (a resumed run) reads the same database
    again = CachingSearcher(archive, tmp_path / "checkpoint.sqlite")
    again.search(query)
    assert archive.calls == 2
    again.clear()
    again.search(query)
    assert archive.calls == 3
