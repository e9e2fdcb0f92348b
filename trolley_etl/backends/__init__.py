"""One module per protocol. Searchers find objects; downloaders fetch them."""

from trolley_etl.backends.http import BearerAuth, auth_from_env
from trolley_etl.backends.qido_rs import QidoRS
from trolley_etl.backends.wado_rs import WadoRS
from trolley_etl.backends.wado_uri import WadoURI

__all__ = ["BearerAuth", "QidoRS", "WadoRS", "WadoURI", "auth_from_env"]
