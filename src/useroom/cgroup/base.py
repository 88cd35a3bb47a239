"""The memory cgroup interface shared by the cgroup v1 and v2 backends.

:class:`Group` is an abstract base class; each backend is a subclass
(:class:`useroom.cgroup.v1.V1Group`, :class:`useroom.cgroup.v2.V2Group`) and :meth:`Group.open` /
:meth:`Group.current` return an instance of the one the kernel needs (see
:func:`backend_class`). A subclass rather than a delegate object because what
differs between versions is a handful of file names, value formats and
notification mechanisms, while most operations (paths, children, tasks,
removal, error translation) are the same code: the base class holds that code
and a backend overrides only what its kernel interface changes. Callers type
against :class:`Group` and never name a backend.

A ``Group`` is a handle on a directory: it holds no fd, values it returns are
snapshots, and every operation translates the kernel's errno into an error of
:mod:`useroom.exceptions` (``raise ... from`` the ``OSError``). This layer is
plain Python and is never on the OOM critical path; what the handler needs
then (fds of control files, the eventfd) is prepared ahead with
:meth:`Group.open_file` and :meth:`Group.oom_notifier`.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
import posixpath
import select
import signal
import time
from collections.abc import Iterator, Mapping
from typing import ClassVar, Final


from useroom import _fd
from useroom._mounts import (
    CGROUP_FSTYPES,
    MemoryHierarchy,
    Mount,
    memory_hierarchy,
    read_memberships,
    read_mounts,
    read_text,
)
from useroom._units import parse_size
from useroom.cgroup.notify import EventRegistration, Notifier, OomCounter
from useroom.cgroup.values import OomControl, Stats
from useroom.exceptions import (
    CgroupError,
    CgroupPermissionError,
    GroupBusy,
    GroupExists,
    GroupGone,
    GroupNotFound,
    InvalidName,
    KernelFormatError,
    NotAMemoryCgroup,
    ProcessGone,
    RootGroupError,
    UnsupportedKernel,
)

__all__ = ["Group", "backend_class"]


#: How long :meth:`Group.remove` with ``force=True`` waits by default for the
#: group's tasks to die.
DEFAULT_REMOVE_TIMEOUT: Final = 10.0

_KILL_RULE: Final = (
    "kill(2): the sender's real or effective uid must match the target's real or saved uid, or have CAP_KILL"
)
_KILL_ADVICE: Final = "remove the group as the user who owns its tasks, or as root"


class Group(abc.ABC):
    """A memory cgroup: one directory of the memory controller's hierarchy.

    Get one with :meth:`current`, :meth:`open`, :meth:`of_pid` or
    :meth:`create_child`; the constructor is for backends. Two handles on the
    same directory are equal.
    """

    #: The backend of each cgroup version, filled in by :mod:`useroom.cgroup`
    #: (which imports them): this module never names a backend.
    backends: ClassVar[dict[int, type[Group]]] = {}

    #: The cgroup version of the backend (1 or 2).
    version: ClassVar[int]
    #: Control files, relative to the group's directory. The handler opens
    #: them ahead of an OOM with :meth:`open_file`.
    procs_file: ClassVar[str] = "cgroup.procs"
    stat_file: ClassVar[str] = "memory.stat"
    limit_file: ClassVar[str]
    #: How a handler meets an OOM on this backend, in a sentence for people.
    handling: ClassVar[str]
    usage_file: ClassVar[str]
    #: The file a handler's wall lives in: what its grants raise and restore
    #: (v1 the hard limit; v2 ``memory.high``, below ``memory.max``).
    wall_file: ClassVar[str]
    #: Whether the kernel refuses to set the wall below the usage (v1), so
    #: that a successful write says the usage fits; v2 takes any value.
    wall_write_checks_fit: ClassVar[bool]
    #: Whether a ``pread`` at offset 0 of an open ``cgroup.procs`` lists the
    #: tasks of now (v2: the iteration restarts at position 0) or the list
    #: its first read loaded (v1 keeps a pid list per open file while it is
    #: read; only a new file's first read loads a new one).
    procs_pread_relists: ClassVar[bool]
    #: The longest the kernel may put a task that took the group over its
    #: wall to sleep (seconds): 0 on v1, where the task waits in the OOM and
    #: wakes as soon as the limit fits; 2 on v2, the cap of the throttle
    #: penalty for going over ``memory.high`` (``MEMCG_MAX_HIGH_DELAY_JIFFIES``),
    #: a sleep that only a fatal signal ends. A thread asleep there may hold
    #: the GIL, so the plan waits this much longer for the ``on_oom`` hooks.
    wall_sleep_max: ClassVar[float]
    #: Whether one thread can be moved apart from its process
    #: (:meth:`attach_thread`): v1 charges a thread's kernel allocations (open
    #: files, pidfds, read buffers) to the thread's own group, and its
    #: ``tasks`` file moves one thread; v2's memory controller moves whole
    #: processes only.
    moves_threads: ClassVar[bool]
    #: Whether a process may join the parent of a group that has the memory
    #: controller (where a handler inside the group places its watchdog):
    #: any v1 group holds processes; v2's no-internal-process rule keeps
    #: them out of a non-root parent that enables memory for its children.
    parent_holds_processes: ClassVar[bool]
    #: Rules the kernel applies, by operation, for :class:`CgroupPermissionError`.
    permission_rules: ClassVar[Mapping[str, tuple[str, str]]] = {
        "remove": (
            "removing a group needs write permission on the parent group's directory",
            "chown the parent group's directory to the user (delegation)",
        ),
        "read": (
            "reading a control file needs read permission on it",
            "chown the group's directory and files to the user (delegation)",
        ),
    }

    __slots__ = ("_path", "_relpath", "_hierarchy")

    def __init__(self, path: str, relpath: str, hierarchy: MemoryHierarchy) -> None:
        self._path = path
        self._relpath = relpath
        self._hierarchy = hierarchy

    # -- finding groups ---------------------------------------------------

    @classmethod
    def current(cls) -> Group:
        """The memory cgroup of the calling process."""
        return cls._of_process("self")

    @classmethod
    def of_pid(cls, pid: int) -> Group:
        """The memory cgroup of process *pid* (raises :class:`ProcessGone` if there is none)."""
        return cls._of_process(_checked_pid(pid))

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Group:
        """Open an existing group.

        *path* is either a filesystem path at or below a mount of the memory
        hierarchy (``/sys/fs/cgroup/memory/a/b``), or a path within the
        hierarchy, as ``/proc/<pid>/cgroup`` shows it (``/a/b``; ``/`` is the
        root group).

        Raises :class:`GroupNotFound` if there is no such group, and
        :class:`NotAMemoryCgroup` for a path in another cgroup hierarchy, or
        outside every cgroup filesystem, or naming a file.
        """
        text = os.fspath(path)
        if not isinstance(text, str):
            raise TypeError(f"a group path is a str or os.PathLike[str], not {type(text).__name__}")
        mounts = read_mounts()
        hierarchy = memory_hierarchy(mounts)
        if "\0" in text:
            raise GroupNotFound(errno.ENOENT, f"no group {text!r} (a path cannot contain NUL)", text)
        normalized = posixpath.normpath(posixpath.join("/", text))
        real = os.path.realpath(normalized)
        fs_path: str | None
        relpath: str | None
        cgroupfs = _containing_cgroup_mount(mounts, real)
        if cgroupfs is not None:
            if cgroupfs not in hierarchy.mounts:
                raise NotAMemoryCgroup(
                    f"{text} is in the cgroup hierarchy mounted at {cgroupfs.mount_point} "
                    f"({_describe(cgroupfs)}), not in the memory hierarchy at {hierarchy.mount.mount_point}"
                )
            fs_path, relpath = real, cgroupfs.cgroup_path(real)
        else:
            relpath = normalized
            fs_path = hierarchy.fs_path(relpath)
        if fs_path is None or relpath is None:
            raise GroupNotFound(errno.ENOENT, f"group {relpath or text} is not visible through any mount", text)
        if not os.path.isdir(fs_path):
            if os.path.lexists(fs_path):
                raise NotAMemoryCgroup(f"{fs_path} is a file, not a group")
            if cgroupfs is None and os.path.lexists(text):
                raise NotAMemoryCgroup(
                    f"{text} is not in a cgroup filesystem; the memory hierarchy is mounted at "
                    f"{hierarchy.mount.mount_point} (pass a path below it, or a group path such as /a/b)"
                )
            raise GroupNotFound(errno.ENOENT, f"no group {relpath} in the memory hierarchy", fs_path)
        return backend_class(hierarchy.version)(fs_path, relpath, hierarchy)

    @classmethod
    def of_thread(cls, tid: int, pid: int | None = None) -> Group:
        """The memory cgroup of thread *tid* of process *pid* (default: this
        process), from ``/proc/<pid>/task/<tid>/cgroup``. On cgroup v1 a
        thread can be in another group than its process (see
        :meth:`attach_thread`). Raises :class:`ProcessGone` if there is no such thread."""
        owner = "self" if pid is None else str(_checked_pid(pid))
        return cls._of_process(f"{owner}/task/{_checked_pid(tid)}")

    @classmethod
    def _of_process(cls, pid: int | str) -> Group:
        hierarchy = memory_hierarchy(read_mounts())
        try:
            memberships = read_memberships(pid)
        except (FileNotFoundError, ProcessLookupError) as err:
            raise ProcessGone(f"no process {pid}") from err
        membership = hierarchy.membership(memberships)
        if membership is None:
            raise UnsupportedKernel(f"/proc/{pid}/cgroup has no line for the memory hierarchy")
        fs_path = hierarchy.fs_path(membership.path)
        if fs_path is None:
            raise GroupNotFound(
                errno.ENOENT,
                f"the memory group {membership.path} of process {pid} is not visible through any mount",
                membership.path,
            )
        return backend_class(hierarchy.version)(fs_path, membership.path, hierarchy)

    # -- identity -----------------------------------------------------------

    @property
    def path(self) -> str:
        """The group's directory."""
        return self._path

    @property
    def relpath(self) -> str:
        """The group's path within the hierarchy, as in ``/proc/<pid>/cgroup`` (``/`` for the root)."""
        return self._relpath

    @property
    def name(self) -> str:
        """The last component of :attr:`relpath` (``/`` for the root)."""
        return posixpath.basename(self._relpath) or "/"

    @property
    def is_root(self) -> bool:
        """True for the hierarchy's root group, which has no limit and no OOM notifications."""
        return self._relpath == "/"

    @property
    def hierarchy(self) -> MemoryHierarchy:
        """The memory hierarchy the group belongs to."""
        return self._hierarchy

    @property
    def parent(self) -> Group | None:
        """The parent group; None for the root and for the top of a mounted subtree."""
        if self.is_root or any(self._path == mount.mount_point for mount in self._hierarchy.mounts):
            return None
        return type(self)(posixpath.dirname(self._path), posixpath.dirname(self._relpath), self._hierarchy)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._relpath} at {self._path}>"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Group):
            return (self.version, self._path) == (other.version, other._path)
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.version, self._path))

    # -- tree ---------------------------------------------------------------

    def children(self) -> list[Group]:
        """The child groups, sorted by name."""
        try:
            with os.scandir(self._path) as entries:
                names = sorted(entry.name for entry in entries if entry.is_dir(follow_symlinks=False))
        except OSError as err:
            raise self._error(err, "list the child groups of", self._path) from err
        return [self._child(name) for name in names]

    @contextlib.contextmanager
    def room_for_children(self, leaf: str) -> Iterator[None]:
        """Within the block, child groups of this group may have memory
        limits. Nothing to do on cgroup v1, where any group may; see the
        v2 backend for when this process must step into a leaf (*leaf*, a
        child name) for the time of the block."""
        yield

    def enable_memory_for_children(self) -> None:
        """Lets child groups have memory limits. Nothing to do on cgroup v1,
        where any group may; the v2 backend writes ``+memory`` to
        ``cgroup.subtree_control`` (the group must hold no process then)."""

    def create_child(self, name: str, memory_max: str | int | None = None) -> Group:
        """Create the child group *name* and return it.

        *memory_max*, if given, is set as its limit (see :meth:`set_limit`);
        if that fails, the new group is removed again. Raises
        :class:`InvalidName` for a name that is not a single path component,
        :class:`GroupExists` if the child exists.
        """
        limit = None if memory_max is None else parse_size(memory_max)
        child = self._make_child(name)
        if limit is not None:
            try:
                child.set_limit(limit)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.rmdir(child.path)  # the error being raised says more than this one
                raise
        return child

    def enter_child(self, name: str, memory_max: str | int | None = None) -> Group:
        """Create the child group *name*, move this process into it, and give
        it *memory_max*: how a service makes its own limited group inside the
        cgroup its service manager delegated to it (systemd's ``Delegate=yes``).

        The order is cgroup v2's: the delegated group holds the service until
        it moves, and a group that gives its children memory limits may hold
        no process ("no internal processes"). So the child is made, this
        process (all its threads) moves in, and only then is memory enabled
        for the children and the limit set. Another process still in this
        group raises :class:`GroupBusy`; on any error this process moves back
        and the child is removed, as far as the kernel allows. On v1 it is
        :meth:`create_child` and :meth:`attach`.
        """
        limit = None if memory_max is None else parse_size(memory_max)
        child = self._make_child(name)
        try:
            child.attach(os.getpid())
            self.enable_memory_for_children()
            if limit is not None:
                child.set_limit(limit)
        except BaseException:
            with contextlib.suppress(OSError):  # CgroupError is one
                self.attach(os.getpid())
                os.rmdir(child.path)
            raise
        return child

    def _make_child(self, name: str) -> Group:
        """mkdir of the child *name*, the kernel's refusals translated."""
        _check_name(name, "group name")
        path = posixpath.join(self._path, name)
        try:
            os.mkdir(path)
        except OSError as err:
            if err.errno == errno.EEXIST:
                raise GroupExists(err.errno, f"group {self._child_relpath(name)} already exists", path) from err
            if err.errno == errno.EINVAL:
                raise InvalidName(f"the kernel refused the group name {name!r}") from err
            raise self._error(err, "create a child group in", path, rule="create") from err
        return self._child(name)

    def remove(self, force: bool = False, timeout: float = DEFAULT_REMOVE_TIMEOUT) -> None:
        """Remove the group.

        Without *force* the group must be empty: tasks or child groups raise
        :class:`GroupBusy`. With *force*, for the group and every group below
        it: the kernel OOM killer is re-enabled and the limit lifted (so tasks
        asleep in an OOM can run), every task is sent SIGKILL, and once they
        are gone (waiting up to *timeout* seconds, else :class:`GroupBusy`)
        the groups are removed depth-first.
        """
        if self.is_root:
            raise RootGroupError("the root memory cgroup cannot be removed")
        if not force:
            self._rmdir()
            return
        if not os.path.isdir(self._path):
            raise GroupGone(errno.ENOENT, f"group {self._relpath} was removed", self._path)
        deadline = time.monotonic() + timeout
        while True:
            subtree = self._subtree()  # children before parents
            self._refuse_own_process(subtree)
            for group in reversed(subtree):
                group._release_quietly()
            pidfds: list[int] = []
            try:
                for group in subtree:
                    group._kill_tasks(pidfds)
                _wait_for_exit(pidfds, deadline)
            finally:
                for pidfd in pidfds:
                    os.close(pidfd)
            busy = None
            for group in subtree:
                try:
                    group._rmdir()
                except GroupGone:
                    pass
                except GroupBusy as err:
                    busy = err
                    break
            if busy is None:
                return
            if time.monotonic() >= deadline:
                raise GroupBusy(
                    errno.EBUSY, f"could not remove {self._relpath} within {timeout} s: {busy.strerror}", busy.path
                ) from busy
            time.sleep(0.005)

    # -- tasks --------------------------------------------------------------

    def procs(self) -> list[int]:
        """The pids of the group's processes (thread-group leaders), as the kernel lists them."""
        text = self._read(self.procs_file, "list the tasks of")
        try:
            return [int(line) for line in text.split()]
        except ValueError as err:
            raise KernelFormatError(f"{self.procs_file} of {self._relpath}: {text[:200]!r}") from err

    def attach(self, pid: int) -> None:
        """Move process *pid* (all its threads) into the group.

        Memory the process already uses stays charged to its old group; only
        new pages are charged here. Raises :class:`ProcessGone` if there is no
        such process.
        """
        pid = _checked_pid(pid)
        try:
            self._write(self.procs_file, str(pid))
        except OSError as err:
            if err.errno == errno.ESRCH:
                raise ProcessGone(f"cannot attach pid {pid} to {self._relpath}: no such process") from err
            raise self._error(err, f"attach pid {pid} to", self._file(self.procs_file), rule="attach") from err

    def attach_thread(self, tid: int) -> None:
        """Move one thread *tid* into the group, apart from its process
        (where :attr:`moves_threads`; see the v1 backend). Raises
        :class:`UnsupportedKernel` where a thread cannot be moved alone."""
        raise UnsupportedKernel(
            errno.ENOTSUP,
            f"cannot move thread {tid} alone to {self._relpath}: this memory controller moves whole processes",
        )

    # -- memory -------------------------------------------------------------

    def usage(self) -> int:
        """Memory charged to the group (and its descendants), in bytes."""
        return self._read_int(self.usage_file, "read the usage of")

    def stats(self) -> Stats:
        """A snapshot of ``memory.stat``."""
        return Stats.from_text(self._read(self.stat_file, "read the statistics of"))

    @abc.abstractmethod
    def limit(self) -> int:
        """The hard limit in bytes; :data:`~useroom._units.UNLIMITED` when there is none."""

    @abc.abstractmethod
    def set_limit(self, size: str | int) -> None:
        """Set the hard limit (``"256M"``, an int, or ``"max"``).

        The kernel rounds it down to a whole page. A limit below the usage
        makes the kernel reclaim; if it cannot, :class:`LimitBelowUsage`.
        """

    @abc.abstractmethod
    def oom_control(self) -> OomControl:
        """The group's OOM state."""

    @abc.abstractmethod
    def set_oom_kill(self, enabled: bool) -> None:
        """Enable or disable the kernel OOM killer for the group.

        Disabled, tasks that hit the limit sleep until user space raises the
        limit or kills or moves a task; re-enabling it wakes them.
        """

    @abc.abstractmethod
    def oom_notifier(self) -> Notifier:
        """A notifier that fires each time the group hits an OOM (v1 an
        eventfd on ``memory.oom_control``; v2 ``memory.events``, whose
        ``oom`` and ``oom_kill`` counters say what happened)."""

    @abc.abstractmethod
    def usage_threshold(self, size: str | int) -> EventRegistration:
        """An eventfd signalled each time the usage crosses *size*, upwards or downwards."""

    # -- files --------------------------------------------------------------

    def open_file(self, name: str, flags: int) -> int:
        """Open the control file *name* of the group and return the fd, which the caller owns.

        ``O_CLOEXEC`` is always added. *name* must be a plain file name
        (:class:`InvalidName` otherwise). Used to prepare, ahead of an OOM,
        every fd the handler will need then.
        """
        _check_name(name, "file name")
        path = self._file(name)
        try:
            return os.open(path, flags | os.O_CLOEXEC)
        except OSError as err:
            writing = flags & (os.O_WRONLY | os.O_RDWR)
            raise self._error(err, f"open {name} of", path, rule="write" if writing else "read") from err

    def write_file(self, name: str, value: str) -> None:
        """Write *value* to the control file *name* of the group in one ``write()``.

        *name* must be a plain file name (:class:`InvalidName` otherwise);
        the errno is translated as for every other operation (a
        :class:`CgroupError`). For files this layer has no method for, such
        as the proposed kernel interfaces a declared handler writes.
        """
        _check_name(name, "file name")
        try:
            self._write(name, value)
        except OSError as err:
            raise self._error(err, f"write {name} of", self._file(name), rule="write") from err

    # -- for backends ---------------------------------------------------------

    @abc.abstractmethod
    def _release(self) -> None:
        """Let tasks asleep in an OOM run: re-enable the kernel killer, lift the limit."""

    def _refuse_root(self, action: str) -> None:
        if self.is_root:
            raise RootGroupError(f"cannot {action} the root memory cgroup: it has no limit and no OOM")

    def _file(self, name: str) -> str:
        return posixpath.join(self._path, name)

    def _read(self, name: str, action: str) -> str:
        try:
            return read_text(self._file(name))
        except OSError as err:
            raise self._error(err, action, self._file(name), rule="read") from err

    def _read_int(self, name: str, action: str) -> int:
        text = self._read(name, action)
        try:
            return int(text)
        except ValueError as err:
            raise KernelFormatError(f"{name} of {self._relpath} is not a number: {text[:200]!r}") from err

    def _write(self, name: str, value: str) -> None:
        """Write *value* to a control file in one write(); OSError is the caller's to translate."""
        fd = os.open(self._file(name), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def _error(self, err: OSError, action: str, path: str, *, rule: str = "", detail: str = "") -> CgroupError:
        """Translate *err* from an operation on this group (the caller raises it ``from err``).

        The message reads "cannot <action> <group><detail>: <reason>"; *rule*
        selects the entry of :attr:`permission_rules` for EACCES and EPERM.
        """
        what = f"cannot {action} {self._relpath}{detail}"
        if err.errno == errno.ENODEV or (err.errno == errno.ENOENT and not os.path.isdir(self._path)):
            return GroupGone(err.errno, f"{what}: the group was removed", path)
        if err.errno in (errno.EACCES, errno.EPERM):
            kernel_rule, advice = self.permission_rules.get(rule, ("", ""))
            return CgroupPermissionError(
                err.errno or 0, f"{what}: {os.strerror(err.errno)}", path, rule=kernel_rule, advice=advice
            )
        return CgroupError(err.errno or 0, f"{what}: {os.strerror(err.errno or 0)}", path)

    def _child(self, name: str) -> Group:
        return type(self)(posixpath.join(self._path, name), self._child_relpath(name), self._hierarchy)

    def _child_relpath(self, name: str) -> str:
        return posixpath.join(self._relpath, name)

    def _subtree(self) -> list[Group]:
        """This group and all below it, children before their parents; gone groups are skipped."""
        groups: list[Group] = []
        try:
            children = self.children()
        except GroupGone:
            return groups
        for child in children:
            groups.extend(child._subtree())
        groups.append(self)
        return groups

    def _rmdir(self) -> None:
        try:
            os.rmdir(self._path)
        except OSError as err:
            if err.errno == errno.EBUSY:
                raise GroupBusy(err.errno, f"cannot remove {self._relpath}: {self._busy_reason()}", self._path) from err
            raise self._error(err, "remove", self._path, rule="remove") from err

    def _busy_reason(self) -> str:
        reasons = []
        try:
            pids = self.procs()
            children = [child.name for child in self.children()]
        except CgroupError:
            return "it is busy"
        if pids:
            reasons.append(f"it still has {len(pids)} task(s) {pids[:10]}")
        if children:
            reasons.append(f"it has child group(s) {children[:10]}")
        reasons.append("use remove(force=True) to kill the tasks and remove the children")
        return "; ".join(reasons)

    def _refuse_own_process(self, subtree: list[Group]) -> None:
        for group in subtree:
            try:
                if os.getpid() in group.procs():
                    raise GroupBusy(
                        errno.EBUSY,
                        f"refusing to force-remove {self._relpath}: the calling process is in {group.relpath}",
                        group.path,
                    )
            except GroupGone:
                pass

    def _release_quietly(self) -> None:
        try:
            self._release()
        except GroupGone:
            pass

    def _kill_tasks(self, pidfds: list[int]) -> None:
        """SIGKILL every task of this group; add pidfds of those signalled to *pidfds*, to wait on."""
        try:
            pids = self.procs()
        except GroupGone:
            return
        for pid in pids:
            pidfd = self._kill(pid)
            if pidfd is not None:
                pidfds.append(pidfd)

    def _kill(self, pid: int) -> int | None:
        """SIGKILL *pid* if it is still in this group; return its pidfd (the caller closes it)."""
        try:
            if not _fd.can_use_pidfd:
                # No pidfd: the pid may name another process by now. The
                # check just before the signal keeps it in the group.
                if self._holds(pid):
                    os.kill(pid, signal.SIGKILL)
                return None
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        except PermissionError as err:
            raise self._kill_refused(err, pid) from err
        try:
            # The pidfd pins the process: if it is still alive when signalled,
            # the pid named it when /proc/<pid>/cgroup was read.
            if not self._holds(pid):
                os.close(pidfd)
                return None
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            os.close(pidfd)
            return None
        except PermissionError as err:
            os.close(pidfd)
            raise self._kill_refused(err, pid) from err
        except BaseException:
            os.close(pidfd)
            raise
        return pidfd

    def _holds(self, pid: int) -> bool:
        """Whether process *pid* is in this group now (its /proc/<pid>/cgroup
        says so); raises FileNotFoundError or ProcessLookupError if it is gone."""
        membership = self._hierarchy.membership(read_memberships(pid))
        return membership is not None and membership.path == self._relpath

    def _kill_refused(self, err: OSError, pid: int) -> CgroupPermissionError:
        return CgroupPermissionError(
            err.errno or 0, f"cannot kill pid {pid} of {self._relpath}", self._path, rule=_KILL_RULE,
            advice=_KILL_ADVICE
        )

    # -- version-neutral views ------------------------------------------------

    @abc.abstractmethod
    def oom_counter(self) -> OomCounter:
        """Count the group's OOMs from now on, with the backend's own
        notification (see :class:`OomCounter`)."""


def backend_class(version: int) -> type[Group]:
    """Return the :class:`Group` subclass for cgroup *version* (the backends
    are registered by :mod:`useroom.cgroup`, which imports them)."""
    backend = Group.backends.get(version)
    if backend is None:
        raise UnsupportedKernel(f"the memory controller is on cgroup v{version}, which this version of useroom lacks")
    return backend


def _containing_cgroup_mount(mounts: tuple[Mount, ...], path: str) -> Mount | None:
    """The cgroup mount with the longest mount point at or above *path*, if any."""
    best = None
    for mount in mounts:
        if mount.fstype in CGROUP_FSTYPES and mount.cgroup_path(path) is not None:
            if best is None or len(mount.mount_point) > len(best.mount_point):
                best = mount
    return best


def _describe(mount: Mount) -> str:
    if mount.fstype == "cgroup2":
        return "cgroup2 without the memory controller"
    return "cgroup v1: " + ",".join(sorted(mount.controllers)) if mount.controllers else "cgroup v1"


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str):
        raise InvalidName(f"a {what} is a str, not {type(name).__name__}")
    if name in ("", ".", ".."):
        raise InvalidName(f"invalid {what} {name!r}: it must not be empty, '.' or '..'")
    for char, label in (("/", "'/'"), ("\0", "NUL"), ("\n", "a newline")):
        if char in name:
            raise InvalidName(f"invalid {what} {name!r}: it must be a single path component without {label}")
    if len(os.fsencode(name)) > 255:
        raise InvalidName(f"invalid {what} {name[:40]!r}...: longer than 255 bytes")


def _checked_pid(pid: int) -> int:
    if isinstance(pid, bool) or not isinstance(pid, int):
        raise TypeError(f"a pid is an int, not {type(pid).__name__}")
    if pid <= 0:
        # To the kernel, 0 in cgroup.procs means the writer itself.
        raise ValueError(f"a pid is a positive int, not {pid}")
    return pid


def _wait_for_exit(pidfds: list[int], deadline: float) -> None:
    """Wait until every pidfd is readable (its process exited) or *deadline* passes."""
    poller = select.poll()
    pending = set(pidfds)
    for pidfd in pending:
        poller.register(pidfd, select.POLLIN)
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        for pidfd, _ in poller.poll(max(1, round(remaining * 1000))):
            pending.discard(pidfd)
            poller.unregister(pidfd)
