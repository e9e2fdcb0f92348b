"""One measured workload per process: ``python workloads.py KIND SPEC_JSON``.

Each workload runs in a fresh interpreter so that its peak RSS (VmHWM, read from
/proc/self/status at the end) is its own: ``ru_maxrss`` of a forked child would include the
parent's peak. The last line printed on stdout is a JSON object with the figures.

This file imports only the standard library at module level, because the peer tools run it
with their own virtual environment, where trolley-etl is not installed.
"""

from __future__ import annotations

import json
import os
import queue
import re
import resource
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ACCEPT_ANY_SYNTAX = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CHUNK = 1 << 20


def peak_rss_kb() -> int:
    """Peak resident set size of this process image (VmHWM), in KiB."""
    with open("/proc/self/status") as status:
        found = re.search(r"VmHWM:\s+(\d+) kB", status.read())
    return int(found.group(1)) if found else -1


def over_studies(study_uids: list[str], workers: int, job: Callable[[str], None]) -> None:
    """Run ``job`` for every study (or other key) with ``workers`` threads; re-raise the first
    error."""
    todo: queue.Queue[str] = queue.Queue()
    for uid in study_uids:
        todo.put(uid)
    errors: list[BaseException] = []

    def worker() -> None:
        while not errors:
            try:
                uid = todo.get_nowait()
            except queue.Empty:
                return
            try:
                job(uid)
            except BaseException as exc:  # reported by the parent
                errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


# --- the wire limit ---------------------------------------------------------------------------


def wire(spec: dict[str, Any]) -> dict[str, Any]:
    """Plain streaming GETs of WADO-RS studies, the multipart bodies written to disk unparsed
    (and, with ``fsync``, made durable: one fsync per study body; with ``sync_at_end``, made
    durable by one sync of the file system after the last body)."""
    import requests

    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    local = threading.local()
    written = [0]
    lock = threading.Lock()

    def fetch(uid: str) -> None:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
        url = f"{spec['dicomweb']}/studies/{uid}"
        size = 0
        with session.get(url, headers={"Accept": ACCEPT_ANY_SYNTAX}, stream=True) as response:
            response.raise_for_status()
            with open(out / f"{uid}.multipart", "wb") as handle:
                for chunk in response.iter_content(CHUNK):
                    handle.write(chunk)
                    size += len(chunk)
                if spec.get("fsync"):
                    handle.flush()
                    os.fsync(handle.fileno())
        with lock:
            written[0] += size

    over_studies(spec["study_uids"], spec["workers"], fetch)
    if spec.get("sync_at_end"):  # the durable limit: every byte received, then one sync
        from trolley_etl.core.storage import sync_filesystem

        sync_filesystem(out)
    return {"body_bytes": written[0]}


