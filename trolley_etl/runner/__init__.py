"""The runner: executes a manifest step by step through the Trolley, with a checkpoint.

The names below are imported on first use (PEP 562): `trolley_etl.runner.checkpoint` alone,
as `trolley-etl status` needs it, does not load the runner, the Trolley and the backends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from trolley_etl.lazy import lazy_exports

if TYPE_CHECKING:
    from trolley_etl.runner.run import Runner, RunOptions, RunResult

__all__ = ["RunOptions", "RunResult", "Runner"]


__getattr__, __dir__ = lazy_exports(__name__, dict.fromkeys(__all__, "run"))
