"""The de-identification step of a run: between a received temp file and the committer.

`prepare` checks everything before the first download (the secret is set, the table is
installed, the settings match those the storage root was filled with), so that one export
never mixes two secrets or two profiles. `Deidentifier.process` turns each received temp
file into a de-identified temp file (or holds it back), removes the received one, and
returns what the committer should put in place: the path and size and hash of the
de-identified file, under the source UIDs the checkpoint works with.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trolley_etl.core.errors import DeidSettingsError
from trolley_etl.deid import audit, gate
from trolley_etl.deid.actions import Policy
from trolley_etl.deid.keys import Pseudonymizer
from trolley_etl.deid.profile import describe_table, load_table, safe_private
from trolley_etl.deid.pseudonym_map import PseudonymMap
from trolley_etl.deid.stream import deidentify_file

if TYPE_CHECKING:
    from trolley_etl.core.storage import StorageDir, StoredInstance
    from trolley_etl.manifest.models import Deid


def _tag(keyword: str) -> int:
    from pydicom.datadict import tag_for_keyword

    tag = tag_for_keyword(keyword)
    if tag is None:
        raise DeidSettingsError(f"unknown DICOM keyword {keyword!r}")
    return int(tag)


def build_policy(config: Deid, secret: bytes) -> Policy:
    options = frozenset(config.options)
    return Policy(
        table=load_table(),
        options=options,
        pseudonyms=Pseudonymizer(secret, config.date_shift_days),
        keep=frozenset(_tag(k) for k in config.keep),
        remove=frozenset(_tag(k) for k in config.remove),
        safe_private=safe_private(config.keep_private)
        if "retain_safe_private" in options
        else None,
    )


def settings_record(config: Deid, policy: Policy) -> dict[str, Any]:
    """What makes two runs' output comparable; names the secret by its fingerprint only."""
    return {
        "profile": config.profile,
        "options": sorted(config.options),
        "secret_fingerprint": policy.pseudonyms.fingerprint(),
        "keep": sorted(config.keep),
        "remove": sorted(config.remove),
        "keep_private": sorted(config.keep_private),
        "allow_burned_in": config.allow_burned_in,
        "blank_regions": [r.model_dump(mode="json") for r in config.blank_regions],
        "date_shift_days": list(config.date_shift_days),
        "table": describe_table(),
    }


