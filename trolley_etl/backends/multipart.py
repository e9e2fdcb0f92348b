"""Streaming `multipart/related` parsing for WADO-RS and RAD-69 (MTOM/XOP) responses.

Each part is handed to the sink chunk by chunk as it arrives, so memory does not grow with
the size of the response. The boundary scanning is python-multipart's; this module only
wires its callbacks to a sink and checks that the message really ended.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser

from trolley_etl.core.backend import InstanceSink, InstanceWriter
from trolley_etl.core.errors import ResponseFormatError


def boundary_from_content_type(content_type: str) -> str | None:
    """The `boundary` parameter of a Content-Type header, unquoted; None if absent."""
    for param in content_type.split(";")[1:]:
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            return value.strip().strip('"')
    return None


def stream_parts(chunks: Iterable[bytes], boundary: str, sink: InstanceSink, *, url: str) -> int:
    """Feed a multipart body into `sink`, one instance per part; return the number of parts.

    A body that stops before its closing boundary (a dropped connection) is an error, and the
    part that was being received is aborted, never committed.
    """
    return stream_related(chunks, boundary, lambda _headers: sink.open_instance(), url=url)


def stream_single(chunks: Iterable[bytes], sink: InstanceSink) -> int:
    """A body that is one whole DICOM object (single-part answers, WADO-URI)."""
    writer = sink.open_instance()
    try:
        for chunk in chunks:
            writer.write(chunk)
    except BaseException:
        writer.abort()
        raise
    writer.commit()
    return 1


class _PartsWithHeaders:
    """Collects each part's headers, then asks `open_part` where its bytes should go."""

    def __init__(self, open_part: Callable[[dict[str, str]], InstanceWriter]) -> None:
        self.open_part = open_part
        self.headers: dict[str, str] = {}
        self.field = b""
        self.value = b""
        self.writer: InstanceWriter | None = None
        self.count = 0
        self.ended = False

    def on_part_begin(self) -> None:
        self.headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        name = self.field.decode("latin-1").strip().lower()
        self.headers[name] = self.value.decode("latin-1").strip()
        self.field, self.value = b"", b""

    def on_headers_finished(self) -> None:
        self.writer = self.open_part(self.headers)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.writer is not None and end > start:
            self.writer.write(bytes(data[start:end]))

    def on_part_end(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.commit()
            self.count += 1

    def on_end(self) -> None:
        self.ended = True

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def stream_related(
    chunks: Iterable[bytes],
    boundary: str,
    open_part: Callable[[dict[str, str]], InstanceWriter],
    *,
    url: str,
) -> int:
    """Like `stream_parts`, but each part goes where `open_part(headers)` says.

    Headers are given with lower-case names (`content-id`, `content-type`, ...), so protocols
    that label their parts (MTOM/XOP `Content-ID`, RFC 2387) can route each one as it starts.
    Returns the number of complete parts; truncation aborts the open part and raises.
    """
    handler = _PartsWithHeaders(open_part)
    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": handler.on_part_begin,
            "on_header_field": handler.on_header_field,
            "on_header_value": handler.on_header_value,
            "on_header_end": handler.on_header_end,
            "on_headers_finished": handler.on_headers_finished,
            "on_part_data": handler.on_part_data,
            "on_part_end": handler.on_part_end,
            "on_end": handler.on_end,
        },
    )
    try:
        for chunk in chunks:
            if chunk:
                parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        handler.abort()
        raise ResponseFormatError(f"{url}: malformed multipart response: {exc}", url=url) from None
    except BaseException:
        handler.abort()
        raise
    if not handler.ended:
        handler.abort()
        raise ResponseFormatError(
            f"{url}: the multipart response ended before its closing boundary "
            f"after {handler.count} complete part(s)",
            url=url,
        )
    return handler.count
