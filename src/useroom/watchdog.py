"""``python -m useroom.watchdog``: the watchdog on its own (see :mod:`useroom._watchdog`)."""

from __future__ import annotations

import sys

from useroom._watchdog import DEFAULT_DELAY, Takeover, Watchdog, WatchdogLink, main

__all__ = ["DEFAULT_DELAY", "Takeover", "Watchdog", "WatchdogLink", "main"]

if __name__ == "__main__":
    sys.exit(main())
