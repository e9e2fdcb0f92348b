"""`plan`, `run` and `status`: commands that execute a manifest or read its checkpoint.

The runner (and with it pydicom, requests, structlog, tqdm) is imported by the commands that
run something, not here: `status` reads a manifest and a checkpoint and needs none of it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from trolley_etl.cli import exit_codes
from trolley_etl.core.constants import CHECKPOINT_NAME
from trolley_etl.core.errors import AuthenticationError, ConnectionFailedError, TrolleyError
from trolley_etl.manifest import Manifest, ManifestError, load_manifest
from trolley_etl.runner.checkpoint import FAILED, PENDING, open_checkpoint, state_dir
from trolley_etl.runner.window import OutsideWindowError, waiting_state

if TYPE_CHECKING:
    from trolley_etl.runner.logs import RunLog
    from trolley_etl.runner.run import Runner, RunOptions


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path, metavar="MANIFEST")
    parser.add_argument("--root", type=Path, help="storage root (overrides storage.root)")
    parser.add_argument(
        "--log-format",
        choices=("json", "console"),
        help="stderr log format (default: console on a terminal, json otherwise)",
    )
    parser.add_argument("--log-file", type=Path, help="also write JSON logs to this file")
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="only warnings and errors on stderr, no progress bar")  # fmt: skip


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    plan = subparsers.add_parser("plan", help="run the search step and print what would be pulled")
    _common(plan)
    plan.add_argument("--format", choices=("text", "json"), default="text")
    plan.add_argument("--workers", type=int, help="parallel searches (default: run.workers)")
    plan.set_defaults(handler=run_plan)

    run = subparsers.add_parser("run", help="execute the manifest; resumes from its checkpoint")
    _common(run)
    run.add_argument("--workers", type=int, help="parallel downloads (overrides run.workers)")
    run.add_argument(
        "--refresh",
        action="store_true",
        help="search again and re-resolve the checkpoint (after a manifest change); "
        "rewrites MANIFEST.lock.json when there is one",
    )
    run.add_argument(
        "--dry-run", action="store_true", help="search and plan; print it; download nothing"
    )
    run.add_argument("--ignore-window", action="store_true",
                     help="contact the archive even outside run.window")  # fmt: skip
    run.add_argument("--no-wait", action="store_true",
                     help=f"outside run.window (or when it closes), exit "
                     f"{exit_codes.BACKEND_UNAVAILABLE} instead of waiting")  # fmt: skip
    run.set_defaults(handler=run_run)

    status = subparsers.add_parser("status", help="what the checkpoint says; no archive contact")
    _common(status)
    status.add_argument("--format", choices=("text", "json"), default="text")
    status.set_defaults(handler=run_status)


def _load(args: argparse.Namespace) -> Manifest:
    return load_manifest(args.manifest)


def _root(args: argparse.Namespace, manifest: Manifest) -> Path:
    return (args.root or manifest.storage_root).absolute()


def _log(args: argparse.Namespace, root: Path | None, run_id: str | None = None) -> RunLog:
    from trolley_etl.runner.logs import RunLog

    log_file = state_dir(root) / "logs" / f"{run_id}.jsonl" if root and run_id else None
    return RunLog(log_file=log_file, stderr_format=args.log_format, quiet=args.quiet,
                  extra_file=args.log_file)  # fmt: skip


def _backend_exit(error: TrolleyError) -> int:
    if isinstance(error, (ConnectionFailedError, AuthenticationError, OutsideWindowError)):
        return exit_codes.BACKEND_UNAVAILABLE
    return exit_codes.USAGE


def _interrupt_on_sigterm() -> None:
    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, raise_interrupt)


def run_plan(args: argparse.Namespace) -> int:
    from trolley_etl.runner.run import Runner

    try:
        manifest = _load(args)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return exit_codes.USAGE
    log = _log(args, None)
    runner = Runner(manifest, args.manifest, log, _options(args))
    try:
        runner.plan_only()
    except TrolleyError as exc:
        log.logger.error("plan.failed", error_type=type(exc).__name__, error=str(exc))
        return _backend_exit(exc)
    finally:
        log.close()
    _print_plan(runner, args.format)
    return exit_codes.OK


def _options(args: argparse.Namespace) -> RunOptions:
    from trolley_etl.runner.run import RunOptions

    return RunOptions(
        root=args.root,
        workers=getattr(args, "workers", None),
        refresh=getattr(args, "refresh", False),
        dry_run=getattr(args, "dry_run", False),
        quiet=args.quiet,
        progress=sys.stderr.isatty(),
        ignore_window=getattr(args, "ignore_window", False),
        no_wait=getattr(args, "no_wait", False),
    )


def _print_plan(runner: Runner, style: str) -> None:
    rows = []
    for found in runner.found:
        study = found.study
        rows.append({
            "query_set": found.query_set,
            "study_uid": study.uid,
            "accession_number": str(study.data.get("AccessionNumber", "")),
            "patient_id": str(study.data.get("PatientID", "")),
            "study_date": str(study.data.get("StudyDate", "")),
            "series": len(study.series) if study.series is not None else None,
            "instances": len(study.all_instances()) if study.series else None,
        })  # fmt: skip
    if style == "json":
        print(json.dumps({"studies": rows, "items": len(runner.references)}, indent=2))
        return
    for row in rows:
        known = "".join(f"  {row[k]} {k}" for k in ("series", "instances") if row[k] is not None)
        print(f"{row['query_set']:<16} {row['study_date']:<8} {row['accession_number']:<16} "
              f"{row['study_uid']}{known}")  # fmt: skip
    print(f"{len(rows)} studies, {len(runner.references)} retrieval items")


def run_run(args: argparse.Namespace) -> int:
    try:
        manifest = _load(args)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return exit_codes.USAGE
    if args.workers is not None and args.workers < 1:
        print("trolley-etl: --workers must be at least 1", file=sys.stderr)
        return exit_codes.USAGE
    root = _root(args, manifest)
    options = _options(args)
    if args.dry_run:
        return run_plan(argparse.Namespace(**{**vars(args), "format": "text"}))
    return execute_run(args, manifest, root, options)


def execute_run(
    args: argparse.Namespace, manifest: Manifest, root: Path, options: RunOptions
) -> int:
    """Run (or repair) with its own log file; the documented exit code of the outcome.

    Items that failed are listed on stderr, one JSON object per line.
    """
    from trolley_etl.runner.run import ManifestChangedError, RootBusyError, Runner, new_run_id

    options.run_id = new_run_id()
    log = _log(args, root, options.run_id)
    runner = Runner(manifest, args.manifest, log, options)
    _interrupt_on_sigterm()
    event = options.purpose  # "run" or "repair"
    try:
        result = runner.run()
    except (ManifestChangedError, RootBusyError) as exc:
        log.logger.error(f"{event}.refused", error_type=type(exc).__name__, error=str(exc))
        return exit_codes.USAGE
    except KeyboardInterrupt:
        log.logger.warning(f"{event}.interrupted")
        return exit_codes.INTERRUPTED
    except TrolleyError as exc:
        log.logger.error(f"{event}.failed", error_type=type(exc).__name__, error=str(exc))
        return _backend_exit(exc)
    finally:
        log.close()
    if result.status == "interrupted":
        return exit_codes.INTERRUPTED
    if result.status != "complete":
        for failure in result.failed:
            print(f"failed: {json.dumps(failure)}", file=sys.stderr)
        return exit_codes.ITEMS_FAILED
    return exit_codes.OK


def manifest_with_checkpoint(
    args: argparse.Namespace, *, check_env: bool = False
) -> tuple[Manifest, Path] | int:
    """The manifest and its storage root, for commands that read an existing checkpoint.

    Returns the exit code instead (after saying why) when the manifest is invalid or nothing
    has run yet.
    """
    try:
        manifest = load_manifest(args.manifest, check_env=check_env)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return exit_codes.USAGE
    root = _root(args, manifest)
    if not (state_dir(root) / CHECKPOINT_NAME).exists():
        print(f"no checkpoint in {state_dir(root)}: nothing has run yet", file=sys.stderr)
        return exit_codes.USAGE
    return manifest, root


def run_status(args: argparse.Namespace) -> int:
    loaded = manifest_with_checkpoint(args)
    if isinstance(loaded, int):
        return loaded
    manifest, root = loaded
    checkpoint = open_checkpoint(root)
    try:
        counts = checkpoint.counts()
        runs = checkpoint.runs()
        failed = checkpoint.items([FAILED])
    finally:
        checkpoint.close()
    last = runs[-1] if runs else None
    waiting = waiting_state(state_dir(root))  # a run waiting for its time window
    if args.format == "json":
        print(json.dumps({
            "manifest": manifest.name, "root": str(root), "counts": counts, "last_run": last,
            "waiting_for_window": waiting,
            "failed": [{"reference": str(i.reference), "attempts": i.attempts,
                        "error": i.last_error} for i in failed],
        }, indent=2))  # fmt: skip
    else:
        print(f"{manifest.name}: {counts['done']} done, {counts[PENDING]} pending, "
              f"{counts[FAILED]} failed; {counts['files']} files, "
              f"{counts['bytes'] / 2**20:.1f} MiB in {root}")  # fmt: skip
        if last:
            print(f"last run {last['run_id']}: {last['status']}, started {last['started_at']}, "
                  f"finished {last['finished_at'] or '-'}")  # fmt: skip
        if waiting:
            print(f"run {waiting['run_id']} is waiting for its time window until "
                  f"{waiting['until']}")  # fmt: skip
        for item in failed[:20]:
            print(f"  failed {item.reference} after {item.attempts} attempt(s): {item.last_error}")
    return (
        exit_codes.OK if counts[FAILED] == 0 and counts[PENDING] == 0 else exit_codes.ITEMS_FAILED
    )
