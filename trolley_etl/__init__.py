"""trolley-etl: pull DICOM studies out of image archives for research."""

from trolley_etl.core.errors import TrolleyError
from trolley_etl.core.model import (
    Instance,
    InstanceReference,
    QueryLevel,
    Series,
    SeriesReference,
    Study,
    StudyReference,
)
from trolley_etl.core.query import Query
from trolley_etl.core.storage import StorageDir, StoredInstance
from trolley_etl.core.trolley import Trolley

__version__ = "0.1.0"

__all__ = [
    "Instance",
    "InstanceReference",
    "Query",
    "QueryLevel",
    "Series",
    "SeriesReference",
    "StorageDir",
    "StoredInstance",
    "Study",
    "StudyReference",
    "Trolley",
    "TrolleyError",
    "__version__",
]
