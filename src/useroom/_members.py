"""Whether a task is still in the group, checked right before it is signalled.

The victim table pins each task with a pidfd at the refresh. A pidfd
protects against pid reuse, not against a move: a task that its service
manager (or its user) moves to another group after the refresh charges
that group, and the handled group's OOM is none of its business. So every
signal to a task of the group, from the native plan or from Python, goes
out only if the task's ``/proc/<pid>/cgroup`` holds the group's line when
the signal is sent:

- ``N:memory:/a/b`` on cgroup v1 (N, the hierarchy's number, and the
  controllers field as the kernel prints them for the memory hierarchy),
- ``0::/a/b`` on cgroup v2.

The native plan reads that file through an fd the refresh opened and read
once (:class:`ProcCgroup`): a ``pread`` at offset 0 formats the text of now
into the seq_file buffer the first read allocated, so the check charges
nothing to a group that is out of memory. Where no such fd is open it opens
the file by pid, which can fail under the OOM; a file that cannot be read
says no, and the task is not signalled.

A group renamed after the start has a new path: its tasks no longer match
the line, and are not signalled until the handler reads the new one.
"""

from __future__ import annotations

import os

from useroom._fd import OwnedFd
from useroom.cgroup import Group

__all__ = ["MembershipLine", "ProcCgroup", "member_line"]

#: More than ``/proc/<pid>/cgroup`` holds on any machine we know (a v1 line
#: per mounted hierarchy, each with a path).
_TEXT_MAX = 2048


class MembershipLine:
    """The line of a group in ``/proc/<pid>/cgroup``, and the checks on it."""

    __slots__ = ("line",)

    def __init__(self, line: bytes) -> None:
        if not line.endswith(b"\n") or b"\n" in line[:-1]:
            raise ValueError(f"a membership line is one line ending in a newline, not {line!r}")
        self.line = line

    def __repr__(self) -> str:
        return f"MembershipLine({self.line!r})"

    def holds(self, text: bytes) -> bool:
        """Whether *text* (a ``/proc/<pid>/cgroup``) has this line as one of its lines."""
        return (b"\n" + text).find(b"\n" + self.line) >= 0

    def has(self, pid: int) -> bool:
        """Whether process *pid* is in the group now, as its file, opened
        and read now, says. Raises ProcessLookupError if there is no such
        process, and OSError if the file cannot be read (ENOMEM: opening
        it is charged to the group, which may be out of memory)."""
        try:
            fd = os.open(f"/proc/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ProcessLookupError(pid) from None
        try:
            return self.holds(os.read(fd, _TEXT_MAX))
        finally:
            os.close(fd)

    def has_file(self, file: ProcCgroup) -> bool:
        """Whether the process of *file* is in the group now (one ``pread``,
        which allocates nothing). Raises OSError if it cannot be read (ESRCH:
        the process has exited)."""
        return self.holds(os.pread(file.fileno(), _TEXT_MAX, 0))


def member_line(group: Group) -> MembershipLine:
    """The line that a task of *group* has in its ``/proc/<pid>/cgroup``.

    cgroup v2's is ``0::<path>``. A v1 line starts with the number and the
    controllers field of the memory hierarchy, which this process's own
    file shows (each process has a line for each mounted hierarchy).
    """
    if group.version == 2:
        return MembershipLine(b"0::" + os.fsencode(group.relpath) + b"\n")
    with open("/proc/self/cgroup", "rb") as file:
        text = file.read()
    for line in text.split(b"\n"):
        number, sep, rest = line.partition(b":")
        controllers, sep2, _ = rest.partition(b":")
        if sep and sep2 and b"memory" in controllers.split(b","):
            return MembershipLine(number + b":" + controllers + b":" + os.fsencode(group.relpath) + b"\n")
    raise LookupError("/proc/self/cgroup has no line for the memory hierarchy")


class ProcCgroup(OwnedFd):
    """``/proc/<pid>/cgroup`` of one process, opened and read once, so that
    a ``pread`` at offset 0 (the native plan's, at the OOM) says which group
    it is in then without allocating. The file names the process it was
    opened for: once that exits, reads fail, whatever process then has the pid."""

    def __init__(self, pid: int) -> None:
        self._fd = os.open(f"/proc/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.pread(self._fd, _TEXT_MAX, 0)
        except BaseException:
            self.close()
            raise

