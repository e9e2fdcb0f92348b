"""One module per protocol. Searchers find objects; downloaders fetch them."""

from trolley_etl.backends.c_get import CGet
from trolley_etl.backends.c_move import CMove
from trolley_etl.backends.dicom_qr import DicomQR
from trolley_etl.backends.http import BearerAuth, auth_from_env
from trolley_etl.backends.local_folder import LocalFolder
from trolley_etl.backends.mint import Mint
from trolley_etl.backends.qido_rs import QidoRS
from trolley_etl.backends.rad69 import Rad69
from trolley_etl.backends.wado_rs import WadoRS
from trolley_etl.backends.wado_uri import WadoURI

__all__ = [
    "BearerAuth",
    "CGet",
    "CMove",
    "DicomQR",
    "LocalFolder",
    "Mint",
    "QidoRS",
    "Rad69",
    "WadoRS",
    "WadoURI",
    "auth_from_env",
]
