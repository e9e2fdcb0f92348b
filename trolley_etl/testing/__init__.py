"""In-memory archives for testing code and manifests against the Trolley, without a server.

Public and dependency-free (pydicom only, as the Trolley itself): build a :class:`FakeArchive`
from pydicom Datasets (or Part 10 bytes), and hand its :class:`FakeSearcher` and
:class:`FakeDownloader` to a :class:`~trolley_etl.Trolley` or to ``Runner(backends=...)``::

    from trolley_etl import Trolley
    from trolley_etl.testing import FakeArchive, make_dataset

    archive = FakeArchive([make_dataset(PatientID="P1", AccessionNumber="A1")])
    trolley = Trolley(archive.downloader(), archive.searcher())
    result = run_manifest("pull.yaml", archive)   # a whole run, as `trolley-etl run`

The archive answers searches the way a real one does (rows carrying
NumberOfStudyRelatedInstances and NumberOfSeriesRelatedInstances unless told not to) and can
misbehave on purpose: lose instances, send instances no search listed, or fail the first
fetches. It records every search and fetch, so a test can assert what was asked. The
project's own integration harness (Orthanc, qrscp, fault proxies) is private and not here.
"""

from __future__ import annotations

from trolley_etl.testing.fakes import (
    HEADER_KEYWORDS,
    FakeArchive,
    FakeDownloader,
    FakeSearcher,
    SeriesBatch,
    make_dataset,
)
from trolley_etl.testing.runs import run_manifest

__all__ = [
    "HEADER_KEYWORDS",
    "FakeArchive",
    "FakeDownloader",
    "FakeSearcher",
    "SeriesBatch",
    "make_dataset",
    "run_manifest",
]
