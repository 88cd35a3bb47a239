"""The benchmark's own groups and processes, and the safety net that frees them.

With ``oom_kill_disable=1`` a task that needs a page while its group is at the
limit sleeps in the kernel until user space resolves the OOM, possibly
forever. So everything the benchmark creates is registered in a :class:`Lab`
the moment it exists, and :meth:`Lab.close` (run from ``finally``, also after
SIGINT, SIGTERM or SIGHUP) rescues every group still registered: it re-enables
the kernel OOM killer, lifts the limit, SIGKILLs the processes the benchmark
started, reaps them and removes the group. Children also get
``PR_SET_PDEATHSIG`` = SIGKILL, so a benchmark killed with SIGKILL (the one
case no ``finally`` survives) does not leave them asleep in the OOM wait.

Groups are handled with plain file I/O on their directories, not with the
library's cgroup layer: the safety net must not depend on the code being
measured. Groups are created only below this process's own memory cgroup.

On cgroup v2 nobody waits in an OOM (the kernel kills at ``memory.max``):
there the handler's wall (``memory.high``) takes the place of the disabled
kernel killer, "under OOM" means the usage is held at the wall, and the
rescue lifts the wall and the limit.
"""

from __future__ import annotations

import abc
import contextlib
import ctypes
import errno
import os
import posixpath
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, ClassVar, Final, TypeAlias

import attrs

from useroom._fd import OwnedFd
from useroom._mounts import memory_hierarchy, read_memberships, read_text

__all__ = [
    "BenchError",
    "Child",
    "Interrupted",
    "Lab",
    "OomControl",
    "Pidfd",
    "ScratchGroup",
    "SignalGuard",
    "V1ScratchGroup",
    "V2ScratchGroup",
    "cgroup_version",
    "die_with_parent",
    "enter_group",
    "own_memcg",
    "scratch_kind",
]

#: What ``memory.limit_in_bytes`` takes for "no limit".
NO_LIMIT: Final = -1
_PR_SET_PDEATHSIG: Final = 1
_REAP_TIMEOUT_S: Final = 10.0
_RMDIR_TIMEOUT_S: Final = 5.0
#: Every group of the benchmark is named ``useroom-bench.<pid>.<serial>.<variant>``.
_PREFIX: Final = "useroom-bench."


class BenchError(Exception):
    """The benchmark cannot run, or could not clean up after itself."""


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived; raised so that every ``finally`` runs.

    A BaseException, like KeyboardInterrupt, so ``except Exception`` does not
    swallow it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signum).name}"


#: What ``signal.signal`` takes and returns.
_SignalHandler: TypeAlias = "Callable[[int, FrameType | None], Any] | int | signal.Handlers | None"


class SignalGuard:
    """Turn SIGINT, SIGTERM and SIGHUP into :class:`Interrupted`, except while shielded.

    Cleanup runs :meth:`shielded`: a signal that arrives then is remembered and
    raised when the outermost shielded block ends, so a second Ctrl-C cannot
    cut a rescue short and leave a group stuck.
    """

    SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self._depth = 0
        self._pending: int | None = None
        self._previous: dict[int, _SignalHandler] = {}

    def __enter__(self) -> SignalGuard:
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    @property
    def received(self) -> int | None:
        """The signal that arrived while shielded and is not raised yet, if any."""
        return self._pending

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._depth:
            self._pending = signum
            return
        raise Interrupted(signum)

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and self._pending is not None:
            signum, self._pending = self._pending, None
            raise Interrupted(signum)


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


