"""Lock files: the exact UIDs a manifest resolved to, kept next to it in version control.

`MANIFEST.lock.json` pins, per query set, the StudyInstanceUIDs and, where the downloader
retrieves series or instances, those UIDs too. A run with a lock pulls exactly that, whatever
the archive answers today, so an extraction can be repeated months later. The lock holds
UIDs only (no PatientID, no accession numbers) and is written with sorted keys and lists,
two-space indentation and a final newline, so that `git diff` shows only real changes.

`manifest_hash` is the manifest's resolution hash (source, queries, CSV values, select,
layout): editing comments, workers or retries does not make a lock outdated; changing what
is pulled does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trolley_etl import __version__
from trolley_etl.core.errors import LockFileError
from trolley_etl.core.files import file_sha256
from trolley_etl.core.model import InstanceReference, Reference, SeriesReference, StudyReference
from trolley_etl.runner.atomic import write_atomic
from trolley_etl.runner.checkpoint import Expectation

LOCK_VERSION = 1
LOCK_SUFFIX = ".lock.json"


def lock_path_for(manifest_path: Path) -> Path:
    """`pull.yaml` -> `pull.yaml.lock.json`, beside it."""
    return manifest_path.with_name(manifest_path.name + LOCK_SUFFIX)


@dataclass
class Lock:
    """What a manifest resolved to: per query set, study UID -> the references to fetch."""

    manifest_name: str
    manifest_hash: str
    query_sets: dict[str, dict[str, list[Reference]]] = field(default_factory=dict)
    tool_version: str = __version__
    #: query set -> keyword -> the range a relative date (`{last: 7d}`) resolved to
    resolved_dates: dict[str, dict[str, str]] = field(default_factory=dict)
    #: What the archive said each study or series unit holds (`expected_instances`).
    expected: dict[Reference, int] = field(default_factory=dict)

    @classmethod
    def from_resolution(
        cls,
        manifest_name: str,
        manifest_hash: str,
        studies: Iterable[tuple[str, str]],
        references: Iterable[Reference],
        expectations: Mapping[Reference, Expectation] | None = None,
    ) -> Lock:
        """From (query set, study UID) pairs and the retrieval references of those studies."""
        lock = cls(manifest_name, manifest_hash)
        for ref, expectation in (expectations or {}).items():
            if expectation.count is not None and not isinstance(ref, InstanceReference):
                lock.expected[ref] = expectation.count
        owner: dict[str, str] = {}
        for query_set, study_uid in studies:
            lock.query_sets.setdefault(query_set, {}).setdefault(study_uid, [])
            owner.setdefault(study_uid, query_set)
        for ref in references:
            name = owner.get(ref.study_uid)
            if name is None:
                raise LockFileError(f"reference {ref} belongs to no resolved study")
            lock.query_sets[name][ref.study_uid].append(ref)
        return lock

    # --- views ----------------------------------------------------------------------------

    def study_uids(self) -> dict[str, set[str]]:
        return {name: set(studies) for name, studies in self.query_sets.items()}

    def study_owners(self) -> dict[str, str]:
        """Study UID -> the query set it is locked under."""
        return {uid: name for name, studies in self.query_sets.items() for uid in studies}

    def references(self) -> list[Reference]:
        return [
            ref for studies in self.query_sets.values() for refs in studies.values() for ref in refs
        ]

    def expectations(self) -> dict[Reference, Expectation]:
        """The expectation of each unit as locked: a count, or the listed instance."""
        found: dict[Reference, Expectation] = {}
        for ref in self.references():
            if isinstance(ref, InstanceReference):
                found[ref] = Expectation.of_uids([ref.instance_uid])
            elif ref in self.expected:
                found[ref] = Expectation(self.expected[ref])
        return found

    # --- format ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        query_sets: dict[str, Any] = {}
        for name, studies in self.query_sets.items():
            entries = []
            for study_uid, refs in studies.items():
                entries.append(_study_entry(study_uid, refs, self.expected))
            query_sets[name] = {"studies": sorted(entries, key=lambda e: e["study_uid"])}
        return {
            "lock_version": LOCK_VERSION,
            "manifest": {"name": self.manifest_name, "manifest_hash": self.manifest_hash},
            "query_sets": query_sets,
            "totals": {
                "studies": sum(len(s) for s in self.query_sets.values()),
                "items": len(self.references()),
            },
            "tool_version": self.tool_version,
            **({"resolved_dates": self.resolved_dates} if self.resolved_dates else {}),
        }

    def text(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, data: Any, where: str) -> Lock:
        try:
            if data.get("lock_version") != LOCK_VERSION:
                raise LockFileError(
                    f"{where}: unsupported lock_version {data.get('lock_version')!r} "
                    f"(this trolley-etl writes {LOCK_VERSION})"
                )
            manifest = data["manifest"]
            lock = cls(
                str(manifest["name"]),
                str(manifest["manifest_hash"]),
                tool_version=str(data.get("tool_version", "")),
            )
            lock.resolved_dates = dict(data.get("resolved_dates") or {})
            for name, content in data["query_sets"].items():
                studies = lock.query_sets.setdefault(str(name), {})
                for entry in content["studies"]:
                    study_uid = str(entry["study_uid"])
                    studies[study_uid] = list(_entry_references(study_uid, entry))
                    lock.expected.update(_entry_expectations(study_uid, entry))
        except (KeyError, TypeError, AttributeError) as exc:
            raise LockFileError(f"{where}: not a trolley-etl lock file ({exc!r})") from None
        return lock


def _study_entry(
    study_uid: str, refs: list[Reference], expected: dict[Reference, int]
) -> dict[str, Any]:
    """`{"study_uid"}` for a whole study; with `series` (and `instances`) when finer.

    Study and series units carry `expected_instances` where the archive gave a count.
    """
    entry: dict[str, Any] = {"study_uid": study_uid}
    if not refs or any(isinstance(r, StudyReference) for r in refs):
        count = expected.get(StudyReference(study_uid))
        if count is not None:
            entry["expected_instances"] = count
        return entry
    series: dict[str, list[str] | None] = {}
    for ref in refs:
        if isinstance(ref, InstanceReference):
            known = series.setdefault(ref.series_uid, [])
            if known is not None:
                known.append(ref.instance_uid)
        elif isinstance(ref, SeriesReference):
            series[ref.series_uid] = None  # the whole series
    entry["series"] = [
        _series_entry(study_uid, uid, expected)
        if instances is None
        else {"series_uid": uid, "instances": sorted(instances)}
        for uid, instances in sorted(series.items())
    ]
    return entry


def _series_entry(
    study_uid: str, series_uid: str, expected: dict[Reference, int]
) -> dict[str, Any]:
    entry: dict[str, Any] = {"series_uid": series_uid}
    count = expected.get(SeriesReference(study_uid, series_uid))
    if count is not None:
        entry["expected_instances"] = count
    return entry


def _entry_expectations(study_uid: str, entry: dict[str, Any]) -> Iterable[tuple[Reference, int]]:
    if "series" not in entry:
        if "expected_instances" in entry:
            yield StudyReference(study_uid), int(entry["expected_instances"])
        return
    for series in entry["series"]:
        if "instances" not in series and "expected_instances" in series:
            yield (
                SeriesReference(study_uid, str(series["series_uid"])),
                int(series["expected_instances"]),
            )


def _entry_references(study_uid: str, entry: dict[str, Any]) -> Iterable[Reference]:
    if "series" not in entry:
        yield StudyReference(study_uid)
        return
    for series in entry["series"]:
        series_uid = str(series["series_uid"])
        if "instances" not in series:
            yield SeriesReference(study_uid, series_uid)
            continue
        for instance_uid in series["instances"]:
            yield InstanceReference(study_uid, series_uid, str(instance_uid))


def read_lock(path: Path) -> Lock:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise LockFileError(f"{path}: cannot read the lock file: {exc.strerror}") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LockFileError(f"{path}: the lock file is not valid JSON: {exc}") from None
    return Lock.from_json(data, str(path))


def lock_hash(path: Path) -> str:
    """SHA-256 of the lock file as stored: what reports cite and the checkpoint remembers."""
    return file_sha256(path)


def write_lock(path: Path, lock: Lock) -> bool:
    """Write the lock atomically; False (and the file untouched) when nothing changed."""
    if path.exists():
        try:
            if _content(read_lock(path)) == _content(lock):
                return False
        except LockFileError:
            pass  # unreadable: replace it
    write_atomic(path, lock.text())
    return True


def _content(lock: Lock) -> dict[str, Any]:
    """What the lock pins; a new tool version alone is no reason to rewrite it."""
    data = lock.to_json()
    data.pop("tool_version")
    return data


@dataclass(frozen=True)
class Drift:
    """How the archive's current answers differ from the lock, per query set."""

    added: dict[str, list[str]]
    removed: dict[str, list[str]]

    @property
    def changed(self) -> bool:
        return any(self.added.values()) or any(self.removed.values())

    def counts(self) -> dict[str, int]:
        return {
            "added": sum(len(v) for v in self.added.values()),
            "removed": sum(len(v) for v in self.removed.values()),
        }

    def to_json(self, limit: int = 50) -> dict[str, Any]:
        """Counts and, per query set, at most `limit` UIDs each way (logs stay readable)."""
        return {
            **self.counts(),
            "added_studies": {k: sorted(v)[:limit] for k, v in self.added.items() if v},
            "removed_studies": {k: sorted(v)[:limit] for k, v in self.removed.items() if v},
        }


def diff(lock: Lock, current: dict[str, set[str]]) -> Drift:
    """Studies the archive answers now but the lock lacks (added), and the other way round.

    A study counts under the query set that finds it now; a study that moved from one query
    set to another is not drift, as the union is what is pulled.
    """
    locked_all = set(lock.study_owners())
    current_all = {uid for uids in current.values() for uid in uids}
    names = sorted(set(lock.query_sets) | set(current))
    added = {n: sorted(current.get(n, set()) - locked_all) for n in names}
    removed = {n: sorted(set(lock.query_sets.get(n, {})) - current_all) for n in names}
    return Drift(added, removed)
