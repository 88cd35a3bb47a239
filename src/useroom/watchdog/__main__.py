"""``python -m useroom.watchdog``: the watchdog on its own (see :mod:`useroom.watchdog`)."""

import sys

from useroom.watchdog.process import main

sys.exit(main())