_LIBC: Final = _libc()


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (for a fresh child).

    Called in a child between fork and exec (or instead of exec); it allocates
    nothing from Python's point of view but a ctypes call.
    """
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def enter_group(procs_path: str) -> Callable[[], None]:
    """A ``preexec_fn``: die with the benchmark, then move into the group
    before exec, so that everything the program touches is charged there."""

    def enter() -> None:
        die_with_parent()
        fd = os.open(procs_path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")  # "0": the writer itself
        finally:
            os.close(fd)
    return enter


def settle_child(parent: int, keep: tuple[int, int], signals: tuple[signal.Signals, ...]) -> bool:
    """In a process just forked from the benchmark: the signals the benchmark
    handles back to their defaults and unblocked, SIGKILL when the parent
    dies, and every fd closed but the two in *keep* (a copy of a pipe's
    write end kept here would hold its EOF away from the reader). False if
    the parent is gone already (the child must exit)."""
    for signum in signals:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
    die_with_parent()
    if os.getppid() != parent:
        return False
    low, high = sorted(keep)
    os.closerange(3, low)
    os.closerange(low + 1, high)
    os.closerange(high + 1, _MAX_FD)
    return True


#: Above any fd number: the end of ``os.closerange``.
_MAX_FD: Final = 2**31 - 1


def own_memcg() -> str:
    """Return the filesystem path of this process's memory cgroup.

    On cgroup v2 a group that holds processes cannot give its children the
    memory controller (the root excepted): this process then moves the
    group's processes (its own run: a delegated scope) to a leaf child and
    enables ``+memory`` for the children.
    """
    hierarchy = memory_hierarchy()
    membership = hierarchy.membership(read_memberships())
    if membership is None:
        raise BenchError("this process has no 'memory' line in /proc/self/cgroup")
    path = hierarchy.fs_path(membership.path)
    if path is None:
        raise BenchError(f"no mount of the memory hierarchy shows this process's group {membership.path}")
    _KINDS[hierarchy.version].make_room_below(path, membership.path == "/")
    return path


def cgroup_version() -> int:
    """1 or 2: where the memory controller is."""
    return memory_hierarchy().version


def scratch_kind(version: int | None = None) -> type[ScratchGroup]:
    """The :class:`ScratchGroup` of cgroup *version*, by default this machine's memory hierarchy's."""
    return _KINDS[memory_hierarchy().version if version is None else version]


def _enable_memory_below(path: str, is_root: bool) -> None:
    subtree = posixpath.join(path, "cgroup.subtree_control")
    if "memory" in read_text(subtree).split():
        return
    if not is_root:
        leaf = posixpath.join(path, f"{_PREFIX}{os.getpid()}.self")
        os.makedirs(leaf, exist_ok=True)
        for _ in range(100):  # processes forked meanwhile are moved by the next round
            pids = read_text(posixpath.join(path, "cgroup.procs")).split()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    _write_file(posixpath.join(leaf, "cgroup.procs"), pid)
    _write_file(subtree, "+memory")


def _write_file(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


@attrs.frozen
class OomControl:
    """The three numbers of v1 ``memory.oom_control``."""

    kill_disabled: bool
    under_oom: bool
    oom_kill: int

    @classmethod
    def parse(cls, text: str) -> OomControl:
        fields = dict(line.split(None, 1) for line in text.splitlines() if line.strip())
        return cls(fields["oom_kill_disable"].strip() == "1", fields["under_oom"].strip() == "1",
                   int(fields.get("oom_kill", "0")))


@attrs.define(eq=False)
class ScratchGroup(abc.ABC):
    """A memory cgroup the benchmark created, by its directory.

    The interface the benchmark uses on either cgroup version: the subclass
    of the machine's version (:func:`scratch_kind`) does that version's file
    I/O, and its class attributes are that version's facts. A handler's
    *wall* is the limit it holds: on v1 the hard limit itself, with the
    kernel killer off; on v2 ``memory.high``, below ``memory.max`` (the
    kernel's backstop).
    """

    path: str

    #: The cgroup version (1 or 2).
    version: ClassVar[int]
    #: The hard limit's file, the wall's (v1: the same file) and the usage's.
    limit_file: ClassVar[str]
    wall_file: ClassVar[str]
    usage_file: ClassVar[str]
    #: Whether the wall is a file of its own below the hard limit (v2)
    #: rather than the limit itself (v1).
    wall_apart: ClassVar[bool]
    #: Whether the kernel refuses a wall below the usage (v1), so that a
    #: handler may fail to put its wall back after a grant: a grant can be
    #: left open. v2 takes any value.
    wall_write_checks_fit: ClassVar[bool]
    #: Whether "under OOM" is inferred from the usage held at the wall (v2),
    #: which pages of a task that has exited may hold up a while, rather
    #: than read from the kernel, where it means tasks asleep in the OOM wait (v1).
    under_oom_from_usage: ClassVar[bool]
    #: Whether the kernel OOM killer can be switched off, so that tasks wait
    #: in an OOM for user space (v1); on v2 nobody waits in an OOM.
    killer_switch: ClassVar[bool]
    #: What the storm benchmark counts as the group's OOMs, in words for its table.
    ooms_counted: ClassVar[str]
    #: How the figures read on this version where they differ from v1's, for a report ("": they do not).
    figures_note: ClassVar[str]

    @classmethod
    def make_room_below(cls, parent: str, is_root: bool) -> None:
        """Let the groups made below *parent* have memory limits: nothing to
        do on v1, where any group may."""

    @classmethod
    @abc.abstractmethod
    def backstop(cls, wall: int, gap: int) -> int:
        """The hard limit that puts a handler's wall at *wall*, *gap* being
        the room the handler keeps between the two where they are apart."""

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    def _write(self, filename: str, value: str) -> None:
        _write_file(posixpath.join(self.path, filename), value)

    def _read(self, filename: str) -> str:
        return read_text(posixpath.join(self.path, filename))

    @abc.abstractmethod
    def oom_control(self) -> OomControl:
        """v1's ``memory.oom_control``, or its meaning on v2."""

    def under_oom(self) -> bool:
        return self.oom_control().under_oom

    @abc.abstractmethod
    def set_kill_disable(self, disabled: bool) -> None:
        """The kernel OOM killer off or on (the safety net turns it on)."""

    @abc.abstractmethod
    def killer_held_off(self) -> bool:
        """Whether a handler holds the kernel killer off (v1: its switch; v2: a wall is set)."""

    @abc.abstractmethod
    def set_limit(self, limit: int) -> None:
        """Set the hard limit; :data:`NO_LIMIT` lifts it."""

    @abc.abstractmethod
    def limit(self) -> int:
        """The hard limit."""

    @abc.abstractmethod
    def wall(self) -> int:
        """The wall a handler holds (:data:`NO_LIMIT`: none)."""

    @abc.abstractmethod
    def hold_wall(self, wall: int, gap: int) -> None:
        """Make *wall* the limit a handler of the group holds, the hard
        limit at :meth:`backstop` (a handler adopts a moved wall at its
        next refresh)."""

    def usage(self) -> int:
        return int(self._read(self.usage_file))

    def attach(self, pid: int) -> None:
        self._write("cgroup.procs", str(pid))

    def procs(self) -> list[int]:
        return [int(line) for line in self._read("cgroup.procs").split()]


@attrs.define(eq=False)
class V1ScratchGroup(ScratchGroup):
    """cgroup v1: the kernel killer has a switch in ``memory.oom_control``,
    and the wall is the hard limit, ``memory.limit_in_bytes``."""

    version: ClassVar[int] = 1
    limit_file: ClassVar[str] = "memory.limit_in_bytes"
    wall_file: ClassVar[str] = "memory.limit_in_bytes"
    usage_file: ClassVar[str] = "memory.usage_in_bytes"
    wall_apart: ClassVar[bool] = False
    wall_write_checks_fit: ClassVar[bool] = True
    under_oom_from_usage: ClassVar[bool] = False
    killer_switch: ClassVar[bool] = True
    ooms_counted: ClassVar[str] = ("OOM notifications this process received (an eventfd on memory.oom_control: "
                                   "the kernel notifies each task's attempt)")
    figures_note: ClassVar[str] = ""

    @classmethod
    def backstop(cls, wall: int, gap: int) -> int:
        """The wall itself: with the killer off, nothing else is needed."""
        return wall

    def oom_control(self) -> OomControl:
        return OomControl.parse(self._read("memory.oom_control"))

    def set_kill_disable(self, disabled: bool) -> None:
        self._write("memory.oom_control", "1" if disabled else "0")

    def killer_held_off(self) -> bool:
        return self.oom_control().kill_disabled

    def set_limit(self, limit: int) -> None:
        self._write(self.limit_file, str(limit))

    def limit(self) -> int:
        return int(self._read(self.limit_file))

    def wall(self) -> int:
        return self.limit()

    def hold_wall(self, wall: int, gap: int) -> None:
        self.set_limit(wall)


@attrs.define(eq=False)
class V2ScratchGroup(ScratchGroup):
    """cgroup v2: the kernel kills at ``memory.max`` and has no switch; a
    handler's wall is ``memory.high``, where the kernel throttles instead.
    Here the killer is never off, "under OOM" is the usage held at the wall,
    and the kill count is ``memory.events``' ``oom_kill``."""

    version: ClassVar[int] = 2
    limit_file: ClassVar[str] = "memory.max"
    wall_file: ClassVar[str] = "memory.high"
    usage_file: ClassVar[str] = "memory.current"
    wall_apart: ClassVar[bool] = True
    wall_write_checks_fit: ClassVar[bool] = False
    under_oom_from_usage: ClassVar[bool] = True
    killer_switch: ClassVar[bool] = False
    ooms_counted: ClassVar[str] = "memory.events 'oom' (memory.max reached and reclaim failed)"
    figures_note: ClassVar[str] = ("cgroup v2: nobody waits in an OOM; the handlers hold memory.high as a wall below "
                                   "memory.max, 'under OOM' is the usage held at the wall, kernel kills are "
                                   "memory.events oom_kill")

    @classmethod
    def make_room_below(cls, parent: str, is_root: bool) -> None:
        """A group that holds processes cannot give its children the memory
        controller (the root excepted): its processes (this process's own
        run: a delegated scope) move to a leaf child, and ``+memory`` is
        enabled for the children."""
        _enable_memory_below(parent, is_root)

    @classmethod
    def backstop(cls, wall: int, gap: int) -> int:
        """``memory.max``, *gap* above the wall."""
        return wall + gap

    def oom_control(self) -> OomControl:
        events = dict(line.split() for line in self._read("memory.events").splitlines() if line.strip())
        high = self.wall()
        held = high != NO_LIMIT and self.usage() >= high
        return OomControl(False, held, int(events.get("oom_kill", "0")))

    def set_kill_disable(self, disabled: bool) -> None:
        """No switch: enabling lifts any wall (``memory.high`` = max);
        disabling is the handler's wall, which it sets itself."""
        if not disabled:
            self._write(self.wall_file, "max")

    def killer_held_off(self) -> bool:
        return self.wall() != NO_LIMIT

    def set_limit(self, limit: int) -> None:
        self._write(self.limit_file, self._max_text(limit))

    def limit(self) -> int:
        return self._read_max(self.limit_file)

    def wall(self) -> int:
        return self._read_max(self.wall_file)

    def hold_wall(self, wall: int, gap: int) -> None:
        self.set_limit(self.backstop(wall, gap))
        self._write(self.wall_file, self._max_text(wall))

    def _read_max(self, filename: str) -> int:
        text = self._read(filename).strip()
        return NO_LIMIT if text == "max" else int(text)

    @staticmethod
    def _max_text(limit: int) -> str:
        return "max" if limit == NO_LIMIT else str(limit)


#: The scratch group of each cgroup version.
_KINDS: Final[dict[int, type[ScratchGroup]]] = {1: V1ScratchGroup, 2: V2ScratchGroup}


class Pidfd(OwnedFd):
    """A pidfd (close-on-exec): it names one process until it is closed,
    never a later one with its pid, and polls readable once that process
    has exited."""

    __slots__ = ()

    def __init__(self, pid: int) -> None:
        self._fd = os.pidfd_open(pid)

    def send_signal(self, signum: int) -> None:
        """Signal the process; ProcessLookupError once it has exited."""
        signal.pidfd_send_signal(self.fileno(), signum)

    def exited(self, timeout: float = 0.0) -> bool:
        """Whether the process has exited, waiting up to *timeout* seconds (it is not reaped)."""
        return bool(select.select([self.fileno()], [], [], max(timeout, 0.0))[0])


@attrs.define(eq=False)
class Child:
    """A process the benchmark started: a forked worker or a handler subprocess.

    The pid stays ours until it is reaped, so signalling it cannot hit another
    process; the pidfd (closed once it is reaped) lets the benchmark wait for
    its exit with poll(): poll the child itself, or its :meth:`fileno`.
    """

    pid: int
    pidfd: Pidfd
    popen: subprocess.Popen[Any] | None = None
    status: int | None = None  # the wait status once reaped
    exited_ns: int | None = None

    @classmethod
    def adopt(cls, pid: int, popen: subprocess.Popen[Any] | None = None) -> Child:
        return cls(pid, Pidfd(pid), popen)

    @property
    def reaped(self) -> bool:
        return self.status is not None

    def fileno(self) -> int:
        """The pidfd, readable once the process has exited; ValueError once it is reaped."""
        return self.pidfd.fileno()

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.reaped or self.pidfd.closed:
            return
        with contextlib.suppress(ProcessLookupError):
            self.pidfd.send_signal(signum)

    def exited(self) -> bool:
        """Whether the process has exited (its pidfd is readable), without reaping it."""
        if self.reaped:
            return True
        return self.pidfd.exited()

    def reap(self, now_ns: int | None = None) -> int:
        """Wait for the process (it should have exited) and return its wait status."""
        if self.status is None:
            if self.popen is not None:
                self.popen.wait()
                returncode = self.popen.returncode
                self.status = (-returncode) & 0x7F if returncode < 0 else (returncode & 0xFF) << 8
            else:
                _, self.status = os.waitpid(self.pid, 0)
            self.exited_ns = now_ns if now_ns is not None else time.monotonic_ns()
            self.pidfd.close()
        return self.status

    def wait(self, timeout: float) -> bool:
        """Wait up to *timeout* seconds for the process to exit; reap it if it did."""
        if self.reaped:
            return True
        if self.pidfd.exited(timeout):
            self.reap()
            return True
        return False

    @property
    def killed_by(self) -> int | None:
        """The signal that ended the process, or None (not reaped, or exited normally)."""
        if self.status is None or not os.WIFSIGNALED(self.status):
            return None
        return os.WTERMSIG(self.status)

    @property
    def exit_code(self) -> int | None:
        if self.status is None or not os.WIFEXITED(self.status):
            return None
        return os.WEXITSTATUS(self.status)


@attrs.define(eq=False)
class Lab:
    """Owns the benchmark's groups and children and always frees them.

    Use as a context manager; every group made by :meth:`create_group` and
    every child passed to :meth:`adopt` is rescued and released on exit,
    whatever the exit.
    """

    parent: str
    #: The scratch group of the machine's cgroup version: what every group of the lab is.
    kind: type[ScratchGroup] = V1ScratchGroup
    prefix: str = attrs.field(factory=lambda: f"{_PREFIX}{os.getpid()}")
    groups: list[ScratchGroup] = attrs.field(factory=list)
    children: dict[int, Child] = attrs.field(factory=dict)
    _serial: int = 0
    #: Problems met while cleaning up (a rescue that failed); reported, never raised mid-cleanup.
    problems: list[str] = attrs.field(factory=list)

    @classmethod
    def below_own_memcg(cls) -> Lab:
        return cls(own_memcg(), scratch_kind())

    @property
    def version(self) -> int:
        """The cgroup version of the lab's groups."""
        return self.kind.version

    def sweep_stale(self) -> list[str]:
        """Remove groups an earlier run left here (its process is gone: it was SIGKILLed); return them.

        Their workers died with it (``PR_SET_PDEATHSIG``), so they are empty;
        the kernel killer is re-enabled and the limit lifted first anyway, and
        a group that still has tasks is reported, never emptied: they are not
        this run's processes.
        """
        swept = []
        for name in sorted(os.listdir(self.parent)):
            parts = name.split(".")
            if len(parts) < 3 or f"{parts[0]}." != _PREFIX or not parts[1].isdecimal() or parts[2] == "self":
                continue
            if int(parts[1]) == os.getpid() or os.path.exists(f"/proc/{parts[1]}"):
                continue
            group = self.kind(posixpath.join(self.parent, name))
            self._try(group, "re-enable the kernel OOM killer", group.set_kill_disable, False)
            self._try(group, "lift the limit", group.set_limit, NO_LIMIT)
            try:
                os.rmdir(group.path)
            except OSError as err:
                self.problems.append(f"{group.path}, left by an earlier run, could not be removed: {err}")
                continue
            swept.append(group.path)
        return swept

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_group(self, tag: str, *, limit: int, kill_disable: bool) -> ScratchGroup:
        """Make a fresh group below the own memcg with this limit and OOM-killer setting."""
        self._serial += 1
        path = posixpath.join(self.parent, f"{self.prefix}.{self._serial}.{tag}")
        os.mkdir(path)
        group = self.kind(path)
        self.groups.append(group)
        group.set_limit(limit)
        group.set_kill_disable(kill_disable)
        return group

    def adopt(self, pid: int, popen: subprocess.Popen[Any] | None = None) -> Child:
        """Register a process this benchmark just started, so the safety net covers it."""
        child = Child.adopt(pid, popen)
        self.children[pid] = child
        return child

    def forget(self, child: Child) -> None:
        """Drop a reaped child from the registry."""
        if child.reaped:
            self.children.pop(child.pid, None)

    def rescue(self, group: ScratchGroup, children: list[Child] | None = None) -> None:
        """Resolve whatever OOM *group* is in: kernel killer on, limit lifted, *children* SIGKILLed and reaped.

        *children* defaults to every registered child still in the group.
        Errors are recorded in :attr:`problems` and the rescue goes on.
        """
        self._try(group, "re-enable the kernel OOM killer", group.set_kill_disable, False)
        self._try(group, "lift the limit", group.set_limit, NO_LIMIT)
        if children is None:
            members = set(self._procs_or_empty(group))
            children = [child for child in self.children.values() if child.pid in members]
        for child in children:
            child.kill()
        self._reap_all(children)

    def release(self, group: ScratchGroup) -> None:
        """Rescue *group*, kill and reap every registered child in it, and remove it."""
        self.rescue(group)
        deadline = time.monotonic() + _RMDIR_TIMEOUT_S
        while True:
            try:
                os.rmdir(group.path)
                break
            except FileNotFoundError:
                break
            except OSError as err:
                # EBUSY: a task is still on its way out (or a stranger is in it).
                left = self._procs_or_empty(group)
                if err.errno != errno.EBUSY or time.monotonic() > deadline:
                    self.problems.append(f"{group.path}: could not remove it ({err}); tasks left: {left}")
                    return
                stragglers = [child for child in self.children.values() if child.pid in left]
                for child in stragglers:
                    child.kill()
                self._reap_all(stragglers)
                time.sleep(0.01)
        if group in self.groups:
            self.groups.remove(group)

    def close(self) -> None:
        """Release every group, then kill and reap every child still registered."""
        for group in list(self.groups):
            self.release(group)
        rest = [child for child in self.children.values() if not child.reaped]
        for child in rest:
            child.kill()
        self._reap_all(rest)
        for child in list(self.children.values()):
            self.forget(child)

    def _reap_all(self, children: list[Child]) -> None:
        deadline = time.monotonic() + _REAP_TIMEOUT_S
        for child in children:
            if not child.wait(deadline - time.monotonic()):
                self.problems.append(f"process {child.pid} did not exit within {_REAP_TIMEOUT_S:g} s of SIGKILL")
                continue
            self.forget(child)

    def _try(self, group: ScratchGroup, step: str, action: Callable[[Any], None], value: Any) -> None:
        try:
            action(value)
        except FileNotFoundError:
            pass  # the group is gone already
        except OSError as err:
            self.problems.append(f"{group.path}: could not {step}: {err}")

    @staticmethod
    def _procs_or_empty(group: ScratchGroup) -> list[int]:
        try:
            return group.procs()
        except OSError:
            return []


def size_arg(text: str) -> int:
    """An argparse type: a size such as ``64M`` in bytes."""
    import argparse

    from useroom._units import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
