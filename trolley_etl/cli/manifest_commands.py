"""`validate` and `schema`: commands that only read manifests and models."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from trolley_etl.cli import exit_codes
from trolley_etl.core.errors import ManifestError


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    validate = subparsers.add_parser(
        "validate", help="check manifests; print FILE:LINE:COL: field: problem for each error"
    )
    validate.add_argument("manifests", nargs="+", metavar="MANIFEST")
    validate.add_argument(
        "--no-env-check",
        action="store_true",
        help="do not require the environment variables the manifest names (e.g. in CI)",
    )
    validate.set_defaults(handler=run_validate, preload=("trolley_etl.manifest",))

    schema = subparsers.add_parser("schema", help="print the manifest JSON Schema")
    schema.add_argument("--output", "-o", type=Path, help="write it to this file instead")
    schema.set_defaults(handler=run_schema)


def run_validate(args: argparse.Namespace) -> int:
    from trolley_etl.manifest import load_manifest
    from trolley_etl.manifest.loader import manifest_warnings

    status = exit_codes.OK
    for path in args.manifests:
        try:
            manifest = load_manifest(path, check_env=not args.no_env_check)
        except ManifestError as exc:
            print(exc, file=sys.stderr)
            status = exit_codes.USAGE
            continue
        sets = len(manifest.queries)
        print(f"{path}: valid ({manifest.name}, {sets} query set{'s' if sets != 1 else ''})")
        for warning in manifest_warnings(path, manifest):  # issue 13: valid but risky
            print(warning, file=sys.stderr)
    return status


def run_schema(args: argparse.Namespace) -> int:
    from trolley_etl.manifest.schema import manifest_json_schema_text

    text = manifest_json_schema_text()
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return exit_codes.OK
