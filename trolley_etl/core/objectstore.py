"""Object storage (S3 and S3-compatible services) as the storage root: `s3://bucket/prefix`.

Each instance is received into a local temp file exactly as on a local root (hashed as it
streams, header read from its first bytes), then sent with ONE request to its final key:
the SHA-256 goes along as `x-amz-checksum-sha256`, so the server refuses bytes that differ
from what was received, and `If-None-Match: *` makes the PUT fail instead of replacing an
object already at that key. An existing object with the same SHA-256 is the same instance
(a rerun after a crash between PUT and checkpoint): accepted, which makes reruns idempotent.
A different one is reported and left alone. Objects above `multipart_threshold_mb` go in
parts, each with its own checksum, the completion again conditional.

Why a local temp file rather than a pipe to the bucket: the checksum header must be known
before the body is sent, and a retry must be able to send the same bytes again. One instance
at a time per worker is on local disk, never a study.

The client is boto3 (Apache-2.0), AWS's own, the most used S3 client with every S3-compatible
service; other object stores (GCS, Azure) would be another `ObjectStore` with the same four
operations. The checkpoint, logs and reports stay on local disk (`run.state_dir`): SQLite must
not live in a bucket.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from trolley_etl.core.errors import (
    AuthenticationError,
    BackendError,
    ChecksumRejectedError,
    ConnectionFailedError,
    ObjectExistsError,
    ObjectNotFoundError,
    StorageError,
)
from trolley_etl.core.layout import DEFAULT_LAYOUT
from trolley_etl.core.storage import StorageDir, StoredInstance

if TYPE_CHECKING:
    from trolley_etl.deid.engine import Deidentifier
    from trolley_etl.manifest.models import Manifest, S3Settings

SCHEME = "s3://"
#: Bytes per part of a multipart upload (held in memory one part at a time per worker).
PART_BYTES = 16 << 20
#: Sends of one object whose checksum the server rejected, before the item is retried.
CHECKSUM_ATTEMPTS = 3
#: Keys listed per request; a listing is paged and bounded by MAX_LIST_PAGES.
MAX_LIST_PAGES = 1_000_000
CHUNK = 1 << 20
_AUTH_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"}
_CHECKSUM_CODES = {
    "BadDigest",
    "InvalidDigest",
    "XAmzContentChecksumMismatch",
    "XAmzContentSHA256Mismatch",
    "InvalidChecksum",
}


def is_object_url(root: str | os.PathLike[str]) -> bool:
    """True for an `s3://` root (object storage), False for a local folder."""
    return str(root).startswith(SCHEME)


def split_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://bucket/prefix; the prefix has no leading or trailing slash."""
    if not is_object_url(url):
        raise StorageError(f"not an s3:// URL: {url}")
    bucket, _, prefix = url[len(SCHEME) :].partition("/")
    if not bucket:
        raise StorageError(f"no bucket in {url}")
    return bucket, prefix.strip("/")


def b64_sha256(hex_digest: str) -> str:
    """The base64 form of a SHA-256 that S3 checks (`x-amz-checksum-sha256`)."""
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")


def _boto3() -> Any:
    try:
        import boto3
    except ImportError:
        raise StorageError(
            "an s3:// storage root needs boto3: pip install 'trolley-etl[s3]'"
        ) from None
    return boto3


