"""Refreshes that keep failing, and the safe mode they lead to.

The armed plan names the victims of the last good refresh. When refreshes
fail for a moment (``ENOMEM`` while the group is at its limit) that is the
design: the plan is at most one episode old. When they keep failing for
another reason (the process is out of fds: ``EMFILE``; ``/proc`` cannot be
read), the table grows old: new tasks are not in it, and with no fd left
the plan's pick cannot pin them either, so it kills what the table still
names, small bystanders included, and the culprit lives on.

After :data:`STALE_FAILURES` failed refreshes in a row spanning at least
:data:`STALE_SECONDS` (``ENOMEM`` aside), the handler goes to a safe mode: it
arms a plan with no victims from the table, and on cgroup v1 turns the
kernel's OOM killer on for the group (on v2 the plan's kernel step lifts
the wall), so the kernel picks with its own, current view. It says so (a
warning with ``cause`` ``refresh_failing`` and a :class:`StaleTableError` in
``handler.errors``). The first good refresh leaves the safe mode, also
logged (``cause`` ``refresh_recovered``).
"""

from __future__ import annotations

import errno
import logging

from useroom.exceptions import UseroomError

__all__ = ["STALE_FAILURES", "STALE_SECONDS", "StaleTable", "StaleTableError"]

logger = logging.getLogger(__name__)

#: Failed refreshes in a row, and the least time they span, before the safe mode.
STALE_FAILURES = 3
STALE_SECONDS = 1.0


class StaleTableError(UseroomError):
    """The victim table could not be refreshed for a while: the handler
    runs in its safe mode (the kernel's OOM killer picks) until it can."""


class StaleTable:
    """Counts the failed refreshes of one group; says when to enter and to
    leave the safe mode."""

    def __init__(self) -> None:
        self._failures = 0
        self._since = 0.0
        #: In the safe mode: the plan names no victim from the table.
        self.active = False

    def failed(self, err: BaseException, now: float) -> bool:
        """A refresh failed with *err*; True if the safe mode begins now."""
        if isinstance(err, OSError) and err.errno == errno.ENOMEM:
            return False  # at the limit: the plan of the last refresh is the design
        if self._failures == 0:
            self._since = now
        self._failures += 1
        if self.active or self._failures < STALE_FAILURES or now - self._since < STALE_SECONDS:
            return False
        self.active = True
        return True

    def succeeded(self) -> bool:
        """A refresh succeeded; True if the safe mode ends now."""
        self._failures = 0
        ended, self.active = self.active, False
        return ended

    def enter(self, group: str, err: BaseException) -> StaleTableError:
        """The error to record, logged, for a safe mode that begins."""
        stale = StaleTableError(f"{group}: {self._failures} refreshes failed in a row (the last: {err}); "
                                "the kernel's OOM killer picks the victims until a refresh succeeds")
        logger.warning("%s", stale, extra={"group": group, "cause": "refresh_failing", "failures": self._failures})
        return stale

    @staticmethod
    def leave(group: str) -> None:
        logger.warning("%s: the victim table is refreshed again: the handler picks the victims again", group,
                       extra={"group": group, "cause": "refresh_recovered"})
