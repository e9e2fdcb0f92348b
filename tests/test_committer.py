"""The committer: files handed over are fsynced, renamed, their folders fsynced, then
recorded, in that order; failures reach the item that owns the file; nobody waits forever.

These use a real StorageDir and a real checkpoint on disk; only the order of the durability
calls is observed, by wrapping the functions the committer calls.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from trolley_etl import StorageDir
from trolley_etl._harness.dicomgen import make_instance, test_uid
from trolley_etl.core.errors import StorageError
from trolley_etl.core.model import StudyReference
from trolley_etl.runner import committer as committer_module
from trolley_etl.runner.checkpoint import open_checkpoint
from trolley_etl.runner.committer import Committer, ItemFiles
from trolley_etl.runner.progress import Progress


def _instance(n: int, series: str = "se") -> bytes:
    return make_instance(
        patient_id="P1", patient_name="A^B", study_uid=test_uid("st"), series_uid=test_uid(series),
        sop_uid=test_uid("sop", series, n), modality="CT", study_date="20240101",
        accession_number="A1", instance_number=n,
    ).data  # fmt: skip


def _hand_over(storage: StorageDir, committer: Committer, files: ItemFiles, data: bytes) -> Path:
    staged = storage.open_instance()
    staged.write(data)
    stored = staged.finish(sync=False)
    committer.submit(files, staged.path, stored)
    return stored.path


@pytest.fixture
def setup(tmp_path: Path):
    storage = StorageDir(tmp_path / "data")
    checkpoint = open_checkpoint(storage.root)
    progress = Progress(1, enabled=False)
    yield storage, checkpoint, progress
    checkpoint.close()


def _waited(files: ItemFiles) -> BaseException | None:
    """files.wait() in a thread, so that a committer that lost a file fails the test
    instead of hanging it."""
    outcome: list[BaseException | None] = []

    def wait() -> None:
        try:
            files.wait()
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert outcome, "ItemFiles.wait() never returned"
    return outcome[0]


def test_files_are_synced_renamed_synced_then_recorded(setup, monkeypatch) -> None:
    storage, checkpoint, progress = setup
    calls: list[str] = []
    lock = threading.Lock()

    def spy(name: str, real):
        def wrapper(*args, **kwargs):
            with lock:
                calls.append(name)
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        committer_module, "fsync_file", spy("fsync_file", committer_module.fsync_file)
    )
    monkeypatch.setattr(committer_module, "fsync_dir", spy("fsync_dir", committer_module.fsync_dir))
    monkeypatch.setattr(storage, "install", spy("install", storage.install))
    monkeypatch.setattr(checkpoint, "record_files_of_items",
                        spy("record", checkpoint.record_files_of_items))  # fmt: skip

    item = checkpoint_item(checkpoint)
    files = ItemFiles(item)
    with Committer(storage, checkpoint, progress, source="test", run_id="r1") as committer:
        paths = [_hand_over(storage, committer, files, _instance(n)) for n in range(1, 6)]
        assert _waited(files) is None

    assert all(p.is_file() for p in paths)
    assert not list(storage.tmp_dir.iterdir())
    recorded = {r["path"] for r in checkpoint.files()}
    assert recorded == {p.relative_to(storage.root).as_posix() for p in paths}
    assert progress.instances == 5 and files.bytes == sum(p.stat().st_size for p in paths)
    # every record comes after the fsync of each file it names and of its folder
    last_record = max(i for i, c in enumerate(calls) if c == "record")
    assert calls.count("fsync_file") == 5 and calls.count("install") == 5
    first_record = calls.index("record")
    assert max(i for i, c in enumerate(calls) if c == "fsync_file") < last_record
    assert calls.index("fsync_dir") < first_record
    for index, call in enumerate(calls):
        if call == "install":  # renamed only after its own fsync finished (futures)
            assert calls[:index].count("fsync_file") >= calls[: index + 1].count("install")


def checkpoint_item(checkpoint) -> int:
    checkpoint.save_resolution("h", [], [StudyReference(test_uid("st"))])
    return checkpoint.items()[0].item_id


def test_a_file_that_cannot_be_placed_fails_its_item_only(setup) -> None:
    storage, checkpoint, progress = setup
    storage = StorageDir(storage.root, "{PatientID}.dcm")  # every instance to the same path
    item = checkpoint_item(checkpoint)
    first, second = ItemFiles(item), ItemFiles(item)
    with Committer(storage, checkpoint, progress, source="test", run_id="r1") as committer:
        _hand_over(storage, committer, first, _instance(1))
        assert _waited(first) is None
        _hand_over(storage, committer, second, _instance(2))
        error = _waited(second)
    assert isinstance(error, StorageError) and "maps two instances" in str(error)
    assert [r["sop_instance_uid"] for r in checkpoint.files()] == [test_uid("sop", "se", 1)]
    assert not list(storage.tmp_dir.iterdir())  # the refused temp file is gone


def test_a_checkpoint_that_cannot_record_fails_the_item_and_nobody_hangs(
    setup, monkeypatch
) -> None:
    storage, checkpoint, progress = setup
    item = checkpoint_item(checkpoint)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "record_files_of_items", broken)
    files = ItemFiles(item)
    with Committer(storage, checkpoint, progress, source="test", run_id="r1") as committer:
        path = _hand_over(storage, committer, files, _instance(1))
        error = _waited(files)
    assert isinstance(error, OSError) and "disk full" in str(error)
    assert path.is_file() and list(checkpoint.files()) == []  # in place, unknown: fetched again


def test_an_unexpected_error_in_the_committer_still_releases_the_waiters(
    setup, monkeypatch
) -> None:
    storage, checkpoint, progress = setup
    item = checkpoint_item(checkpoint)

    def exploding(size: int) -> None:
        raise RuntimeError("progress bar broke")

    monkeypatch.setattr(progress, "instance_stored", exploding)
    files = ItemFiles(item)
    with Committer(storage, checkpoint, progress, source="test", run_id="r1") as committer:
        _hand_over(storage, committer, files, _instance(1))
        first = _waited(files)
        later = ItemFiles(item)
        _hand_over(storage, committer, later, _instance(2))  # the thread is still alive
        second = _waited(later)
    assert first is None and second is None  # recorded before progress was told
    assert len(list(checkpoint.files())) == 2