class ObjectStore:
    """The four operations trolley-etl needs from a bucket, over boto3. Thread-safe."""

    def __init__(self, url: str, settings: S3Settings | None = None) -> None:
        self.url = url.rstrip("/")
        self.bucket, self.prefix = split_url(url)
        self.multipart_threshold = (settings.multipart_threshold_mb if settings else 64) << 20
        #: Tests only: how many of the next sends carry a wrong checksum (a fault to survive).
        self.fault_wrong_checksums = 0
        self._fault_lock = threading.Lock()
        self._settings = settings
        self._client: Any = None
        self._client_lock = threading.Lock()

    @property
    def client(self) -> Any:
        """The boto3 client, made on first use (so that a missing boto3 or credential is an
        ordinary one-line failure of the run, not of building it)."""
        with self._client_lock:
            if self._client is None:
                self._client = self._make_client(self._settings)
            return self._client

    @staticmethod
    def _make_client(settings: S3Settings | None) -> Any:
        boto3 = _boto3()
        from botocore.config import Config

        kwargs: dict[str, Any] = {}
        if settings is not None and settings.access_key_env:
            assert settings.secret_key_env is not None
            try:
                kwargs["aws_access_key_id"] = os.environ[settings.access_key_env]
                kwargs["aws_secret_access_key"] = os.environ[settings.secret_key_env]
            except KeyError as missing:
                raise AuthenticationError(
                    f"environment variable {missing.args[0]} (storage.s3) is not set"
                ) from None
        config = Config(
            retries={"max_attempts": 4, "mode": "standard"},  # bounded, with backoff
            connect_timeout=30,
            read_timeout=300,
            max_pool_connections=64,
            request_checksum_calculation="when_required",  # we send SHA-256 ourselves
            response_checksum_validation="when_required",
            s3={"addressing_style": "path"} if settings and settings.endpoint_url else {},
        )
        session = boto3.session.Session()
        return session.client(
            "s3",
            endpoint_url=settings.endpoint_url if settings else None,
            # the manifest's, else the provider chain's (AWS_REGION, config), else S3's default
            region_name=(settings.region if settings else None)
            or session.region_name
            or "us-east-1",
            config=config,
            **kwargs,
        )

    # --- keys ------------------------------------------------------------------------------

    def key(self, relative: str) -> str:
        """The object key of a path relative to the root (under the prefix)."""
        relative = PurePosixPath(relative).as_posix().lstrip("/")
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def relative(self, key: str) -> str:
        """The path relative to the root of an object key."""
        return key[len(self.prefix) + 1 :] if self.prefix else key

    def describe(self, relative: str) -> str:
        """The object's URL, for messages."""
        return f"{self.url}/{relative}"

    # --- operations ------------------------------------------------------------------------

    def check(self) -> None:
        """The bucket exists and these credentials may list it (before any archive contact)."""
        self._call(
            "list_objects_v2",
            self.prefix,
            Bucket=self.bucket,
            MaxKeys=1,
            Prefix=f"{self.prefix}/" if self.prefix else "",
        )

    def put_file(self, path: Path, relative: str, sha256: str, size: int) -> bool:
        """Send a complete local file to its key; True if sent, False if already there.

        Raises ObjectExistsError when another object is at the key, ChecksumRejectedError
        when the server kept computing another SHA-256 than `sha256`.
        """
        key = self.key(relative)
        for attempt in range(1, CHECKSUM_ATTEMPTS + 1):
            try:
                if size > self.multipart_threshold:
                    self._put_multipart(path, key, size)
                else:
                    with path.open("rb") as body:
                        self._call(
                            "put_object",
                            key,
                            Bucket=self.bucket,
                            Key=key,
                            Body=body,
                            ContentLength=size,
                            ChecksumSHA256=self._checksum(sha256),
                            IfNoneMatch="*",
                        )
                return True
            except ChecksumRejectedError:
                if attempt == CHECKSUM_ATTEMPTS:
                    raise
            except _PreconditionFailed:
                if self._same_object(key, sha256, size):
                    return False
                raise ObjectExistsError(
                    f"a different object already exists at {self.describe(relative)}; "
                    "not overwritten (remove it, or use another prefix)"
                ) from None
        raise AssertionError("unreachable")

    def _checksum(self, sha256: str) -> str:
        with self._fault_lock:
            if self.fault_wrong_checksums > 0:
                self.fault_wrong_checksums -= 1
                return b64_sha256(hashlib.sha256(b"not these bytes").hexdigest())
        return b64_sha256(sha256)

    def _put_multipart(self, path: Path, key: str, size: int) -> None:
        """Parts with their own SHA-256, completed only if nothing is at the key yet."""
        if self.head(key) is not None:
            raise _PreconditionFailed()
        upload = self._call(
            "create_multipart_upload", key, Bucket=self.bucket, Key=key, ChecksumAlgorithm="SHA256"
        )
        upload_id = upload["UploadId"]
        parts = []
        try:
            with path.open("rb") as handle:
                number = 1
                while chunk := handle.read(PART_BYTES):
                    digest = hashlib.sha256(chunk).hexdigest()
                    answer = self._call(
                        "upload_part",
                        key,
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=chunk,
                        ChecksumSHA256=self._checksum(digest),
                    )
                    parts.append(
                        {
                            "ETag": answer["ETag"],
                            "PartNumber": number,
                            "ChecksumSHA256": b64_sha256(digest),
                        }
                    )
                    number += 1
            self._call(
                "complete_multipart_upload",
                key,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
        except BaseException:
            # the bucket's lifecycle rule cleans what this could not
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise

    def head(self, key: str) -> dict[str, Any] | None:
        """The object's metadata, or None when there is no such object."""
        try:
            answer: dict[str, Any] = self._call(
                "head_object", key, Bucket=self.bucket, Key=key, ChecksumMode="ENABLED"
            )
        except ObjectNotFoundError:
            return None
        return answer

    def _same_object(self, key: str, sha256: str, size: int) -> bool:
        """Is the object at `key` these bytes? By its stored checksum, else by reading it."""
        head = self.head(key)
        if head is None or int(head.get("ContentLength", -1)) != size:
            return False
        stored = str(head.get("ChecksumSHA256") or "")
        if stored and "-" not in stored:  # a full-object checksum the server verified
            return stored == b64_sha256(sha256)
        return self.hash_object(self.relative(key))[1] == sha256

    def hash_object(self, relative: str) -> tuple[int, str]:
        """(size, sha256) of a stored object, streamed in 1 MiB chunks."""
        digest = hashlib.sha256()
        size = 0
        for chunk in self.iter_bytes(relative):
            digest.update(chunk)
            size += len(chunk)
        return size, digest.hexdigest()

    def iter_bytes(self, relative: str, limit: int | None = None) -> Iterator[bytes]:
        """The object's bytes in chunks (the first `limit` bytes with a ranged GET)."""
        key = self.key(relative)
        extra = {"Range": f"bytes=0-{limit - 1}"} if limit else {}
        answer = self._call("get_object", key, Bucket=self.bucket, Key=key, **extra)
        body = answer["Body"]
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()

    def list_objects(self) -> Iterator[tuple[str, int]]:
        """(relative path, size) of every object under the prefix, paged."""
        paginator = self.client.get_paginator("list_objects_v2")
        prefix = f"{self.prefix}/" if self.prefix else ""
        pages = paginator.paginate(
            Bucket=self.bucket, Prefix=prefix, PaginationConfig={"MaxItems": None}
        )
        try:
            for count, page in enumerate(pages):
                if count >= MAX_LIST_PAGES:
                    raise StorageError(f"{self.url}: more than {MAX_LIST_PAGES} listing pages")
                for entry in page.get("Contents", []):
                    yield self.relative(entry["Key"]), int(entry["Size"])
        except _client_errors() as error:
            raise _translate(error, self.url) from None

    def delete(self, relative: str) -> None:
        """Remove one object (a repair deletes what it replaces)."""
        key = self.key(relative)
        self._call("delete_object", key, Bucket=self.bucket, Key=key)

    def put_bytes(self, relative: str, data: bytes) -> None:
        """Small files of our own (the BagIt manifest): replaced, not conditional."""
        key = self.key(relative)
        self._call(
            "put_object",
            key,
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ChecksumSHA256=b64_sha256(hashlib.sha256(data).hexdigest()),
        )

    def _call(self, operation: str, key: str, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, operation)(**kwargs)
        except _client_errors() as error:
            raise _translate(error, f"{self.url}/{self.relative(key)}") from None


class _PreconditionFailed(Exception):
    """If-None-Match: something is already at the key."""


def _client_errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (ClientError, BotoCoreError)


def _translate(error: BaseException, where: str) -> BaseException:
    """botocore's exceptions as the project's error tree (exit codes, retries)."""
    from botocore.exceptions import (
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
    )

    if isinstance(error, NoCredentialsError):
        return AuthenticationError(f"no S3 credentials for {where}", url=where)
    if isinstance(error, EndpointConnectionError):
        return ConnectionFailedError(f"cannot reach the S3 service for {where}: {error}", url=where)
    if not isinstance(error, ClientError):
        return ConnectionFailedError(f"S3 {where}: {error}", url=where)
    code = str(error.response.get("Error", {}).get("Code", ""))
    status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0) or None
    message = f"S3 {where}: {code or status}: {error.response.get('Error', {}).get('Message', '')}"
    if code in ("PreconditionFailed",) or status == 412:
        return _PreconditionFailed()
    if code in _CHECKSUM_CODES:
        return ChecksumRejectedError(message, url=where)
    if code in _AUTH_CODES or status in (401, 403):
        return AuthenticationError(message, url=where, status=status)
    if code in ("NoSuchKey", "NoSuchBucket", "404") or status == 404:
        return ObjectNotFoundError(message, url=where, status=404)
    if code == "ConditionalRequestConflict" or status == 409:
        return BackendError(message, url=where, status=503)  # retry later
    return BackendError(message, url=where, status=status)


