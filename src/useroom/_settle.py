"""Closing the hooks' grant from the hook thread, before the service runs on.

When the ``on_oom`` hooks of an episode return, what they freed is still in
the process's allocator, and the group's limit is still raised by the
grant. The native plan would restore the limit after the hook thread
replies; by then every thread the hooks held has run on and may have taken
the memory back, and the restore fails (cgroup v1 refuses a limit below the
usage) or, on cgroup v2, the check after it sees the usage above the wall.
So the hook thread settles the episode itself, while the other threads are
still held and with the GIL: it trims the allocator (the freed pages leave
the process), reads the usage, and restores the limit if the usage fits.
It then tells the plan through the reply eventfd (``SETTLED``), and the plan
counts the grant closed and the episode resolved.

The usage fits when it is *below* the limit: a group under OOM sits at
its limit (the charge that failed would have taken it past), so a limit
restored at the usage leaves no room, and the task the hooks were for
faults again as soon as it runs, a new episode whose hooks run again. On
cgroup v1 the kernel takes a limit equal to the usage (it refuses one
below), so the write's success does not say that the usage fits: the usage
is compared first on both backends. On v1 the write still refuses a usage
that rose above the limit since (a task the hooks did not hold); on v2
``memory.high`` takes any value.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import attrs

from useroom import native
from useroom.cgroup import Group
from useroom._fd import Fd

__all__ = ["GrantCloser", "SETTLED"]

#: What the hook thread adds to the reply eventfd when it closed the grant.
SETTLED: int = native.SETTLED


@attrs.define(eq=False)
class GrantCloser:
    """Reads the group's usage and restores its limit through fds of its own
    (opened ahead: during an episode ``open()`` may fail for want of memory)."""

    usage_fd: Fd
    limit_fd: Fd
    #: The limit (v1) or wall (v2) to restore, as the handler holds it now.
    limit: Callable[[], int]

    @classmethod
    def open(cls, group: Group, limit: Callable[[], int]) -> GrantCloser:
        """The closer for ``group``'s backend; ``limit`` gives the value to restore."""
        usage = Fd(group.open_file(group.usage_file, os.O_RDONLY))
        try:
            os.pread(usage.fileno(), 64, 0)  # the first read allocates the file's buffer
            write = Fd(group.open_file(group.wall_file, os.O_WRONLY))
        except BaseException:
            usage.close()
            raise
        return cls(usage, write, limit)

    def usage(self) -> int:
        """The group's usage in bytes; -1 if it cannot be read now."""
        try:
            return int(os.pread(self.usage_fd.fileno(), 64, 0))
        except (OSError, ValueError):
            return -1

    def fits(self, usage: int) -> bool:
        """Whether ``usage`` leaves room under the limit (see above: equal is full)."""
        return 0 <= usage < self.limit()

    def close_grant(self) -> bool:
        """Trims the allocator, then restores the limit if the usage fits;
        True if it did (the grant is closed)."""
        native.heap_trim()
        limit = self.limit()
        if not self.fits(self.usage()):
            return False
        try:
            os.pwrite(self.limit_fd.fileno(), str(limit).encode(), 0)
        except OSError:
            return False  # v1: EBUSY, the usage rose above the limit since
        return True

    def close(self) -> None:
        self.usage_fd.close()
        self.limit_fd.close()

