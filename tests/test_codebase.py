"""Properties of the code base itself: no process-wide side effects at import, and the
pre-commit hooks run the same checks as `make lint`."""

from __future__ import annotations

import re
from pathlib import Path
from xml.etree import ElementTree

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_rad69_leaves_elementtrees_prefix_registry_alone() -> None:
    from trolley_etl.backends.rad69 import IHE_XDS, SOAP_ENV, Rad69, SeriesInstances

    registry = ElementTree._namespace_map  # type: ignore[attr-defined]
    assert SOAP_ENV not in registry and IHE_XDS not in registry
    body = Rad69("http://127.0.0.1:9/rad69", repository_id="1.2.3").request_body(
        SeriesInstances("1.2", "1.2.3", ("1.2.3.4",))
    )
    assert body.startswith(b"<?xml") and b"<s:Envelope xmlns:s=" in body
    envelope = ElementTree.fromstring(body)
    assert envelope.tag == f"{{{SOAP_ENV}}}Envelope"
    assert [e.text for e in envelope.iter(f"{{{IHE_XDS}}}DocumentUniqueId")] == ["1.2.3.4"]
    assert SOAP_ENV not in registry


def test_pre_commit_runs_the_checks_of_make_lint() -> None:
    makefile = (ROOT / "Makefile").read_text()
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    make_commands = [
        line.strip().replace("$(BIN)/", "") for line in lint.splitlines()[1:] if line.strip()
    ]
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    hooks = [hook for repo in config["repos"] for hook in repo["hooks"]]
    hook_commands = [re.sub(r"^\.venv/bin/", "", hook["entry"]) for hook in hooks]
    assert hook_commands == make_commands
