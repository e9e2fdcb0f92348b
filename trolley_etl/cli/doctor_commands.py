"""`doctor`: check every backend of a manifest as an archive administrator would.

Prints one line per check (with a fix hint when it fails) and exits 0 when all pass, 3 when
an archive cannot be reached or refuses, 2 for an invalid manifest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import cast

from trolley_etl.cli import exit_codes
from trolley_etl.core.errors import ManifestError


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    doctor = subparsers.add_parser(
        "doctor", help="check each backend of a manifest: network, TLS, AE titles, credentials"
    )
    doctor.add_argument("manifest", type=Path, metavar="MANIFEST")
    doctor.set_defaults(handler=run_doctor, preload=("trolley_etl.runner.doctor",))


def run_doctor(args: argparse.Namespace) -> int:
    from trolley_etl.core.errors import TrolleyError
    from trolley_etl.manifest import load_manifest
    from trolley_etl.runner.backends import build_backends
    from trolley_etl.runner.doctor import Doctor, exit_status

    try:
        manifest = load_manifest(args.manifest)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return exit_codes.USAGE
    try:
        searcher, downloader = build_backends(manifest)
    except (TrolleyError, ValueError) as exc:
        print(f"trolley-etl: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    checks = []
    try:
        for check in Doctor(manifest, searcher, downloader).checks():
            print(check.line(), flush=True)
            checks.append(check)
    finally:
        searcher.close()
        if downloader is not cast(object, searcher):  # a local folder is both
            downloader.close()
    if exit_status(checks):
        print(f"{manifest.name}: every check passed")
        return exit_codes.OK
    failed = sum(1 for c in checks if c.status == "FAIL")
    print(f"{manifest.name}: {failed} check(s) failed", file=sys.stderr)
    return exit_codes.BACKEND_UNAVAILABLE
