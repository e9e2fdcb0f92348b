"""Streaming `multipart/related` parsing for WADO-RS and RAD-69 (MTOM/XOP) responses.

Each part is handed to the sink chunk by chunk as it arrives, so memory does not grow with
the size of the response. The boundary is searched for in whole chunks (issue 17: a parser
that called back per small piece cost more than writing the bytes), and the message must
really end with its closing boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import cast

from trolley_etl.core.backend import InstanceSink, InstanceWriter
from trolley_etl.core.errors import MultipartParseError, ResponseFormatError


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


#: A part's header block larger than this is refused (never trust the archive).
MAX_HEADER_BYTES = 64 * 1024
#: Bytes before the first boundary (preamble) tolerated, at most.
MAX_PREAMBLE_BYTES = 64 * 1024


class _Parser:
    """A `multipart/related` body cut into parts by searching for the boundary in whole
    chunks (`bytes.find`, in C), not byte by byte: the part's bytes between two boundaries
    go to its writer in as few, as large, writes as the chunks allow.

    Follows RFC 2046: the delimiter is CRLF `--boundary` (the first may come without the
    CRLF), followed by `--` (the end) or optional white space and CRLF, then the part's
    headers up to an empty line.
    """

    def __init__(self, boundary: str, open_part: Callable[[dict[str, str]], InstanceWriter]):
        self.open_part = open_part
        self.first = b"--" + boundary.encode("latin-1")
        self.delimiter = b"\r\n" + self.first
        self.buffer = b""
        self.state = "preamble"  # preamble, after-boundary, headers, body, end
        self.writer: InstanceWriter | None = None
        self.views = False  # the writer takes memoryviews of the received chunks
        self.count = 0

    @property
    def ended(self) -> bool:
        return self.state == "end"

    def write(self, chunk: bytes) -> None:
        if self.state == "end":
            return  # the epilogue is ignored, as RFC 2046 says
        data = self.buffer + chunk if self.buffer else chunk
        self.buffer = b""
        steps = {
            "body": self._body,
            "after-boundary": self._after_boundary,
            "headers": self._headers_block,
            "preamble": self._preamble,
        }
        position: int | None = 0
        while position is not None and self.state != "end":
            position = steps[self.state](data, position)

    # Each step reads from `position`: it returns where the next step starts, or None when
    # the rest of `data` must wait for the next chunk (kept in `self.buffer`) or the end came.

    def _body(self, data: bytes, position: int) -> int | None:
        found = data.find(self.delimiter, position)
        if found < 0:
            keep = self._undecided(data, position)
            if keep > position:
                self._part_data(data, position, keep)
            self.buffer = data[keep:]
            return None
        if found > position:
            self._part_data(data, position, found)
        self._part_end()
        self.state = "after-boundary"
        return found + len(self.delimiter)

    def _after_boundary(self, data: bytes, position: int) -> int | None:
        line_end = data.find(b"\r\n", position)
        if line_end < 0:
            if len(data) - position > MAX_HEADER_BYTES:
                raise MultipartParseError("no line end after a boundary")
            self.buffer = data[position:]
            return None
        rest = data[position:line_end]
        if rest.startswith(b"--"):
            self.state = "end"
            return None
        if rest.strip(b" \t"):
            raise MultipartParseError("unexpected bytes after a boundary")
        self.state = "headers"
        return line_end + 2

    def _headers_block(self, data: bytes, position: int) -> int | None:
        if data.startswith(b"\r\n", position):  # no headers at all
            block, position = b"", position + 2
        else:
            found = data.find(b"\r\n\r\n", position)
            if found < 0:
                if len(data) - position > MAX_HEADER_BYTES:
                    raise MultipartParseError("part headers too large")
                self.buffer = data[position:]
                return None
            block, position = data[position:found], found + 4
        self.writer = self.open_part(_headers(block))
        self.views = bool(getattr(self.writer, "accepts_views", False))
        self.state = "body"
        return position

    def _preamble(self, data: bytes, position: int) -> int | None:
        found = data.find(self.first, position)
        if found < 0 or len(data) - found < len(self.first):
            if len(data) > MAX_PREAMBLE_BYTES:
                raise MultipartParseError("no boundary at the start of the body")
            self.buffer = data[position:]
            return None
        if found and data[found - 2 : found] != b"\r\n":
            return found + 1  # the boundary text inside the preamble's line
        self.state = "after-boundary"
        return found + len(self.first)

    def _undecided(self, data: bytes, position: int) -> int:
        """Where the bytes that could start a delimiter cut by the chunk's end begin (the
        length of `data` if none could): usually none, so the next chunk is not copied."""
        start = data.rfind(b"\r", max(position, len(data) - len(self.delimiter) + 1))
        if start >= 0 and self.delimiter.startswith(data[start:]):
            return start
        return len(data)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        """`data[start:end]` to the part's writer: a view of those bytes where the writer
        takes views (`accepts_views`, see `core.backend.InstanceWriter`), which saves one
        more copy of every byte received; a copy for any other writer."""
        if self.writer is not None:
            if self.views:
                self.writer.write(cast(bytes, memoryview(data)[start:end]))
            else:
                self.writer.write(data[start:end])

    def _part_end(self) -> None:
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.commit()
            self.count += 1

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


def _headers(block: bytes) -> dict[str, str]:
    """A part's header block, names in lower case; folded lines are joined."""
    headers: dict[str, str] = {}
    name = ""
    for line in block.decode("latin-1").split("\r\n"):
        if not line:
            continue
        if line[:1] in (" ", "\t") and name:
            headers[name] = f"{headers[name]} {line.strip()}".strip()
            continue
        field, colon, value = line.partition(":")
        if not colon:
            raise MultipartParseError(f"malformed part header line {line[:80]!r}")
        name = field.strip().lower()
        headers[name] = value.strip()
    return headers


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
    handler = _Parser(boundary, open_part)
    try:
        for chunk in chunks:
            if chunk:
                handler.write(chunk)
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
