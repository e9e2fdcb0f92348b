"""The groups of ``make bench`` where per-file and fixed costs dominate (issue 17), each a
cohort of its own in its own cached archive, measured with the machinery of ``benchlib``:

- ``small``: 20,000 instances of about 16 KB: the wire and durable limits, a disk reference
  (the same number of files created, written and renamed, one sync at the end) and
  ``trolley-etl run`` with 1 and 4 workers;
- ``fixed``: the fixed cost of a run, a one-instance manifest's ``trolley-etl run`` minus the
  plain GET of that instance, each a fresh process, with the interpreter's start-up and the
  import of the command line beside them to say where it goes;
- ``mid``: a 40 MB cohort (376 instances of about 110 KB), a whole ``trolley-etl run`` against
  dicomtrolley's download loop.

The configurations of a group are measured in turns (A B C, A B C, ...), so that the machine
getting busier during the group moves them alike.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    DICOMTROLLEY_ROW,
    DURABLE_LIMIT,
    MAIN_ROW,
    WIRE_LIMIT,
    Bench,
    Cohort,
    Job,
    Measure,
    target,
)

from trolley_etl._harness.orthanc import OrthancServer

ONE_WORKER_ROW = "trolley-etl WADO-RS, 1 worker(s)"
SMALL_DURABLE_TARGET = "small objects: WADO-RS 4 workers >= 0.5 x durable limit"
SMALL_SCALING_TARGET = "small objects: 4 workers >= 1.8 x 1 worker"
FIXED_COST_TARGET = "fixed cost <= 0.3 s"
MID_TARGET = "40 MB cohort: run >= 2 x dicomtrolley"
#: The fixed cost is a small difference of two wall times: more runs than the others.
FIXED_COST_RUNS = 5


def _by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in rows}


def _speedup(rows: list[dict[str, Any]], faster: str, slower: str) -> float | None:
    """How many times faster row ``faster`` is than row ``slower`` (None if either is
    missing)."""
    by_name = _by_name(rows)
    if faster not in by_name or slower not in by_name:
        return None
    return float(by_name[slower]["wall_s"] / by_name[faster]["wall_s"])


# --- small objects ----------------------------------------------------------------------------


class SmallObjects(Bench):
    """20,000 instances of about 16 KB, where the per-file work decides the speed."""

    key = "small"
    title = "Small objects"
    #: 20 x 4 x 250 single-frame 88 x 88 16-bit images: 16.6 KB each, 330 MB in all.
    base_cohort = Cohort(studies=20, series=4, instances=250, rows=88, columns=88)

    def measure_all(self, server: OrthancServer) -> None:
        manifest = self.write_manifest(server, "wado-rs")
        disk = self.disk_job(
            "disk: the same files written and renamed, one sync at the end (4 threads)",
            sync_at_end=True,
        )
        self.repeat_together(
            [
                self.wire_job(WIRE_LIMIT, "wire"),
                self.wire_job(DURABLE_LIMIT, "reference", sync_at_end=True),
                disk,
                self.run_job(ONE_WORKER_ROW, manifest, 1),
                self.run_job(MAIN_ROW, manifest, 4),
            ]
        )
        # Issue 17: a rerun of a finished 10,000-instance manifest (half the studies) < 1 s.
        half = self.cohort.study_uids[: self.cohort.studies // 2]
        count = len(half) * self.cohort.series * self.cohort.instances
        self.measure_rerun(rerun_row(count), self.write_manifest(server, "wado-rs", half))

    def targets(self, rows: list[dict[str, Any]], ratios: dict[str, float]) -> dict[str, Any]:
        return small_targets(rows)


def rerun_row(instances: int) -> str:
    """The rerun row's name, e.g. "trolley-etl rerun of a finished 10,000-instance manifest"."""
    return f"trolley-etl rerun of a finished {instances:,}-instance manifest"


def small_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """4 workers >= 0.5 x the durable limit, >= 1.8 x 1 worker; the rerun < 1 s."""
    found: dict[str, Any] = {}
    durable = _speedup(rows, MAIN_ROW, DURABLE_LIMIT)
    if durable is not None:
        found[SMALL_DURABLE_TARGET] = target(durable, durable >= 0.5)
    scaling = _speedup(rows, MAIN_ROW, ONE_WORKER_ROW)
    if scaling is not None:
        found[SMALL_SCALING_TARGET] = target(scaling, scaling >= 1.8)
    for row in rows:
        if row["group"] == "resume":  # "rerun of a finished 10,000-instance manifest < 1 s"
            name = row["name"].removeprefix("trolley-etl ") + " < 1 s"
            found[name] = target(row["wall_s"], row["wall_s"] < 1)
    return found


# --- the fixed cost of a run ------------------------------------------------------------------


