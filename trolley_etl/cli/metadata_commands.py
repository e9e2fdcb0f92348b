"""`metadata`: the cohort's header values as a table, from the stored files."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from trolley_etl.cli import exit_codes
from trolley_etl.cli.run_commands import _common, manifest_with_checkpoint
from trolley_etl.core.errors import MetadataError, TrolleyError


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    meta = subparsers.add_parser(
        "metadata", help="the cohort's header values as a table, read from the stored files"
    )
    _common(meta)
    meta.add_argument("--level", choices=("instance", "series", "study"), default="instance")
    meta.add_argument("--fields", help="comma-separated DICOM keywords (default: per level)")
    meta.add_argument("--format", choices=("csv", "parquet"), default="csv")
    meta.add_argument("--output", "-o", type=Path, help="write it to this file, not stdout")
    meta.set_defaults(handler=run_metadata, preload=("trolley_etl.reports.metadata",))


def run_metadata(args: argparse.Namespace) -> int:
    from trolley_etl.reports import metadata
    from trolley_etl.runner.checkpoint import open_checkpoint

    loaded = manifest_with_checkpoint(args)
    if isinstance(loaded, int):
        return loaded
    manifest, root = loaded
    from trolley_etl.core.objectstore import object_store_of

    started = time.monotonic()
    try:
        fields = metadata.parse_fields(args.fields, args.level)
        names = metadata.columns(args.level, fields)
        checkpoint = open_checkpoint(root)
        try:
            files = metadata.stored_files(checkpoint)
            objects = object_store_of(manifest)  # issue 19: an s3:// root
            rows = metadata.iter_rows(root, files, args.level, fields, objects=objects)
            count = metadata.write_table(rows, names, args.format, args.output, sys.stdout)
        finally:
            checkpoint.close()
    except MetadataError as exc:
        print(f"trolley-etl: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    except TrolleyError as exc:  # issue 19: the bucket of an s3:// root
        from trolley_etl.cli.run_commands import _backend_exit

        print(f"trolley-etl: {exc}", file=sys.stderr)
        return _backend_exit(exc)
    if not args.quiet and args.output:
        print(
            f"wrote {count} {args.level} rows to {args.output} "
            f"in {time.monotonic() - started:.1f} s",
            file=sys.stderr,
        )
    return exit_codes.OK
