"""The manifest fields of issue 19 (object storage, executor, state_dir): what is accepted,
what is refused and where the checkpoint goes. No server, no cluster."""

from __future__ import annotations

from pathlib import Path

import pytest

from trolley_etl.manifest import ManifestError
from trolley_etl.manifest.loader import parse_manifest

BASE = """\
version: 1
name: scale
source:
  search: {backend: qido-rs, url: "http://127.0.0.1:9/dicom-web"}
queries:
  - name: all
    filters: {PatientID: "1"}
"""


def parse(tail: str, tmp_path: Path, env: bool = False):
    return parse_manifest(BASE + tail, "m.yaml", base_dir=tmp_path, check_env=env)


def test_an_s3_root_keeps_its_checkpoint_beside_the_manifest(tmp_path) -> None:
    manifest = parse("storage:\n  root: s3://cohorts/chest-ct-2024\n", tmp_path)
    assert manifest.object_root == "s3://cohorts/chest-ct-2024"
    assert manifest.storage_root == (tmp_path / "scale.state").resolve()
    assert manifest.run.executor == "threads"  # the default: no new dependency


def test_the_contract_example(tmp_path) -> None:
    manifest = parse(
        """\
storage:
  root: s3://cohorts/chest-ct-2024
  s3: {endpoint_url: https://s3.example.org, region: eu-west-1, access_key_env: S3_KEY,
       secret_key_env: S3_SECRET}
run:
  executor: dask
  scheduler: tcp://scheduler.example.org:8786
  state_dir: ./state
""",
        tmp_path,
    )
    assert manifest.storage_root == (tmp_path / "state").resolve()
    assert manifest.run.scheduler == "tcp://scheduler.example.org:8786"
    assert manifest.storage.s3 is not None and manifest.storage.s3.region == "eu-west-1"


def test_a_local_root_ignores_state_dir(tmp_path) -> None:
    manifest = parse("storage:\n  root: ./data\nrun:\n  state_dir: ./state\n", tmp_path)
    assert manifest.object_root is None
    assert manifest.storage_root == (tmp_path / "data").resolve()


@pytest.mark.parametrize(
    ("tail", "message"),
    [
        ("storage:\n  root: s3://\n", "s3://bucket"),
        ("storage:\n  root: s3://Bad_Bucket/x\n", "s3://bucket"),
        ("storage:\n  root: gs://bucket/x\n", "local folder or s3://"),
        ("storage:\n  root: s3://bk1/x\n  s3: {access_key_env: K}\n", "go together"),
        ("storage:\n  root: s3://bk1/x\n  s3: {endpoint_url: ftp://h}\n", "http(s)"),
        ("storage:\n  root: s3://bk1/x\n  s3: {secret_key: literal}\n", "secret_key"),
        ("storage:\n  root: ./d\nrun:\n  executor: ray\n", "executor"),
        ("storage:\n  root: ./d\nrun:\n  scheduler: scheduler.example.org\n", "scheduler"),
    ],
)
def test_refused(tail: str, message: str, tmp_path) -> None:
    with pytest.raises(ManifestError) as info:
        parse(tail, tmp_path)
    assert message in str(info.value)


def test_the_key_pair_must_be_in_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("S3_KEY_FOR_TEST", raising=False)
    monkeypatch.setenv("S3_SECRET_FOR_TEST", "x")
    tail = (
        "storage:\n  root: s3://bk1/x\n  s3: {access_key_env: S3_KEY_FOR_TEST, "
        "secret_key_env: S3_SECRET_FOR_TEST}\n"
    )
    with pytest.raises(ManifestError) as info:
        parse(tail, tmp_path, env=True)
    assert "storage.s3.access_key_env" in str(info.value)
    assert "S3_KEY_FOR_TEST is not set" in str(info.value)
