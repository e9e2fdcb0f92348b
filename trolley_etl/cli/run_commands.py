"""`plan`, `run` and `status`: commands that execute a manifest or read its checkpoint.

The runner (and with it pydicom, requests, structlog, tqdm) is imported by the commands that
run something, not here: `status` reads a manifest and a checkpoint and needs none of it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from trolley_etl.cli import exit_codes
from trolley_etl.core.constants import CHECKPOINT_NAME, STATE_DIR
from trolley_etl.core.errors import (
    AuthenticationError,
    ConnectionFailedError,
    DiskFullError,
    ManifestError,
    OutsideWindowError,
    TrolleyError,
)

# Building the parser (`--help`, a usage error) loads none of the manifest models, the
# checkpoint or the runner: each command imports what it uses.
if TYPE_CHECKING:
    from trolley_etl.manifest import Manifest
    from trolley_etl.runner.logs import RunLog
    from trolley_etl.runner.run import Runner, RunOptions, RunResult

#: What `run` and `plan` use, loaded before they start (see `cli.startup`).
RUN_MODULES = (
    "trolley_etl.manifest",
    "trolley_etl.runner.run",
    "trolley_etl.reports.render",
    "trolley_etl.reports.summary",
)
#: What `status` uses.
STATUS_MODULES = ("trolley_etl.manifest", "trolley_etl.reports.status")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifest", type=Path, metavar="MANIFEST")
    parser.add_argument("--root", type=_local_folder, help="storage root (overrides storage.root)")
    parser.add_argument(
        "--state-dir", type=Path, help="checkpoint folder of an s3:// root (run.state_dir)"
    )
    parser.add_argument(
        "--log-format",
        choices=("json", "console"),
        help="stderr log format (default: console on a terminal, json otherwise)",
    )
    parser.add_argument("--log-file", type=Path, help="also write JSON logs to this file")
    parser.add_argument(
        "--quiet", "-q", action="store_true", help="only errors and the closing summary on stderr"
    )


def _local_folder(value: str) -> Path:
    """`--root` is a local folder; an object-storage root belongs in the manifest (issue 19)."""
    if "://" in value:
        raise argparse.ArgumentTypeError(
            f"{value}: --root takes a local folder; put an s3:// root in storage.root"
        )
    return Path(value)


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    plan = subparsers.add_parser("plan", help="run the search step and print what would be pulled")
    _common(plan)
    plan.add_argument(
        "--format",
        choices=("table", "json", "csv", "text"),
        default="table",
        help="table (or text) for people, json or csv for scripts",
    )
    plan.add_argument("--workers", type=int, help="parallel searches (default: run.workers)")
    plan.set_defaults(handler=run_plan, preload=RUN_MODULES)

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
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="no redrawn bar: a plain progress line now and then",
    )
    run.add_argument(
        "--ignore-window", action="store_true", help="contact the archive even outside run.window"
    )
    run.add_argument(
        "--no-wait",
        action="store_true",
        help=f"outside run.window (or when it closes), exit "
        f"{exit_codes.BACKEND_UNAVAILABLE} instead of waiting",
    )
    run.add_argument(
        "--executor", choices=("threads", "dask"), help="where units run (overrides run.executor)"
    )
    run.add_argument(
        "--scheduler",
        metavar="tcp://HOST:PORT",
        help="Dask scheduler (overrides run.scheduler; implies --executor dask)",
    )
    run.set_defaults(handler=run_run, preload=RUN_MODULES)

    status = subparsers.add_parser("status", help="what the checkpoint says; no archive contact")
    _common(status)
    status.add_argument("--format", choices=("text", "json"), default="text")
    status.set_defaults(handler=run_status, preload=STATUS_MODULES)


def _load(args: argparse.Namespace) -> Manifest:
    from trolley_etl.manifest import load_manifest

    return load_manifest(args.manifest)


def state_dir(root: Path) -> Path:
    """The folder under a storage root that trolley-etl owns (`runner.checkpoint.state_dir`)."""
    return root / STATE_DIR


def _root(args: argparse.Namespace, manifest: Manifest) -> Path:
    state = getattr(args, "state_dir", None)  # issue 19: an s3:// root's local folder
    if args.root is None and state is not None and manifest.object_root is not None:
        return Path(state).absolute()
    return (args.root or manifest.storage_root).absolute()


def _log(args: argparse.Namespace, root: Path | None, run_id: str | None = None) -> RunLog:
    from trolley_etl.runner.logs import RunLog

    log_file = state_dir(root) / "logs" / f"{run_id}.jsonl" if root and run_id else None
    return RunLog(
        log_file=log_file, stderr_format=args.log_format, quiet=args.quiet, extra_file=args.log_file
    )


def _backend_exit(error: TrolleyError) -> int:
    if isinstance(error, (ConnectionFailedError, AuthenticationError, OutsideWindowError)):
        return exit_codes.BACKEND_UNAVAILABLE
    if isinstance(error, DiskFullError):  # issue 13: the run stopped, incomplete
        return exit_codes.ITEMS_FAILED
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
        progress=sys.stderr.isatty() and not getattr(args, "no_progress", False),
        progress_lines=sys.stderr.isatty() and getattr(args, "no_progress", False),
        ignore_window=getattr(args, "ignore_window", False),
        no_wait=getattr(args, "no_wait", False),
        state_dir=getattr(args, "state_dir", None),
        executor=getattr(args, "executor", None),
        scheduler=getattr(args, "scheduler", None),
    )


def _print_plan(runner: Runner, style: str) -> None:
    from trolley_etl.reports.plan import average_instance_size, plan_row, render_plan
    from trolley_etl.runner.checkpoint import open_checkpoint

    counts = None  # an earlier pull into the root tells the average size of an instance
    if (state_dir(runner.root) / CHECKPOINT_NAME).exists():
        checkpoint = open_checkpoint(runner.root)
        try:
            counts = checkpoint.counts()
        finally:
            checkpoint.close()
    average = average_instance_size(counts)
    expected: dict[str, int | None] = {}  # what the plan's units say each study holds
    for ref, expectation in runner.planned.expectations.items():
        so_far = expected.get(ref.study_uid, 0)
        count = expectation.count
        expected[ref.study_uid] = None if so_far is None or count is None else so_far + count
    rows = []
    for found in runner.found:
        row = plan_row(found.query_set, found.study, average)
        if expected.get(found.study.uid) is not None:
            row["instances"] = expected[found.study.uid]
            if average:
                row["estimated_bytes"] = round(row["instances"] * average)
        rows.append(row)
    text = render_plan(rows, len(runner.references), style)
    if style == "json":  # the funnel of each query set before anything is downloaded
        data = json.loads(text)
        data["cohort"] = {name: account.to_json() for name, account in runner.cohort.items()}
        text = json.dumps(data, indent=2) + "\n"
    sys.stdout.write(text)


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
    from trolley_etl.core.errors import ManifestChangedError, RootBusyError
    from trolley_etl.runner.run import Runner, new_run_id

    started = time.monotonic()
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
    if result.status not in ("complete", "interrupted"):
        for failure in result.failed:
            print(f"failed: {json.dumps(failure)}", file=sys.stderr)
        for short in result.incomplete:
            print(f"incomplete: {json.dumps(short)}", file=sys.stderr)
        for row in result.unmatched:
            print(f"unmatched: {json.dumps(row)}", file=sys.stderr)
    _closing_summary(args, root, result, time.monotonic() - started, people=log.style != "json")
    if result.status == "interrupted":
        return exit_codes.INTERRUPTED
    if result.status != "complete":
        return exit_codes.ITEMS_FAILED
    return exit_codes.OK


def _closing_summary(
    args: argparse.Namespace, root: Path, result: RunResult, seconds: float, *, people: bool
) -> None:
    """What happened, for people (also with --quiet; not among JSON log lines, where the
    `run.end` event says it); the Markdown summary for a CI page."""
    from trolley_etl.reports.render import append_job_summary
    from trolley_etl.reports.summary import load_report, run_summary

    log_path = state_dir(root) / "logs" / f"{result.run_id}.jsonl"
    if people:
        sys.stderr.write(
            run_summary(
                args.manifest,
                root,
                result.status,
                result.counts,
                seconds,
                result.report_path,
                log_path,
            )
        )
    if not os.environ.get("GITHUB_STEP_SUMMARY"):
        return  # no CI job page to append to: the report just written is not read back
    report = load_report(result.report_path)
    if report is not None:
        append_job_summary(report)


def manifest_with_checkpoint(
    args: argparse.Namespace, *, check_env: bool = False
) -> tuple[Manifest, Path] | int:
    """The manifest and its storage root, for commands that read an existing checkpoint.

    Returns the exit code instead (after saying why) when the manifest is invalid or nothing
    has run yet.
    """
    from trolley_etl.manifest import load_manifest

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
    """What the checkpoint says; exits 0 only when the cohort is complete on disk."""
    loaded = manifest_with_checkpoint(args)
    if isinstance(loaded, int):
        return loaded
    manifest, root = loaded
    from trolley_etl.reports.status import build_status, render_status
    from trolley_etl.runner.checkpoint import FAILED, INCOMPLETE, TODO_STATES, open_checkpoint
    from trolley_etl.runner.cohort import allowed_unmatched, cohort_report, refused_unmatched
    from trolley_etl.runner.window import waiting_state

    # read-only where the root is (issue 13); where writable, runs whose process died are
    # marked aborted on the way
    checkpoint = open_checkpoint(root, read_only=True)
    try:
        status = build_status(manifest.name, root, checkpoint)
        failed = checkpoint.items([FAILED])
        incomplete = checkpoint.items([INCOMPLETE])
        cohort = cohort_report(checkpoint, allowed_unmatched(manifest.queries))
        unmatched = refused_unmatched(checkpoint, allowed_unmatched(manifest.queries))
    finally:
        checkpoint.close()
    counts = status["counts"]
    planned = sum(counts[state] for state in (*TODO_STATES, "done"))
    waiting = waiting_state(state_dir(root))  # a run waiting for its time window
    status.update(
        {
            "waiting_for_window": waiting,
            "failed": [
                {"reference": str(i.reference), "attempts": i.attempts, "error": i.last_error}
                for i in failed
            ],
            "incomplete": [
                {
                    "reference": str(i.reference),
                    "state": i.state,
                    "expected_instances": i.expected.count,
                    "stored_instances": i.stored_instances,
                    "missing_uids": list(i.missing_uids),
                }
                for i in incomplete
            ],
            "unmatched": unmatched,
            "cohort": cohort,
            "empty": planned == 0,
        }
    )
    if args.format == "json":
        print(json.dumps(status, indent=2))
    else:
        sys.stdout.write(render_status(status))
        if waiting:
            print(
                f"run {waiting['run_id']} is waiting for its time window until {waiting['until']}"
            )
        for item in incomplete[:20]:
            missing = ", ".join(item.missing_uids[:5]) or "not named"
            print(
                f"  incomplete {item.reference}: expected {item.expected.count}, stored "
                f"{item.stored_instances}; missing {missing}"
            )
        for row in unmatched[:20]:
            print(f"  unmatched {row['query_set']} row {row['row']}: {row['value']}")
        if planned == 0:
            print(f"  {root} holds nothing: no unit was planned (nothing resolved yet)")
    todo = any(counts[state] for state in TODO_STATES)
    return exit_codes.ITEMS_FAILED if todo or unmatched or planned == 0 else exit_codes.OK
