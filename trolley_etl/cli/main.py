"""Argument parsing and dispatch; every command returns one of the documented exit codes."""

from __future__ import annotations

import argparse
import json
import os
import sys

from trolley_etl import __version__
from trolley_etl.cli import (
    audit_commands,
    doctor_commands,
    exit_codes,
    failures,
    manifest_commands,
    metadata_commands,
    run_commands,
    startup,
)
from trolley_etl.core.errors import TrolleyError
from trolley_etl.core.privacy import private_umask


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trolley-etl",
        description="Pull DICOM studies out of image archives, driven by YAML manifests.",
    )
    parser.add_argument("--version", action="version", version=f"trolley-etl {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    manifest_commands.add_commands(subparsers)
    run_commands.add_commands(subparsers)
    audit_commands.add_commands(subparsers)
    metadata_commands.add_commands(subparsers)
    doctor_commands.add_commands(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line; `argv` None (the console script, `python -m trolley_etl`) means this
    process is the command, which also tunes the collector for it (see `cli.startup`)."""
    collecting = startup.pause() if argv is None else None
    failures.quiet_libraries()
    umask = private_umask()  # what this process creates is owner-only (issue 13)
    try:
        return _main(argv, collecting)
    except BrokenPipeError:  # the reader of stdout went away (`verify | head`)
        failures.silence_stdout()
        return failures.BROKEN_PIPE
    finally:
        os.umask(umask)  # for callers of main() in the same process
        if collecting is not None:
            startup.exiting(resume=collecting)


def _main(argv: list[str] | None, collecting: bool | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse exits 2 on usage errors, 0 on --help
        return int(exit_.code or 0)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return exit_codes.USAGE
    if collecting is not None:  # the modules this command uses, loaded before it starts
        startup.loaded(getattr(args, "preload", ()), resume=collecting)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return exit_codes.INTERRUPTED
    except TrolleyError as exc:
        print(f"trolley-etl: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    except BrokenPipeError:
        raise
    except Exception as exc:  # ordinary failures (disk full, read-only root, ...): one line
        described = failures.describe(exc)
        if described is None or failures.debugging():
            raise
        message, code = described
        if getattr(args, "log_format", None) == "json":  # stderr holds only JSON lines then
            print(
                json.dumps({"level": "error", "event": "command.failed", "error": message}),
                file=sys.stderr,
            )
        else:
            print(f"trolley-etl: {message}", file=sys.stderr)
        return code
