"""The machinery every group of ``make bench`` shares: the synthetic cohort, its seeded Orthanc
archive, one measured workload per fresh process, medians of repeated runs, and the rows,
ratios and targets of one group's section in the results.

A group (:class:`Bench` and its subclasses) is one cohort in its own archive, measured in one
go; ``run_bench.py`` runs the groups the user picked and writes one results file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trolley_etl._harness.dicomgen import make_instance, test_uid
from trolley_etl._harness.orthanc import OrthancServer

BENCH_DIR = Path(__file__).resolve().parent
WORKLOADS = BENCH_DIR / "workloads.py"
RESULTS_DIR = BENCH_DIR / "results"
#: The row every durable configuration is measured against (issue 17).
DURABLE_LIMIT = "durable limit: wire + write, one sync at the end (4 threads)"
WIRE_LIMIT = "wire limit (streaming GET, 4 threads)"
MAIN_ROW = "trolley-etl WADO-RS, 4 worker(s)"
DICOMTROLLEY_ROW = "dicomtrolley (QIDO-RS + WADO-RS Trolley), 4 threads"
#: Flags of every measured ``trolley-etl`` command: no progress bar, logs as JSON lines.
QUIET = ["--quiet", "--log-format", "json"]
#: Row groups whose rows do not move cohort bytes (no instances/s, no MB/s).
NO_THROUGHPUT = ("resume", "startup")
#: Upload threads when seeding an archive.
SEED_WORKERS = 4


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


def scaled_cohort(scale: float, base: Cohort | None = None) -> Cohort:
    """``base`` (the default 1 GB cohort) with ``scale`` applied to the instances per series
    (study count stays, so every concurrency level still has studies to spread)."""
    base = base or Cohort()
    return dataclasses.replace(base, instances=max(1, round(base.instances * scale)))


def default_archive_dir(cohort: Cohort) -> Path:
    """The temp folder a cohort's seeded archive is kept in between bench runs."""
    return Path(tempfile.gettempdir()) / f"trolley-etl-bench-archive-{cohort.key}"


def seeded_archive(cohort: Cohort, workdir: Path, fresh: bool) -> tuple[OrthancServer, int]:
    """Start Orthanc on ``workdir``; seed the cohort unless that folder already holds it.

    Each study is generated, then uploaded by :data:`SEED_WORKERS` threads (Orthanc stores in
    parallel), with progress in instances. Returns the server and the total size in bytes of
    the cohort's files.
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
    total = done = 0
    for study in range(cohort.studies):
        files = list(cohort.study_files(study))
        total += sum(len(f) for f in files)
        server.upload_many(files, workers=SEED_WORKERS)
        done += len(files)
        rate = done / max(time.monotonic() - started, 1e-3)
        print(
            f"\rarchive: seeded {done}/{cohort.count} instances "
            f"({study + 1}/{cohort.studies} studies, {rate:.0f}/s)",
            end="",
            flush=True,
        )
    print(f" ({total / 1e6:.0f} MB in {time.monotonic() - started:.0f} s)", flush=True)
    marker.write_text(json.dumps({"key": cohort.key, "bytes": total}))
    return server, total


def manifest_text(
    cohort: Cohort, server: OrthancServer, download: str, study_uids: Iterable[str] = ()
) -> str:
    """A manifest pulling the cohort (or only ``study_uids``) by Study UID with the given
    download backend."""
    uids = "\n".join(f"      - {uid}" for uid in (list(study_uids) or cohort.study_uids))
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


# --- running one measurement ------------------------------------------------------------------


@dataclass
class Measure:
    """One configuration: its samples and what it is."""

    name: str
    group: str  # "wire", "reference", "trolley-etl", "peer", "resume", "startup"
    samples: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""

    def median(self, key: str) -> float:
        return float(statistics.median(s[key] for s in self.samples))


#: One configuration to measure: the measure, the interpreter, the workload kind, its spec.
Job = tuple[Measure, Path | str, str, dict[str, Any]]


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


def slug(name: str) -> str:
    """A folder name for a row: its name in lower case, runs of other characters as ``-``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:60]


def run_argv(manifest: Path, root: Path, workers: int | None = None) -> list[str]:
    """``trolley-etl run`` of ``manifest`` into ``root`` (with ``workers``, else the
    manifest's), quiet."""
    chosen = ["--workers", str(workers)] if workers else []
    return ["run", str(manifest), "--root", str(root), *chosen, *QUIET]


