"""The victim table: who is in the group, how big, and a pidfd for each.

It is refreshed ahead of the OOM (on usage thresholds, on a timer, after
each episode), never during one: reading
``cgroup.procs`` or ``/proc`` allocates kernel memory charged to the group,
which fails under the OOM. Each victim carries a pidfd opened at refresh
time, so the native plan can signal it without racing pid reuse: a process
that exits makes its pidfd readable, and the plan skips it.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable

import attrs
import psutil

from useroom import _native
from useroom._cgroup import Group
from useroom._fd import OwnedFd

__all__ = ["Pidfd", "ProcStatus", "Victim", "VictimTable"]

#: Whether pidfds can be used; without them the plan signals pids.
can_use_pidfd: bool = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


class ProcStatus(OwnedFd):
    """``/proc/<pid>/status`` of one process, opened and read once, so that
    the native plan can read it again at the OOM (``pread`` at offset 0
    regenerates the text into the buffer the first read allocated) and
    compute the process's badness then, not at the last refresh."""

    def __init__(self, pid: int) -> None:
        self._fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.pread(self._fd, 4096, 0)
        except BaseException:
            self.close()
            raise


class Pidfd(OwnedFd):
    """A pidfd (close-on-exec) for one process, and its :class:`ProcStatus`
    (None if it could not be opened), closed with it."""

    __slots__ = ("pid", "status")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = os.pidfd_open(pid)
        self.status: ProcStatus | None = None
        try:
            # Opened after the pidfd: should the process exit first (and its
            # pid be reused), the pidfd is readable and the pick skips it,
            # whatever process this file then names.
            self.status = ProcStatus(pid)
        except OSError:
            pass  # exited already (the pidfd says so), or /proc is not there

    def close(self) -> None:
        if self.status is not None:
            self.status.close()
        super().close()

    @property
    def exited(self) -> bool:
        """True once the process has exited (the pidfd is readable)."""
        return _native.wait_readable(self.fileno(), 0)


@attrs.frozen
class Victim:
    """A task of the group as of the last refresh."""

    pid: int
    name: str
    rss: int
    create_time: float
    uid: int
    pidfd: Pidfd | None = attrs.field(eq=False, repr=False)
    #: /proc/<pid>/oom_score_adj at the refresh (-1000: the kernel never
    #: picks it, and neither does a badness pick).
    oom_score_adj: int = 0

    def describe(self) -> str:
        return f"{self.pid} ({self.name}, {self.rss / 2**20:.1f} MiB RSS)"


def _oom_score_adj(pid: int) -> int:
    """The process's oom_score_adj (-1000..1000); raises ProcessLookupError if it is gone."""
    try:
        with open(f"/proc/{pid}/oom_score_adj", "rb") as f:
            return int(f.read())
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None


class VictimTable:
    """The group's tasks, minus the protected pids, with open pidfds.

    Pidfds of processes that left the table stay open until :meth:`release`
    is told they are no longer referenced by an armed plan: closing one early
    could let its number be reused while a plan still names it.
    """

    def __init__(self, group: Group, protect: Iterable[int] = ()) -> None:
        self.group = group
        self.protect = frozenset(protect) | {os.getpid()}
        self.victims: tuple[Victim, ...] = ()
        self.procs: tuple[int, ...] = ()
        self._pidfds: dict[int, Pidfd] = {}
        self._retired: list[Pidfd] = []
        #: Pids already sent SIGKILL: dying, not victims again.
        self.dying: set[int] = set()

    def refresh(self) -> tuple[Victim, ...]:
        """Re-reads the group's tasks and their sizes; opens pidfds for new ones.

        Raises GroupGone if the group was removed; OSError(ENOMEM) if called
        while the group is under OOM.
        """
        procs = tuple(sorted(self.group.procs()))
        self.dying &= set(procs)
        fresh: dict[int, Pidfd] = {}
        victims = []
        for pid in procs:
            if pid in self.protect or pid in self.dying:
                continue
            pidfd = self._pidfds.get(pid)
            try:
                if pidfd is None or pidfd.closed:
                    pidfd = Pidfd(pid) if can_use_pidfd else None
                proc = psutil.Process(pid)
                with proc.oneshot():
                    info = proc.memory_info()
                    name = proc.name()
                    created = proc.create_time()
                    uid = proc.uids().real
                adj = _oom_score_adj(pid)
            except (ProcessLookupError, psutil.NoSuchProcess, psutil.ZombieProcess):
                if pidfd is not None and pid not in self._pidfds:
                    pidfd.close()
                continue
            if pidfd is not None:
                if pidfd.exited:
                    if pid not in self._pidfds:
                        pidfd.close()
                    continue
                fresh[pid] = pidfd
            victims.append(Victim(pid, name, info.rss, created, uid, pidfd, adj))
        # A pid that was in cgroup.procs and whose pidfd is still not readable
        # is the same live process: a live process keeps its pid. Check that
        # it is still in the group (it may have been moved out meanwhile).
        now = set(self.group.procs())
        victims = [v for v in victims if v.pid in now]
        self.procs = procs
        for pid, pidfd in self._pidfds.items():
            if pid not in fresh:
                self._retired.append(pidfd)
        self._pidfds = fresh
        self.victims = tuple(victims)
        return self.victims

    def release(self, in_use: Iterable[Pidfd]) -> None:
        """Closes retired pidfds that no armed plan uses any more."""
        keep = {id(p) for p in in_use}
        still = []
        for pidfd in self._retired:
            if id(pidfd) in keep:
                still.append(pidfd)
            else:
                pidfd.close()
        self._retired = still

    def close(self) -> None:
        for pidfd in [*self._pidfds.values(), *self._retired]:
            pidfd.close()
        self._pidfds = {}
        self._retired = []
        self.victims = ()

