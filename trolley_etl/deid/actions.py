"""Applying the profile to one header: every element, every sequence item, every private tag.

Elements are looked at without being read where possible (`Dataset.get_item` leaves a
deferred value on disk), so an element that is removed is never loaded. What each element
became is counted by keyword (never by value) for the audit.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from trolley_etl.deid.keys import Pseudonymizer, shift_date, shift_datetime
from trolley_etl.deid.profile import (
    CLEAN,
    DUMMY,
    EMPTY,
    KEEP,
    METHOD_CODES,
    OPTION_NAMES,
    REMOVE,
    UID,
    ProfileTable,
    SafePrivate,
    resolve_action,
)

PATIENT_ID = 0x00100020
PATIENT_NAME = 0x00100010
#: Set by the de-identification itself, whatever the source held.
WRITTEN_BY_US = {0x00120062, 0x00120063, 0x00120064, 0x00280303}
TEXT_VRS = {"LO", "SH", "LT", "ST", "UT", "UC", "PN", "CS", "AE"}
NUMBER_VRS = {"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"}
DUMMIES = {
    "DA": "19000101",
    "TM": "000000",
    "DT": "19000101000000",
    "PN": "ANONYMOUS",
    "CS": "ANONYMIZED",
    "IS": "0",
    "DS": "0",
    "AS": "000Y",
    "AE": "ANONYMOUS",
}


@dataclass
class Outcome:
    """What the profile did to one instance (and what the pseudonym map needs)."""

    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    mapped: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, original) -> new

    def count(self, what: str, tag: int, creator: str = "") -> None:
        if creator:
            name = f'({tag >> 16:04X},"{creator}",{tag & 0xFF:02X})'
        else:
            name = keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
        self.counts[(what, name)] += 1


@dataclass(frozen=True)
class Policy:
    table: ProfileTable
    options: frozenset[str]
    pseudonyms: Pseudonymizer
    keep: frozenset[int] = frozenset()
    remove: frozenset[int] = frozenset()
    safe_private: SafePrivate | None = None  # None: every private tag goes

    @property
    def keeps_uids(self) -> bool:
        return "retain_uids" in self.options

    def method_codes(self) -> list[tuple[str, str]]:
        names = ["basic", *[o for o in OPTION_NAMES if o in self.options]]
        return [METHOD_CODES[n] for n in names if n in METHOD_CODES]


class _Instance:
    """The state of one instance's walk: its patient and its identifying values."""

    def __init__(self, policy: Policy, ds: Dataset, outcome: Outcome) -> None:
        self.policy = policy
        self.outcome = outcome
        self.patient_key = _text(ds, PATIENT_ID) or _text(ds, PATIENT_NAME)
        self.offset = policy.pseudonyms.date_offset(self.patient_key)
        self.identifiers = _identifiers(ds)

    def uid(self, value: str, kind: str = "") -> str:
        new = self.policy.pseudonyms.uid(value)
        if kind:
            self.outcome.mapped[(kind, value)] = new
        return new

    def scrub(self, text: str) -> str:
        """Known identifiers of this instance blanked out of a free-text value."""
        for known in self.identifiers:
            text = re.sub(re.escape(known), "X" * len(known), text, flags=re.IGNORECASE)
        return text

    # --- the walk ------------------------------------------------------------------------

    def dataset(self, ds: Dataset) -> None:
        kept_blocks: set[int] = set()
        creators: list[BaseTag] = []
        for tag in list(ds.keys()):
            if tag in WRITTEN_BY_US:
                del ds[tag]
                continue
            if tag.element == 0x0000:  # group lengths: obsolete and recomputed by readers
                del ds[tag]
                continue
            if tag.is_private:
                if tag.is_private_creator:
                    creators.append(tag)
                elif self.private(ds, tag):
                    kept_blocks.add((tag.group << 16) | (tag.element >> 8))
                continue
            self.public(ds, tag)
        for creator in creators:
            if creator not in kept_blocks:
                del ds[creator]

    def private(self, ds: Dataset, tag: BaseTag) -> bool:
        """Keep a private element when the safe list names it; True if it was kept."""
        creator_tag = Tag(tag.group, tag.element >> 8)
        creator = str(ds[creator_tag].value).strip() if creator_tag in ds else ""
        allowed = self.policy.safe_private
        if (
            creator
            and allowed is not None
            and allowed.allows(tag.group, creator, tag.element & 0xFF)
        ):
            element = ds[tag]
            if element.VR == "SQ":
                for item in element.value:
                    self.dataset(item)
            elif element.VR == "UI" and not self.policy.keeps_uids:
                self.replace_uids(element, tag)  # a kept private UID must not link back
            self.outcome.count("kept", tag, creator)
            return True
        del ds[tag]
        self.outcome.count("removed", tag, creator or "unknown creator")
        return False

    def public(self, ds: Dataset, tag: BaseTag) -> None:
        policy = self.policy
        if tag in policy.remove:
            action = REMOVE
        elif tag in policy.keep:
            action = KEEP
        elif tag in (PATIENT_ID, PATIENT_NAME):
            action = "P"  # keyed pseudonym
        else:
            rule = policy.table.rule_for(tag)
            action = resolve_action(rule, policy.options)
            if rule is None:  # not named by the profile: kept, but its items are walked
                self.walk_items(ds, tag)
                return
        if action == REMOVE:
            del ds[tag]
            self.outcome.count("removed", tag)
            return
        element = ds[tag]
        vr = element.VR
        if action == KEEP:
            if vr == "SQ":
                self.walk_items(ds, tag)
            self.outcome.count("kept", tag)
            return
        self.outcome.count("replaced", tag)
        self.replace(element, tag, action)

    def replace(self, element: DataElement, tag: BaseTag, action: str) -> None:
        """Apply a replacing action (pseudonym, empty, dummy, new UID, clean) in place."""
        vr = element.VR
        if action == "P":
            self.pseudonymise(element, tag)
        elif action == EMPTY:
            element.value = Sequence() if vr == "SQ" else None
        elif action == DUMMY:
            element.value = self.dummy(element)
        elif action == UID:
            self.replace_uids(element, tag)
        elif action == CLEAN:
            self.clean(element)

    def pseudonymise(self, element: DataElement, tag: BaseTag) -> None:
        """PatientID and PatientName get their keyed pseudonyms; the pair is remembered."""
        original = _first(element.value)
        if tag == PATIENT_ID:
            new = self.policy.pseudonyms.patient_id(original)
            self.outcome.mapped[("PatientID", original)] = new
        else:
            new = self.policy.pseudonyms.patient_name(self.patient_key)
            self.outcome.mapped[("PatientName", original)] = new
        element.value = new

    def walk_items(self, ds: Dataset, tag: BaseTag) -> None:
        raw = ds.get_item(tag)
        vr = raw.VR if raw is not None else None
        if vr is None:
            vr = _dictionary_vr(tag)
        if vr == "SQ":
            for item in ds[tag].value:
                self.dataset(item)

    def dummy(self, element: DataElement) -> object:
        vr = element.VR
        if vr == "SQ":  # a dummy structure would still carry the text: drop the items
            return Sequence()
        if vr == "UI":
            return [self.uid(v) for v in _values(element.value)] or None
        if vr in DUMMIES:
            return DUMMIES[vr]
        if vr in TEXT_VRS:
            return "ANONYMIZED"
        if vr in NUMBER_VRS:
            return 0
        return None

    def replace_uids(self, element: DataElement, tag: BaseTag) -> None:
        if element.VR == "SQ":  # X/Z/U*: keep the references, every UID in them replaced
            for item in element.value:
                self.dataset(item)
            return
        kind = {0x0020000D: "StudyInstanceUID", 0x0020000E: "SeriesInstanceUID"}.get(tag, "")
        values = [self.uid(v, kind) for v in _values(element.value) if v]
        element.value = values if len(values) != 1 else values[0]

    def clean(self, element: DataElement) -> None:
        vr = element.VR
        if vr == "SQ":
            for item in element.value:
                self.dataset(item)
        elif vr == "DA":
            element.value = [shift_date(v, self.offset) for v in _values(element.value)] or None
        elif vr == "DT":
            element.value = [shift_datetime(v, self.offset) for v in _values(element.value)] or None
        elif vr == "UI":
            self.replace_uids(element, element.tag)
        elif vr in TEXT_VRS and element.value is not None:
            cleaned = [self.scrub(str(v)) for v in _values(element.value)]
            element.value = cleaned if len(cleaned) != 1 else cleaned[0]
        # TM and numbers: a whole-day shift leaves times as they are


