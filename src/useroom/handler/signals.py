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

    def send(self, pid: int, sig: int, *, listed: bool = False) -> int:
        """Sends *sig* to process *pid* if it is in the group now: 0, or
        -errno, with nothing sent: :data:`useroom.native.NOT_MEMBER` if it
        is not in the group, ESRCH if it has exited, ENOMEM (or another
        errno) if its cgroup file cannot be read.

        ``listed``: the pid was in the group's ``cgroup.procs`` read just
        now. Where its cgroup file cannot be opened for want of memory, that
        read stands in for it (the grant's fallback, which must act when no
        file can be opened: reading an open ``cgroup.procs`` is not charged
        to the group)."""
        pinned = self._table.pidfd(pid)
        if pinned is not None and not pinned.closed:
            return self._through(pinned.fileno(), pinned.cgroup, pid, sig, listed)
        if _fd.can_use_pidfd:
            try:
                fd = Fd(os.pidfd_open(pid))
            except OSError as err:
                if err.errno not in _NO_FD:
                    return -(err.errno or errno.EIO)
            else:
                with fd:
                    return self._through(fd.fileno(), None, pid, sig, listed)
        # No pidfd to be had: the pid, right after its file said it is here.
        inside = self._inside(None, pid, listed)
        if inside != 0:
            return inside
        try:
            os.kill(pid, sig)
        except OSError as err:
            return -(err.errno or errno.EIO)
        return 0

    def _inside(self, file: ProcCgroup | None, pid: int, listed: bool) -> int:
        """0 if the task is in the group now, else -errno (NOT_MEMBER: it is not)."""
        try:
            inside = self.member.has_file(file) if file is not None and not file.closed else self.member.has(pid)
        except ProcessLookupError:
            return -errno.ESRCH
        except OSError as err:
            if listed and err.errno in _NO_FD:
                return 0
            return -(err.errno or errno.EIO)
        return 0 if inside else native.NOT_MEMBER

    def _through(self, pidfd: int, file: ProcCgroup | None, pid: int, sig: int, listed: bool) -> int:
        if native.wait_readable(pidfd, 0):
            return -errno.ESRCH
        inside = self._inside(file, pid, listed)
        if native.wait_readable(pidfd, 0):
            return -errno.ESRCH  # exited meanwhile: the file may have named another process
        if inside != 0:
            return inside
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except OSError as err:
            return -(err.errno or errno.EIO)
        return 0
