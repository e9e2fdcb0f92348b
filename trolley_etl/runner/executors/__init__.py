"""Where the units of a run execute: threads of this process (the default) or Dask."""
