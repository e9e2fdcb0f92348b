"""`sanitise_component` returns values that are already safe as they are, without applying its
rules character by character; what it returns must not change because of that."""

from __future__ import annotations

import random
import re

import pytest

from trolley_etl.core import layout


def test_the_fast_path_agrees_with_the_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    alphabet = "a.Z9_-^+=@,() /\\\x00\x1f\xe9\u0301"
    rng = random.Random(17)
    values = ["1.2.840.10008.5.1.4.1.1.2", "20240131", "CT", "a.", ".a", "..", "x" * 100]
    values += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8))) for _ in range(5000)]
    fast = [layout.sanitise_component(value) for value in values]
    monkeypatch.setattr(layout, "_ALREADY_SAFE", re.compile(r"(?!)"))  # matches nothing
    assert fast == [layout.sanitise_component(value) for value in values]


def test_uids_and_dates_are_kept_as_they_are() -> None:
    for value in ("1.2.840.10008.5.1.4.1.1.2", "20240131", "CT"):
        assert layout._ALREADY_SAFE.fullmatch(value)
