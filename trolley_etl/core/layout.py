"""Where a stored object goes: layout templates of DICOM keywords, and safe path components.

Values from DICOM headers are sanitised before they become path components, so that no
archive, however hostile, can make us write outside the root. This module does not import
pydicom: reading a manifest (which checks its layout) must stay cheap, e.g. for `status`.
"""

from __future__ import annotations

import hashlib
import re
import string
import unicodedata
from collections.abc import MutableSequence
from pathlib import Path
from typing import Any, Protocol

from trolley_etl.core.constants import DEFAULT_LAYOUT as DEFAULT_LAYOUT  # also ours to offer
from trolley_etl.core.errors import LayoutError, QueryError
from trolley_etl.core.query import check_keyword

#: Used in a path where the dataset has no value for a layout keyword.
MISSING_VALUE = "unknown"
#: Longest path component made from a tag value, in characters.
MAX_COMPONENT_LENGTH = 100

_UNSAFE = re.compile(r"[^\w.\-^+=@,()]", re.UNICODE)
#: A value that every rule below would leave as it is (ASCII from the safe set, no leading
#: or trailing dot): UIDs, dates, most codes. Checked first, since every stored file's path
#: is made of such values and the rules cost a Python step per character.
_ALREADY_SAFE = re.compile(r"[\w\-^+=@,()](?:[\w.\-^+=@,()]*[\w\-^+=@,()])?", re.ASCII)


def sanitise_component(value: str, max_length: int = MAX_COMPONENT_LENGTH) -> str:
    """Make one tag value safe as a single path component.

    Separators, control characters and anything outside a conservative set become `_`;
    a leading dot becomes `_` (so neither `..` nor hidden files); over-long values are cut and
    suffixed with a short hash so that two long values stay distinct.
    """
    if len(value) <= max_length and _ALREADY_SAFE.fullmatch(value):
        return value
    text = unicodedata.normalize("NFC", value).strip()
    text = "".join("_" if unicodedata.category(ch).startswith("C") else ch for ch in text)
    text = _UNSAFE.sub("_", text)
    text = re.sub(r"^\.", "_", text).rstrip(". ")
    if not text:
        return MISSING_VALUE
    if len(text) > max_length:
        digest = hashlib.sha1(value.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        text = f"{text[: max_length - 9]}_{digest}"
    return text


class HeaderValues(Protocol):
    """Anything that gives header values by keyword: a pydicom Dataset or HeaderFacts."""

    def get(self, keyword: str, default: Any = None, /) -> Any: ...


def _value_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray)):
        return ""  # binary values make no sense in a path
    if isinstance(value, (MutableSequence, tuple)):
        return "_".join(_value_text(v) for v in value)
    return str(value)


class LayoutTemplate:
    """A relative path template such as `{PatientID}/{StudyDate}/{SOPInstanceUID}.dcm`.

    Fields are DICOM keywords; the template is checked when it is built (unknown keywords,
    unbalanced braces, absolute paths, `..`), and each filled-in value is sanitised.
    """

    def __init__(self, template: str = DEFAULT_LAYOUT) -> None:
        self.template = template
        self.parts: list[list[tuple[str, str | None]]] = []  # per path component: (text, field)
        if not template or template.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", template):
            raise LayoutError(f"layout {template!r} must be a non-empty relative path")
        for component in template.split("/"):
            self.parts.append(self._parse_component(component))
        if not any(name for _, name in self.parts[-1]):
            raise LayoutError(f"layout {template!r}: the file name must contain a {{Keyword}}")

    def _parse_component(self, component: str) -> list[tuple[str, str | None]]:
        where = f"layout {self.template!r}"
        if component in ("", ".", ".."):
            raise LayoutError(f"{where}: empty, '.' or '..' path components are not allowed")
        if "\\" in component:
            raise LayoutError(f"{where}: use '/' as the separator")
        try:
            pieces = list(string.Formatter().parse(component))
        except ValueError as exc:
            raise LayoutError(f"{where}: {exc} (unbalanced braces?)") from None
        parsed: list[tuple[str, str | None]] = []
        for literal, name, spec, conversion in pieces:
            if name is not None:
                if spec or conversion:
                    raise LayoutError(f"{where}: format specs are not supported in {{{name}}}")
                try:
                    check_keyword(name)
                except QueryError as exc:
                    raise LayoutError(f"{where}: {exc}") from None
            parsed.append((literal, name or None))
        return parsed

    @property
    def keywords(self) -> list[str]:
        return [name for part in self.parts for _, name in part if name]

    def render(self, dataset: HeaderValues) -> Path:
        """The relative path for a dataset; every component is safe."""
        components = []
        for part in self.parts:
            text = ""
            for literal, name in part:
                text += literal
                if name:
                    text += _value_text(dataset.get(name)) or MISSING_VALUE
            components.append(sanitise_component(text))
        return Path(*components)