class ObjectStorageDir(StorageDir):
    """A StorageDir whose files go to object storage.

    `root` is the local state folder (temp files, checkpoint, logs, reports); `path_for`
    still names a path under it, whose relative part is the object's key under the prefix.
    """

    def __init__(
        self,
        store: ObjectStore,
        state_root: str | os.PathLike[str],
        layout: str = DEFAULT_LAYOUT,
        deid: Deidentifier | None = None,
        *,
        file_format: str = "dicom",
    ) -> None:
        super().__init__(state_root, layout, deid, file_format=file_format)
        self.store = store

    #: An object is durable once its PUT is answered: no file or folder to fsync.
    is_remote = True

    def install(self, staged: Path, stored: StoredInstance, *, sync_dir: bool = True) -> None:
        """PUT the complete temp file to its key (checksum and If-None-Match), then drop it."""
        self.store.put_file(staged, stored.relative_path.as_posix(), stored.sha256, stored.size)
        staged.unlink(missing_ok=True)

    def stored_sizes(self) -> dict[str, int]:
        """Relative path -> size of every object under the prefix (one listing)."""
        return dict(self.store.list_objects())


def object_storage(manifest: Manifest, state_root: Path) -> ObjectStorageDir:
    """The storage of a manifest whose root is object storage (the checkpoint in `state_root`)."""
    assert manifest.object_root is not None
    store = ObjectStore(manifest.object_root, manifest.storage.s3)
    return ObjectStorageDir(
        store, state_root, manifest.storage.layout, file_format=manifest.source.file_format
    )


def object_store_of(manifest: Manifest) -> ObjectStore | None:
    """The bucket of a manifest with an object-storage root, else None."""
    if manifest.object_root is None:
        return None
    return ObjectStore(manifest.object_root, manifest.storage.s3)


def copy_tag_files(state_root: Path, store: ObjectStore, names: Iterable[str]) -> None:
    """The BagIt tag files written in the state folder, copied beside the objects (or removed
    there when the state folder has none)."""
    for name in sorted(names):
        local = state_root / name
        if local.is_file():
            store.put_bytes(name, local.read_bytes())
        else:
            with contextlib.suppress(ObjectNotFoundError):
                store.delete(name)
