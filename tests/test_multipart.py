"""Streaming multipart parsing: parts reach the sink whole, however the bytes are chunked."""

import pytest

from trolley_etl.backends.multipart import (
    boundary_from_content_type,
    stream_parts,
    stream_related,
)
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


def test_preamble_padding_folded_headers_and_epilogue() -> None:
    """What RFC 2046 allows around the parts (issue 17's parser searches whole chunks)."""
    body = (
        b"a preamble line\r\n--a1b2c3  \r\nContent-Type: application/dicom\r\n"
        b"Content-ID:\r\n <one>\r\n\r\nfirst\r\n--a1b2c3\r\n\r\nsecond"
        b"\r\n--a1b2c3--\r\nan epilogue --a1b2c3\r\n"
    )
    headers: list[dict[str, str]] = []
    sink = ListSink()

    def open_part(part_headers: dict[str, str]) -> ListWriter:
        headers.append(part_headers)
        return ListWriter(sink)

    for size in (1, 5, len(body)):
        headers.clear()
        sink.committed.clear()
        chunks = (body[i : i + size] for i in range(0, len(body), size))
        assert stream_related(chunks, BOUNDARY, open_part, url="u") == 2
        assert sink.committed == [b"first", b"second"]
        assert headers == [{"content-type": "application/dicom", "content-id": "<one>"}, {}]


def test_large_parts_reach_the_writer_in_few_writes() -> None:
    part = bytes(range(256)) * 8192  # 2 MiB
    body = _body([part, part])
    writes: list[int] = []

    class Counting(ListWriter):
        def write(self, chunk: bytes) -> None:
            writes.append(len(chunk))
            super().write(chunk)

    sink = ListSink()
    size = 1 << 20
    chunks = [body[i : i + size] for i in range(0, len(body), size)]
    assert stream_related(chunks, BOUNDARY, lambda _h: Counting(sink), url="u") == 2
    assert sink.committed == [part, part]
    assert len(writes) <= len(chunks) + 2  # about one write per chunk, not per small piece


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"x" * 70_000, "no boundary"),
        (b"--a1b2c3\r\n" + b"X-Long: " + b"y" * 70_000, "headers too large"),
        (b"--a1b2c3\r\nno colon here\r\n\r\ndata\r\n--a1b2c3--", "malformed part header"),
        (b"--a1b2c3junk\r\n\r\ndata\r\n--a1b2c3--", "after a boundary"),
    ],
)
def test_hostile_bodies_are_refused_with_one_line(body: bytes, message: str) -> None:
    sink = ListSink()
    with pytest.raises(ResponseFormatError, match=message):
        stream_parts([body], BOUNDARY, sink, url="u")
    assert sink.committed == []


def test_near_boundaries_at_every_chunk_edge_are_kept_as_data() -> None:
    """Parts full of delimiter fragments, cut at seeded random places: same bytes out."""
    import random

    rng = random.Random(17)
    pieces = [b"\r", b"\r\n", b"\r\n-", b"\r\n--a1b2c", b"\r\n--a1b2c4", b"x", b"\r\r\n--"]
    parts = [b"".join(rng.choice(pieces) for _ in range(300)) + b"\r" for _ in range(4)]
    body = _body(parts)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(body)), 40))
        chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        sink = ListSink()
        assert stream_parts(chunks, BOUNDARY, sink, url="u") == len(parts)
        assert sink.committed == parts


class ViewWriter(ListWriter):
    """Takes memoryviews (`accepts_views`) and notes what it was given."""

    accepts_views = True

    def __init__(self, sink: ListSink) -> None:
        super().__init__(sink)
        self.kinds: set[type] = set()

    def write(self, chunk: bytes) -> None:
        self.kinds.add(type(chunk))
        self.data += bytes(chunk)  # a view is only valid during the call


@pytest.mark.parametrize("chunk_size", [7, 4096, 1 << 20])
def test_a_writer_that_takes_views_gets_them_and_others_get_bytes(chunk_size: int) -> None:
    body = _body(PARTS)
    chunks = [body[i : i + chunk_size] for i in range(0, len(body), chunk_size)]
    viewing, plain = ListSink(), ListSink()
    writers: list[ViewWriter] = []

    def open_view(_headers: dict[str, str]) -> ViewWriter:
        writers.append(ViewWriter(viewing))
        return writers[-1]

    assert stream_related(iter(chunks), BOUNDARY, open_view, url="u") == len(PARTS)
    assert viewing.committed == PARTS
    assert set().union(*(w.kinds for w in writers)) == {memoryview}
    plain_writers: list[ViewWriter] = []

    def open_plain(_headers: dict[str, str]) -> ViewWriter:
        plain_writers.append(ViewWriter(plain))
        plain_writers[-1].accepts_views = False  # type: ignore[misc]
        return plain_writers[-1]

    assert stream_related(iter(chunks), BOUNDARY, open_plain, url="u") == len(PARTS)
    assert plain.committed == PARTS
    assert set().union(*(w.kinds for w in plain_writers)) == {bytes}
