"""Test harness: a throw-away Orthanc archive and deterministic DICOM generators."""

from trolley_etl.testing.dicomgen import (
    COHORT_ACCESSIONS,
    COHORT_PATIENTS,
    COHORT_STUDIES,
    HOSTILE,
    GeneratedInstance,
    large_series_instances,
    make_instance,
    standard_cohort,
    test_uid,
)
from trolley_etl.testing.orthanc import (
    OrthancError,
    OrthancNotInstalledError,
    OrthancServer,
    OrthancStartError,
    free_port,
)

__all__ = [
    "COHORT_ACCESSIONS",
    "COHORT_PATIENTS",
    "COHORT_STUDIES",
    "HOSTILE",
    "GeneratedInstance",
    "OrthancError",
    "OrthancNotInstalledError",
    "OrthancServer",
    "OrthancStartError",
    "free_port",
    "large_series_instances",
    "make_instance",
    "standard_cohort",
    "test_uid",
]