class Deidentifier:
    def __init__(
        self,
        config: Deid,
        policy: Policy,
        database: Path | None,
        run_id: str,
        map_path: Path | None,
        logger: Any = None,
    ) -> None:
        self.config = config
        self.policy = policy
        self.settings = settings_record(config, policy)
        self.audit = audit.AuditLog(database, run_id) if database is not None else None
        self.map = PseudonymMap(map_path) if map_path is not None else None
        self.logger = logger
        self.devices = tuple(
            gate.DeviceRegions(d.manufacturer, d.model, tuple(d.regions))
            for d in config.blank_regions
        )
        self.counts: Counter[tuple[str, str]] = Counter()
        self.written = 0
        self.quarantined = 0
        self._lock = threading.Lock()
        self._closed = False

    def process(
        self, staged: Path, received: StoredInstance, storage: StorageDir
    ) -> tuple[Path, StoredInstance] | None:
        """The de-identified temp file and what it is, or None when it was held back.

        The received temp file is removed in every case.
        """
        fd, name = tempfile.mkstemp(dir=storage.tmp_dir, prefix="deid-", suffix=".part")
        out_path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                result = deidentify_file(
                    staged,
                    out,
                    self.policy,
                    allow_burned_in=self.config.allow_burned_in,
                    devices=self.devices,
                )
                out.flush()
            if result.quarantined:
                out_path.unlink(missing_ok=True)
                uids = (
                    result.sop_instance_uid,
                    result.study_uid,
                    result.series_uid,
                    result.sop_class_uid,
                )
                if self.audit is not None:
                    self.audit.quarantine(uids, result.quarantined, received.sha256)
                with self._lock:
                    self.quarantined += 1
                if self.logger is not None:
                    self.logger.warning(
                        "deid.quarantined",
                        sop_instance_uid=uids[0],
                        study_uid=uids[1],
                        reason=result.quarantined,
                    )
                return None
            described = storage.describe(out_path, result.size, result.sha256)
        except BaseException:
            out_path.unlink(missing_ok=True)
            raise
        finally:
            staged.unlink(missing_ok=True)
        stored = dataclasses.replace(
            described,
            study_uid=result.study_uid,
            series_uid=result.series_uid,
            sop_instance_uid=result.sop_instance_uid,
            file_sop_instance_uid=described.sop_instance_uid,
        )
        if self.audit is not None:
            self.audit.file(
                result.sop_instance_uid, described.sop_instance_uid, received.sha256, result.sha256
            )
        if self.map is not None:
            for (kind, original), new in sorted(result.outcome.mapped.items()):
                self.map.add(kind, original, new)
        with self._lock:
            self.counts.update(result.outcome.counts)
            self.written += 1
        return out_path, stored

    def close(self) -> None:
        """Record this run's settings and counts; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.audit is not None:
            self.audit.run(self.settings, self.counts)
            self.audit.close()
        if self.map is not None:
            self.map.close()
        if self.logger is not None:
            self.logger.info(
                "deid.summary",
                written=self.written,
                quarantined=self.quarantined,
                secret_fingerprint=self.settings["secret_fingerprint"],
            )


def make_deidentifier(
    settings: Deid | dict[str, Any], *, pseudonym_map: str | os.PathLike[str] | None = None
) -> Deidentifier:
    """For the Python API: `StorageDir(root, deid=make_deidentifier({...}))`.

    `settings` is a manifest's `deid` section (as a dict or model); the secret is read from
    the environment variable it names, as in a run. Nothing is recorded in a checkpoint;
    `close()` it when done (it flushes the pseudonym map).
    """
    from trolley_etl.manifest.models import Deid as DeidModel

    config = settings if isinstance(settings, DeidModel) else DeidModel.model_validate(settings)
    secret = os.environ.get(config.secret_env, "")
    if not secret:
        raise DeidSettingsError(f"the environment variable {config.secret_env} is not set")
    chosen = pseudonym_map or config.pseudonym_map
    map_path = Path(chosen) if chosen else None
    return Deidentifier(config, build_policy(config, secret.encode()), None, "api", map_path)


def prepare(
    config: Deid | None,
    *,
    base_dir: Path,
    root: Path,
    checkpoint: Any,
    run_id: str,
    logger: Any = None,
) -> Deidentifier | None:
    """The run's Deidentifier (None without a `deid` section), after every check."""
    has_files = checkpoint.counts().get("files", 0) > 0
    recorded = checkpoint.get_meta(audit.SETTINGS_KEY)
    if config is None:
        if recorded and has_files:
            raise DeidSettingsError(
                f"{root} holds a de-identified export: a run without the deid section would "
                "add identifiable files to it; use another storage root"
            )
        return None
    secret = os.environ.get(config.secret_env, "")
    if not secret:
        raise DeidSettingsError(
            f"deid.secret_env names {config.secret_env}, which is not set or empty: "
            "set it to the project's secret key"
        )
    map_path = None
    if config.pseudonym_map:
        map_path = (base_dir / config.pseudonym_map).resolve()
        resolved_root = root.resolve()
        if map_path == resolved_root or resolved_root in map_path.parents:
            raise DeidSettingsError(f"deid.pseudonym_map {map_path} lies inside {root}")
    policy = build_policy(config, secret.encode())
    compared = settings_record(config, policy)
    compared.pop("allow_burned_in")  # lets more through, changes no written file
    settings = json.dumps(compared, sort_keys=True)
    if recorded is None and has_files:
        raise DeidSettingsError(
            f"{root} already holds files written without de-identification; "
            "use another storage root"
        )
    if recorded is not None and recorded != settings and has_files:
        before = json.loads(recorded)
        changed = sorted(k for k in {*before, *compared} if before.get(k) != compared.get(k))
        named = ", ".join("the secret" if k == "secret_fingerprint" else k for k in changed)
        raise DeidSettingsError(
            f"the de-identification settings changed since {root} was filled ({named}): "
            "one export must not mix two; use another storage root"
        )
    checkpoint.set_meta(audit.SETTINGS_KEY, settings)
    return Deidentifier(config, policy, checkpoint.path, run_id, map_path, logger)
