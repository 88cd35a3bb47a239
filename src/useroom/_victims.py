"""The victim table: who is in the group, how big, and a pidfd for each.

It is refreshed ahead of the OOM (on usage thresholds, on a timer, after
each episode), never during one: reading
``cgroup.procs`` or ``/proc`` allocates kernel memory charged to the group,
which fails under the OOM. Each victim carries a pidfd opened at refresh
time, so the native plan can signal it without racing pid reuse: a process
that exits makes its pidfd readable, and the plan skips it.

The table owns the pidfds (:meth:`VictimTable.pidfd`); a :class:`Victim`
is a plain value, which a policy or a hook may keep, and so is
:class:`TaskFds`, the fd numbers a plan names for a task.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterable, Mapping

import attrs
import psutil

from useroom import _fd
from useroom import native
from useroom.cgroup import Group
from useroom._fd import OwnedFd
from useroom._members import ProcCgroup

__all__ = ["Pidfd", "ProcAdj", "ProcStatus", "TaskFds", "Victim", "VictimTable"]


#: More than ``/proc/<pid>/status`` ever holds (about 1.5 KiB).
_STATUS_MAX = 4096


class ProcStatus(OwnedFd):
    """``/proc/<pid>/status`` of one process, opened and read once, so that
    the native plan can read it again at the OOM (``pread`` at offset 0
    regenerates the text into the buffer the first read allocated) and
    compute the process's badness then, not at the last refresh."""

    def __init__(self, pid: int) -> None:
        self._fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.pread(self._fd, _STATUS_MAX, 0)
        except BaseException:
            self.close()
            raise

    def read(self) -> bytes:
        """The file's text now (one ``pread``); empty once the process has
        exited, or on an error (the caller asks psutil instead)."""
        try:
            return os.pread(self.fileno(), _STATUS_MAX, 0)
        except OSError:
            return b""


class ProcAdj(OwnedFd):
    """``/proc/<pid>/oom_score_adj`` of one process, opened once: a
    ``pread`` at offset 0 formats the value of now into the caller's buffer
    and allocates nothing, so the native pick reads it at the OOM."""

    def __init__(self, pid: int) -> None:
        self._fd = os.open(f"/proc/{pid}/oom_score_adj", os.O_RDONLY | os.O_CLOEXEC)

    def read(self) -> int:
        """The value now; raises ProcessLookupError once the process has exited."""
        try:
            return int(os.pread(self.fileno(), 32, 0))
        except (OSError, ValueError):
            raise ProcessLookupError from None


@attrs.frozen
class TaskFds:
    """The fd numbers a plan names for one task: its pidfd, its status file,
    its ``oom_score_adj`` file and its cgroup file (-1: not open). Numbers, not owners: the
    :class:`VictimTable` owns the fds, and keeps open those an armed plan
    names (:meth:`VictimTable.release`)."""

    pidfd: int
    status: int = -1
    adj: int = -1
    #: ``/proc/<pid>/cgroup`` (:class:`~useroom._members.ProcCgroup`), for
    #: the check that the task is still in the group when it is signalled.
    cgroup: int = -1


class Pidfd(OwnedFd):
    """A pidfd (close-on-exec) for one process, and its :class:`ProcStatus`,
    :class:`ProcAdj` and :class:`~useroom._members.ProcCgroup` (None if
    they could not be opened), closed with it."""

    __slots__ = ("pid", "status", "adj", "cgroup")

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = os.pidfd_open(pid)
        self.status: ProcStatus | None = None
        self.adj: ProcAdj | None = None
        self.cgroup: ProcCgroup | None = None
        try:
            # Opened after the pidfd: should the process exit first (and its
            # pid be reused), the pidfd is readable and the pick skips it,
            # whatever process these files then name.
            self.status = ProcStatus(pid)
            self.adj = ProcAdj(pid)
            self.cgroup = ProcCgroup(pid)
        except OSError:
            pass  # exited already (the pidfd says so), or /proc is not there

    def complete(self) -> None:
        """Opens the files an earlier try could not (for want of memory,
        under an OOM): a refresh calls it for each task it knows."""
        if self.status is not None and self.adj is not None and self.cgroup is not None:
            return
        try:
            if self.status is None:
                self.status = ProcStatus(self.pid)
            if self.adj is None:
                self.adj = ProcAdj(self.pid)
            if self.cgroup is None:
                self.cgroup = ProcCgroup(self.pid)
        except OSError:
            pass  # next time (the pidfd says whether it exited)

    def close(self) -> None:
        for file in (self.status, self.adj, self.cgroup):
            if file is not None:
                file.close()
        super().close()

    def numbers(self) -> TaskFds:
        """The fd numbers of now (a value a plan may name)."""
        return TaskFds(self.fileno(), -1 if self.status is None else self.status.fileno(),
                       -1 if self.adj is None else self.adj.fileno(),
                       -1 if self.cgroup is None else self.cgroup.fileno())

    @property
    def exited(self) -> bool:
        """True once the process has exited (the pidfd is readable)."""
        return native.wait_readable(self.fileno(), 0)