def is_durable(measure: Measure) -> bool | None:
    """Whether the row's files are on stable storage when it ends: the wire limit and the
    peer tools never sync; trolley-etl and the sync/fsync reference rows do. None for rows
    that store nothing (interpreter start-up)."""
    if measure.group == "startup":
        return None
    return measure.group in ("trolley-etl", "resume") or (
        measure.group == "reference" and ("sync" in measure.name or "fsync" in measure.name)
    )


def speed_ratios(rows: list[dict[str, Any]], main_row: str = MAIN_ROW) -> dict[str, float]:
    """Throughput of ``main_row`` over the wire limit and over every other measured row
    (peers, other trolley-etl rows, references): wall time of the other / wall time of it."""
    by_name = {r["name"]: r for r in rows}
    main = by_name.get(main_row)
    if not main:
        return {}
    label = main_row.replace(", ", " ").replace(" worker(s)", " workers")
    found = {}
    wire = by_name.get(WIRE_LIMIT)
    if wire:
        found[f"{label} / wire limit"] = round(wire["wall_s"] / main["wall_s"], 3)
    for r in rows:
        if r["group"] in ("peer", "trolley-etl", "reference") and r is not main:
            found[f"{label} / {r['name']}"] = round(r["wall_s"] / main["wall_s"], 3)
    return found


def target(value: float, met: bool) -> list[Any]:
    """One target's entry in the results: the measured figure and whether it is met."""
    return [round(value, 3), bool(met)]


# --- one group of rows ------------------------------------------------------------------------


