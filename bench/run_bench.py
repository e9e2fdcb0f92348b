"""Throughput, memory and resume cost of trolley-etl, side by side with the wire and peer tools.

``make bench`` runs this: it starts a private Orthanc on loopback, seeds a synthetic cohort
(reused from an earlier run when it is the same cohort), then measures every configuration
on the same data in the same run, each in its own process (see ``workloads.py``), and prints
a table plus ratios. Absolute figures depend on the machine; only ratios from one run are
meant to be compared. Results go to ``bench/results/`` as JSON.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trolley_etl import __version__
from trolley_etl._harness.dicomgen import make_instance, test_uid
from trolley_etl._harness.orthanc import OrthancServer

BENCH_DIR = Path(__file__).resolve().parent
WORKLOADS = BENCH_DIR / "workloads.py"
RESULTS_DIR = BENCH_DIR / "results"
DEFAULT_PEERS_PYTHON = BENCH_DIR / ".peers-venv" / "bin" / "python"
STATUS_ITEMS = 100_000
#: The row every durable configuration is measured against (issue 17).
DURABLE_LIMIT = "durable limit: wire + write, one sync at the end (4 threads)"
MAIN_ROW = "trolley-etl WADO-RS, 4 worker(s)"


# --- the cohort -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cohort:
    """``studies`` x ``series`` x ``instances`` single-frame ``rows`` x ``columns`` 16-bit CT."""

    studies: int = 20
    series: int = 4
    instances: int = 25
    rows: int = 512
    columns: int = 512

    @property
    def key(self) -> str:
        return f"{self.studies}x{self.series}x{self.instances}-{self.rows}x{self.columns}"

    @property
    def count(self) -> int:
        return self.studies * self.series * self.instances

    def study_uid(self, study: int) -> str:
        return test_uid("bench-study", self.key, study)

    @property
    def study_uids(self) -> list[str]:
        return [self.study_uid(s) for s in range(self.studies)]

    def study_files(self, study: int) -> Iterator[bytes]:
        """The Part 10 bytes of one study, generated deterministically."""
        study_uid = self.study_uid(study)
        for series in range(self.series):
            series_uid = test_uid("bench-series", study_uid, series)
            for number in range(1, self.instances + 1):
                yield make_instance(
                    patient_id=f"BENCH{study:04d}",
                    patient_name=f"Bench^{study:04d}",
                    study_uid=study_uid,
                    series_uid=series_uid,
                    sop_uid=test_uid("bench-sop", series_uid, number),
                    modality="CT",
                    study_date="20240301",
                    accession_number=f"BENCH{study:04d}",
                    series_number=series + 1,
                    instance_number=number,
                    rows=self.rows,
                    columns=self.columns,
                ).data


def scaled_cohort(scale: float) -> Cohort:
    """The default cohort with ``scale`` applied to the instances per series (study count stays,
    so every concurrency level still has studies to spread)."""
    return Cohort(instances=max(1, round(Cohort.instances * scale)))


def seeded_archive(cohort: Cohort, workdir: Path, fresh: bool) -> tuple[OrthancServer, int]:
    """Start Orthanc on ``workdir``; seed the cohort unless that folder already holds it.

    Returns the server and the total size in bytes of the cohort's files.
    """
    marker = workdir / "seeded.json"
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    server = OrthancServer(workdir).start()
    if marker.exists():
        seeded = json.loads(marker.read_text())
        stats = server.statistics()
        if seeded.get("key") == cohort.key and stats.get("CountInstances") == cohort.count:
            print(f"archive: reusing the seeded cohort {cohort.key} in {workdir}", flush=True)
            return server, int(seeded["bytes"])
    started = time.monotonic()
    total = 0
    for study in range(cohort.studies):
        files = list(cohort.study_files(study))
        total += sum(len(f) for f in files)
        server.upload_many(files, workers=4)
        print(f"\rarchive: seeded {study + 1}/{cohort.studies} studies", end="", flush=True)
    print(f" ({total / 1e6:.0f} MB in {time.monotonic() - started:.0f} s)", flush=True)
    marker.write_text(json.dumps({"key": cohort.key, "bytes": total}))
    return server, total


# --- running one measurement ------------------------------------------------------------------


@dataclass
class Measure:
    """One configuration: its samples and what it is."""

    name: str
    group: str  # "wire", "trolley-etl", "peer", "resume"
    samples: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    def median(self, key: str) -> float:
        return float(statistics.median(s[key] for s in self.samples))


def run_workload(python: Path | str, kind: str, spec: dict[str, Any], log: Path) -> dict[str, Any]:
    """Run one workload in a fresh process; wall time is the whole process, as a user waits."""
    started = time.perf_counter()
    with log.open("ab") as stderr:
        done = subprocess.run(
            [str(python), str(WORKLOADS), kind, json.dumps(spec)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            check=False,
        )
    wall = time.perf_counter() - started
    output = done.stdout.decode(errors="replace").strip().splitlines()
    if done.returncode != 0 or not output:
        raise RuntimeError(f"{kind} failed (exit {done.returncode}); see {log}")
    figures = dict(json.loads(output[-1]))
    figures["wall_s"] = wall
    return figures


def tree_size(root: Path) -> tuple[int, int]:
    """(files, bytes) in the study folders under ``root``: not trolley-etl's own ``.trolley``
    folder, nor files at the top (run reports and the like)."""
    files = size = 0
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".trolley"]
        if Path(folder) == root and dirs:
            continue
        for name in names:
            files += 1
            size += os.stat(os.path.join(folder, name)).st_size
    return files, size


def manifest_text(cohort: Cohort, server: OrthancServer, download: str) -> str:
    """A manifest pulling the cohort by Study UID with the given download backend."""
    uids = "\n".join(f"      - {uid}" for uid in cohort.study_uids)
    if download == "c-get":
        dimse = f'host: 127.0.0.1, port: {server.dicom_port}, called_aet: "{server.aet}"'
        source = f"""\
  search: {{backend: dicom-qr, {dimse}}}
  download: {{backend: c-get, {dimse}}}"""
    else:
        url = server.wado_uri_url if download == "wado-uri" else server.dicomweb_url
        source = f"""\
  search: {{backend: qido-rs, url: "{server.dicomweb_url}"}}
  download: {{backend: {download}, url: "{url}"}}"""
    return f"""\
