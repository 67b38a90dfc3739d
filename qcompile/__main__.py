"""``python -m qcompile``: the same command line as the ``qcompile`` script."""

import sys

from qcompile.cli import main

sys.exit(main())
