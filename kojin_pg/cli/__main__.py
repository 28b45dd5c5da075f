"""``python -m kojin_pg.cli``: the same as the ``kojin-pg`` console script."""

import sys

from . import main

sys.exit(main())
