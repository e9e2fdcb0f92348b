"""The garbage collector at the start and the end of a command-line process.

Loading what a run needs (pydicom, pydantic, requests, the runner) allocates some hundred
thousand objects that live until the process exits. The cyclic collector, triggered by
allocation counts, walks them again and again while they load, and once more, all of them,
when the interpreter shuts down: about a fifth of a small run's fixed cost, for no garbage.
So the process pauses the collector while its command's modules load, then moves everything
loaded into the permanent generation (`gc.freeze`), which later collections skip; and it
freezes once more on its way out. Reference counting frees ordinary garbage all along; the
collector is on for the whole work of the command. Only the process's own entry point does
this (`main()` without arguments): a caller of `main([...])` keeps its collector as it was.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
from collections.abc import Iterable


def pause() -> bool:
    """Pause the collector while modules load; whether it was running (to restore it)."""
    running = gc.isenabled()
    gc.disable()
    return running


def loaded(modules: Iterable[str], *, resume: bool) -> None:
    """Load `modules` (what the command is about to use), then make everything loaded so far
    permanent for the collector and resume it (when it was running before `pause`)."""
    try:
        for name in modules:
            with contextlib.suppress(ImportError):  # the command itself says what is missing
                importlib.import_module(name)
    finally:
        gc.freeze()
        if resume:
            gc.enable()


def exiting(*, resume: bool) -> None:
    """The command is done: spare the interpreter's shutdown a walk over every object.

    Files, the checkpoint and the logs were closed (and synced) by the command itself;
    nothing here is needed for what is on disk. The collector runs again afterwards (when
    it was running before `pause`), also after a command that ended before it started.
    """
    gc.freeze()
    if resume:
        gc.enable()
