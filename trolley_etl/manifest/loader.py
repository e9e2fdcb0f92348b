"""Load a manifest file and turn every problem into `FILE:LINE:COL: field.path: problem`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from trolley_etl.core.errors import ManifestError
from trolley_etl.core.layout import LayoutTemplate
from trolley_etl.manifest.models import BasicAuth, BearerAuth, HttpBackend, Manifest
from trolley_etl.manifest.yaml_source import (
    Path_,
    Position,
    YamlDocument,
    YamlProblem,
    parse_yaml,
)


@dataclass(frozen=True)
class ManifestIssue:
    file: str
    line: int
    column: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.column}"
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


def field_path(path: Sequence[str | int]) -> str:
    """`queries[1].filters.StudyDate` for ('queries', 1, 'filters', 'StudyDate')."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def load_manifest(path: str | os.PathLike[str], *, check_env: bool = True) -> Manifest:
    """Read, parse and validate a manifest; raise ManifestError listing every problem."""
    shown = str(path)
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        issue = ManifestIssue(shown, 1, 1, "", f"cannot read the file: {reason}")
        raise ManifestError([issue]) from None
    return parse_manifest(text, shown, base_dir=file.parent, check_env=check_env)


def parse_manifest(
    text: str, file: str, *, base_dir: str | os.PathLike[str] = ".", check_env: bool = True
) -> Manifest:
    try:
        document = parse_yaml(text)
    except YamlProblem as problem:
        position = problem.position
        raise ManifestError(
            [
                ManifestIssue(
                    file, position.line, position.column, field_path(problem.path), problem.message
                )
            ]
        ) from None
    if not isinstance(document.data, dict):
        raise ManifestError(
            [
                ManifestIssue(
                    file, 1, 1, "", "a manifest is a YAML mapping (version, name, source, ...)"
                )
            ]
        )
    try:
        manifest = Manifest.model_validate(document.data, context={"base_dir": Path(base_dir)})
    except ValidationError as exc:
        raise ManifestError(_issues(exc, document, file)) from None
    if check_env:
        missing = list(_missing_environment(manifest, document, file))
        if missing:
            raise ManifestError(missing)
    return manifest


def _issues(exc: ValidationError, document: YamlDocument, file: str) -> list[ManifestIssue]:
    issues = []
    for err in exc.errors(include_url=False):
        path = _data_path(err["loc"], document.data, missing=err["type"] == "missing")
        path.extend((err.get("ctx") or {}).get("at", []))
        if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
            path.append(str((err.get("ctx") or {}).get("discriminator", "")).strip("'"))
        position = document.position(tuple(path))
        issues.append(
            ManifestIssue(file, position.line, position.column, field_path(path), _message(err))
        )
    return sorted(issues, key=lambda i: (i.line, i.column))


def _data_path(loc: Sequence[str | int], data: Any, *, missing: bool) -> list[str | int]:
    """The location in the document: pydantic's loc without union tags and validator names."""
    path: list[str | int] = []
    current = data
    for index, part in enumerate(loc):
        in_mapping = isinstance(current, dict) and part in current
        in_list = isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current)
        if in_mapping or in_list:
            current = current[part]
            path.append(part)
        elif missing and index == len(loc) - 1 and isinstance(current, dict):
            path.append(part)  # a missing field: name it, point at its parent
        # otherwise a union tag such as 'qido-rs' or 'function-after[...]': not in the data
    return path


def _message(err: Any) -> str:
    kind, message = err["type"], err["msg"]
    if kind == "missing":
        return "required field is missing"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx") or {}
        name = str(ctx.get("discriminator", "tag")).strip("'")
        return f"unknown {name} {ctx.get('tag')!r}: expected one of {ctx.get('expected_tags')}"
    if kind == "union_tag_not_found":
        return "required field is missing"
    return str(message).removeprefix("Value error, ")


def _missing_environment(manifest: Manifest, document: YamlDocument, file: str):  # type: ignore[no-untyped-def]
    s3 = manifest.storage.s3  # issue 19: the bucket's key pair
    for field_name in ("access_key_env", "secret_key_env"):
        variable = getattr(s3, field_name, None) if manifest.object_root else None
        if variable and variable not in os.environ:
            where: Path_ = ("storage", "s3", field_name)
            position = document.position(where)
            yield ManifestIssue(
                file,
                position.line,
                position.column,
                field_path(where),
                f"environment variable {variable} is not set",
            )
    for role in ("search", "download"):
        backend = getattr(manifest.source, role)
        if not isinstance(backend, HttpBackend):
            continue
        auth = backend.auth
        if not isinstance(auth, (BasicAuth, BearerAuth)) and auth.type != "oauth2":
            continue
        for field_name in (
            "username_env",
            "password_env",
            "token_env",
            "client_id_env",
            "client_secret_env",
        ):
            variable = getattr(auth, field_name, None)
            if variable and variable not in os.environ:
                path: Path_ = ("source", role, "auth", field_name)
                position = document.position(path)
                yield ManifestIssue(
                    file,
                    position.line,
                    position.column,
                    field_path(path),
                    f"environment variable {variable} is not set",
                )


def manifest_warnings(path: str | os.PathLike[str], manifest: Manifest) -> list[ManifestIssue]:
    """Things that are valid but will likely go wrong, with their position (issue 13).

    A layout without `{SOPInstanceUID}` cannot tell two instances apart (`{InstanceNumber}`
    repeats, a series folder holds many files), so the run would stop at the second file
    that maps to the same path, after files were written.
    """
    layout = manifest.storage.layout
    if "SOPInstanceUID" in LayoutTemplate(layout).keywords:
        return []
    try:
        document = parse_yaml(Path(path).read_text(encoding="utf-8"))
        position = document.position(("storage", "layout"))
    except (OSError, UnicodeDecodeError, YamlProblem):
        position = Position(1, 1)
    message = (
        f"warning: layout {layout!r} cannot tell instances apart (two instances would get "
        "the same path); include {SOPInstanceUID} in the file name"
    )
    return [ManifestIssue(str(path), position.line, position.column, "storage.layout", message)]
