"""Manifests: the YAML files that say what to pull, from where, and how to store it."""

from trolley_etl.core.errors import ManifestError
from trolley_etl.manifest.loader import ManifestIssue, load_manifest, parse_manifest
from trolley_etl.manifest.models import Manifest

__all__ = ["Manifest", "ManifestError", "ManifestIssue", "load_manifest", "parse_manifest"]