version: 1
name: bench-{download}
source:
{source}
queries:
  - name: cohort
    study_uids:
{uids}
storage:
  root: ./data
run:
  workers: 4
  retries: 0
"""


def runner_supports_cget() -> bool:
    """Whether ``trolley-etl run`` accepts a dicom-qr + c-get manifest in this version."""
    from trolley_etl.manifest import models

    return hasattr(models, "CGetDownload") and hasattr(models, "DicomQrSearch")


class Bench:
    def __init__(self, args: argparse.Namespace, cohort: Cohort) -> None:
        self.args = args
        self.cohort = cohort
        self.work = Path(tempfile.mkdtemp(prefix="trolley-etl-bench-"))
        self.log = self.work / "workloads.log"
        self.measures: list[Measure] = []
        self.server: OrthancServer | None = None
        self.cohort_bytes = 0

    def out(self, name: str) -> Path:
        return self.work / "out" / name

    def repeat(
        self, measure: Measure, python: Path | str, kind: str, spec: dict[str, Any]
    ) -> Measure:
        """Measure ``runs`` times, each in a fresh output folder removed right after."""
        out = Path(spec["out"])
        for attempt in range(self.args.runs):
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            figures = run_workload(python, kind, spec, self.log)
            figures["files"], figures["bytes"] = tree_size(out)
            if measure.group not in ("wire", "reference") and figures["files"] != self.cohort.count:
                raise RuntimeError(
                    f"{measure.name}: wrote {figures['files']} files, not {self.cohort.count}"
                )
            measure.samples.append(figures)
            print(
                f"  {measure.name} run {attempt + 1}: {figures['wall_s']:.2f} s, "
                f"{figures['peak_rss_kb'] / 1024:.0f} MiB",
                flush=True,
            )
            if not (self.args.keep_output and attempt == self.args.runs - 1):
                shutil.rmtree(out, ignore_errors=True)
        self.measures.append(measure)
        return measure

    def run(self) -> dict[str, Any]:
        archive_dir = Path(
            self.args.archive_dir
            or Path(tempfile.gettempdir()) / f"trolley-etl-bench-archive-{self.cohort.key}"
        )
        self.server, self.cohort_bytes = seeded_archive(self.cohort, archive_dir, self.args.fresh)
        try:
            self._measure_all()
        finally:
            self.server.stop()
            shutil.rmtree(self.work / "out", ignore_errors=True)
        return self.results()

    def _measure_all(self) -> None:
        server = self.server
        assert server is not None
        uids = self.cohort.study_uids
        me = sys.executable
        print(f"measuring, {self.args.runs} runs each; workload logs in {self.log}", flush=True)

        self.repeat(
            Measure("wire limit (streaming GET, 4 threads)", "wire"),
            me,
            "wire",
            {
                "dicomweb": server.dicomweb_url,
                "study_uids": uids,
                "workers": 4,
                "out": str(self.out("wire")),
            },
        )
        # Not a target, a profile aid: what making the bytes durable costs on this disk.
        self.repeat(
            Measure("wire + fsync of each body (4 threads)", "reference"),
            me,
            "wire",
            {
                "dicomweb": server.dicomweb_url,
                "study_uids": uids,
                "workers": 4,
                "fsync": True,
                "out": str(self.out("wire-fsync")),
            },
        )

        # The durable limit (issue 17): the bytes received and written, then one sync.
        self.repeat(
            Measure(DURABLE_LIMIT, "reference"),
            me,
            "wire",
            {
                "dicomweb": server.dicomweb_url,
                "study_uids": uids,
                "workers": 4,
                "sync_at_end": True,
                "out": str(self.out("wire-sync")),
            },
        )
        # Also a profile aid: what making each file durable costs on this disk, no network.
        self.repeat(
            Measure("disk: the same files written and fsynced one by one (4 threads)", "reference"),
            me,
            "disk",
            {
                "files": self.cohort.count,
                "size": self.cohort_bytes // self.cohort.count,
                "per_folder": self.cohort.instances,
                "workers": 4,
                "out": str(self.out("disk")),
            },
        )

        manifests = {}
        downloads = (
            ("wado-rs", "wado-uri", "c-get") if runner_supports_cget() else ("wado-rs", "wado-uri")
        )
        for download in downloads:
            folder = self.work / download
            folder.mkdir(exist_ok=True)
            manifests[download] = folder / "bench.yaml"
            manifests[download].write_text(manifest_text(self.cohort, server, download))
        quiet = ["--quiet", "--log-format", "json"]
        for workers in (1, 2, 4):
            out = self.out(f"wado-rs-{workers}")
            self.repeat(
                Measure(f"trolley-etl WADO-RS, {workers} worker(s)", "trolley-etl"),
                me,
                "trolley-cli",
                {
                    "argv": [
                        "run",
                        str(manifests["wado-rs"]),
                        "--root",
                        str(out),
                        "--workers",
                        str(workers),
                        *quiet,
                    ],
                    "out": str(out),
                },
            )
        out = self.out("wado-uri")
        self.repeat(
            Measure("trolley-etl WADO-URI, 4 workers", "trolley-etl"),
            me,
            "trolley-cli",
            {
                "argv": [
                    "run",
                    str(manifests["wado-uri"]),
                    "--root",
                    str(out),
                    "--workers",
                    "4",
                    *quiet,
                ],
                "out": str(out),
            },
        )

        if "c-get" in manifests:
            out = self.out("c-get")
            self.repeat(
                Measure("trolley-etl C-GET, 4 workers", "trolley-etl"),
                me,
                "trolley-cli",
                {
                    "argv": [
                        "run",
                        str(manifests["c-get"]),
                        "--root",
                        str(out),
                        "--workers",
                        "4",
                        *quiet,
                    ],
                    "out": str(out),
                },
            )
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
                    "study_uids": uids,
                    "workers": 4,
                    "out": str(self.out("c-get")),
                },
            )

        peers = Path(self.args.peers_python)
        if peers.exists():
            for kind, label in (
                ("dicomtrolley", "dicomtrolley (QIDO-RS + WADO-RS Trolley)"),
                ("dicomweb-client", "dicomweb-client (retrieve_study)"),
            ):
                self.repeat(
                    Measure(f"{label}, 4 threads", "peer"),
                    peers,
                    kind,
                    {
                        "dicomweb": server.dicomweb_url,
                        "study_uids": uids,
                        "workers": 4,
                        "out": str(self.out(kind)),
                    },
                )
        else:
            print(f"peer tools skipped: no {peers} (make bench creates it)", flush=True)

        self._measure_resume(manifests["wado-rs"])

    def _measure_resume(self, manifest: Path) -> None:
        """Rerun of a finished manifest, and ``status`` on a 100,000-item checkpoint."""
        me = sys.executable
        root = self.out("resume")
        shutil.rmtree(root, ignore_errors=True)
        quiet = ["--quiet", "--log-format", "json"]
        run = ["run", str(manifest), "--root", str(root), *quiet]
        run_workload(me, "trolley-cli", {"argv": run}, self.log)  # the first, full run
        rerun = Measure("trolley-etl rerun of the finished manifest", "resume")
        for _ in range(self.args.runs):
            rerun.samples.append(run_workload(me, "trolley-cli", {"argv": run}, self.log))
        self.measures.append(rerun)
        shutil.rmtree(root, ignore_errors=True)

        big = self.out("status-100k")
        fill_checkpoint(big, STATUS_ITEMS)
        status = Measure(f"trolley-etl status, {STATUS_ITEMS:,} items", "resume")
        argv = ["status", str(manifest), "--root", str(big), "--quiet"]
        for _ in range(self.args.runs):
            status.samples.append(run_workload(me, "trolley-cli", {"argv": argv}, self.log))
        self.measures.append(status)
        shutil.rmtree(big, ignore_errors=True)
        for measure in (rerun, status):
            print(f"  {measure.name}: {measure.median('wall_s'):.2f} s", flush=True)

    # --- results ------------------------------------------------------------------------------

    def results(self) -> dict[str, Any]:
        rows = []
        for m in self.measures:
            wall = m.median("wall_s")
            row: dict[str, Any] = {
                "name": m.name,
                "group": m.group,
                "wall_s": round(wall, 3),
                "peak_rss_mib": round(max(s["peak_rss_kb"] for s in m.samples) / 1024, 1),
                "runs": len(m.samples),
                "samples_wall_s": [round(s["wall_s"], 3) for s in m.samples],
            }
            if m.group != "resume":
                row["instances_per_s"] = round(self.cohort.count / wall, 1)
                row["mb_per_s"] = round(self.cohort_bytes / 1e6 / wall, 1)
            row["durable"] = is_durable(m)
            if m.note:
                row["note"] = m.note
            rows.append(row)
        by_name = {r["name"]: r for r in rows}
        wire = next(r for r in rows if r["group"] == "wire")
        main = by_name.get("trolley-etl WADO-RS, 4 worker(s)")
        ratios = {}
        if main:
            ratios["trolley-etl WADO-RS 4 workers / wire limit"] = round(
                wire["wall_s"] / main["wall_s"], 3
            )
            for r in rows:
                if r["group"] in ("peer", "trolley-etl", "reference") and r is not main:
                    ratios[f"trolley-etl WADO-RS 4 workers / {r['name']}"] = round(
                        r["wall_s"] / main["wall_s"], 3
                    )
        return {
            "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "trolley_etl_version": __version__,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "cohort": {
                "shape": self.cohort.key,
                "instances": self.cohort.count,
                "bytes": self.cohort_bytes,
            },
            "rows": rows,
            "ratios": ratios,
            "targets": targets(rows, ratios),
        }


def is_durable(measure: Measure) -> bool:
    """Whether the row's files are on stable storage when it ends: the wire limit and the
    peer tools never sync; trolley-etl and the sync/fsync reference rows do."""
    return measure.group in ("trolley-etl", "resume") or (
        measure.group == "reference" and ("sync" in measure.name or "fsync" in measure.name)
    )


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
    trolley_rss = max(
        (r["peak_rss_mib"] for r in rows if r["group"] in ("trolley-etl", "resume")), default=0
    )
    found["peak RSS < 200 MB"] = [trolley_rss, trolley_rss * 1.048576 < 200]
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


# --- output -----------------------------------------------------------------------------------


def table(results: dict[str, Any]) -> str:
    """The results as a Markdown table, then the ratios and targets."""
    lines = [
        "| configuration | durable | instances/s | MB/s | peak RSS (MiB) | wall s (median) |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in results["rows"]:
        ips = f"{r['instances_per_s']:.0f}" if "instances_per_s" in r else "-"
        mbs = f"{r['mb_per_s']:.0f}" if "mb_per_s" in r else "-"
        durable = "yes" if r.get("durable") else "no"
        lines.append(
            f"| {r['name']} | {durable} | {ips} | {mbs} | {r['peak_rss_mib']:.0f} "
            f"| {r['wall_s']:.2f} |"
        )
    lines += ["", "| ratio (throughput) | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f} |" for k, v in results["ratios"].items()]
    lines += ["", "| target | measured | met |", "| --- | ---: | --- |"]
    lines += [
        f"| {k} | {v[0]} | {'yes' if v[1] else 'no'} |" for k, v in results["targets"].items()
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="cohort size factor (1.0: 20 studies x 4 series x 25 instances "
        "of 512x512x16 bit, about 1 GB; 0.1: about 100 MB)",
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration (median)")
    parser.add_argument(
        "--peers-python",
        default=str(DEFAULT_PEERS_PYTHON),
        help="interpreter of the virtual environment with the peer tools",
    )
    parser.add_argument(
        "--archive-dir",
        help="Orthanc data folder (default: a temp folder "
        "named after the cohort, reused between runs)",
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
    cohort = scaled_cohort(args.scale)
    print(f"cohort {cohort.key}: {cohort.count} instances", flush=True)
    bench = Bench(args, cohort)
    try:
        results = bench.run()
    finally:
        shutil.rmtree(bench.work / "out", ignore_errors=True)
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