@attrs.frozen
class Victim:
    """A task of the group as of the last refresh."""

    pid: int
    name: str
    rss: int
    create_time: float
    uid: int
    #: /proc/<pid>/oom_score_adj at the refresh (-1000: the kernel never
    #: picks it, and neither does a badness pick).
    oom_score_adj: int = 0

    def describe(self) -> str:
        return f"{self.pid} ({self.name}, {self.rss / 2**20:.1f} MiB RSS)"


@attrs.frozen
class _StatusFields:
    """What the table reads of ``/proc/<pid>/status`` for a task it knows."""

    comm: bytes
    rss: int
    uid: int

    @classmethod
    def parse(cls, text: bytes) -> _StatusFields | None:
        """The fields, or None if the text lacks one (a zombie has no
        ``VmRSS``; an exited task's file reads empty)."""
        values = []
        for key in (b"Name:", b"\nUid:", b"\nVmRSS:"):
            at = text.find(key)
            if at < 0:
                return None
            at += len(key)
            values.append(text[at:text.find(b"\n", at)])
        try:
            # A comm may hold spaces; a number ends at the first blank.
            return cls(values[0].strip(), int(values[2].split()[0]) * 1024, int(values[1].split()[0]))
        except (IndexError, ValueError):
            return None


@attrs.frozen
class _Seen:
    """A task as the table measured it, and the pidfd that pins it; the
    name and start time stand while the pidfd and the comm are the same."""

    pidfd: Pidfd | None = attrs.field(eq=False)
    comm: bytes | None
    name: str
    rss: int
    create_time: float
    uid: int


