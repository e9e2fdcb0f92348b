"""One module per protocol. Searchers find objects; downloaders fetch them.

The classes are imported on first use (PEP 562), so a command that needs one protocol does
not pay for loading the others (pynetdicom alone takes a quarter of a second).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trolley_etl.lazy import lazy_exports

if TYPE_CHECKING:
    from trolley_etl.backends.c_get import CGet
    from trolley_etl.backends.c_move import CMove, MoveDestination
    from trolley_etl.backends.dicom_qr import DicomQR
    from trolley_etl.backends.dicom_qr_metadata import DicomQRMetadata
    from trolley_etl.backends.dimse import DimseSettings, DimseTls
    from trolley_etl.backends.http import BearerAuth, HttpSettings, auth_from_env
    from trolley_etl.backends.local_folder import LocalFolder
    from trolley_etl.backends.mint import Mint
    from trolley_etl.backends.qido_rs import QidoRS
    from trolley_etl.backends.rad69 import Rad69
    from trolley_etl.backends.session_auth import ImpaxAuth, VitreaAuth
    from trolley_etl.backends.wado_rs import WadoRS
    from trolley_etl.backends.wado_uri import WadoURI

_MODULES = {
    "BearerAuth": "http",
    "CGet": "c_get",
    "CMove": "c_move",
    "DicomQR": "dicom_qr",
    "DicomQRMetadata": "dicom_qr_metadata",
    "DimseSettings": "dimse",
    "DimseTls": "dimse",
    "HttpSettings": "http",
    "MoveDestination": "c_move",
    "ImpaxAuth": "session_auth",
    "LocalFolder": "local_folder",
    "Mint": "mint",
    "QidoRS": "qido_rs",
    "Rad69": "rad69",
    "VitreaAuth": "session_auth",
    "WadoRS": "wado_rs",
    "WadoURI": "wado_uri",
    "auth_from_env": "http",
}

__all__ = [
    "BearerAuth",
    "CGet",
    "CMove",
    "DicomQR",
    "DicomQRMetadata",
    "DimseSettings",
    "DimseTls",
    "HttpSettings",
    "ImpaxAuth",
    "LocalFolder",
    "Mint",
    "MoveDestination",
    "QidoRS",
    "Rad69",
    "VitreaAuth",
    "WadoRS",
    "WadoURI",
    "auth_from_env",
]


__getattr__, __dir__ = lazy_exports(__name__, _MODULES)
