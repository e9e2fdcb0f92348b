"""The burned-in text gate: which instances may carry identifying text in their pixels.

This is a gate, not OCR: it decides from the header alone. An instance is held back when
BurnedInAnnotation says YES, or says nothing on a SOP class whose pixels are commonly
screenshots, photographs, scanned documents or ultrasound screens. The manifest can let them
through (`allow_burned_in: true`), or give rectangles to blank for a device (matched on
Manufacturer and, optionally, ManufacturerModelName), which works on uncompressed pixel data.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset

#: SOP class UIDs, or prefixes ending in ".", whose pixels often hold burned-in text.
RISKY_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture (screenshots, scans)
    "1.2.840.10008.5.1.4.1.1.7.",  # multi-frame Secondary Capture
    "1.2.840.10008.5.1.4.1.1.6.",  # Ultrasound, Enhanced US Volume
    "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound (retired)
    "1.2.840.10008.5.1.4.1.1.3.",  # Ultrasound multi-frame
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound multi-frame (retired)
    "1.2.840.10008.5.1.4.1.1.104.",  # Encapsulated PDF, CDA, STL, ... documents
    "1.2.840.10008.5.1.4.1.1.77.1.",  # VL endoscopy, photography, video, slide scans
)
RISKY_MODALITIES = frozenset({"US", "XC", "ES", "DOC", "SC"})


@dataclass(frozen=True)
class DeviceRegions:
    manufacturer: str
    model: str | None
    regions: tuple[tuple[int, int, int, int], ...]  # x, y, width, height in pixels

    def matches(self, ds: Dataset) -> bool:
        if str(ds.get("Manufacturer", "")).strip().lower() != self.manufacturer.lower():
            return False
        model = str(ds.get("ManufacturerModelName", "")).strip().lower()
        return self.model is None or model == self.model.lower()


@dataclass(frozen=True)
class Verdict:
    """`reason` is set when the instance is at risk; `regions` when it may pass blanked."""

    reason: str = ""
    regions: tuple[tuple[int, int, int, int], ...] = ()

    @property
    def at_risk(self) -> bool:
        return bool(self.reason)


def _risky_class(sop_class: str) -> bool:
    return any(
        sop_class.startswith(p) if p.endswith(".") else sop_class == p for p in RISKY_SOP_CLASSES
    )


def burned_in_risk(ds: Dataset, sop_class: str) -> str:
    """Why this instance may carry burned-in text, or "" if the header says it does not."""
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        return "BurnedInAnnotation is YES"
    if flag == "NO":
        return ""
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if _risky_class(sop_class):
        return f"BurnedInAnnotation absent on SOP class {sop_class}"
    if modality in RISKY_MODALITIES:
        return f"BurnedInAnnotation absent on modality {modality}"
    return ""


def check(
    ds: Dataset, sop_class: str, *, allow: bool, devices: tuple[DeviceRegions, ...]
) -> Verdict:
    reason = burned_in_risk(ds, sop_class)
    if not reason or allow:
        return Verdict()
    for device in devices:
        if device.matches(ds):
            return Verdict(reason, device.regions)
    return Verdict(reason)