#: A comm this long may have been cut short (TASK_COMM_LEN is 16 with the NUL).
_COMM_MAX = 15
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[bytes, float]:
    """The process's comm and start time (seconds since the epoch, as
    psutil's ``create_time()``), from ``/proc/<pid>/stat``; raises
    ProcessLookupError if it is gone."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    try:
        text = os.read(fd, 4096)
    except OSError:
        raise ProcessLookupError(pid) from None
    finally:
        os.close(fd)
    # The comm is between the first "(" and the last ")" (it may hold both);
    # starttime, in clock ticks since boot, is the 22nd field.
    end = text.rfind(b")")
    try:
        starttime = int(text[end + 2:].split()[19])
    except (IndexError, ValueError):
        raise ProcessLookupError(pid) from None
    return text[text.find(b"(") + 1:end], starttime / _CLOCK_TICKS + psutil.boot_time()


def _oom_score_adj(pid: int) -> int:
    """The process's oom_score_adj (-1000..1000); raises ProcessLookupError if it is gone."""
    try:
        fd = os.open(f"/proc/{pid}/oom_score_adj", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    try:
        return int(os.read(fd, 32))
    finally:
        os.close(fd)


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
        self._numbers: dict[int, TaskFds] = {}
        self._retired: list[Pidfd] = []
        self._seen: dict[int, _Seen] = {}
        #: Pids already sent SIGKILL: dying, not victims again.
        self.dying: set[int] = set()

    def refresh(self) -> tuple[Victim, ...]:
        """Re-reads the group's tasks and their sizes; opens pidfds for new ones.

        A task seen before is measured with one ``pread`` of its status
        file (opened with its pidfd); psutil is asked only about new tasks
        and renamed ones. In an OOM storm the table is refreshed after every
        episode, and the handler's CPU time comes out of the workload's.

        Raises GroupGone if the group was removed; OSError(ENOMEM) if called
        while the group is under OOM.
        """
        procs = tuple(sorted(self.group.procs()))
        self.dying &= set(procs)
        fresh: dict[int, Pidfd] = {}
        try:
            victims, seen = self._measure_all(procs, fresh)
        except BaseException:
            # Out of fds, say: the pidfds opened by this refresh go, or each
            # failed refresh would leave more behind.
            for pid, pidfd in fresh.items():
                if pid not in self._pidfds:
                    pidfd.close()
            raise
        self.procs = procs
        for pid, pidfd in self._pidfds.items():
            if pid not in fresh:
                self._retired.append(pidfd)
        self._pidfds = fresh
        self._numbers = {pid: pidfd.numbers() for pid, pidfd in fresh.items()}
        self._seen = seen
        self.victims = tuple(victims)
        return self.victims

    def _measure_all(self, procs: tuple[int, ...], fresh: dict[int, Pidfd]) -> tuple[list[Victim], dict[int, _Seen]]:
        """The victims among *procs*, measured; their pidfds go into *fresh*."""
        seen: dict[int, _Seen] = {}
        victims = []
        for pid in procs:
            if pid in self.protect or pid in self.dying:
                continue
            pidfd = self._pidfds.get(pid)
            try:
                if pidfd is None or pidfd.closed:
                    pidfd = Pidfd(pid) if _fd.can_use_pidfd else None
                else:
                    pidfd.complete()
                known = self._measure(pid, pidfd)
                adj = pidfd.adj.read() if pidfd is not None and pidfd.adj is not None else _oom_score_adj(pid)
            except (ProcessLookupError, psutil.NoSuchProcess, psutil.ZombieProcess):
                if pidfd is not None and pid not in self._pidfds:
                    pidfd.close()
                continue
            except BaseException:
                if pidfd is not None and pid not in self._pidfds:
                    pidfd.close()  # opened just now, and in no list yet
                raise
            if pidfd is not None:
                if pidfd.exited:
                    if pid not in self._pidfds:
                        pidfd.close()
                    continue
                fresh[pid] = pidfd
                seen[pid] = known
            victims.append(Victim(pid, known.name, known.rss, known.create_time, known.uid, adj))
        # A pid that was in cgroup.procs and whose pidfd is still not readable
        # is the same live process: a live process keeps its pid. Check that
        # it is still in the group (it may have been moved out meanwhile).
        now = set(self.group.procs())
        return [v for v in victims if v.pid in now], seen

    @property
    def pidfds(self) -> Mapping[int, TaskFds]:
        """The fd numbers of the victims of the last refresh, by pid (the
        table owns the fds: see :meth:`release`)."""
        return types.MappingProxyType(self._numbers)

    def pidfd(self, pid: int) -> Pidfd | None:
        """The pidfd of a victim of the last refresh; None without pidfds or
        for a pid the refresh did not list."""
        return self._pidfds.get(pid)

    def named(self, fd: int) -> Pidfd | None:
        """The open pidfd whose number a plan names (a victim's of the last
        refresh, or a retired one still kept for an armed plan), or None."""
        for pidfd in [*self._pidfds.values(), *self._retired]:
            if not pidfd.closed and pidfd.fileno() == fd:
                return pidfd
        return None

    def _measure(self, pid: int, pidfd: Pidfd | None) -> _Seen:
        """The task's name, size, start time and uid; raises
        ProcessLookupError (or psutil's errors) if it is gone."""
        last = self._seen.get(pid)
        status = pidfd.status if pidfd is not None else None
        if last is not None and status is not None and last.pidfd is pidfd:
            now = _StatusFields.parse(status.read())
            # The same comm: the name psutil gave stands (it may be longer,
            # from the command line); a new one (exec, PR_SET_NAME) is asked for.
            if now is not None and now.comm == last.comm:
                return attrs.evolve(last, rss=now.rss, uid=now.uid)
        # First sight (or a new comm): the start time and comm from
        # /proc/<pid>/stat, the size and uid from the status file.
        comm, created = _stat(pid)
        # A comm of 15 bytes may be cut short (TASK_COMM_LEN): psutil finds
        # the whole name in the command line.
        name = os.fsdecode(comm) if len(comm) < _COMM_MAX else psutil.Process(pid).name()
        fields = _StatusFields.parse(status.read()) if status is not None else None
        if fields is None:  # no status file (or a zombie's): psutil
            proc = psutil.Process(pid)
            with proc.oneshot():
                rss, uid = proc.memory_info().rss, proc.uids().real
        else:
            rss, uid = fields.rss, fields.uid
        return _Seen(pidfd, fields.comm if fields is not None else None, name, rss, created, uid)

    def release(self, in_use: Iterable[int]) -> None:
        """Closes retired pidfds whose numbers no armed plan names any more
        (``in_use``: the pidfd numbers the armed plans name)."""
        keep = set(in_use)
        still = []
        for pidfd in self._retired:
            if not pidfd.closed and pidfd.fileno() in keep:
                still.append(pidfd)
            else:
                pidfd.close()
        self._retired = still

    def close(self) -> None:
        for pidfd in [*self._pidfds.values(), *self._retired]:
            pidfd.close()
        self._pidfds = {}
        self._numbers = {}
        self._retired = []
        self.victims = ()

