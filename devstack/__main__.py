"""``python -m devstack``: the same entry point as the ``devstack`` console script."""

import sys

from devstack.cli import main

sys.exit(main())
