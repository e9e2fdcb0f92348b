"""The `trolley-etl` command line."""

from trolley_etl.cli.main import main

__all__ = ["main"]
