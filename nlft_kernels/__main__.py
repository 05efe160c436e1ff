"""``python -m nlft_kernels``: the ``nlft`` command line."""

import sys

from nlft_kernels.recipes.cli import main

sys.exit(main())
