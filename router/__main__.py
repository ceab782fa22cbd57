"""``python -m router``: kept as an alias of ``python -m devstack`` for scripts that use it.

The one import of the composition root from inside ``router/`` (import-linter ignores it by name):
an entry shim, which nothing in the data plane imports.
"""

import sys

from devstack.cli import main

sys.exit(main())
