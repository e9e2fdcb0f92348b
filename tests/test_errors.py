"""One error tree: every error in core/errors.py, exported, named for what happened, and
carrying its own retry decision (`transient`) that the runner's policy reads."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import trolley_etl
from trolley_etl import (
    AuthenticationError,
    BackendError,
    ConfigurationError,
    ConnectionFailedError,
    DimseStatusError,
    DiskFullError,
    InvalidUidError,
    LayoutError,
    MatchError,
    NoMatchError,
    ObjectNotFoundError,
    ObjectTooLargeError,
    Query,
    ResponseFormatError,
    SeveralMatchesError,
    Trolley,
    TrolleyError,
)
from trolley_etl.core import errors
from trolley_etl.core.layout import LayoutTemplate
from trolley_etl.runner.retry import is_retryable
from trolley_etl.testing import FakeArchive, make_dataset

#: Private exceptions used for control flow inside one module, never seen by callers.
CONTROL_FLOW = {"_Stopped", "_GiveUp", "_RowError", "YamlProblem", "_PreconditionFailed"}


def _public_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(trolley_etl.__path__, "trolley_etl."):
        if "._harness" in info.name or info.name.endswith("__main__"):
            continue
        names.append(info.name)
    return names


def test_every_error_class_lives_in_the_errors_module() -> None:
    stray = []
    for name in _public_modules():
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == name
                and name != "trolley_etl.core.errors"
                and attr not in CONTROL_FLOW
            ):
                stray.append(f"{name}.{attr}")
    assert stray == []


def test_every_public_error_is_exported_from_the_package_and_drawn_in_the_tree() -> None:
    tree = errors.__doc__ or ""
    for name in errors.__all__:
        value = getattr(errors, name)
        if not inspect.isclass(value):
            continue
        assert issubclass(value, TrolleyError), name
        assert getattr(trolley_etl, name) is value, name
        assert name in tree or value is errors.NotFoundError, f"{name} missing from the tree"


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (ConnectionFailedError("refused"), True),
        (ResponseFormatError("truncated multipart"), True),
        (BackendError("HTTP 503", status=503), True),
        (BackendError("HTTP 429", status=429), True),
        (BackendError("no status"), True),
        (BackendError("HTTP 400", status=400), False),
        (AuthenticationError("HTTP 401", status=401), False),
        (ObjectNotFoundError("HTTP 404", status=404), False),
        (DimseStatusError("0xC000 cannot understand", status=0xC000), False),
        (DiskFullError("no space"), False),
        (InvalidUidError("1.2.x"), False),
        (ConfigurationError("page_size must be at least 1"), False),
        (ObjectTooLargeError("over the limit"), True),
    ],
)
def test_the_retry_policy_reads_the_errors_transient_property(
    error: TrolleyError, transient: bool
) -> None:
    assert error.transient is transient
    assert is_retryable(error) is transient


def test_the_retry_policy_follows_a_new_error_type_without_being_edited() -> None:
    class FlakyLicenceServer(TrolleyError):
        @property
        def transient(self) -> bool:
            return True

    assert is_retryable(FlakyLicenceServer("try again"))
    assert is_retryable(TimeoutError()) and not is_retryable(KeyError("bug"))


def test_no_match_and_several_matches_are_told_apart() -> None:
    study = "1.2.826.0.1.3680043.8.498.1"
    archive = FakeArchive(
        [
            make_dataset(study_uid=study, PatientID="P1", AccessionNumber="A1"),
            make_dataset(PatientID="P1", AccessionNumber="A2"),
        ]
    )
    trolley = Trolley(archive.downloader(), archive.searcher())
    assert trolley.find_study(Query(AccessionNumber="A1")).uid == study
    with pytest.raises(NoMatchError, match="found 0"):
        trolley.find_study(Query(AccessionNumber="NOPE"))
    with pytest.raises(SeveralMatchesError, match="found 2"):
        trolley.find_study(Query(PatientID="P1"))
    assert issubclass(NoMatchError, MatchError) and issubclass(SeveralMatchesError, MatchError)


def test_an_invalid_layout_is_a_configuration_error_not_a_query_error() -> None:
    with pytest.raises(LayoutError) as caught:
        LayoutTemplate("{PatientID}/../{SOPInstanceUID}")
    assert isinstance(caught.value, ConfigurationError)
    assert not isinstance(caught.value, errors.QueryError)


def test_backend_constructors_raise_configuration_errors() -> None:
    from trolley_etl.backends.qido_rs import QidoRS

    with pytest.raises(ConfigurationError, match="page_size"):
        QidoRS("http://127.0.0.1:9/dicom-web", page_size=0)