class FixedCost(Bench):
    """A one-instance manifest: what a run costs beyond moving its bytes."""

    key = "fixed"
    title = "Fixed cost of a run"
    #: One 512 x 512 16-bit CT image (525 KB), as in the 1 GB cohort; never scaled.
    base_cohort = Cohort(studies=1, series=1, instances=1)
    rows_by_role: ClassVar[dict[str, str]] = {
        "wire": "one instance: plain GET, fresh process (wire)",
        "run": "one instance: trolley-etl run of a one-instance manifest",
        "interpreter": "interpreter start-up, nothing imported",
        "import": "interpreter + import trolley_etl.cli.main",
    }

    @classmethod
    def make_cohort(cls, scale: float) -> Cohort:
        return cls.base_cohort

    def measure_all(self, server: OrthancServer) -> None:
        manifest = self.write_manifest(server, "wado-rs")
        roles = self.rows_by_role
        jobs: list[Job] = [
            self.wire_job(roles["wire"], "wire", workers=1),
            self.run_job(roles["run"], manifest, None),
            (Measure(roles["interpreter"], "startup"), sys.executable, "import", {"modules": []}),
            (
                Measure(roles["import"], "startup"),
                sys.executable,
                "import",
                {"modules": ["trolley_etl.cli.main"]},
            ),
        ]
        self.repeat_together(jobs, runs=max(self.args.runs, FIXED_COST_RUNS))
        by_name = {measure.name: measure.samples for measure in self.measures}
        self.figures = fixed_cost_figures({role: by_name[name] for role, name in roles.items()})

    def rows(self) -> list[dict[str, Any]]:
        """The rows without throughput: one instance says nothing about instances/s."""
        rows = super().rows()
        for row in rows:
            row.pop("instances_per_s", None)
            row.pop("mb_per_s", None)
        return rows

    def ratios(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        return {}

    def targets(self, rows: list[dict[str, Any]], ratios: dict[str, float]) -> dict[str, Any]:
        return fixed_targets(self.figures)


def fixed_cost_figures(samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Where a one-instance run's time goes, from the samples of the four fixed-cost rows
    (keyed ``run``, ``wire``, ``interpreter``, ``import``): the fixed cost (run minus wire,
    medians of whole-process wall times), the interpreter's start-up, the import of the
    command line and the rest of the run in process (manifest, search, download, checkpoint,
    report), and which heavy packages the run loaded."""

    def median(role: str, key: str) -> float:
        return float(statistics.median(sample[key] for sample in samples[role]))

    run_s, wire_s = median("run", "wall_s"), median("wire", "wall_s")
    import_s = median("import", "work_s")
    last_run = samples["run"][-1]
    figures: dict[str, Any] = {
        "fixed_cost_s": run_s - wire_s,
        "run_s": run_s,
        "wire_s": wire_s,
        "interpreter_s": median("interpreter", "wall_s"),
        "import_cli_s": import_s,
        "run_after_import_s": median("run", "work_s") - import_s,
    }
    figures = {key: round(value, 3) for key, value in figures.items()}
    figures["run_modules_loaded"] = last_run.get("modules_loaded")
    figures["run_heavy_packages"] = last_run.get("heavy_packages")
    return figures


def fixed_targets(figures: dict[str, Any]) -> dict[str, Any]:
    """The fixed cost of a run <= 0.3 s."""
    if "fixed_cost_s" not in figures:
        return {}
    fixed = figures["fixed_cost_s"]
    return {FIXED_COST_TARGET: target(fixed, fixed <= 0.3)}


# --- a 40 MB cohort ---------------------------------------------------------------------------


class MidCohort(Bench):
    """A cohort of the size of the project's acceptance checks, against dicomtrolley."""

    key = "mid"
    title = "40 MB cohort"
    #: 4 x 2 x 47 single-frame 234 x 234 16-bit images: 110 KB each, 41.6 MB in all.
    base_cohort = Cohort(studies=4, series=2, instances=47, rows=234, columns=234)

    def measure_all(self, server: OrthancServer) -> None:
        manifest = self.write_manifest(server, "wado-rs")
        jobs = [
            self.wire_job(WIRE_LIMIT, "wire"),
            self.wire_job(DURABLE_LIMIT, "reference", sync_at_end=True),
            self.run_job(MAIN_ROW, manifest, 4),
        ]
        peer = self.peer_job(DICOMTROLLEY_ROW, "dicomtrolley")
        self.repeat_together(jobs + ([peer] if peer else []))

    def targets(self, rows: list[dict[str, Any]], ratios: dict[str, float]) -> dict[str, Any]:
        return mid_targets(rows)


def mid_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """A whole run of the 40 MB cohort >= 2 x dicomtrolley's download loop."""
    speed = _speedup(rows, MAIN_ROW, DICOMTROLLEY_ROW)
    return {} if speed is None else {MID_TARGET: target(speed, speed >= 2)}
