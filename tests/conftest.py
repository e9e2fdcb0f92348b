"""Shared fixtures: real Orthanc archives seeded with the standard synthetic cohort.

Orthanc is a hard requirement of the test suite: if it is missing, the fixtures FAIL (they do
not skip) with the command to install it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

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
