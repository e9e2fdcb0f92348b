"""The start and the end of a command-line process: the garbage collector, and BLAS threads.

Loading what a run needs (pydicom, pydantic, requests, the runner) allocates some hundred
thousand objects that live until the process exits. The cyclic collector, triggered by
allocation counts, walks them again and again while they load, and once more, all of them,
when the interpreter shuts down: about a fifth of a small run's fixed cost, for no garbage.
So the process pauses the collector while its command's modules load, then moves everything
loaded into the permanent generation (`gc.freeze`), which later collections skip; and it
freezes once more on its way out. Reference counting frees ordinary garbage all along; the
collector is on for the whole work of the command. Only the process's own entry point does
this (`main()` without arguments): a caller of `main([...])` keeps its collector as it was.
The same process also asks for a single BLAS thread before anything loads numpy.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
from collections.abc import Iterable

#: OpenBLAS (numpy's linear algebra) starts one busy-waiting thread per core when numpy loads.
#: A run does no linear algebra; pydicom loads numpy only for its pixel back ends. One thread
#: saves a small run about 60 ms of CPU, most of it on the other core of a two-core machine.
BLAS_THREADS = {"OPENBLAS_NUM_THREADS": "1"}


def pause() -> bool:
    """Pause the collector while modules load; whether it was running (to restore it).

    Also asks for one BLAS thread, unless the environment says otherwise (see
    `BLAS_THREADS`): numpy is not loaded yet, the process is the command.
    """
    for name, value in BLAS_THREADS.items():
        os.environ.setdefault(name, value)
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
