"""The `trolley-etl` command line."""

from __future__ import annotations

import argparse

from trolley_etl import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trolley-etl",
        description="Pull DICOM studies out of image archives, driven by YAML manifests.",
    )
    parser.add_argument("--version", action="version", version=f"trolley-etl {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    return 0