def deidentify_dataset(ds: Dataset, policy: Policy) -> Outcome:
    """De-identify `ds` (its header; pixel data is handled by the caller) in place."""
    outcome = Outcome()
    walk = _Instance(policy, ds, outcome)
    walk.dataset(ds)
    if "retain_longitudinal_modified_dates" in policy.options:
        outcome.mapped[("DateShiftDays", walk.patient_key)] = str(walk.offset)
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = [
        "PS3.15 E.1 Basic Application Level Confidentiality Profile",
        *[o for o in OPTION_NAMES if o in policy.options],
    ]
    ds.DeidentificationMethodCodeSequence = Sequence(
        [_code(value, meaning) for value, meaning in policy.method_codes()]
    )
    if "retain_longitudinal_full_dates" in policy.options:
        ds.LongitudinalTemporalInformationModified = "UNMODIFIED"
    elif "retain_longitudinal_modified_dates" in policy.options:
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
    else:
        ds.LongitudinalTemporalInformationModified = "REMOVED"
    return outcome


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag).split(" or ")[0]
    except KeyError:
        return "UN"


def _values(value: object) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return [str(v) for v in value]
    return [str(value)]


def _first(value: object) -> str:
    values = _values(value)
    return values[0] if values else ""


def _text(ds: Dataset, tag: int) -> str:
    if tag not in ds:
        return ""
    return _first(ds[tag].value).strip()


def _identifiers(ds: Dataset) -> list[str]:
    """Values that must not survive in free text: names, IDs, the accession number."""
    found: set[str] = set()
    for keyword in (
        "PatientID",
        "AccessionNumber",
        "OtherPatientIDs",
        "PatientBirthDate",
        "StudyID",
        "MedicalRecordLocator",
    ):
        element = ds.get(keyword)
        if element is not None:
            found.update(v.strip() for v in _values(element))
    _person_names(ds, found)
    return sorted((v for v in found if len(v) >= 3), key=len, reverse=True)


def _person_names(ds: Dataset, found: set[str]) -> None:
    """Name parts of every PN value, sequences included; other values are not read."""
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        vr = (raw.VR if raw is not None else None) or _dictionary_vr(tag)
        if vr == "PN":
            for value in _values(ds[tag].value):
                found.update(part.strip() for part in re.split(r"[\\^=]", value))
        elif vr == "SQ":
            for item in ds[tag].value:
                _person_names(item, found)
