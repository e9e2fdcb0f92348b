"""Keyed pseudonyms: HMAC-SHA-256 under the project's secret, nothing else.

Every replacement value is HMAC-SHA-256(secret, purpose || 0x00 || original): the same secret
gives the same value on every run and machine, another secret unrelated values, and without
the secret nobody can test guesses (unlike a plain or unsalted hash of a patient ID, which a
dictionary of IDs reverses). `purpose` separates the uses, so a UID pseudonym never equals a
patient pseudonym of the same text.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac

from trolley_etl.core.errors import ConfigurationError

#: Days a date may move at most, either way (both ends of a configured range).
MAX_SHIFT_DAYS = 36_500


class Pseudonymizer:
    def __init__(self, secret: bytes, shift_range: tuple[int, int] = (-730, -1)) -> None:
        if not secret:
            raise ConfigurationError("empty secret")
        low, high = shift_range
        if not -MAX_SHIFT_DAYS <= low <= high <= MAX_SHIFT_DAYS:
            raise ConfigurationError(f"bad date shift range {shift_range}")
        self._secret = secret
        self.shift_range = (low, high)

    def _mac(self, purpose: str, value: str) -> bytes:
        message = purpose.encode() + b"\x00" + value.encode("utf-8", "surrogateescape")
        return hmac.new(self._secret, message, hashlib.sha256).digest()

    def fingerprint(self) -> str:
        """Names the secret in reports (same secret, same fingerprint) without revealing it."""
        return self._mac("fingerprint", "trolley-etl deid secret").hex()[:16]

    def uid(self, original: str) -> str:
        """`2.25.<128-bit integer>`: a valid UID of at most 44 characters (PS3.5 B.2)."""
        return f"2.25.{int.from_bytes(self._mac('uid', original.strip())[:16], 'big')}"

    def token(self, purpose: str, original: str, length: int = 16) -> str:
        """Upper-case letters and digits, fit for LO, SH and PN values."""
        text = base64.b32encode(self._mac(purpose, original)).decode().rstrip("=")
        return text[:length]

    def patient_id(self, original: str) -> str:
        return "PSN" + self.token("PatientID", original.strip())

    def patient_name(self, patient_key: str) -> str:
        """One name per patient (from the patient key, so spelling variants agree)."""
        return "ANON^" + self.token("PatientName", patient_key.strip(), 12)

    def date_offset(self, patient_key: str) -> int:
        """Whole days every date of this patient moves by: keyed, in the configured range."""
        low, high = self.shift_range
        span = high - low + 1
        number = int.from_bytes(self._mac("date-shift", patient_key.strip())[:8], "big")
        return low + number % span


def shift_date(value: str, days: int) -> str:
    """A DA value (YYYYMMDD) moved by `days`; "" when it is not a full date."""
    value = value.strip()
    try:
        moved = dt.datetime.strptime(value[:8], "%Y%m%d").date() + dt.timedelta(days=days)
    except ValueError:
        return ""
    if len(value) != 8:
        return ""
    return moved.strftime("%Y%m%d")


def shift_datetime(value: str, days: int) -> str:
    """A DT value moved by `days`, keeping its time and offset; "" when unreadable."""
    value = value.strip()
    if len(value) < 8:
        return ""
    date_part = shift_date(value[:8], days)
    return date_part + value[8:] if date_part else ""
