"""``python -m router``: the same entry point as the ``devstack`` console script."""

import sys

from router.cli import main

sys.exit(main())
