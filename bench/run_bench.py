"""Throughput, memory and resume cost of trolley-etl, side by side with the wire and peer tools.

``make bench`` runs this: for each group of rows (``--only`` picks some: ``main``, the 1 GB
rows here; ``small``, ``fixed`` and ``mid`` in ``small_runs.py``) it starts a private Orthanc
on loopback, seeds the group's synthetic cohort (reused from an earlier run when it is the same
cohort), then measures every configuration on the same data, each in its own process (see
``workloads.py``), and prints tables plus ratios and every target. Absolute figures depend on
the machine; only ratios from one run are meant to be compared. Results go to
``bench/results/`` as JSON (ignored by git).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    BENCH_DIR,
    DICOMTROLLEY_ROW,
    DURABLE_LIMIT,
    MAIN_ROW,
    RESULTS_DIR,
    WIRE_LIMIT,
    Bench,
    Measure,
    all_targets,
    ratios_table,
    rows_table,
    run_workload,
    targets_table,
)
from small_runs import FixedCost, MidCohort, SmallObjects

from trolley_etl import __version__
from trolley_etl._harness.dicomgen import test_uid
from trolley_etl._harness.orthanc import OrthancServer

DEFAULT_PEERS_PYTHON = BENCH_DIR / ".peers-venv" / "bin" / "python"
STATUS_ITEMS = 100_000


def runner_supports_cget() -> bool:
    """Whether ``trolley-etl run`` accepts a dicom-qr + c-get manifest in this version."""
    from trolley_etl.manifest import models

    return hasattr(models, "CGetDownload") and hasattr(models, "DicomQrSearch")


class MainBench(Bench):
    """The 1 GB rows: wire, durable and disk references, trolley-etl with WADO-RS at 1, 2 and
    4 workers, WADO-URI and C-GET, the peer tools, a rerun and ``status`` on 100,000 items."""

    key = "main"
    title = "1 GB cohort"

    def archive_dir(self) -> Path:
        return Path(self.args.archive_dir) if self.args.archive_dir else super().archive_dir()

    def targets(self, rows: list[dict[str, Any]], ratios: dict[str, float]) -> dict[str, Any]:
        return targets(rows, ratios)

    def measure_all(self, server: OrthancServer) -> None:
        me = sys.executable
        self.repeat_together([self.wire_job(WIRE_LIMIT, "wire")])
        # Not a target, a profile aid: what making the bytes durable costs on this disk.
        fsync = self.wire_job("wire + fsync of each body (4 threads)", "reference", fsync=True)
        self.repeat_together([fsync])
        # The durable limit (issue 17): the bytes received and written, then one sync.
        self.repeat_together([self.wire_job(DURABLE_LIMIT, "reference", sync_at_end=True)])
        # Also a profile aid: what making each file durable costs on this disk, no network.
        disk = "disk: the same files written and fsynced one by one (4 threads)"
        self.repeat_together([self.disk_job(disk)])

        downloads = ["wado-rs", "wado-uri"] + (["c-get"] if runner_supports_cget() else [])
        manifests = {download: self.write_manifest(server, download) for download in downloads}

        for workers in (1, 2, 4):
            name = f"trolley-etl WADO-RS, {workers} worker(s)"
            self.repeat_together([self.run_job(name, manifests["wado-rs"], workers)])
        name = "trolley-etl WADO-URI, 4 workers"
        self.repeat_together([self.run_job(name, manifests["wado-uri"], 4)])
        if "c-get" in manifests:
            name = "trolley-etl C-GET, 4 workers"
            self.repeat_together([self.run_job(name, manifests["c-get"], 4)])
        else:  # a version whose runner cannot drive C-GET yet: the same Trolley, by API
            self.repeat(
                Measure(
                    "trolley-etl C-GET, 4 workers (Python API)",
                    "trolley-etl",
                    note="C-FIND + C-GET through Trolley(DicomQR, CGet).download",
                ),
                me,
                "trolley-cget",
                {
                    "host": "127.0.0.1",
                    "port": server.dicom_port,
                    "aet": server.aet,
                    "study_uids": self.cohort.study_uids,
                    "workers": 4,
                    "out": str(self.out("c-get")),
                },
            )

        for kind, label in (
            ("dicomtrolley", DICOMTROLLEY_ROW),
            ("dicomweb-client", "dicomweb-client (retrieve_study), 4 threads"),
        ):
            peer = self.peer_job(label, kind)
            if peer:
                self.repeat_together([peer])

        self._measure_resume(manifests["wado-rs"])

    def _measure_resume(self, manifest: Path) -> None:
        """Rerun of a finished manifest, and ``status`` on a 100,000-item checkpoint."""
        me = sys.executable
        self.measure_rerun("trolley-etl rerun of the finished manifest", manifest)

        big = self.out("status-100k")
        fill_checkpoint(big, STATUS_ITEMS)
        status = Measure(f"trolley-etl status, {STATUS_ITEMS:,} items", "resume")
        argv = ["status", str(manifest), "--root", str(big), "--quiet"]
        for _ in range(self.args.runs):
            status.samples.append(run_workload(me, "trolley-cli", {"argv": argv}, self.log))
        self.measures.append(status)
        shutil.rmtree(big, ignore_errors=True)
        print(f"  {status.name}: {status.median('wall_s'):.2f} s (median)", flush=True)


def targets(rows: list[dict[str, Any]], ratios: dict[str, float]) -> dict[str, Any]:
    """The goals of the benchmark issue, each with the measured figure and whether it is met."""
    by_name = {r["name"]: r for r in rows}
    found: dict[str, Any] = {}
    durable = ratios.get(f"trolley-etl WADO-RS 4 workers / {DURABLE_LIMIT}")
    if durable is not None:
        found["WADO-RS 4 workers >= 0.8 x durable limit"] = [durable, durable >= 0.8]
    for key, value in ratios.items():
        if key.endswith("dicomtrolley (QIDO-RS + WADO-RS Trolley), 4 threads"):
            found["WADO-RS 4 workers >= 3 x dicomtrolley"] = [value, value >= 3]
    main = by_name.get(MAIN_ROW)
    for row in rows:
        if main and row["name"].startswith(("trolley-etl WADO-URI", "trolley-etl C-GET")):
            speed = round(main["wall_s"] / row["wall_s"], 3)
            found[f"{row['name']} >= 0.5 x WADO-RS"] = [speed, speed >= 0.5]
    rerun = by_name.get("trolley-etl rerun of the finished manifest")
    if rerun:
        found["rerun < 1 s"] = [rerun["wall_s"], rerun["wall_s"] < 1]
    status = by_name.get(f"trolley-etl status, {STATUS_ITEMS:,} items")
    if status:
        found["status on 100,000 items < 0.5 s"] = [status["wall_s"], status["wall_s"] < 0.5]
    return found


def fill_checkpoint(root: Path, items: int) -> None:
    """A checkpoint with ``items`` done instance items and one file each, for ``status``."""
    from trolley_etl.core.model import InstanceReference
    from trolley_etl.core.storage import StoredInstance
    from trolley_etl.runner.checkpoint import StudyRow
    from trolley_etl.runner.run import open_checkpoint

    checkpoint = open_checkpoint(root)
    try:
        study, series = test_uid("status-study"), test_uid("status-series")
        refs = [InstanceReference(study, series, test_uid("status", n)) for n in range(items)]
        checkpoint.save_resolution("bench", [StudyRow(study, "cohort")], refs)
        checkpoint.start_run("bench-fill", "bench")
        items = checkpoint.items()
        batches = []
        for item in items:
            uid = getattr(item.reference, "instance_uid", "")
            path = Path(study, series, f"{uid}.dcm")
            stored = StoredInstance(
                path=root / path,
                relative_path=path,
                study_uid=study,
                series_uid=series,
                sop_instance_uid=uid,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax="1.2.840.10008.1.2.1",
                size=525_000,
                sha256="0" * 64,
            )
            batches.append((item.item_id, [stored]))
        # one transaction each for the whole fill: this is set-up, not what is measured
        checkpoint.record_files_of_items(batches, "bench")
        checkpoint._db.execute("BEGIN")
        for item in items:
            checkpoint.mark_done(item.item_id)
        checkpoint._db.execute("COMMIT")
        checkpoint.finish_run("bench-fill", "complete", checkpoint.counts())
    finally:
        checkpoint.close()


# --- the whole run ----------------------------------------------------------------------------

#: Every group ``make bench`` measures, in order; ``--only`` picks some by these names.
GROUPS: dict[str, type[Bench]] = {
    group.key: group for group in (MainBench, SmallObjects, FixedCost, MidCohort)
}


def collect_results(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The results file: the 1 GB group's rows at the top (as before there were groups), every
    other group under ``groups``, and every group's targets together in ``targets``."""
    found: dict[str, Any] = {
        "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "trolley_etl_version": __version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    main = sections.get(MainBench.key)
    if main:
        found.update(cohort=main["cohort"], rows=main["rows"], ratios=main["ratios"])
    found["groups"] = {key: section for key, section in sections.items() if key != MainBench.key}
    found["targets"] = all_targets(sections)
    return found


def table(results: dict[str, Any]) -> str:
    """The results as Markdown tables: each group's rows and ratios, then every target."""
    lines: list[str] = []
    if "rows" in results:
        lines += rows_table(results["rows"]) + ratios_table(results["ratios"]) + [""]
    for section in results["groups"].values():
        cohort = section["cohort"]
        lines += [
            f"{section['title']} (cohort {cohort['shape']}: {cohort['instances']} instances, "
            f"{cohort['bytes'] / 1e6:.0f} MB)",
            "",
        ]
        lines += rows_table(section["rows"]) + ratios_table(section["ratios"])
        figures = section.get("figures", {})
        lines += ["", *(f"- {key}: {value}" for key, value in figures.items()), ""]
    return "\n".join(lines + targets_table(results["targets"]))


def groups_argument(text: str) -> list[str]:
    """``--only small,fixed``: known group names, comma-separated, none twice."""
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in GROUPS]
    if unknown or not chosen or len(set(chosen)) != len(chosen):
        raise argparse.ArgumentTypeError(
            f"expected group names from {', '.join(GROUPS)}, comma-separated, each once"
        )
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="cohort size factor (1.0: 20 studies x 4 series x 25 instances "
        "of 512x512x16 bit, about 1 GB; 0.1: about 100 MB); the small-object and 40 MB "
        "cohorts scale alike",
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=3,
        help="runs per configuration (median; the fixed-cost rows take at least 5)",
    )
    parser.add_argument(
        "--only",
        type=groups_argument,
        default=list(GROUPS),
        metavar="GROUP,...",
        help=f"measure only these groups, in this order (default: all of {','.join(GROUPS)})",
    )
    parser.add_argument(
        "--peers-python",
        default=str(DEFAULT_PEERS_PYTHON),
        help="interpreter of the virtual environment with the peer tools",
    )
    parser.add_argument(
        "--archive-dir",
        help="Orthanc data folder of the 1 GB cohort (default, and for the other groups: "
        "a temp folder named after the cohort, reused between runs)",
    )
    parser.add_argument("--fresh", action="store_true", help="seed the archive again")
    parser.add_argument(
        "--keep-output",
        action="store_true",
        help="keep the last output of each configuration (for inspection)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="JSON results file (default: bench/results/bench-TIMESTAMP.json and latest.json)",
    )
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="trolley-etl-bench-"))  # manifests and workload logs
    sections = {key: GROUPS[key](args, work).run() for key in args.only}  # kept if one fails
    if args.keep_output:
        print(f"\noutputs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    results = collect_results(sections)
    text = table(results)
    print("\n" + text)
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    outputs = (
        [args.output]
        if args.output
        else [RESULTS_DIR / f"bench-{stamp}.json", RESULTS_DIR / "latest.json"]
    )
    for path in outputs:
        path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults: {', '.join(str(p) for p in outputs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
