"""Streaming multipart parsing: parts reach the sink whole, however the bytes are chunked."""

import pytest

from trolley_etl.backends.multipart import boundary_from_content_type, stream_parts
from trolley_etl.core.errors import ResponseFormatError


class ListSink:
    def __init__(self) -> None:
        self.committed: list[bytes] = []
        self.aborted = 0

    def open_instance(self) -> "ListWriter":
        return ListWriter(self)


class ListWriter:
    def __init__(self, sink: ListSink) -> None:
        self.sink = sink
        self.data = b""

    def write(self, chunk: bytes) -> None:
        self.data += chunk

    def commit(self) -> None:
        self.sink.committed.append(self.data)

    def abort(self) -> None:
        self.sink.aborted += 1


BOUNDARY = "a1b2c3"
PARTS = [b"\x00" * 128 + b"DICM" + bytes(range(256)) * 10, b"second\r\n--a1b2c-not-a-boundary", b""]


def _body(parts: list[bytes], close: bool = True) -> bytes:
    body = b""
    for part in parts:
        body += f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    return body + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64, 4096])
def test_parts_survive_any_chunking(chunk_size: int) -> None:
    body = _body(PARTS)
    sink = ListSink()
    chunks = (body[i : i + chunk_size] for i in range(0, len(body), chunk_size))
    assert stream_parts(chunks, BOUNDARY, sink, url="u") == len(PARTS)
    assert sink.committed == PARTS


def test_truncated_body_aborts_the_open_part() -> None:
    body = _body(PARTS[:1])[:-40]
    sink = ListSink()
    with pytest.raises(ResponseFormatError, match="ended before its closing boundary"):
        stream_parts([body], BOUNDARY, sink, url="http://x/studies/1")
    assert sink.committed == []
    assert sink.aborted == 1


def test_missing_final_boundary_is_an_error_even_after_complete_parts() -> None:
    sink = ListSink()
    with pytest.raises(ResponseFormatError, match="after 1 complete part"):
        stream_parts([_body(PARTS[:2], close=False)], BOUNDARY, sink, url="u")


def test_boundary_parameter() -> None:
    ct = 'multipart/related; type="application/dicom"; boundary="abc 123"'
    assert boundary_from_content_type(ct) == "abc 123"
    assert boundary_from_content_type("multipart/related; boundary=xyz") == "xyz"
    assert boundary_from_content_type("application/dicom") is None
