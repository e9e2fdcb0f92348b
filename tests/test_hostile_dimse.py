"""A hostile C-GET SCP (pynetdicom on 127.0.0.1): foreign instances and endless associations.

No real archive sends another study's instance or trickles C-STOREs forever, so a small
pynetdicom SCP does; the real-archive paths are in test_dimse.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from io import BytesIO

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelGet

from trolley_etl import StorageDir, Trolley
from trolley_etl._harness.dicomgen import make_instance, test_uid
from trolley_etl.backends import CGet
from trolley_etl.core.errors import DownloadError
from trolley_etl.core.interrupts import abort_transfers
from trolley_etl.core.model import StudyReference

STUDY = test_uid("dimse-hostile", "study")
OTHER = test_uid("dimse-hostile", "other")


def dataset(sop: str, study: str) -> pydicom.Dataset:
    made = make_instance(
        patient_id="P",
        patient_name="N",
        study_uid=study,
        series_uid=test_uid(study, "s"),
        sop_uid=sop,
        modality="CT",
        study_date="20240101",
        accession_number="A",
        rows=8,
        columns=8,
    )
    return pydicom.dcmread(BytesIO(made.data))


class HostileGetSCP:
    """Answers every C-GET with `datasets`, waiting `pause` seconds before each."""

    def __init__(self, datasets: list[pydicom.Dataset], pause: float = 0.0) -> None:
        self.datasets, self.pause = datasets, pause
        self.stop = threading.Event()
        ae = AE(ae_title="HOSTILE")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_supported_context(CTImageStorage, scu_role=True, scp_role=True)
        self.server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_GET, self.handle)]
        )
        self.port = self.server.server_address[1]

    def handle(self, event: evt.Event) -> Iterator[object]:
        yield len(self.datasets)
        for ds in self.datasets:
            if self.stop.wait(self.pause):
                return
            yield 0xFF00, ds

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()


@pytest.fixture()
def scp_factory() -> Iterator:
    made: list[HostileGetSCP] = []

    def make(datasets: list[pydicom.Dataset], pause: float = 0.0) -> HostileGetSCP:
        made.append(HostileGetSCP(datasets, pause))
        return made[-1]

    yield make
    for scp in made:
        scp.close()


def cget(port: int, **kwargs: object) -> CGet:
    return CGet("127.0.0.1", port, "HOSTILE", storage_sop_classes=[CTImageStorage], **kwargs)


@pytest.mark.archive
def test_c_get_answer_with_another_studys_instance_is_refused(scp_factory, tmp_path) -> None:
    mine, foreign = dataset(test_uid("d", 1), STUDY), dataset(test_uid("d", 2), OTHER)
    scp = scp_factory([mine, foreign])
    trolley = Trolley(downloader=cget(scp.port))
    with pytest.raises(DownloadError):
        trolley.download(StudyReference(STUDY), output_dir=tmp_path)
    stored = [p for p in tmp_path.rglob("*.dcm") if ".trolley" not in p.parts]
    assert [p.stem for p in stored] == [mine.SOPInstanceUID]
    assert OTHER not in {p.name for p in tmp_path.rglob("*")}


@pytest.mark.archive
def test_an_endless_association_hits_its_deadline(scp_factory, tmp_path) -> None:
    scp = scp_factory([dataset(test_uid("slow", i), STUDY) for i in range(100)], pause=0.3)
    downloader = cget(scp.port)
    downloader.settings = type(downloader.settings)(
        **{**vars(downloader.settings), "deadline": 1.5}
    )
    started = time.monotonic()
    with pytest.raises(DownloadError, match=r"deadline of 1\.5 s"):
        Trolley(downloader=downloader).download(StudyReference(STUDY), output_dir=tmp_path)
    assert time.monotonic() - started < 10


@pytest.mark.archive
def test_abort_transfers_stops_an_association_at_once(scp_factory, tmp_path) -> None:
    scp = scp_factory([dataset(test_uid("stall", i), STUDY) for i in range(3)], pause=60)
    downloader = cget(scp.port)
    failure: list[BaseException] = []

    def fetch() -> None:
        try:
            downloader.fetch(StudyReference(STUDY), StorageDir(tmp_path))
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=fetch)
    worker.start()
    time.sleep(1.0)
    started = time.monotonic()
    assert abort_transfers() >= 1
    worker.join(timeout=10)
    assert not worker.is_alive() and time.monotonic() - started < 5
    assert failure and "interrupted" in str(failure[0])
