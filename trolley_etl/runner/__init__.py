"""The runner: executes a manifest step by step through the Trolley, with a checkpoint.

The names below are imported on first use (PEP 562): `trolley_etl.runner.checkpoint` alone,
as `trolley-etl status` needs it, does not load the runner, the Trolley and the backends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from trolley_etl.runner.run import Runner, RunOptions, RunResult

__all__ = ["RunOptions", "RunResult", "Runner"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from trolley_etl.runner import run

    value = getattr(run, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
