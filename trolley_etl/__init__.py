"""trolley-etl: pull DICOM studies out of image archives for research.

The public names are imported on first use (PEP 562), so a command that only reads a
checkpoint (`trolley-etl status`) does not pay for loading pydicom and the Trolley.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trolley_etl.lazy import lazy_exports

if TYPE_CHECKING:
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

_MODULES = {
    "Instance": "core.model",
    "InstanceReference": "core.model",
    "Query": "core.query",
    "QueryLevel": "core.model",
    "Series": "core.model",
    "SeriesReference": "core.model",
    "StorageDir": "core.storage",
    "StoredInstance": "core.storage",
    "Study": "core.model",
    "StudyReference": "core.model",
    "Trolley": "core.trolley",
    "TrolleyError": "core.errors",
}

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


__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
