"""What a search backend and a download backend must provide.

Searchers and downloaders never know about each other: the Trolley owns one of each and
moves references between them. Downloaders push each instance they receive into a sink as a
stream of bytes, so no backend ever holds a whole study in memory.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from trolley_etl.core.model import (
    QueryLevel,
    Reference,
    Retrievable,
    Study,
    contained_references,
    iter_references,
)
from trolley_etl.core.query import Query


class InstanceWriter(Protocol):
    """Receives the bytes of one DICOM Part 10 object, in order.

    A writer with a true `accepts_views` attribute may be given memoryviews of the received
    buffers instead of bytes (it must not keep them past `write`): the multipart parser then
    hands each part over without copying it.
    """

    def write(self, chunk: bytes) -> None:
        """Append bytes of the object being received."""

    def commit(self) -> None:
        """The object is complete; make it permanent."""

    def abort(self) -> None:
        """The object is incomplete; forget every byte written so far."""


class InstanceSink(Protocol):
    """Where downloaders put what they receive (a StorageDir, a dataset queue, ...)."""

    def open_instance(self) -> InstanceWriter:
        """A writer for the next object."""


def write_instance(sink: InstanceSink, data: bytes) -> None:
    """Hand one already complete object to a sink (for protocols that deliver whole objects)."""
    writer = sink.open_instance()
    try:
        writer.write(data)
    except BaseException:
        writer.abort()
        raise
    writer.commit()


class Searcher(ABC):
    """Finds studies, series and instances from a Query."""

    @abstractmethod
    def search(self, query: Query) -> list[Study]:
        """All matches of the query, as merged Study trees down to the query's level."""

    def close(self) -> None:  # noqa: B027 - optional hook, most searchers hold nothing to close
        """Release connections."""


class Downloader(ABC):
    """Fetches the DICOM objects behind references and streams them into a sink."""

    #: The level this downloader retrieves at; None means any level (study, series or instance).
    retrieval_level: QueryLevel | None = None

    def plan(self, objects: Sequence[Retrievable]) -> list[Reference]:
        """The references to fetch, one retrieval each.

        Raises MissingReferencesError when the objects do not reach `retrieval_level`; the
        Trolley then has the missing levels searched and calls plan again.
        """
        if self.retrieval_level is None:
            return list(dict.fromkeys(iter_references(objects)))
        return list(dict.fromkeys(contained_references(objects, self.retrieval_level)))

    @abstractmethod
    def fetch(self, reference: Reference, sink: InstanceSink) -> int:
        """Stream every instance under `reference` into `sink`; return how many there were."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


@runtime_checkable
class MetadataSource(Protocol):
    """A downloader that can also describe what it holds (WADO-RS `/metadata`).

    The Trolley uses it to expand references when it has no searcher.
    """

    def metadata_tree(self, reference: Reference) -> Study:
        """The full Study tree (down to instances) under a study or series reference."""
        ...
