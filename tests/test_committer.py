"""The committer: files handed over are renamed, recorded as unsynced, then synced by batch
and marked durable, in that order; a rerun re-hashes what was never marked durable;
failures reach the item that owns the file; nobody waits forever.

These use a real StorageDir and a real checkpoint on disk; only the order of the durability
calls is observed, by wrapping the functions the committer calls.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from trolley_etl import StorageDir
from trolley_etl._harness.dicomgen import make_instance, test_uid
from trolley_etl.core.errors import StorageError
from trolley_etl.core.model import StudyReference
from trolley_etl.runner import committer as committer_module
from trolley_etl.runner.checkpoint import open_checkpoint
from trolley_etl.runner.committer import Committer, ItemFiles, recover_unsynced
from trolley_etl.runner.progress import Progress


def _instance(n: int, series: str = "se") -> bytes:
    return make_instance(
        patient_id="P1",
        patient_name="A^B",
        study_uid=test_uid("st"),
        series_uid=test_uid(series),
        sop_uid=test_uid("sop", series, n),
        modality="CT",
        study_date="20240101",
        accession_number="A1",
        instance_number=n,
    ).data


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


def test_files_are_renamed_recorded_unsynced_then_synced_by_batch(setup, monkeypatch) -> None:
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
        committer_module, "sync_filesystem", spy("sync", committer_module.sync_filesystem)
    )
    monkeypatch.setattr(storage, "install", spy("install", storage.install))
    monkeypatch.setattr(
        checkpoint, "record_files_of_items", spy("record", checkpoint.record_files_of_items)
    )
    monkeypatch.setattr(checkpoint, "mark_durable", spy("durable", checkpoint.mark_durable))

    item = checkpoint_item(checkpoint)
    files = ItemFiles(item)
    with Committer(storage, checkpoint, progress, source="test", run_id="r1") as committer:
        paths = [_hand_over(storage, committer, files, _instance(n)) for n in range(1, 6)]
        assert _waited(files) is None
        # recorded, but listed as unsynced until the batch's sync
        assert len(checkpoint.unsynced_files()) == 5
        assert "sync" not in calls

    assert all(p.is_file() for p in paths)
    assert not list(storage.tmp_dir.iterdir())
    recorded = {r["path"] for r in checkpoint.files()}
    assert recorded == {p.relative_to(storage.root).as_posix() for p in paths}
    assert progress.instances == 5 and files.bytes == sum(p.stat().st_size for p in paths)
    # one sync for the whole batch, after every record, and only then marked durable
    assert calls.count("install") == 5 and calls.count("sync") == 1
    assert max(i for i, c in enumerate(calls) if c == "record") < calls.index("sync")
    assert calls.index("sync") < calls.index("durable")
    assert calls.index("install") < calls.index("record")
    assert checkpoint.unsynced_files() == []


def test_a_sync_is_due_after_enough_files(setup, monkeypatch) -> None:
    """Long runs sync along the way, not only at the end: a power cut takes back at most a
    batch, and the next run re-hashes at most that."""
    storage, checkpoint, progress = setup
    monkeypatch.setattr(committer_module, "SYNC_FILES", 2)
    synced = threading.Event()
    real = committer_module.sync_filesystem

    def spy(path):
        synced.set()
        return real(path)

    monkeypatch.setattr(committer_module, "sync_filesystem", spy)
    files = ItemFiles(checkpoint_item(checkpoint))
    with Committer(storage, checkpoint, progress, source="test", run_id="r1") as committer:
        for n in range(1, 4):
            _hand_over(storage, committer, files, _instance(n))
        assert _waited(files) is None
        assert synced.wait(timeout=30)  # before close


def test_recover_unsynced_rehashes_and_reopens_only_what_was_lost(setup) -> None:
    storage, checkpoint, progress = setup
    item = checkpoint_item(checkpoint)
    files = ItemFiles(item)
    committer = Committer(storage, checkpoint, progress, source="test", run_id="r1")
    paths = [_hand_over(storage, committer, files, _instance(n)) for n in range(1, 4)]
    assert _waited(files) is None
    committer._closing = True  # stop without the final sync, as a crash would
    with committer._due:
        committer._unsynced_files = 0
        committer._due.notify_all()
    committer._queue.put(committer_module._CLOSE)
    committer._thread.join(timeout=30)
    committer._syncer.join(timeout=30)
    checkpoint.mark_done(item)
    assert len(checkpoint.unsynced_files()) == 3
    paths[0].unlink()  # what a power cut can do to files never synced
    os.truncate(paths[1], 10)
    assert recover_unsynced(storage.root, checkpoint) == 2
    assert checkpoint.unsynced_files() == []
    assert {r["path"] for r in checkpoint.files()} == {
        paths[2].relative_to(storage.root).as_posix()
    }
    (state,) = {i.state.value for i in checkpoint.items()}
    assert state == "pending"  # fetched again by the run


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


def test_without_syncfs_each_file_and_folder_is_fsynced(setup, monkeypatch) -> None:
    """Kernels before 5.8 do not report write-back errors from syncfs: fsync instead."""
    storage, checkpoint, progress = setup
    monkeypatch.setattr(committer_module, "use_syncfs", lambda: False)
    synced: list[Path] = []
    lock = threading.Lock()
    real = committer_module.fsync_path

    def spy(path: Path) -> None:
        with lock:
            synced.append(path)
        real(path)

    monkeypatch.setattr(committer_module, "fsync_path", spy)
    files = ItemFiles(checkpoint_item(checkpoint))
    with Committer(storage, checkpoint, progress, source="test", run_id="r1") as committer:
        paths = [_hand_over(storage, committer, files, _instance(n)) for n in range(1, 4)]
        assert _waited(files) is None
    assert set(synced) == {*paths, paths[0].parent}
    assert checkpoint.unsynced_files() == []


def test_a_failed_sync_fails_the_close_and_leaves_the_files_unsynced(setup, monkeypatch) -> None:
    """A write-back error must not end in exit 0, nor in files the next run trusts unseen."""
    storage, checkpoint, progress = setup

    def failing(path: Path) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(committer_module, "use_syncfs", lambda: True)
    monkeypatch.setattr(committer_module, "sync_filesystem", failing)
    files = ItemFiles(checkpoint_item(checkpoint))
    committer = Committer(storage, checkpoint, progress, source="test", run_id="r1")
    for n in range(1, 3):
        _hand_over(storage, committer, files, _instance(n))
    assert _waited(files) is None
    with pytest.raises(OSError, match="Input/output"):
        committer.close()
    assert len(checkpoint.unsynced_files()) == 2  # the next run re-hashes them


def test_files_handed_over_together_are_recorded_in_few_transactions(setup, monkeypatch) -> None:
    storage, checkpoint, progress = setup
    transactions: list[int] = []
    record = checkpoint.record_files_of_items

    def counted(batches, *args, **kwargs):
        transactions.append(sum(len(stored) for _, stored in batches))
        return record(batches, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "record_files_of_items", counted)
    monkeypatch.setattr(committer_module, "LINGER_SECONDS", 5.0)  # far longer than the test
    files = ItemFiles(1)
    with Committer(storage, checkpoint, progress, source="t", run_id="r") as committer:
        for n in range(50):
            _hand_over(storage, committer, files, _instance(n))
        waiter = threading.Thread(target=committer.wait_for, args=(files,), daemon=True)
        waiter.start()
        waiter.join(timeout=4.0)  # the waiting item cuts the linger short
        assert not waiter.is_alive(), "an item waiting for its files waited for the linger"
    assert sum(transactions) == 50
    assert len(transactions) <= 3  # one per file before


def test_more_files_than_a_batch_holds_are_all_recorded(setup, monkeypatch) -> None:
    storage, checkpoint, progress = setup
    monkeypatch.setattr(committer_module, "MAX_BATCH", 3)
    monkeypatch.setattr(committer_module, "LINGER_SECONDS", 5.0)
    files = ItemFiles(1)
    with Committer(storage, checkpoint, progress, source="t", run_id="r") as committer:
        for n in range(10):
            _hand_over(storage, committer, files, _instance(n))
        waiter = threading.Thread(target=committer.wait_for, args=(files,), daemon=True)
        waiter.start()
        waiter.join(timeout=30)
        assert not waiter.is_alive(), "a file handed over was never recorded"
    assert len(list(checkpoint.files())) == 10
