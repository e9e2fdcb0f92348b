"""Shared fixtures: real Orthanc archives seeded with the standard synthetic cohort.

Orthanc is a hard requirement of the test suite: if it is missing, the fixtures FAIL (they do
not skip) with the command to install it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:
    import trolley_etl._harness  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trolley_etl._harness.dicomgen import GeneratedInstance, standard_cohort
from trolley_etl._harness.orthanc import (
    OrthancNotInstalledError,
    OrthancServer,
    free_port,
)

__all__ = ["AUTH_USERS", "free_port"]

#: Credentials of the ``orthanc_auth`` server.
AUTH_USERS = {"alice": "s3cret-pass"}


def _start(workdir: Path, **kwargs: object) -> OrthancServer:
    try:
        return OrthancServer(workdir, **kwargs).start()  # type: ignore[arg-type]
    except OrthancNotInstalledError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def cohort() -> list[GeneratedInstance]:
    """The instances of :func:`standard_cohort`, in the order they were seeded."""
    return standard_cohort()


@pytest.fixture(scope="session")
def orthanc(
    tmp_path_factory: pytest.TempPathFactory, cohort: list[GeneratedInstance]
) -> Iterator[OrthancServer]:
    """A running Orthanc (no auth, DICOMweb + WADO-URI) holding the whole cohort."""
    server = _start(tmp_path_factory.mktemp("orthanc"))
    try:
        server.upload_many(inst.data for inst in cohort)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def orthanc_auth(
    tmp_path_factory: pytest.TempPathFactory, cohort: list[GeneratedInstance]
) -> Iterator[OrthancServer]:
    """A running Orthanc with basic auth (:data:`AUTH_USERS`) holding the first study only."""
    server = _start(tmp_path_factory.mktemp("orthanc-auth"), users=AUTH_USERS)
    try:
        first_study = cohort[0].study_uid
        server.upload_many(inst.data for inst in cohort if inst.study_uid == first_study)
        yield server
    finally:
        server.stop()


#: Fixtures that start a real server (Orthanc, qrscp, a local HTTP server): a test that uses
#: any of them, directly or through another fixture, belongs to the ``archive`` tier.
SERVER_FIXTURES = frozenset(
    {
        "archive",
        "orthanc",
        "orthanc_auth",
        "orthanc_archive",
        "qrscp_archive",
        "httpserver",
        "many_studies",
        "large_study",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that needs a real server, so `make test-fast` can leave them out."""
    for item in items:
        if SERVER_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.archive)


#: Tiers a test must be marked with to start a server or another process.
_TIER_MARKERS = {"listen": ("archive", "slow"), "process": ("subprocess", "archive", "slow")}
#: The markers of the test being run (its fixtures included); None between tests.
_running: dict[str, object] = {"node": None, "markers": None}


def _guard(kind: str, real: Any) -> Any:
    def checked(*args: Any, **kwargs: Any) -> Any:
        markers = _running["markers"]
        if isinstance(markers, set) and not markers.intersection(_TIER_MARKERS[kind]):
            what = "starts a server" if kind == "listen" else "starts a process"
            needed = " or ".join(_TIER_MARKERS[kind][:-1])
            raise AssertionError(f"{_running['node']} {what}: mark it {needed}")
        return real(*args, **kwargs)

    return checked


def pytest_configure(config: pytest.Config) -> None:
    """The fast tier stays fast: a test (or a fixture it pulls in) that listens on a socket
    or starts a process without the `archive` or `subprocess` marker fails, naming it."""
    import socket
    import subprocess

    socket.socket.listen = _guard("listen", socket.socket.listen)  # type: ignore[method-assign]
    subprocess.Popen.__init__ = _guard("process", subprocess.Popen.__init__)  # type: ignore[method-assign]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    _running.update(node=item.nodeid, markers={mark.name for mark in item.iter_markers()})
    try:
        yield
    finally:
        _running.update(node=None, markers=None)
