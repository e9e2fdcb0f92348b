"""Parsing XML from archives without trusting it.

MINT answers and RAD-69 SOAP envelopes are small XML documents. Neither protocol uses a DTD
(SOAP 1.2 Part 1, 5: "A SOAP message MUST NOT contain a Document Type Declaration"), so any
document with one is refused before parsing: no entity expansion, no external entities, with
the standard library alone.
"""

from __future__ import annotations

from xml.etree import ElementTree

from trolley_etl.core.errors import ResponseFormatError


def parse_xml(data: bytes, *, url: str, what: str) -> ElementTree.Element:
    """The root element of `data`; ResponseFormatError if it is not safe, well-formed XML."""
    head = data.lstrip()
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise ResponseFormatError(f"{url}: {what} contains a DTD, which is not allowed", url=url)
    try:
        return ElementTree.fromstring(head)
    except ElementTree.ParseError as exc:
        shown = " ".join(head[:200].decode("utf-8", "replace").split())
        raise ResponseFormatError(
            f"{url}: {what} is not well-formed XML ({exc}); it starts with {shown!r}", url=url
        ) from None


def local_name(element: ElementTree.Element) -> str:
    """The tag without its namespace (`{urn:x}Tag` -> `Tag`)."""
    return element.tag.rsplit("}", 1)[-1]


def children(element: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    """Direct children with this local name, whatever their namespace."""
    return [child for child in element if local_name(child) == name]


def descendants(element: ElementTree.Element, name: str) -> list[ElementTree.Element]:
    """All descendants with this local name, whatever their namespace."""
    return [child for child in element.iter() if local_name(child) == name]
