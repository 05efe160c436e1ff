"""python -m benchmarks.gpu_suite: see benchmarks/gpu_suite/__init__.py."""

import sys
import time

# The run's clock starts here, before torch is imported: the deadline counts from the command's start.
STARTED = time.monotonic()

from benchmarks.gpu_suite.cli import main  # noqa: E402 - after the clock

sys.exit(main(started=STARTED))
