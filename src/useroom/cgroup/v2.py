"""The cgroup v2 memory controller backend.

v2 has no way to make the kernel wait for user space: ``memory.max`` is a
hard limit at which the kernel reclaims and then OOM-kills at once, and there
is no ``oom_kill_disable``. What v2 has instead is ``memory.high``, a limit at
which the group's tasks are throttled (made to reclaim and sleep, up to about
2 s per batch of pages) but never killed. A user-space handler therefore holds
``memory.high`` as its wall and keeps ``memory.max`` above it as the kernel's
backstop; the gap between the two is the reserve it may use to act.

Notifications do not need registration: every counter file (``memory.events``,
``cgroup.events``) signals a change to whoever polls it for ``POLLPRI``
(kernfs ``file modified`` events), and ``memory.pressure`` takes PSI
triggers. Facts measured on Debian's 6.1 kernel (the CI guest):

- a fresh fd of ``memory.events`` polls ready (``POLLPRI | POLLERR``) until
  it has been read once; after each change, until it is read again from
  offset 0. So a :class:`FileNotifier` reads the file when it is made and
  after each wakeup;
- after ``rmdir`` an fd of a group's file reads ENODEV, and polls ready;
- ``cgroup.freeze`` returns at once: ``frozen 1`` in ``cgroup.events``
  follows once every task has stopped (a change notification on that file);
- a PSI trigger (``"some 10000 1000000"``) on a group's ``memory.pressure``
  is accepted from root with a 1 s window; unprivileged writers need a window
  that is a multiple of 2 s (Linux 6.5+), and kernels 6.5/6.6 without the fix
  refuse cgroup files with EPERM;
- writing ``memory.max`` below the usage reclaims and then OOM-kills in the
  group until it fits: the write succeeds (no EBUSY as on v1).

Delegation rules (Documentation/admin-guide/cgroup-v2.rst): moving a process
needs write access to ``cgroup.procs`` of the destination *and* of the common
ancestor of the source and destination groups; a group that has controllers
enabled in ``cgroup.subtree_control`` cannot hold processes (the
"no internal processes" rule, the root excepted), and a child has memory
files only if its parent enabled ``+memory`` in its ``cgroup.subtree_control``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import time
from collections.abc import Iterator, Mapping
from typing import ClassVar, Final, Literal

import attrs

from useroom.cgroup.base import Group
from useroom.cgroup.notify import EventRegistration, OomCounter
from useroom.cgroup.values import OomControl, parse_key_values
from useroom._fd import OwnedFd
from useroom._units import UNLIMITED, format_size, parse_size
from useroom.exceptions import (
    CgroupError,
    GroupBusy,
    GroupGone,
    KernelFormatError,
    PressureTriggerRefused,
    UnsupportedKernel,
    UseroomError,
)

__all__ = ["FileNotifier", "MemoryEvents", "PressureTrigger", "V2Group"]

#: How long :meth:`V2Group.freeze` waits by default for every task to stop.
DEFAULT_FREEZE_TIMEOUT: Final = 10.0
#: PSI windows an unprivileged writer may use are a multiple of this (Linux 6.5+).
UNPRIVILEGED_PSI_WINDOW_US: Final = 2_000_000
#: The largest PSI window the kernel accepts.
MAX_PSI_WINDOW_US: Final = 10_000_000
_POLL_CHANGE: Final = select.POLLPRI | select.POLLERR

_NO_INTERNAL_PROCESSES: Final = (
    "v2 'no internal processes' rule: a group that enables controllers for its children in "
    "cgroup.subtree_control cannot hold processes (the root excepted)"
)


@attrs.frozen
class MemoryEvents:
    """A snapshot of ``memory.events`` (or ``memory.events.local``): counters since the group was made.

    ``high``: times the group was throttled at ``memory.high``; ``max``: times
    it hit ``memory.max`` and had to reclaim; ``oom``: times that reclaim
    failed; ``oom_kill``: tasks the kernel OOM killer killed;
    ``oom_group_kill``: whole-group kills (``memory.oom.group``, Linux 5.16).
    Counters the kernel does not report are 0.
    """

    low: int = 0
    high: int = 0
    max: int = 0
    oom: int = 0
    oom_kill: int = 0
    oom_group_kill: int = 0
    sock_throttled: int = 0

    @classmethod
    def from_text(cls, text: str) -> MemoryEvents:
        """Parse the text of ``memory.events`` (``key value`` lines); unknown keys are ignored."""
        values = parse_key_values(text, "memory.events")
        known = {field.name for field in attrs.fields(cls)}
        return cls(**{key: value for key, value in values.items() if key in known})

    def since(self, earlier: MemoryEvents) -> MemoryEvents:
        """The counts that happened after *earlier* was read."""
        return MemoryEvents(
            **{field.name: getattr(self, field.name) - getattr(earlier, field.name)
               for field in attrs.fields(MemoryEvents)}
        )


class FileNotifier(OwnedFd):
    """Change notifications of a cgroup counter file (``memory.events``, ``cgroup.events``).

    It owns one fd of the file (close-on-exec). :meth:`fileno` polls ready
    for ``POLLPRI`` when the file changed since it was last read; :meth:`read`
    waits for that, reads the file again (which re-arms the notification) and
    returns the new text. Use one reader at a time; close with :meth:`close`
    or a ``with`` block (dropping it open warns with ``ResourceWarning``).
    The same duck type as :class:`~useroom.EventRegistration`: ``fileno``,
    ``wait``, ``read``, ``close``, ``closed``, ``description``.
    """

    __slots__ = ("path", "description", "text")

    def __init__(self, fd: int, path: str, description: str) -> None:
        self._fd = fd
        #: The watched file.
        self.path = path
        #: What is watched, e.g. ``"memory.events of /a"``.
        self.description = description
        #: The file's text at the last read.
        self.text = ""
        try:
            self.text = self._reread()  # arms the notification (a fresh fd polls ready)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<FileNotifier {self.description} {state}>"

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the file changed since it was last read; False if *timeout* seconds pass first."""
        poller = select.poll()
        poller.register(self.fileno(), select.POLLPRI)
        return bool(poller.poll(None if timeout is None else max(0, round(timeout * 1000))))

    def read(self, timeout: float | None = None) -> str:
        """Wait for a change, read the file again (re-arming the notification) and return its text.

        Raises TimeoutError if *timeout* seconds pass first, and
        :class:`~useroom.GroupGone` if the group was removed.
        """
        if not self.wait(timeout):
            raise TimeoutError(f"{self.description}: no change within {timeout} s")
        self.text = self._reread()
        return self.text

    def reread(self) -> str:
        """Read the file again now, without waiting (re-arming the notification); its new text."""
        self.text = self._reread()
        return self.text

    def _reread(self) -> str:
        try:
            data = os.pread(self.fileno(), 4096, 0)
        except OSError as err:
            if err.errno in (errno.ENODEV, errno.ENOENT):
                raise GroupGone(err.errno, f"{self.description}: the group was removed", self.path) from err
            raise CgroupError(err.errno or 0, f"{self.description}: {os.strerror(err.errno or 0)}", self.path) from err
        return os.fsdecode(data)

