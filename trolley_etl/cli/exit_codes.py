"""Exit codes, as the contract documents them for CI."""

OK = 0  # everything asked for is on disk and verified
ITEMS_FAILED = 1  # the run finished but some items failed after retries
USAGE = 2  # usage error or invalid manifest
BACKEND_UNAVAILABLE = 3  # a backend could not be reached or refused the credentials
INTERRUPTED = 130  # interrupted; the checkpoint is consistent