def disk(spec: dict[str, Any]) -> dict[str, Any]:
    """The disk's share of storing durably, without network or parsing: ``files`` files of
    ``size`` bytes written from memory to temp names, each fsynced and renamed into a folder
    of ``per_folder`` files, each folder fsynced once at the end. Any tool that makes every
    received file durable before showing it pays at least this. With ``sync_at_end``, no
    fsync per file but one sync of the file system at the end: the per-file cost (create,
    write, rename) of a tool that makes its files durable by batch."""
    out = Path(spec["out"])
    tmp = out / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(spec["size"])
    per_folder = spec["per_folder"]
    folders = {n // per_folder for n in range(spec["files"])}
    for folder in folders:
        (out / f"f{folder}").mkdir()

    def store(index: str) -> None:
        n = int(index)
        staged = tmp / f"{n}.part"
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, payload)
            if not spec.get("sync_at_end"):
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(staged, out / f"f{n // per_folder}" / f"{n}.dcm")

    over_studies([str(n) for n in range(spec["files"])], spec["workers"], store)
    tmp.rmdir()
    if spec.get("sync_at_end"):
        from trolley_etl.core.storage import sync_filesystem

        sync_filesystem(out)
        return {}
    for folder in folders:
        fd = os.open(out / f"f{folder}", os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return {}


# --- trolley-etl ------------------------------------------------------------------------------


#: Packages whose import is a large share of a short run's fixed cost, when a run loads them.
HEAVY_PACKAGES = ("pydicom", "numpy", "PIL", "pydantic", "requests", "yaml", "dask")


def loaded_modules() -> dict[str, Any]:
    """How many modules this process has imported, and which of the heavy packages."""
    heavy = [name for name in HEAVY_PACKAGES if name in sys.modules]
    return {"modules_loaded": len(sys.modules), "heavy_packages": heavy}


def trolley_cli(spec: dict[str, Any]) -> dict[str, Any]:
    """``trolley-etl ARGS...`` in this process (so VmHWM is the run's own), called as the
    console script calls it (no arguments, ``sys.argv``), so the process is tuned as a user's
    command is (the collector, BLAS threads: see ``trolley_etl.cli.startup``)."""
    from trolley_etl.cli import main

    sys.argv = ["trolley-etl", *spec["argv"]]
    code = main()
    if code != 0:
        raise SystemExit(f"trolley-etl {' '.join(spec['argv'])} exited {code}")
    return {"exit_code": code, **loaded_modules()}


def import_modules(spec: dict[str, Any]) -> dict[str, Any]:
    """Import ``modules`` (none: the interpreter's own start-up); ``work_s`` is their import
    time, the wall time minus it the interpreter's."""
    import importlib

    for name in spec["modules"]:
        importlib.import_module(name)
    return loaded_modules()


def trolley_cget(spec: dict[str, Any]) -> dict[str, Any]:
    """C-FIND + C-GET through the Python API (for when the runner cannot drive C-GET yet)."""
    from trolley_etl import Query, StorageDir, Trolley
    from trolley_etl.backends import CGet, DicomQR

    dimse = {"host": spec["host"], "port": spec["port"], "called_aet": spec["aet"]}
    trolley = Trolley(
        searcher=DicomQR(**dimse),
        downloader=CGet(**dimse),
        storage=StorageDir(spec["out"]),
        workers=spec["workers"],
    )
    with trolley:
        studies = trolley.find_studies(Query(StudyInstanceUID=list(spec["study_uids"])))
        stored = trolley.download(studies)
    return {"files": len(stored)}


# --- peer tools -------------------------------------------------------------------------------


def dicomtrolley_peer(spec: dict[str, Any]) -> dict[str, Any]:
    """The reference ``dicomtrolley``: QIDO-RS search, WADO-RS download through its Trolley."""
    import requests
    from dicomtrolley.core import Query
    from dicomtrolley.qido_rs import QidoRS
    from dicomtrolley.storage import StorageDir
    from dicomtrolley.trolley import Trolley
    from dicomtrolley.wado_rs import WadoRS

    local = threading.local()

    def trolley() -> Any:
        found = getattr(local, "trolley", None)
        if found is None:
            session = requests.Session()
            found = local.trolley = Trolley(
                searcher=QidoRS(session, spec["dicomweb"]),
                downloader=WadoRS(session, spec["dicomweb"]),
                storage=StorageDir(spec["out"]),
            )
        return found

    def fetch(uid: str) -> None:
        study = trolley().find_study(Query(StudyInstanceUID=uid))
        trolley().download(study, output_dir=spec["out"])

    over_studies(spec["study_uids"], spec["workers"], fetch)
    return {}


def dicomweb_client_peer(spec: dict[str, Any]) -> dict[str, Any]:
    """``dicomweb-client``: ``retrieve_study`` then each dataset saved as UID-named files."""
    from dicomweb_client.api import DICOMwebClient

    out = Path(spec["out"])
    local = threading.local()

    def fetch(uid: str) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = DICOMwebClient(spec["dicomweb"])
        for ds in client.retrieve_study(uid, media_types=(("application/dicom", "*"),)):
            folder = out / str(ds.StudyInstanceUID) / str(ds.SeriesInstanceUID)
            folder.mkdir(parents=True, exist_ok=True)
            ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm")

    over_studies(spec["study_uids"], spec["workers"], fetch)
    return {}


WORKLOADS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "wire": wire,
    "disk": disk,
    "trolley-cli": trolley_cli,
    "import": import_modules,
    "trolley-cget": trolley_cget,
    "dicomtrolley": dicomtrolley_peer,
    "dicomweb-client": dicomweb_client_peer,
}


def main() -> None:
    kind, spec = sys.argv[1], json.loads(sys.argv[2])
    started = time.perf_counter()
    figures = WORKLOADS[kind](spec)
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    figures.update(
        work_s=time.perf_counter() - started,
        cpu_s=usage.ru_utime + usage.ru_stime,
        peak_rss_kb=peak_rss_kb(),
        pid=os.getpid(),
    )
    sys.stdout.flush()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
