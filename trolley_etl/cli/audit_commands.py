"""`lock`, `report` and `verify`: reproducible extractions and the evidence that they were.

Exit codes follow the contract: 0 all good; 1 verify found missing, changed or unexpected
files (or a repair could not restore them); 2 usage error, invalid manifest, no checkpoint,
outdated lock or a busy root; 3 the archive could not be reached or refused the
credentials; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from trolley_etl.cli import exit_codes
from trolley_etl.cli.run_commands import (
    _backend_exit,
    _common,
    _log,
    _options,
    execute_run,
    manifest_with_checkpoint,
)
from trolley_etl.core.errors import LockFileError, ManifestError, TrolleyError

# The manifest models, the checkpoint, the runner, the report and verify are imported by the
# commands that use them, so that building the parser loads none of them.
if TYPE_CHECKING:
    from trolley_etl.core.objectstore import ObjectStore
    from trolley_etl.manifest import Manifest
    from trolley_etl.runner.run import RunOptions
    from trolley_etl.runner.verify import VerifyResult


def add_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    lock = subparsers.add_parser(
        "lock", help="resolve the queries to exact UIDs and write MANIFEST.lock.json beside it"
    )
    _common(lock)
    lock.add_argument("--workers", type=int, help="parallel searches (default: run.workers)")
    lock.set_defaults(handler=run_lock, preload=("trolley_etl.runner.run",))

    rep = subparsers.add_parser("report", help="the audit report of what was pulled")
    _common(rep)
    rep.add_argument("--format", choices=("json", "csv", "html", "md"), default="json")
    rep.add_argument("--output", "-o", type=Path, help="write it to this file, not stdout")
    rep.set_defaults(handler=run_report, preload=("trolley_etl.runner.report",))

    verify = subparsers.add_parser(
        "verify", help="re-read every stored file and compare it with its recorded checksum"
    )
    _common(verify)
    verify.add_argument("--format", choices=("text", "json"), default="text")
    verify.add_argument("--workers", type=int, help="files hashed (and items repaired) at once")
    verify.add_argument(
        "--repair", action="store_true", help="download missing and changed files again"
    )
    verify.set_defaults(handler=run_verify, preload=("trolley_etl.runner.verify",))


def _load_manifest(path: Path) -> Manifest:
    from trolley_etl.manifest import load_manifest

    return load_manifest(path)


# --- lock ----------------------------------------------------------------------------------


def run_lock(args: argparse.Namespace) -> int:
    from trolley_etl.core.errors import RootBusyError
    from trolley_etl.core.relative_dates import resolved_ranges
    from trolley_etl.runner import lockfile, resolve
    from trolley_etl.runner.run import Runner, root_lock

    try:
        manifest = _load_manifest(args.manifest)
    except ManifestError as exc:
        print(exc, file=sys.stderr)
        return exit_codes.USAGE
    path = lockfile.lock_path_for(args.manifest)
    try:
        previous = lockfile.read_lock(path) if path.exists() else None
    except LockFileError as exc:
        print(f"trolley-etl: {exc} (it will be replaced)", file=sys.stderr)
        previous = None
    log = _log(args, None)
    runner = Runner(manifest, args.manifest, log, _options(args))
    try:
        with root_lock(runner.root):  # issue 13: never beside a run of the same root
            runner.plan_only()
            lock = lockfile.Lock.from_resolution(
                manifest.name,
                resolve.resolution_hash(manifest),
                [(found.query_set, found.study.uid) for found in runner.found],
                runner.references,
                runner.planned.expectations,
            )
            lock.resolved_dates = resolved_ranges(manifest)  # what `{last: 7d}` meant today
            changed = lockfile.write_lock(path, lock)
    except RootBusyError as exc:
        log.logger.error("lock.refused", error_type=type(exc).__name__, error=str(exc))
        return exit_codes.USAGE
    except TrolleyError as exc:
        log.logger.error("lock.failed", error_type=type(exc).__name__, error=str(exc))
        return _backend_exit(exc)
    finally:
        log.close()
    totals = lock.to_json()["totals"]
    what = f"{totals['studies']} studies, {totals['items']} retrieval items"
    if previous is not None and previous.manifest_hash == lock.manifest_hash:
        drift = lockfile.diff(previous, lock.study_uids())
        counts = drift.counts()
        what += f"; {counts['added']} added, {counts['removed']} removed since the last lock"
    print(f"{'wrote' if changed else 'unchanged'} {path}: {what}")
    return exit_codes.OK


# --- report --------------------------------------------------------------------------------


def run_report(args: argparse.Namespace) -> int:
    from trolley_etl.runner import report
    from trolley_etl.runner.atomic import write_atomic

    loaded = manifest_with_checkpoint(args)
    if isinstance(loaded, int):
        return loaded
    manifest, root = loaded
    from trolley_etl.core.objectstore import object_store_of

    try:  # issue 19: an s3:// root's file status comes from one listing
        objects = object_store_of(manifest) if args.root is None else None
        sizes = dict(objects.list_objects()) if objects is not None else None
    except TrolleyError as exc:
        print(f"trolley-etl: {exc}", file=sys.stderr)
        return _backend_exit(exc)
    from trolley_etl.runner.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(root, read_only=True)  # works on a read-only root (issue 13)
    try:
        audit = report.build_report(checkpoint, manifest, args.manifest, root, sizes=sizes)
    finally:
        checkpoint.close()
    from trolley_etl.reports.render import append_job_summary, render

    text = render(audit, args.format)  # json, csv, html (one page), md (CI summary)
    append_job_summary(audit)
    try:
        saved: Path | str = report.save_report(root, text, report.report_name(args.format))
    except OSError as exc:  # a read-only root: the report is still printed
        saved = f"nowhere ({exc.strerror or exc})"
    if args.output:
        write_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    if not args.quiet:
        summary = audit["summary"]
        print(
            f"report saved to {saved}: {summary['instances']} instances in "
            f"{summary['studies']} studies, {summary['by_status']}",
            file=sys.stderr,
        )
    return exit_codes.OK


# --- verify --------------------------------------------------------------------------------


def run_verify(args: argparse.Namespace) -> int:
    from trolley_etl.core.errors import RootBusyError

    if args.workers is not None and args.workers < 1:
        print("trolley-etl: --workers must be at least 1", file=sys.stderr)
        return exit_codes.USAGE
    # a repair downloads, so then the credentials must be there
    loaded = manifest_with_checkpoint(args, check_env=args.repair)
    if isinstance(loaded, int):
        return loaded
    manifest, root = loaded
    workers = args.workers or manifest.run.workers
    from trolley_etl.core.objectstore import object_store_of

    try:
        objects = object_store_of(manifest) if args.root is None else None  # issue 19: s3://
        result, repaired_items = _verify_once(root, workers, repair=args.repair, objects=objects)
    except RootBusyError as exc:
        print(f"trolley-etl: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    except TrolleyError as exc:  # the bucket unreachable or the credentials refused
        print(f"trolley-etl: {exc}", file=sys.stderr)
        return _backend_exit(exc)
    if result.ok or not args.repair:
        _print_result(result, args.format, objects.url if objects else root)
        return exit_codes.OK if result.ok else exit_codes.ITEMS_FAILED
    shown = objects.url if objects else root
    _print_result(result, "text", shown, out=sys.stderr)  # what is about to be repaired
    if repaired_items:
        status = _repair_run(args, manifest, root)
        if status is not None:
            return status
    after, _ = _verify_once(root, workers, repair=False, objects=objects)
    replaced = _replaced_content(root, result)
    _print_result(after, args.format, objects.url if objects else root, replaced=replaced)
    return exit_codes.OK if after.ok and not replaced else exit_codes.ITEMS_FAILED


def _verify_once(
    root: Path, workers: int, *, repair: bool, objects: ObjectStore | None = None
) -> tuple[VerifyResult, set[int]]:
    """Verify (and prepare a repair) under the root lock, so no run writes meanwhile."""
    from trolley_etl.runner.checkpoint import open_checkpoint
    from trolley_etl.runner.readonly import reader_lock
    from trolley_etl.runner.run import root_lock
    from trolley_etl.runner.verify import prepare_repair, verify_root

    with root_lock(root) if repair else reader_lock(root):  # issue 13: read-only roots
        checkpoint = open_checkpoint(root, read_only=not repair)
        try:
            result = verify_root(root, checkpoint, workers, objects=objects)
            items = prepare_repair(root, checkpoint, result, objects=objects) if repair else set()
        finally:
            checkpoint.close()
    return result, items


def _repair_run(args: argparse.Namespace, manifest: Manifest, root: Path) -> int | None:
    """Download the items marked pending, as a resumed run; None when it completed."""
    options: RunOptions = _options(argparse.Namespace(**{**vars(args), "refresh": False}))
    options.purpose = "repair"
    code = execute_run(args, manifest, root, options)
    if code == exit_codes.OK:
        return None
    if code == exit_codes.ITEMS_FAILED:  # the forgotten files would not show in a new verify
        print(
            "trolley-etl: the repair could not download everything (see above); "
            "`trolley-etl status` lists it",
            file=sys.stderr,
        )
    return code


def _replaced_content(root: Path, before: VerifyResult) -> list[str]:
    """Repaired files whose bytes differ from the first download: the archive changed."""
    from trolley_etl.runner.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(root)
    try:
        now = {r.sop_instance_uid: r.sha256 for r in checkpoint.files()}
    finally:
        checkpoint.close()
    return sorted(
        p.path
        for p in before.problems
        if p.sop_instance_uid in now and now[p.sop_instance_uid] != p.expected_sha256
    )


def _print_result(
    result: VerifyResult,
    style: str,
    root: Path | str,
    *,
    replaced: list[str] | None = None,
    out: TextIO | None = None,
) -> None:
    stream = out or sys.stdout
    if style == "json":
        print(
            json.dumps(
                {"root": str(root), **result.to_json(), "replaced_content": replaced or []},
                indent=2,
            ),
            file=stream,
        )
        return
    for problem in result.problems:
        print(problem.describe(), file=stream)
    for path in replaced or []:
        print(
            f"replaced {path}: the archive now sends other bytes than the first download",
            file=stream,
        )
    counts = result.to_json()["counts"]
    print(
        f"{result.checked} files checked ({result.bytes / 2**20:.1f} MiB) in {root}: "
        f"{counts['missing']} missing, {counts['changed']} changed, "
        f"{counts['unexpected']} unexpected",
        file=stream,
    )