class Bench:
    """One group of rows: a cohort in its own seeded archive, each configuration measured
    ``--runs`` times in fresh processes. Subclasses say what to measure and which targets
    apply; this base class is the 1 GB group's machinery without its rows."""

    #: How ``--only`` names the group, and its heading in the printed tables.
    key = "group"
    title = "group"
    #: The cohort at ``--scale 1``.
    base_cohort = Cohort()

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.cohort = self.make_cohort(args.scale)
        self.work = work / self.key
        self.work.mkdir(parents=True, exist_ok=True)
        self.spent = work / "spent"  # outputs already measured, removed at the very end
        self.log = work / "workloads.log"
        self.measures: list[Measure] = []
        self.server: OrthancServer | None = None
        self.cohort_bytes = 0
        self.figures: dict[str, Any] = {}

    @classmethod
    def make_cohort(cls, scale: float) -> Cohort:
        return scaled_cohort(scale, cls.base_cohort)

    def out(self, name: str) -> Path:
        return self.work / "out" / name

    def archive_dir(self) -> Path:
        return default_archive_dir(self.cohort)

    def run(self) -> dict[str, Any]:
        """Seed (or reuse) the archive, measure every row, return this group's section."""
        print(f"\n== {self.title}: cohort {self.cohort.key}, {self.cohort.count} instances")
        self.server, self.cohort_bytes = seeded_archive(
            self.cohort, self.archive_dir(), self.args.fresh
        )
        try:
            print(f"measuring, {self.args.runs} runs each; workload logs in {self.log}")
            self.measure_all(self.server)
        finally:
            self.server.stop()
            if not self.args.keep_output:
                self.set_aside(self.work / "out")
        return self.section()

    def set_aside(self, out: Path) -> None:
        """Move a measured output out of the way, to be removed when the whole bench ends.

        Deleting thousands of files just before the next run is measured made that run's file
        creations several times slower on ext4 without a journal (it skips the inodes freed in
        the last minutes when it allocates new ones): each repeat paid for the deletion of the
        one before, and every row that creates a file per instance paid more than the rows
        that write one body per study. Where the disk is short of room, it is deleted now.
        """
        if not out.exists():
            return
        if shutil.disk_usage(out).free < 2 * self.cohort_bytes + (4 << 30):
            shutil.rmtree(out, ignore_errors=True)
            return
        self.spent.mkdir(parents=True, exist_ok=True)
        spent = self.spent / f"{self.key}-{len(list(self.spent.iterdir()))}"
        out.rename(spent)
        os.sync()
        _drop_cached(spent)  # nor does the memory its pages took fill up run after run

    def measure_all(self, server: OrthancServer) -> None:
        raise NotImplementedError

    def write_manifest(
        self, server: OrthancServer, download: str, study_uids: list[str] | None = None
    ) -> Path:
        """The cohort's manifest for ``download`` (or only ``study_uids``), in this group's
        work folder."""
        name = download if study_uids is None else f"{download}-{len(study_uids)}-studies"
        path = self.work / f"{name}.yaml"
        path.write_text(manifest_text(self.cohort, server, download, study_uids or ()))
        return path

    def wire_job(self, name: str, group: str, **options: Any) -> Job:
        """Plain streaming GETs of the cohort's studies (the ``wire`` workload), 4 threads
        unless ``workers`` says otherwise; ``sync_at_end`` or ``fsync`` make it durable."""
        assert self.server is not None
        spec = {
            "dicomweb": self.server.dicomweb_url,
            "study_uids": self.cohort.study_uids,
            "workers": 4,
            **options,
            "out": str(self.out(slug(name))),
        }
        return (Measure(name, group), sys.executable, "wire", spec)

    def disk_job(self, name: str, **options: Any) -> Job:
        """The cohort's number of files, of its mean size, written from memory with 4 threads
        into folders of a series each (the ``disk`` workload: no network, no parsing)."""
        spec = {
            "files": self.cohort.count,
            "size": self.cohort_bytes // self.cohort.count,
            "per_folder": self.cohort.instances,
            "workers": 4,
            **options,
            "out": str(self.out(slug(name))),
        }
        return (Measure(name, "reference"), sys.executable, "disk", spec)

    def run_job(self, name: str, manifest: Path, workers: int | None) -> Job:
        """``trolley-etl run`` of ``manifest`` into a fresh root, as a user runs it."""
        out = self.out(f"{manifest.stem}-{workers or 'manifest'}")
        spec = {"argv": run_argv(manifest, out, workers), "out": str(out)}
        return (Measure(name, "trolley-etl"), sys.executable, "trolley-cli", spec)

    def peer_job(self, name: str, kind: str) -> Job | None:
        """A peer tool's download of the cohort (4 threads, its own virtual environment), or
        None when ``make bench`` has not created that environment."""
        assert self.server is not None
        peers = Path(self.args.peers_python)
        if not peers.exists():
            print(f"{kind} skipped: no {peers} (make bench creates it)", flush=True)
            return None
        spec = {
            "dicomweb": self.server.dicomweb_url,
            "study_uids": self.cohort.study_uids,
            "workers": 4,
            "out": str(self.out(kind)),
        }
        return (Measure(name, "peer"), peers, kind, spec)

    def measure_rerun(self, name: str, manifest: Path) -> Measure:
        """A rerun of ``manifest`` once it is finished: one full run, then ``--runs`` reruns
        (fresh processes) of the same command into the same root."""
        root = self.out(f"resume-{manifest.stem}")
        self.set_aside(root)
        run = ["run", str(manifest), "--root", str(root), *QUIET]
        run_workload(sys.executable, "trolley-cli", {"argv": run}, self.log)  # the full run
        rerun = Measure(name, "resume")
        for _ in range(self.args.runs):
            figures = run_workload(sys.executable, "trolley-cli", {"argv": run}, self.log)
            rerun.samples.append(figures)
        print(f"  {name}: {rerun.median('wall_s'):.2f} s (median)", flush=True)
        self.measures.append(rerun)
        self.set_aside(root)
        return rerun

    def sample(self, job: Job, attempt: int, runs: int) -> None:
        """One run of one configuration, in a fresh output folder removed right after (unless
        ``--keep-output`` and it is the last); a trolley-etl or peer row that did not store the
        whole cohort is an error, not a figure."""
        measure, python, kind, spec = job
        out = Path(spec["out"]) if "out" in spec else None
        if out:
            self.set_aside(out)
            out.mkdir(parents=True)
        os.sync()  # nothing left dirty by an earlier run for this one's sync to write
        figures = run_workload(python, kind, spec, self.log)
        if out:
            figures["files"], figures["bytes"] = tree_size(out)
            if measure.group in ("trolley-etl", "peer") and figures["files"] != self.cohort.count:
                raise RuntimeError(
                    f"{measure.name}: wrote {figures['files']} files, not {self.cohort.count}"
                )
        measure.samples.append(figures)
        print(
            f"  {measure.name} run {attempt + 1}: {figures['wall_s']:.2f} s, "
            f"{figures['peak_rss_kb'] / 1024:.0f} MiB",
            flush=True,
        )
        if out and not (self.args.keep_output and attempt == runs - 1):
            self.set_aside(out)

    def repeat_together(self, jobs: list[Job], runs: int | None = None) -> None:
        """Measure several configurations in turns (A B C, A B C, ...), so that a machine that
        gets busier or quieter during the group moves them alike and their ratios hold."""
        runs = runs or self.args.runs
        for attempt in range(runs):
            for job in jobs:
                self.sample(job, attempt, runs)
        self.measures.extend(job[0] for job in jobs)

    def repeat(
        self, measure: Measure, python: Path | str, kind: str, spec: dict[str, Any]
    ) -> Measure:
        """Measure one configuration ``--runs`` times in a row."""
        self.repeat_together([(measure, python, kind, spec)])
        return measure

    # --- results ------------------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
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
            if all("cpu_s" in s for s in m.samples):  # user + system CPU of the process
                row["cpu_s"] = round(m.median("cpu_s"), 3)
            if m.group not in NO_THROUGHPUT:
                row["instances_per_s"] = round(self.cohort.count / wall, 1)
                row["mb_per_s"] = round(self.cohort_bytes / 1e6 / wall, 1)
            row["durable"] = is_durable(m)
            if m.note:
                row["note"] = m.note
            rows.append(row)
        return rows

    def ratios(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        return speed_ratios(rows)

    def targets(self, rows: list[dict[str, Any]], ratios: dict[str, float]) -> dict[str, Any]:
        return {}

    def section(self) -> dict[str, Any]:
        """This group's part of the results: its cohort, rows, ratios, figures and targets."""
        rows = self.rows()
        ratios = self.ratios(rows)
        found: dict[str, Any] = {
            "title": self.title,
            "cohort": {
                "shape": self.cohort.key,
                "instances": self.cohort.count,
                "bytes": self.cohort_bytes,
            },
            "rows": rows,
            "ratios": ratios,
        }
        if self.figures:
            found["figures"] = self.figures
        found["targets"] = self.targets(rows, ratios)
        return found


def all_targets(sections: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every group's targets in one list, and the one that spans them: peak RSS < 200 MB at any
    study size (every trolley-etl row of every group measured)."""
    found: dict[str, Any] = {}
    for section in sections.values():
        found.update(section["targets"])
    trolley_rss = max(
        (
            row["peak_rss_mib"]
            for section in sections.values()
            for row in section["rows"]
            if row["group"] in ("trolley-etl", "resume")
        ),
        default=None,
    )
    if trolley_rss is not None:  # MiB to MB
        found["peak RSS < 200 MB"] = target(trolley_rss, trolley_rss * 1.048576 < 200)
    return found


# --- output -----------------------------------------------------------------------------------


def rows_table(rows: list[dict[str, Any]]) -> list[str]:
    """A group's rows as a Markdown table; client CPU is the measured process's user + system
    time (the archive's is not in it), so CPU near wall x cores means CPU-bound."""
    lines = [
        "| configuration | durable | instances/s | MB/s | peak RSS (MiB) | wall s (median) "
        "| client CPU s |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ips = f"{r['instances_per_s']:.0f}" if "instances_per_s" in r else "-"
        mbs = f"{r['mb_per_s']:.0f}" if "mb_per_s" in r else "-"
        cpu = f"{r['cpu_s']:.2f}" if "cpu_s" in r else "-"
        durable = {True: "yes", False: "no"}.get(r.get("durable"), "-")
        lines.append(
            f"| {r['name']} | {durable} | {ips} | {mbs} | {r['peak_rss_mib']:.0f} "
            f"| {r['wall_s']:.2f} | {cpu} |"
        )
    return lines


def ratios_table(ratios: dict[str, float]) -> list[str]:
    if not ratios:
        return []
    return ["", "| ratio (throughput) | value |", "| --- | ---: |"] + [
        f"| {k} | {v:.2f} |" for k, v in ratios.items()
    ]


def targets_table(found: dict[str, Any]) -> list[str]:
    return ["| target | measured | met |", "| --- | ---: | --- |"] + [
        f"| {k} | {v[0]} | {'yes' if v[1] else 'no'} |" for k, v in found.items()
    ]


def _drop_cached(folder: Path) -> None:
    """Ask the kernel to forget the (synced, so clean) cached pages of every file under
    ``folder``: outputs kept until the end must not fill the memory that later runs write
    through."""
    for parent, _, names in os.walk(folder):
        for name in names:
            try:
                fd = os.open(os.path.join(parent, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
