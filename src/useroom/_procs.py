"""The ``cgroup.procs`` files the plans read at the OOM.

A task started after the last refresh is not among a plan's candidates.
The native pick (``SIGNAL_BEST``) finds such tasks by reading the group's
``cgroup.procs`` at the OOM through a file opened ahead: opening it then
may fail for want of memory. The two backends differ in what a second read
of one open file returns, held as data on the group class
(``procs_pread_relists``):

- cgroup v2 restarts its task iteration whenever a read starts at offset
  0: one file, read once ahead (the read allocates its seq_file buffer,
  charged to the group), serves every plan.
- cgroup v1 loads a pid list at the first read of each open file and keeps
  serving it to that file while it is read (the list is dropped a second
  after its last read). So the pick opens the file anew through
  ``/proc/self/fd/N`` each time (``procs_reopen``), which loads the list of
  now; should that open fail for want of memory, it reads the plan's own
  file, which is new and unread for each plan: the tasks as of the plan's
  first pick.

A plan names its file by number, so a file is closed only once no plan
that may still run names it: the watcher runs the armed plan or, for an
episode in progress, the one before it.
"""

from __future__ import annotations

import os
import time

from useroom.cgroup import Group
from useroom._fd import Fd

__all__ = ["ProcsFiles", "SpareProcs"]


class ProcsFiles:
    """Hands each plan the ``cgroup.procs`` fd it reads at the OOM."""

    #: Files kept open: the armed plan's, the one an episode may still be
    #: running, and one spare for a plan compiled but not armed.
    KEEP = 3

    def __init__(self, group: Group) -> None:
        self.group = group
        self._files: list[Fd] = []
        #: What :meth:`for_plan` returned last: the fd of the plan compiled
        #: last, which a plan compiled from the same context may keep.
        self.last = -1

    def for_plan(self) -> int:
        """The fd for the next plan; -1 if the file cannot be opened (the
        plan then looks at its candidates only)."""
        self.last = self._for_plan()
        return self.last

    def _for_plan(self) -> int:
        if self.group.procs_pread_relists and self._files:
            return self._files[-1].fileno()
        try:
            file = Fd(self.group.open_file(self.group.procs_file, os.O_RDONLY))
        except OSError:
            return -1
        if self.group.procs_pread_relists:
            try:
                os.pread(file.fileno(), 4096, 0)  # allocates the buffer now, not at the OOM
            except OSError:
                file.close()
                return -1
        self._files.append(file)
        while len(self._files) > self.KEEP:
            self._files.pop(0).close()
        return file.fileno()

    def close(self) -> None:
        for file in self._files:
            file.close()
        self._files = []


#: cgroup v1 frees a group's pid list a second after its last read
#: (CGROUP_PIDLIST_DESTROY_DELAY); a read after that loads a new one.
_PIDLIST_KEPT = 1.5


class SpareProcs:
    """One ``cgroup.procs`` fd, for the grant's fallback when a refresh fails
    for want of memory (no file can be opened then).

    It is read once when it is opened: the first read allocates the file's
    seq_file buffer, charged to the reader's group, and under the OOM that
    fails. A later ``pread`` at offset 0 reuses the buffer, and lists the
    tasks of now on cgroup v2; on v1, the pid list the group keeps for its
    readers, which is of now only if nobody read it for a while
    (:attr:`fresh`): otherwise as of the last load, at most that of the
    last refresh.
    """

    def __init__(self, group: Group) -> None:
        self.group = group
        self._file: Fd | None = None
        self._read_at = 0.0

    def renew(self) -> None:
        """Opens and reads the file, unless it is open already (never raises:
        without it the fallback has only the table)."""
        if self._file is not None and not self._file.closed:
            return
        try:
            file = Fd(self.group.open_file(self.group.procs_file, os.O_RDONLY))
        except OSError:
            return
        try:
            os.pread(file.fileno(), 1 << 16, 0)
        except OSError:
            file.close()
            return
        self._file = file
        self._read_at = time.monotonic()

    def read(self) -> tuple[list[int], bool] | None:
        """The pids the file lists now, and whether that list is of now (see
        above); None if there is no file or the read failed."""
        if self._file is None or self._file.closed:
            return None
        fresh = self.group.procs_pread_relists or time.monotonic() - self._read_at > _PIDLIST_KEPT
        try:
            text = os.pread(self._file.fileno(), 1 << 20, 0)
        except OSError:
            return None
        self._read_at = time.monotonic()
        return [int(p) for p in text.split()], fresh

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file = None