class PressureTrigger(OwnedFd):
    """A PSI trigger: wakes (``POLLPRI``) when tasks stall on memory for *stall* in a *window*.

    Made by :meth:`open` (or :meth:`V2Group.pressure_trigger`). It owns the fd
    of the pressure file the trigger was written to; closing it removes the
    trigger. ``POLLERR`` means the file's group was removed.
    """

    __slots__ = ("path", "kind", "stall_us", "window_us")

    def __init__(self, fd: int, path: str, kind: str, stall_us: int, window_us: int) -> None:
        self._fd = fd
        self.path = path
        self.kind = kind
        self.stall_us = stall_us
        self.window_us = window_us

    @classmethod
    def open(
        cls, path: str, stall: float, window: float, kind: Literal["some", "full"] = "some", *, round_up: bool = False
    ) -> PressureTrigger:
        """Write the trigger ``"<kind> <stall us> <window us>"`` to the pressure file *path*.

        *stall* and *window* are in seconds. With *round_up*, a window the
        kernel refuses is rounded up to the next multiple of 2 s (the rule for
        unprivileged writers, at most 10 s) and tried once more; the trigger's
        :attr:`window_us` says which one is in force. Raises :class:`PressureTriggerRefused`
        (an :class:`UnsupportedKernel`) when the kernel refuses it, with the
        likely reason: without CAP_SYS_RESOURCE (which even root may lack, as
        in a container) windows must be a multiple of 2 s
        (:data:`UNPRIVILEGED_PSI_WINDOW_US`, Linux 6.5+), kernels 6.5/6.6 refuse
        them on cgroup files, and kernels without PSI have no file.
        """
        try:
            return cls._open(path, stall, window, kind)
        except PressureTriggerRefused as err:
            window_us = round(window * 1e6)
            rounded_us = -(-window_us // UNPRIVILEGED_PSI_WINDOW_US) * UNPRIVILEGED_PSI_WINDOW_US
            if not round_up or err.errno not in (errno.EINVAL, errno.EPERM) or rounded_us == window_us:
                raise
            if rounded_us > MAX_PSI_WINDOW_US:
                raise
            try:
                return cls._open(path, stall, rounded_us / 1e6, kind)
            except PressureTriggerRefused as again:
                raise again from err

    @classmethod
    def _open(cls, path: str, stall: float, window: float, kind: str) -> PressureTrigger:
        if kind not in ("some", "full"):
            raise ValueError(f"a PSI trigger is 'some' or 'full', not {kind!r}")
        stall_us, window_us = round(stall * 1e6), round(window * 1e6)
        if not 0 < stall_us <= window_us:
            raise ValueError(f"a PSI trigger needs 0 < stall <= window, not {stall!r} and {window!r}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as err:
            raise PressureTriggerRefused(
                err.errno or 0, f"cannot open {path} for a PSI trigger: {os.strerror(err.errno or 0)}", path,
                reason=_psi_reason(err.errno, window_us, path),
            ) from err
        try:
            os.write(fd, f"{kind} {stall_us} {window_us}".encode() + b"\0")
        except OSError as err:
            os.close(fd)
            raise PressureTriggerRefused(
                err.errno or 0,
                f"the kernel refused the PSI trigger '{kind} {stall_us} {window_us}' on {path}: "
                f"{os.strerror(err.errno or 0)}",
                path,
                reason=_psi_reason(err.errno, window_us, path),
            ) from err
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path, kind, stall_us, window_us)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<PressureTrigger {self.kind} {self.stall_us}/{self.window_us} us on {self.path} {state}>"

    @property
    def description(self) -> str:
        """What is watched."""
        return f"memory pressure ({self.kind} {self.stall_us / 1e6:g} s in {self.window_us / 1e6:g} s) of {self.path}"

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the trigger fires; False if *timeout* seconds pass first.

        Each firing is reported once (polling consumes it). Raises
        :class:`~useroom.GroupGone` if the group was removed.
        """
        poller = select.poll()
        poller.register(self.fileno(), select.POLLPRI)
        ready = poller.poll(None if timeout is None else max(0, round(timeout * 1000)))
        if ready and ready[0][1] & (select.POLLERR | select.POLLNVAL):
            raise GroupGone(errno.ENODEV, f"{self.description}: the group was removed", self.path)
        return bool(ready)


def _psi_reason(err: int | None, window_us: int, path: str) -> str:
    if err == errno.ENOENT:
        return "the kernel has no PSI (CONFIG_PSI, or psi=0 on the command line)"
    if err in (errno.EINVAL, errno.EPERM) and window_us % UNPRIVILEGED_PSI_WINDOW_US:
        return (
            "without CAP_SYS_RESOURCE the window must be a multiple of 2 s (Linux 6.5+); "
            f"{window_us / 1e6:g} s is not"
        )
    if err == errno.EPERM:
        return "unprivileged triggers need Linux 6.5+ (and on cgroup files, 6.7 or a 6.5/6.6 with the fix)"
    if err == errno.EINVAL:
        return f"the window must be 0.5..{MAX_PSI_WINDOW_US / 1e6:g} s and the stall at most the window"
    return ""


class V2Group(Group):
    """A group of the cgroup v2 (unified) hierarchy with the memory controller."""

    version: ClassVar[int] = 2
    limit_file: ClassVar[str] = "memory.max"
    handling: ClassVar[str] = ("the handler holds memory.high as its wall below memory.max "
                               "(cgroup v2: the kernel kills only at memory.max)")
    usage_file: ClassVar[str] = "memory.current"
    high_file: ClassVar[str] = "memory.high"
    wall_file: ClassVar[str] = "memory.high"
    wall_write_checks_fit: ClassVar[bool] = False  # memory.high takes any value
    procs_pread_relists: ClassVar[bool] = True  # cgroup_procs_start restarts at position 0
    wall_sleep_max: ClassVar[float] = 2.0  # the throttle penalty's cap
    moves_threads: ClassVar[bool] = False  # the memory controller is a domain controller
    parent_holds_processes: ClassVar[bool] = False  # the no-internal-process rule
    peak_file: ClassVar[str] = "memory.peak"
    events_file: ClassVar[str] = "memory.events"
    events_local_file: ClassVar[str] = "memory.events.local"
    oom_group_file: ClassVar[str] = "memory.oom.group"
    reclaim_file: ClassVar[str] = "memory.reclaim"
    pressure_file: ClassVar[str] = "memory.pressure"
    controllers_file: ClassVar[str] = "cgroup.controllers"
    subtree_control_file: ClassVar[str] = "cgroup.subtree_control"
    freeze_file: ClassVar[str] = "cgroup.freeze"
    cgroup_events_file: ClassVar[str] = "cgroup.events"
    kill_file: ClassVar[str] = "cgroup.kill"
    permission_rules: ClassVar[Mapping[str, tuple[str, str]]] = {
        **Group.permission_rules,
        "attach": (
            "v2: moving a process needs write permission on cgroup.procs of the destination group and of "
            "the common ancestor of its current and destination groups",
            "delegate a subtree that holds both groups (chown its directory, cgroup.procs, cgroup.threads and "
            "cgroup.subtree_control to the user, e.g. systemd's Delegate=yes), and move processes only within it",
        ),
        "create": (
            "creating a group needs write permission on the parent group's directory",
            "chown the parent group's directory to the user (delegation, e.g. systemd's Delegate=yes)",
        ),
        "write": (
            "writing a control file needs write permission on it; a delegated group's own "
            "memory.max/memory.high belong to the delegator (only its children's are the user's)",
            "create a child group in the delegated subtree and set the limits there",
        ),
        "subtree": (
            "v2: enabling a controller for the children needs write permission on cgroup.subtree_control",
            "chown the group's cgroup.subtree_control to the user (delegation)",
        ),
    }

    __slots__ = ()

    # -- limits -------------------------------------------------------------

    def limit(self) -> int:
        """``memory.max``, the hard limit: at it the kernel reclaims, then OOM-kills."""
        return self._read_max(self.limit_file, "read the limit of")

    def set_limit(self, size: str | int) -> None:
        """Set ``memory.max``. Below the usage the kernel reclaims and then OOM-kills in the group
        until the usage fits (v2 never refuses it as v1 does with :class:`LimitBelowUsage`)."""
        self._write_size(self.limit_file, size, "set the limit of")

    def high(self) -> int:
        """``memory.high``: above it the group's tasks are throttled (never killed); UNLIMITED for none."""
        return self._read_max(self.high_file, "read memory.high of")

    def set_high(self, size: str | int) -> None:
        """Set ``memory.high`` (``"max"`` lifts it). Lowering it below the usage throttles the group's
        allocating tasks until reclaim brings the usage under it."""
        self._write_size(self.high_file, size, "set memory.high of")

    def peak(self) -> int:
        """``memory.peak``: the highest usage since the group was made (Linux 5.19)."""
        self._refuse_root("read the peak of")
        return self._read_int(self._need(self.peak_file, "5.19"), "read the peak of")

    def events(self, local: bool = False) -> MemoryEvents:
        """``memory.events`` (counting events of the whole subtree) or, with *local*,
        ``memory.events.local`` (only this group's own, Linux 5.2)."""
        self._refuse_root("read the memory events of")
        name = self._need(self.events_local_file, "5.2") if local else self.events_file
        return MemoryEvents.from_text(self._read(name, "read the memory events of"))

    def oom_group(self) -> bool:
        """``memory.oom.group``: the kernel OOM killer kills the whole group at once (Linux 4.19)."""
        self._refuse_root("read memory.oom.group of")
        return bool(self._read_int(self._need(self.oom_group_file, "4.19"), "read memory.oom.group of"))

    def set_oom_group(self, enabled: bool) -> None:
        """Make the kernel OOM killer kill every task of the group together (or not)."""
        self._refuse_root("set memory.oom.group of")
        name = self._need(self.oom_group_file, "4.19")
        try:
            self._write(name, "1" if enabled else "0")
        except OSError as err:
            raise self._error(err, "set memory.oom.group of", self._file(name), rule="write") from err

    def reclaim(self, size: str | int) -> bool:
        """Ask the kernel to reclaim *size* bytes from the group (``memory.reclaim``, Linux 5.19).

        Returns False if it could reclaim less (EAGAIN), True otherwise.
        """
        amount = parse_size(size)
        if amount == UNLIMITED:
            raise ValueError("reclaim takes a number of bytes, not 'max'")
        name = self._need(self.reclaim_file, "5.19")
        try:
            self._write(name, str(amount))
        except OSError as err:
            if err.errno == errno.EAGAIN:
                return False
            raise self._error(err, "reclaim memory of", self._file(name), rule="write",
                              detail=f" ({format_size(amount)})") from err
        return True

    # -- controllers ----------------------------------------------------------

    def controllers(self) -> frozenset[str]:
        """The controllers available to this group (``cgroup.controllers``)."""
        return frozenset(self._read(self.controllers_file, "read the controllers of").split())

    def subtree_control(self) -> frozenset[str]:
        """The controllers this group enables for its children (``cgroup.subtree_control``)."""
        return frozenset(self._read(self.subtree_control_file, "read cgroup.subtree_control of").split())

    def enable_memory_for_children(self) -> None:
        """Write ``+memory`` to ``cgroup.subtree_control`` (nothing if it is enabled already).

        Raises :class:`GroupBusy` naming the "no internal processes" rule if
        the group holds processes (move them to a leaf child first), and
        :class:`UnsupportedKernel` if the parent did not enable memory here.
        """
        if "memory" in self.subtree_control():
            return
        try:
            self._write(self.subtree_control_file, "+memory")
        except OSError as err:
            raise self._subtree_error(err) from err

    def disable_memory_for_children(self) -> None:
        """Write ``-memory`` to ``cgroup.subtree_control`` (nothing if it is not enabled).

        Raises :class:`GroupBusy` while a child group still has memory
        settings in use (the kernel refuses).
        """
        if "memory" not in self.subtree_control():
            return
        try:
            self._write(self.subtree_control_file, "-memory")
        except OSError as err:
            raise self._subtree_error(err) from err

    @contextlib.contextmanager
    def room_for_children(self, leaf: str) -> Iterator[None]:
        """A group that holds processes cannot give its children the memory
        controller (the "no internal processes" rule; the root excepted).
        Then this process steps into the leaf child *leaf* for the block,
        and everything is put back afterwards: the controller, this
        process, the leaf. Raises :class:`GroupBusy` if other processes
        share the group (they would have to move too)."""
        if self.is_root or "memory" in self.subtree_control():
            yield
            return
        path = os.path.join(self._path, leaf)
        os.mkdir(path)
        try:
            self._child(leaf).attach(os.getpid())
            try:
                self.enable_memory_for_children()
            except GroupBusy as err:
                raise GroupBusy(err.errno or errno.EBUSY,
                                f"{err.strerror}; other processes share this process's group {self.relpath}: run "
                                "in a group of its own (systemd-run --user --scope -p Delegate=yes ...)",
                                self._path) from err
            try:
                yield
            finally:
                with contextlib.suppress(OSError):
                    self.disable_memory_for_children()
        finally:
            with contextlib.suppress(OSError, UseroomError):
                self.attach(os.getpid())
            with contextlib.suppress(OSError):
                os.rmdir(path)

    def _subtree_error(self, err: OSError) -> CgroupError | UnsupportedKernel:
        path = self._file(self.subtree_control_file)
        what = f"cannot enable the memory controller for the children of {self.relpath}"
        if err.errno == errno.EBUSY:
            return GroupBusy(
                err.errno,
                f"{what}: it holds processes ({_NO_INTERNAL_PROCESSES}); move them to a leaf child group first",
                path,
            )
        if err.errno == errno.ENOENT and os.path.isdir(self._path):
            return UnsupportedKernel(
                errno.ENOENT,
                f"{what}: the memory controller is not available here (its parent's cgroup.subtree_control "
                "lacks +memory)",
            )
        return self._error(err, "enable the memory controller for the children of", path, rule="subtree")

    def create_child(self, name: str, memory_max: str | int | None = None) -> Group:
        """Create the child group *name*, first enabling ``+memory`` for this group's children.

        See :meth:`Group.create_child`; on v2 a child without the memory
        controller enabled above it has no memory files, hence the
        :meth:`enable_memory_for_children`, which fails with :class:`GroupBusy`
        when this group holds processes (the "no internal processes" rule).
        """
        if not self.is_root or "memory" not in self.subtree_control():
            self.enable_memory_for_children()
        return super().create_child(name, memory_max)

    # -- tasks ----------------------------------------------------------------

    def attach(self, pid: int) -> None:
        """Move process *pid* into the group (see :meth:`Group.attach`).

        On v2 a group that enables controllers for its children refuses
        processes: :class:`GroupBusy` names the rule.
        """
        try:
            super().attach(pid)
        except CgroupError as err:
            if err.errno not in (errno.EBUSY, errno.EOPNOTSUPP):
                raise
            raise GroupBusy(
                err.errno, f"cannot attach pid {pid} to {self.relpath}: {_NO_INTERNAL_PROCESSES}", err.path
            ) from err

    def populated(self) -> bool:
        """True while the group or a group below it has a process (``cgroup.events``)."""
        return bool(self._cgroup_events()["populated"])

    def frozen(self) -> bool:
        """True once every task of the group is frozen (``cgroup.events``)."""
        return bool(self._cgroup_events().get("frozen", 0))

    def freeze(self, timeout: float | None = DEFAULT_FREEZE_TIMEOUT) -> None:
        """Stop every task of the group and wait until all are stopped (``cgroup.freeze``, Linux 5.2).

        Frozen tasks hold their memory and still die on SIGKILL. Raises
        TimeoutError if the kernel did not report the group frozen within
        *timeout* seconds (None: wait forever).
        """
        self._set_frozen(True, timeout)

    def thaw(self, timeout: float | None = DEFAULT_FREEZE_TIMEOUT) -> None:
        """Let the tasks run again, and wait until the kernel reports the group thawed."""
        self._set_frozen(False, timeout)

    def kill(self) -> None:
        """SIGKILL every task of the group and its descendants at once (``cgroup.kill``, Linux 5.14)."""
        self._refuse_root("kill the tasks of")
        name = self._need(self.kill_file, "5.14")
        try:
            self._write(name, "1")
        except OSError as err:
            raise self._error(err, "kill the tasks of", self._file(name), rule="write") from err

    # -- notifications --------------------------------------------------------

    def events_notifier(self, local: bool = False) -> FileNotifier:
        """A :class:`FileNotifier` on ``memory.events`` (or ``.local``): readable when a counter changes."""
        self._refuse_root("get memory event notifications for")
        name = self._need(self.events_local_file, "5.2") if local else self.events_file
        return FileNotifier(self.open_file(name, os.O_RDONLY), self._file(name), f"{name} of {self.relpath}")

    def pressure_trigger(
        self, stall: float, window: float, kind: Literal["some", "full"] = "some"
    ) -> PressureTrigger:
        """A PSI trigger on the group's ``memory.pressure`` (see :meth:`PressureTrigger.open`)."""
        return PressureTrigger.open(self._file(self.pressure_file), stall, window, kind)

    def pressure_notifier(
        self, stall: float, window: float, kind: Literal["some", "full"] = "some"
    ) -> PressureTrigger | FileNotifier:
        """A PSI trigger if the kernel takes one, else the fallback: a :class:`FileNotifier` on ``memory.events``.

        If the kernel refuses the window, it is rounded up to the next
        multiple of 2 s (the rule for unprivileged writers, at most 10 s) and
        tried again. The fallback wakes on every change of ``memory.events``
        (each throttling at ``memory.high`` among them) instead of on stall
        time; the returned object's type says which one it is.
        """
        try:
            return PressureTrigger.open(self._file(self.pressure_file), stall, window, kind, round_up=True)
        except PressureTriggerRefused:
            pass
        return self.events_notifier()

    # -- the v1 interface, with its v2 meaning ------------------------------

    def oom_control(self) -> OomControl:
        """The OOM state with its v2 meaning: the kernel killer can never be disabled and tasks never
        wait in an OOM (``kill_disabled`` and ``under_oom`` are False); ``oom_kill`` is from ``memory.events``."""
        return OomControl(kill_disabled=False, under_oom=False, oom_kill=self.events().oom_kill)

    def set_oom_kill(self, enabled: bool) -> None:
        """v2 has no switch for the kernel OOM killer: enabling is a no-op, disabling raises UnsupportedKernel."""
        if enabled:
            return
        raise UnsupportedKernel(
            errno.ENOTSUP,
            f"cannot disable the kernel OOM killer of {self.relpath}: cgroup v2 has no oom_kill_disable; "
            "hold memory.high below memory.max instead (set_high), where tasks are throttled, never killed",
        )

    def oom_notifier(self) -> FileNotifier:
        """A :class:`FileNotifier` on ``memory.events``: its ``oom``/``oom_kill`` counters say what happened."""
        return self.events_notifier()

    def usage_threshold(self, size: str | int) -> EventRegistration:
        """v2 has no usage thresholds: raises UnsupportedKernel (use :meth:`set_high` and
        :meth:`events_notifier`, or :meth:`pressure_notifier`)."""
        raise UnsupportedKernel(
            errno.ENOTSUP,
            "cgroup v2 has no usage thresholds; set memory.high and watch memory.events (events_notifier), "
            "or use a PSI trigger (pressure_notifier)",
        )

    # -- helpers --------------------------------------------------------------

    def _release(self) -> None:
        # Throttled tasks run again once memory.high is lifted; frozen tasks
        # would die on SIGKILL anyway, but thawed they also exit their handlers.
        for name, value in ((self.high_file, "max"), (self.limit_file, "max"), (self.freeze_file, "0")):
            if self.is_root or not os.path.exists(self._file(name)):
                continue
            try:
                self._write(name, value)
            except OSError as err:
                raise self._error(err, "release", self._file(name), rule="write") from err

    def _kill_tasks(self, pidfds: list[int]) -> None:
        # cgroup.kill also reaches tasks forked while the list is read.
        if not self.is_root and os.path.exists(self._file(self.kill_file)):
            try:
                self._write(self.kill_file, "1")
            except OSError:
                pass  # the per-pid kill below reports what matters
        super()._kill_tasks(pidfds)

    def _need(self, name: str, since: str) -> str:
        if not os.path.exists(self._file(name)):
            if not os.path.isdir(self._path):
                raise GroupGone(errno.ENOENT, f"group {self.relpath} was removed", self._path)
            raise UnsupportedKernel(
                errno.ENOENT,
                f"{self.relpath} has no {name} (Linux {since}+, with the memory controller enabled in the "
                "parent's cgroup.subtree_control)",
            )
        return name

    def _read_max(self, name: str, action: str) -> int:
        self._refuse_root(action)
        text = self._read(name, action).strip()
        if text == "max":
            return UNLIMITED
        try:
            return int(text)
        except ValueError as err:
            raise KernelFormatError(f"{name} of {self.relpath} is neither 'max' nor a number: {text[:200]!r}") from err

    def _write_size(self, name: str, size: str | int, action: str) -> None:
        self._refuse_root(action)
        value = parse_size(size)
        try:
            self._write(name, "max" if value == UNLIMITED else str(value))
        except OSError as err:
            raise self._error(err, action, self._file(name), rule="write", detail=f" to {format_size(value)}") from err

    def _cgroup_events(self) -> dict[str, int]:
        return parse_key_values(self._read(self.cgroup_events_file, "read cgroup.events of"), "cgroup.events")

    def _set_frozen(self, frozen: bool, timeout: float | None) -> None:
        action = "freeze" if frozen else "thaw"
        self._refuse_root(action)
        name = self._need(self.freeze_file, "5.2")
        deadline = None if timeout is None else time.monotonic() + timeout
        # Open the events file first: a change between the write and the
        # first read is then not missed.
        with FileNotifier(
            self.open_file(self.cgroup_events_file, os.O_RDONLY), self._file(self.cgroup_events_file),
            f"cgroup.events of {self.relpath}",
        ) as notifier:
            try:
                self._write(name, "1" if frozen else "0")
            except OSError as err:
                raise self._error(err, action, self._file(name), rule="write") from err
            while True:
                state = parse_key_values(notifier._reread(), "cgroup.events").get("frozen", 0)
                if bool(state) == frozen:
                    return
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    state_name = "frozen" if frozen else "thawed"
                    raise TimeoutError(f"{self.relpath} was not reported {state_name} within {timeout} s")
                notifier.wait(left)

    def oom_counter(self) -> OomCounter:
        """``memory.events``' ``oom`` from now on (see :class:`_EventsOomCounter`)."""
        return _EventsOomCounter(self.events_notifier())


class _EventsOomCounter(OomCounter):
    """v2: ``memory.events``, polled for ``POLLPRI`` (a change of any of its
    counters, ``high`` among them) and read again; the count is its ``oom``
    field (``memory.max`` reached and reclaim failed) less what it was when
    the counter was made."""

    poll_events: ClassVar[int] = select.POLLPRI

    def __init__(self, notifier: FileNotifier) -> None:
        super().__init__()
        self._notifier = notifier
        try:
            self._base = MemoryEvents.from_text(notifier.text).oom
        except BaseException:
            notifier.close()
            raise

    def fileno(self) -> int:
        return self._notifier.fileno()

    def update(self) -> int:
        self.count = MemoryEvents.from_text(self._notifier.read(0)).oom - self._base
        return self.count

    def close(self) -> None:
        self._notifier.close()
