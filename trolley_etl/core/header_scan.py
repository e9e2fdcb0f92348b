"""The few header values storing a file needs, read straight from its first bytes.

Storing an object needs a handful of top-level text attributes (its UIDs, the audit facts,
the layout's keywords). Having pydicom build a Dataset for that costs about half a
millisecond per file, which profiling showed to be the largest single cost of a download
(see the README's Performance section). This module walks the top-level elements of the
common encodings itself, and gives up, returning None so that the caller asks pydicom, on
anything it does not handle exactly as pydicom would: deflated or big-endian data sets,
a header longer than the bytes it was given, a non-ASCII value, a VR whose text pydicom
would reformat, an element it cannot skip for sure.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

#: A value as storage uses it: the text, or the texts of a multi-valued element.
HeaderValue = str | tuple[str, ...]

_PREAMBLE = 128
_MAGIC = b"DICM"
_PIXEL_DATA = 0x7FE00010
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_MAX_DEPTH = 8
_UINT16 = struct.Struct("<HH")
_TAG_LENGTH = struct.Struct("<HHI")
_EXPLICIT_SHORT = struct.Struct("<HH2sH")
_LONG_LENGTH = struct.Struct("<I")

_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)
_VR_TEXT = {vr: vr.decode("ascii") for vr in _VRS}
#: Explicit VRs whose length is 4 bytes after 2 reserved ones (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
# How pydicom turns each text VR into a value (pydicom.values): the whole text right-stripped
# of spaces and NULs, then split at backslashes; or split first and every value stripped;
# or stripped and never split. Other VRs (AE strips leading spaces too, numbers are parsed)
# are left to pydicom.
_STRIP_THEN_SPLIT = frozenset({"UI", "AS", "CS", "DA", "DT", "TM", "PN"})
_SPLIT_THEN_STRIP = frozenset({"SH", "LO", "UC"})
_SINGLE = frozenset({"LT", "ST", "UT"})


@dataclass(frozen=True)
class HeaderFacts:
    """Header values of one stored object, the same whichever reader produced them."""

    transfer_syntax: str
    #: MediaStorageSOPClassUID from the file meta (for objects without a SOPClassUID).
    media_storage_sop_class: str
    #: keyword -> value, for the asked keywords the object has; absent ones are missing.
    values: dict[str, HeaderValue] = field(default_factory=dict)

    def get(self, keyword: str, default: HeaderValue | None = None) -> HeaderValue | None:
        return self.values.get(keyword, default)

    def text(self, keyword: str) -> str:
        """The value as one string (multiple values joined with a backslash, as in DICOM)."""
        value = self.values.get(keyword, "")
        return value if isinstance(value, str) else "\\".join(value)


def facts_from_dataset(dataset: Dataset, keywords: Iterable[str]) -> HeaderFacts:
    """HeaderFacts of a header pydicom has read."""
    meta = getattr(dataset, "file_meta", None) or Dataset()
    values: dict[str, HeaderValue] = {}
    for keyword in keywords:
        element = dataset.get(keyword)
        if element is None:
            continue
        if isinstance(element, (MultiValue, list, tuple)):
            values[keyword] = tuple("" if v is None else str(v) for v in element)
        elif isinstance(element, (bytes, bytearray)):
            values[keyword] = ""  # binary values have no text
        else:
            values[keyword] = str(element)
    return HeaderFacts(
        transfer_syntax=str(meta.get("TransferSyntaxUID", "")),
        media_storage_sop_class=str(meta.get("MediaStorageSOPClassUID", "")),
        values=values,
    )


@functools.lru_cache(maxsize=32)
def _wanted_tags(keywords: tuple[str, ...]) -> dict[int, str] | None:
    """tag -> keyword, once per set of keywords (a storage asks for the same set every file);
    None if one is not a data set keyword this reader can look for."""
    wanted: dict[int, str] = {}
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None or tag >> 16 == 0x0002:
            return None
        wanted[tag] = keyword
    return wanted


class _GiveUp(Exception):
    """Not something this reader handles exactly; pydicom will."""


def scan_header(data: bytes, keywords: Iterable[str], *, complete: bool) -> HeaderFacts | None:
    """Read `keywords` from the start of a Part 10 object, or None to let pydicom do it.

    `data` is the object's first bytes; `complete` says whether it is the whole object (so
    that running out of bytes means the data set ended rather than the prefix).
    """
    wanted = _wanted_tags(tuple(keywords))
    if wanted is None:
        return None
    try:
        return _Scanner(memoryview(data), wanted, complete).run()
    except (_GiveUp, struct.error, UnicodeDecodeError, ValueError, KeyError):
        return None


class _Scanner:
    def __init__(self, data: memoryview, wanted: dict[int, str], complete: bool) -> None:
        self.data = data
        self.wanted = wanted
        self.last_wanted = max(wanted, default=0)
        self.complete = complete
        self.implicit = False

    def run(self) -> HeaderFacts:
        data = self.data
        if len(data) < _PREAMBLE + 4 or bytes(data[_PREAMBLE : _PREAMBLE + 4]) != _MAGIC:
            raise _GiveUp
        meta, position = self._file_meta(_PREAMBLE + 4)
        syntax = meta.get(0x00020010, "")
        if not syntax:
            raise _GiveUp
        uid = UID(syntax)
        if not uid.is_transfer_syntax or uid.is_deflated or not uid.is_little_endian:
            raise _GiveUp  # private, deflated or big endian: pydicom's business
        self.implicit = uid.is_implicit_VR
        if self.implicit and bytes(data[position + 4 : position + 6]) in _VRS:
            raise _GiveUp  # looks explicit although the meta says implicit: pydicom guesses
        values = self._top_level(position)
        return HeaderFacts(syntax, meta.get(0x00020002, ""), values)

    def _file_meta(self, position: int) -> tuple[dict[int, str], int]:
        """Group 0002, always explicit VR little endian; returns its UI values."""
        meta: dict[int, str] = {}
        while True:
            group, element = _UINT16.unpack_from(self.data, position)
            if group != 0x0002:
                return meta, position
            vr, length, header = self._explicit_header(position)
            if vr == b"UI":
                raw = self._value(position + header, length)
                meta[group << 16 | element] = _ascii(raw).rstrip(" \x00")
            elif length == _UNDEFINED:
                raise _GiveUp
            position += header + length

    def _explicit_header(self, position: int) -> tuple[bytes, int, int]:
        """(VR, value length, header size) of an explicit VR element."""
        _, _, vr, length = _EXPLICIT_SHORT.unpack_from(self.data, position)
        if vr not in _VRS:
            raise _GiveUp
        if vr in _LONG_VRS:
            (length,) = _LONG_LENGTH.unpack_from(self.data, position + 8)
            return vr, length, 12
        return vr, length, 8

    def _element(self, position: int) -> tuple[int, str | None, int, int]:
        """(tag, VR or None when implicit, value length, header size) of the next element.

        Called for every element of every stored file's header: one unpack of the short
        explicit header, a second only for the long VRs (and item tags, which have no VR in
        any encoding).
        """
        if self.implicit:
            group, element, length = _TAG_LENGTH.unpack_from(self.data, position)
            return group << 16 | element, None, length, 8
        group, element, raw_vr, length = _EXPLICIT_SHORT.unpack_from(self.data, position)
        if group == 0xFFFE:
            (length,) = _LONG_LENGTH.unpack_from(self.data, position + 4)
            return group << 16 | element, None, length, 8
        vr = _VR_TEXT.get(raw_vr)
        if vr is None:
            raise _GiveUp
        if raw_vr in _LONG_VRS:
            (length,) = _LONG_LENGTH.unpack_from(self.data, position + 8)
            return group << 16 | element, vr, length, 12
        return group << 16 | element, vr, length, 8

    def _top_level(self, position: int) -> dict[str, HeaderValue]:
        values: dict[str, HeaderValue] = {}
        end = len(self.data)
        while position < end:
            if position + 8 > end:
                raise _GiveUp  # the prefix ends inside an element header
            tag, vr, length, header = self._element(position)
            if tag > self.last_wanted or tag == _PIXEL_DATA:
                return values  # elements are in ascending order: nothing wanted follows
            start = position + header
            if length == _UNDEFINED:
                if tag in self.wanted or vr not in (None, "SQ"):
                    raise _GiveUp  # a wanted sequence, or UN/OB of undefined length
                position = self._skip_sequence(start, depth=1)
                continue
            if tag in self.wanted:
                values[self.wanted[tag]] = self._text(tag, vr, self._value(start, length))
            position = start + length
        if not self.complete:
            raise _GiveUp  # the prefix ended, not the data set
        return values

    def _skip_sequence(self, position: int, depth: int) -> int:
        """Position after an undefined-length sequence that starts at `position`."""
        if depth > _MAX_DEPTH:
            raise _GiveUp
        while True:
            group, element, length = _TAG_LENGTH.unpack_from(self.data, position)
            tag = group << 16 | element
            position += 8
            if tag == _SEQUENCE_END:
                return position
            if tag != _ITEM:
                raise _GiveUp
            if length != _UNDEFINED:
                position += length
                continue
            while True:  # an item of undefined length: its elements up to the item end
                tag, vr, length, header = self._element(position)
                position += header
                if tag == _ITEM_END:
                    break
                if length == _UNDEFINED:
                    if vr not in (None, "SQ"):
                        raise _GiveUp
                    position = self._skip_sequence(position, depth + 1)
                else:
                    position += length

    def _value(self, start: int, length: int) -> bytes:
        if start + length > len(self.data):
            raise _GiveUp
        return bytes(self.data[start : start + length])

    def _text(self, tag: int, vr: str | None, raw: bytes) -> HeaderValue:
        """The value as pydicom would give it, for the VRs whose rules are mirrored here."""
        if vr is None:
            vr = dictionary_VR(tag)
        text = _ascii(raw)
        if vr in _STRIP_THEN_SPLIT:
            parts = text.rstrip(" \x00").split("\\")
        elif vr in _SPLIT_THEN_STRIP:
            parts = [part.rstrip("\x00 ") for part in text.split("\\")]
        elif vr in _SINGLE:
            return text.rstrip("\x00 ")
        else:
            raise _GiveUp
        return parts[0] if len(parts) == 1 else tuple(parts)


def _ascii(raw: bytes) -> str:
    """ASCII text; anything else (or an ISO 2022 escape) needs pydicom's character sets."""
    if b"\x1b" in raw:
        raise _GiveUp
    return raw.decode("ascii")
