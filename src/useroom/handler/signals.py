"""Signals from Python to the tasks of one group, and only while they are in it.

The native plan signals at the OOM; the handler signals from Python during
a grant (the policy's kills with headroom granted, a ``decide()`` callback's
choice, the tasks no refresh has seen). Each of those goes through
:class:`GroupSignals`, which keeps two promises:

- A process, never a number: the signal goes through a pidfd, the table's
  (opened at the refresh) or one opened now. Only where no pidfd can be had
  (a kernel before 5.3, or none left to open) is it sent by pid.
- Never outside the group: the task's ``/proc/<pid>/cgroup`` is read just
  before the signal (:mod:`useroom._members`), through the file the refresh
  opened where there is one (a read that allocates nothing). A pidfd that
  is still not readable after that read names the process that was read. A
  file that cannot be read says no.
"""

from __future__ import annotations

import errno
import os
import signal

from useroom import _fd, native
from useroom._fd import Fd
from useroom._members import MembershipLine, ProcCgroup
from useroom._victims import VictimTable

__all__ = ["GroupSignals"]

#: Open fails that say "no pidfd now", not "no such process".
_NO_FD = frozenset({errno.ENOMEM, errno.EMFILE, errno.ENFILE})


class GroupSignals:
    """Sends signals to the tasks of ``table``'s group while ``member`` says
    they are in it."""

    def __init__(self, table: VictimTable, member: MembershipLine) -> None:
        self._table = table
        self.member = member

    def send(self, pid: int, sig: int) -> int:
        """Sends *sig* to process *pid* if it is in the group now: 0, or
        -errno (:data:`useroom.native.NOT_MEMBER`: it is not, or its file
        cannot be read; nothing was sent)."""
        pinned = self._table.pidfd(pid)
        if pinned is not None and not pinned.closed:
            return self._through(pinned.fileno(), pinned.cgroup, pid, sig)
        if _fd.can_use_pidfd:
            try:
                fd = Fd(os.pidfd_open(pid))
            except OSError as err:
                if err.errno not in _NO_FD:
                    return -(err.errno or errno.EIO)
            else:
                with fd:
                    return self._through(fd.fileno(), None, pid, sig)
        # No pidfd to be had: the pid, right after its file said it is here.
        try:
            if not self.member.has(pid):
                return native.NOT_MEMBER
            os.kill(pid, sig)
        except OSError as err:
            return -(err.errno or errno.EIO)
        return 0

    def _through(self, pidfd: int, file: ProcCgroup | None, pid: int, sig: int) -> int:
        if native.wait_readable(pidfd, 0):
            return -errno.ESRCH
        try:
            inside = self.member.has_file(file) if file is not None and not file.closed else self.member.has(pid)
        except ProcessLookupError:
            inside = False  # gone by pid: the pidfd says whether it exited
        if native.wait_readable(pidfd, 0):
            return -errno.ESRCH  # exited meanwhile: the file may have named another process
        if not inside:
            return native.NOT_MEMBER
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except OSError as err:
            return -(err.errno or errno.EIO)
        return 0
