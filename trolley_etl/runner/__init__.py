"""The runner: executes a manifest step by step through the Trolley, with a checkpoint."""

from trolley_etl.runner.run import Runner, RunOptions, RunResult

__all__ = ["RunOptions", "RunResult", "Runner"]
