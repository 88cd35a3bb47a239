"""Typed wrappers around the native core; the only importer of ``_core``.

Every C function returns ``>= 0`` or ``-errno``; :func:`_check` turns the
latter into the matching :class:`OSError` subclass with the function named.
Decisions are made here and in the layers above; C only executes them.
"""

from __future__ import annotations

import ctypes
import enum
import errno as _errno
import os
import time
import warnings
import weakref
from collections.abc import Iterable
from typing import Any

import attrs

from useroom._fd import OwnedFd
from useroom.exceptions import WatcherError
from useroom._native._core import ffi as _ffi, lib as _lib

__all__ = [
    "Action",
    "ActionKind",
    "Candidate",
    "ArenaReport",
    "CoreLock",
    "Epoll",
    "EventFd",
    "EventRecord",
    "NativeWatcher",
    "WatchedGroup",
    "Outcome",
    "Plan",
    "SourceKind",
    "Step",
    "PoolReport",
    "Wake",
    "heap_reserve",
    "install_arena_pool",
    "can_use_mrelease",
    "lock_core",
    "mlockall",
    "mrelease",
    "monotonic_ns",
    "stack_prefault",
    "raw_syscalls",
    "wait_readable",
    "watcher_arena_size",
]

PLAN_MAX: int = _lib.URO_PLAN_MAX
RING_SIZE: int = _lib.URO_RING_SIZE
DATA_MAX: int = _lib.URO_DATA_MAX
NEEDLE_MAX: int = _lib.URO_NEEDLE_MAX
CANDS_MAX: int = _lib.URO_CANDS_MAX
#: SIGNAL_BEST's result when it waited for an earlier victim to exit.
WAITED: int = _lib.URO_WAITED
SOURCES_MAX: int = _lib.URO_SOURCES_MAX
STACK_SIZE = 128 * 1024
STATE_WAITING: int = _lib.URO_STATE_WAITING
STATE_EPISODE: int = _lib.URO_STATE_EPISODE
#: What a thread that settled an episode writes to the plan's reply eventfd.
SETTLED: int = _lib.URO_SETTLED
EPOLLIN = 0x001


def _check(ret: int, syscall: str) -> int:
    if ret < 0:
        err = -ret
        raise OSError(err, f"{syscall}: {os.strerror(err)}")
    return ret


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC in nanoseconds, the clock of every event record."""
    return _check(_lib.uro_monotonic_ns(), "clock_gettime")


def mrelease(pidfd: int) -> None:
    """process_mrelease(2): reap a SIGKILLed process's memory now (Linux 5.15)."""
    _check(_lib.uro_mrelease(pidfd), "process_mrelease")


def _probe_mrelease() -> bool:
    # An invalid fd gives EBADF where the syscall exists, ENOSYS where not.
    return bool(_lib.uro_mrelease(-1) != -_errno.ENOSYS)


#: Whether process_mrelease exists; tests patch it to exercise the fallback.
can_use_mrelease: bool = _probe_mrelease()


def raw_syscalls() -> bool:
    """True if the critical path makes raw system calls (no libc)."""
    return bool(_lib.uro_raw_syscalls())


def wait_readable(fd: int, timeout: float | None) -> bool:
    """Blocks (without the GIL) until ``fd`` is readable; False on timeout."""
    ns = -1 if timeout is None else max(0, int(timeout * 1e9))
    while True:
        ret = _lib.uro_wait_readable(fd, ns)
        if ret != -_errno.EINTR:
            return _check(ret, "ppoll") > 0


#: Every fd-owning object of the native layer (the shared pure-Python base).
_FdOwner = OwnedFd


class EventFd(_FdOwner):
    """An eventfd (close-on-exec)."""

    def __init__(self, initval: int = 0, *, nonblocking: bool = False) -> None:
        self._fd = _check(_lib.uro_eventfd_create(initval, int(nonblocking)), "eventfd")

    def read(self) -> int:
        """Returns and resets the counter; blocks (without the GIL) if it is 0."""
        value = _ffi.new("uint64_t *")
        while True:
            ret = _lib.uro_eventfd_read(self.fileno(), value)
            if ret != -_errno.EINTR:
                _check(ret, "read")
                return int(value[0])

    def write(self, value: int = 1) -> None:
        _check(_lib.uro_eventfd_write(self.fileno(), value), "write")

    def wait(self, timeout: float | None) -> bool:
        """True once the counter is non-zero, False after ``timeout`` seconds."""
        return wait_readable(self.fileno(), timeout)


class Epoll(_FdOwner):
    """An epoll set with deadline-based waits."""

    def __init__(self) -> None:
        self._fd = _check(_lib.uro_epoll_create(), "epoll_create1")

    def add(self, fd: int, data: int, events: int = EPOLLIN) -> None:
        _check(_lib.uro_epoll_add(self.fileno(), fd, events, data), "epoll_ctl")

    def remove(self, fd: int) -> None:
        _check(_lib.uro_epoll_del(self.fileno(), fd), "epoll_ctl")

    def wait(self, timeout: float | None, max_events: int = 16) -> list[tuple[int, int]]:
        """Returns ``(data, events)`` pairs; empty once ``timeout`` has passed.

        An interrupted wait is resumed with the time that is left.
        """
        deadline = -1 if timeout is None else monotonic_ns() + max(0, int(timeout * 1e9))
        out = _ffi.new("struct uro_ready[]", max_events)
        while True:
            ret = _lib.uro_epoll_wait(self.fileno(), out, max_events, deadline)
            if ret != -_errno.EINTR:
                break
        n = _check(ret, "epoll_wait")
        return [(int(out[i].data), int(out[i].events)) for i in range(n)]


@attrs.frozen
class ArenaReport:
    """What a locked arena holds: its size, how much was locked, and why not all."""

    size: int
    locked: int
    lock_errno: int

    @property
    def fully_locked(self) -> bool:
        return self.locked == self.size


class _Arena:
    """An mmap'd, prefaulted, mlocked (where allowed) block of memory."""

    def __init__(self, size: int, *, lock: bool = True) -> None:
        self._arena = _ffi.new("struct uro_arena *")
        _check(_lib.uro_arena_map(size, int(lock), self._arena), "mmap")

    @property
    def base(self) -> Any:
        return self._arena.base

    @property
    def closed(self) -> bool:
        return bool(self._arena.base == _ffi.NULL)

    def report(self) -> ArenaReport:
        return ArenaReport(int(self._arena.size), int(self._arena.locked), int(self._arena.lock_errno))

    def close(self) -> None:
        _check(_lib.uro_arena_unmap(self._arena), "munmap")

    def __del__(self) -> None:
        if not self.closed:
            self.close()


@attrs.frozen
class CoreLock:
    """The native core's own pages: how many, how many locked, and why not."""

    image_size: int
    locked: int
    lock_errno: int
    critical_code_size: int


def lock_core() -> CoreLock:
    """mlocks the native core's code, constants and data; reports the result."""
    text = _ffi.new("struct uro_text *")
    _check(_lib.uro_lock_text(text), "mlock")
    return CoreLock(int(text.image_size), int(text.locked), int(text.lock_errno), int(text.crit_size))


def mlockall(*, future: bool) -> int:
    """mlockall(MCL_CURRENT [| MCL_FUTURE]); returns 0 or the errno that refused it."""
    flags = _lib.URO_MCL_CURRENT | (_lib.URO_MCL_FUTURE if future else 0)
    return -int(_lib.uro_mlockall(flags))


def heap_reserve(nbytes: int) -> None:
    """Stops glibc trimming the heap or using fresh mmaps, then grows and
    touches the heap by ``nbytes`` so later allocations reuse resident pages."""
    _check(_lib.uro_heap_reserve(nbytes), "mallopt")


def hooks_wait(wake: EventFd, resume: EventFd, pause: float) -> int:
    """Blocks (without the GIL) until ``wake`` fires; then asks the main
    thread to release the GIL and pause for at most ``pause`` seconds, until
    :func:`hooks_done`. Returns the eventfd counter."""
    while True:
        ret = _lib.uro_hooks_wait(wake.fileno(), resume.fileno(), int(pause * 1e9))
        if ret != -_errno.EINTR:
            return _check(ret, "read")


#: Whether the hook thread can lower CPython's switch interval while it
#: waits for the GIL (the interpreter exports the setter).
can_lower_switch_interval: bool = bool(_lib.uro_hooks_init())


def hooks_done(resume: EventFd) -> None:
    """Ends the main thread's pause."""
    _check(_lib.uro_hooks_done(resume.fileno()), "write")


def main_thread_pauses() -> int:
    """How many times the main thread paused for hooks."""
    return int(_lib.uro_pauses())


# cffi releases the GIL around every call. The functions below must run
# with it held (the hold walks the thread states; a trim must not let other
# Python threads refill the heap): they are called through a ctypes.PyDLL
# handle on the same loaded module, which keeps the GIL.
from useroom._native import _core as _core_module  # noqa: E402

_held = ctypes.PyDLL(_core_module.__file__)
_held.uro_heap_trim.argtypes = [ctypes.c_size_t]
_held.uro_heap_trim.restype = ctypes.c_int
_held.uro_hold_begin.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                 ctypes.POINTER(ctypes.c_uint64), ctypes.c_int]
_held.uro_hold_begin.restype = ctypes.c_int
_held.uro_hold_end.argtypes = [ctypes.c_int]
_held.uro_hold_end.restype = ctypes.c_int
_held.uro_hold_arm.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.POINTER(ctypes.c_uint64), ctypes.c_int]
_held.uro_hold_arm.restype = ctypes.c_int
_held.uro_hold_disarm.argtypes = []
_held.uro_hold_disarm.restype = ctypes.c_int
_held.uro_hold_reset.argtypes = []
_held.uro_hold_reset.restype = ctypes.c_int


#: The watchers' arenas, copied again in the parent after each fork
#: (see uro_arena_touch).
_LIVE_ARENAS: weakref.WeakSet[_Arena] = weakref.WeakSet()


def _touch_arenas_in_parent() -> None:
    for arena in list(_LIVE_ARENAS):
        if not arena.closed:
            _lib.uro_arena_touch(arena._arena)


def _hold_reset_in_child() -> None:
    # A child forked while a hold was armed (or active) keeps neither: its
    # one thread would run slower, or wait for hooks that are not its own.
    if can_hold_threads:
        _held.uro_hold_reset()
_held.uro_hooks_next.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_int64]
_held.uro_hooks_next.restype = ctypes.c_int64

#: Whether the other Python threads can be held while the hooks run (the
#: interpreter exports the functions :func:`hold_begin` needs).
can_hold_threads: bool = bool(_lib.uro_hold_init())
#: Most threads :func:`hold_begin` can exempt.
HOLD_EXEMPT_MAX = 8
os.register_at_fork(after_in_child=_hold_reset_in_child, after_in_parent=_touch_arenas_in_parent)


def heap_trim(keep: int = 0) -> bool:
    """Returns the heap's free pages, in every malloc arena, to the kernel
    but the top ``keep`` bytes of the main heap; True if any were returned.
    Runs with the GIL held: no other Python thread allocates meanwhile."""
    return bool(_held.uro_heap_trim(keep))


def _exempt(exempt: Iterable[int]) -> tuple[Any, int]:
    ids = [int(i) for i in exempt]
    if len(ids) > HOLD_EXEMPT_MAX:
        raise ValueError(f"at most {HOLD_EXEMPT_MAX} exempt threads, not {len(ids)}")
    return (ctypes.c_uint64 * max(1, len(ids)))(*ids), len(ids)


def hold_begin(release: EventFd, deadline_ns: int, stall_ns: int, exempt: Iterable[int] = ()) -> int:
    """Holds every Python thread of this process but ``exempt`` (values of
    ``threading.get_ident()``) at its next call or return until
    :func:`hold_end` or ``deadline_ns``; a held thread runs on to its next
    event when the exempt threads made no progress for ``stall_ns`` (they may
    wait for a lock it holds). Returns how many threads got the hold. Needs
    :data:`can_hold_threads`."""
    ids, n = _exempt(exempt)
    return _check(_held.uro_hold_begin(release.fileno(), deadline_ns, stall_ns, ids, n), "hold_begin")


def hold_arm(release: EventFd, stall_ns: int, exempt: Iterable[int] = ()) -> int:
    """Installs the hold on every thread ahead of an episode, inactive (the
    interpreter runs slower meanwhile); :func:`hooks_wait` starts it the
    moment the hooks are woken, before the hook thread asks for the GIL.
    Returns how many threads have it."""
    ids, n = _exempt(exempt)
    return _check(_held.uro_hold_arm(release.fileno(), stall_ns, ids, n), "hold_arm")


def hold_disarm() -> int:
    """Removes an armed hold (at the end of the active one, if one is)."""
    return _check(_held.uro_hold_disarm(), "hold_disarm")


def hold_end(resume: EventFd) -> int:
    """Releases the threads :func:`hold_begin` held; returns how many had the hold."""
    return _check(_held.uro_hold_end(resume.fileno()), "hold_end")


def hooks_next(reply: EventFd, value: int, hold: EventFd, wake: EventFd, resume: EventFd, pause: float) -> int:
    """The hook thread between episodes, without needing the GIL from its
    reply to its next wake-up: ends the hold (``hold``), then without the
    GIL replies ``value`` (if > 0, after ending the main thread's pause) and
    waits as :func:`hooks_wait` does. Returns the wake eventfd's counter."""
    ret = _held.uro_hooks_next(reply.fileno(), value, hold.fileno(), wake.fileno(), resume.fileno(), int(pause * 1e9))
    return _check(int(ret), "read")


def holds() -> int:
    """How many times a thread was held so far."""
    return int(_lib.uro_holds())


def stack_prefault(nbytes: int) -> None:
    """Touches ``nbytes`` of the calling thread's stack."""
    _check(_lib.uro_stack_prefault(nbytes), "stack_prefault")


@attrs.frozen
class PoolReport:
    """The pymalloc arena pool: its size, lock, and how arenas were served."""

    size: int
    locked: int
    lock_errno: int
    chunk: int
    served: int
    fallbacks: int
    in_use: int


class _ArenaAllocator(ctypes.Structure):
    _fields_ = [("ctx", ctypes.c_void_p), ("alloc", ctypes.c_void_p), ("free", ctypes.c_void_p)]


_pool: Any = None


def install_arena_pool(nbytes: int, *, lock: bool) -> PoolReport:
    """Serves pymalloc's arenas from a prefaulted (and, if ``lock``, locked)
    pool of ``nbytes``. Once per process: the pool stays installed, because
    arenas it handed out are freed through whichever allocator is current."""
    global _pool
    if _pool is None:
        pool = _ffi.new("struct uro_pool *")
        _check(_lib.uro_pool_init(pool, nbytes, int(lock)), "mmap")
        allocator = _ArenaAllocator(
            int(_ffi.cast("uintptr_t", pool)),
            int(_ffi.cast("uintptr_t", _lib.uro_pool_alloc_fn())),
            int(_ffi.cast("uintptr_t", _lib.uro_pool_free_fn())),
        )
        api = ctypes.pythonapi
        api.PyObject_SetArenaAllocator.argtypes = [ctypes.POINTER(_ArenaAllocator)]
        api.PyObject_SetArenaAllocator.restype = None
        api.PyObject_SetArenaAllocator(ctypes.byref(allocator))
        _pool = pool
    report = pool_report()
    assert report is not None
    return report


def pool_report() -> PoolReport | None:
    """The installed pool's figures, or None if none is installed."""
    if _pool is None:
        return None
    p = _pool
    return PoolReport(
        int(p.size), int(p.locked), int(p.lock_errno), int(p.chunk), int(p.served),
        int(p.fallbacks), bin(int(p.used_mask)).count("1"),
    )


class ActionKind(enum.IntEnum):
    SIGNAL_PIDFD = _lib.URO_ACT_SIGNAL_PIDFD
    SIGNAL_PID = _lib.URO_ACT_SIGNAL_PID
    WRITE = _lib.URO_ACT_WRITE
    MRELEASE = _lib.URO_ACT_MRELEASE
    WAKE = _lib.URO_ACT_WAKE
    AWAIT = _lib.URO_ACT_AWAIT
    CHECK = _lib.URO_ACT_CHECK
    SIGNAL_BEST = _lib.URO_ACT_SIGNAL_BEST


class SourceKind(enum.IntEnum):
    OOM = _lib.URO_SRC_OOM
    FORWARD = _lib.URO_SRC_FORWARD


class Wake(enum.IntEnum):
    """How a source's fd signals: an eventfd (v1 notifications, the stop fd)
    is readable and its counter is read; a cgroup v2 file (``memory.events``)
    polls ``EPOLLPRI`` on a change and is read again to re-arm; a PSI trigger
    polls ``EPOLLPRI`` (the poll consumes the event)."""

    EVENTFD = 0
    FILE = _lib.URO_SRC_PRI | _lib.URO_SRC_REREAD
    TRIGGER = _lib.URO_SRC_PRI


class Outcome(enum.IntEnum):
    RESOLVED = _lib.URO_OUT_RESOLVED
    UNRESOLVED = _lib.URO_OUT_UNRESOLVED
    NOT_NEEDED = _lib.URO_OUT_NOT_NEEDED
    GONE = _lib.URO_OUT_GONE
    NO_PLAN = _lib.URO_OUT_NO_PLAN
    ACTED = _lib.URO_OUT_ACTED
    FORWARDED = _lib.URO_OUT_FORWARDED
    RELIEVED = _lib.URO_OUT_RELIEVED
    SUPERSEDED = _lib.URO_OUT_SUPERSEDED


def _timeout_ns(seconds: float) -> int:
    if not seconds >= 0:
        raise ValueError(f"timeout must be >= 0 seconds, not {seconds!r}")
    return int(seconds * 1e9)


@attrs.frozen
class Action:
    """One step of a native plan. Build with the named constructors.

    The fds an action names belong to the caller, who keeps them open while
    a plan that uses them is armed.
    """

    kind: ActionKind
    fd: int = -1
    pid: int = 0
    sig: int = 0
    data: bytes = b""
    timeout_ns: int = 0
    flags: int = 0
    guard: int = -1

    def after(self, index: int) -> Action:
        """This action, run only if the action at ``index`` of the plan ran
        and succeeded (a restore runs only if what it undoes was done)."""
        if not 0 <= index < PLAN_MAX:
            raise ValueError(f"after must index a plan action, not {index!r}")
        return attrs.evolve(self, guard=index)

    def always(self) -> Action:
        """This action, run even after the episode was resolved (a restore)."""
        return attrs.evolve(self, flags=self.flags | _lib.URO_F_ALWAYS)

    def resolving(self) -> Action:
        """This action's success resolves the episode and closes an open
        grant (a limit restored: usage fits again)."""
        return attrs.evolve(self, flags=self.flags | _lib.URO_F_RESOLVES)

    def opening(self) -> Action:
        """This action's success opens a grant (the limit raised): until a
        resolving action succeeds, a check can relieve but not resolve."""
        return attrs.evolve(self, flags=self.flags | _lib.URO_F_OPENS)

    def settling(self) -> Action:
        """An AWAIT that reads its eventfd: a counter of :data:`SETTLED`
        means the thread it waited for restored the limit itself, with the
        usage fitting; the grant is closed and the episode resolved."""
        if self.kind != ActionKind.AWAIT or not self.flags & _lib.URO_F_READ:
            raise ValueError("only an AWAIT that reads its eventfd can settle")
        return attrs.evolve(self, flags=self.flags | _lib.URO_F_SETTLES)

    def if_clear(self) -> Action:
        """This action runs only if the check says the OOM is over now."""
        return attrs.evolve(self, flags=self.flags | _lib.URO_F_IF_CLEAR)

    def on_pick(self) -> Action:
        """This MRELEASE or AWAIT, on the pidfd of the episode's last
        :meth:`signal_best` pick instead of its own fd (-ESRCH if it picked
        nobody)."""
        if self.kind not in (ActionKind.MRELEASE, ActionKind.AWAIT) and \
                not (self.kind is ActionKind.CHECK and self.flags & _lib.URO_F_EXIT):
            raise ValueError("only MRELEASE, AWAIT and a CHECK until_exit() can act on the pick")
        return attrs.evolve(self, fd=-1, flags=self.flags | _lib.URO_F_PICKED)

    def until_exit(self, pidfd: int = -1) -> Action:
        """This CHECK also ends once the process of ``pidfd`` has exited (or
        the pick's, with :meth:`on_pick` after this), after one last check:
        its memory is back, and if the check still fails, the group is out
        of memory again and the next action follows at once (cgroup v2,
        where no task waits for the check to wake it)."""
        if self.kind is not ActionKind.CHECK:
            raise ValueError("only a CHECK ends at an exit")
        return attrs.evolve(self, fd=pidfd, flags=self.flags | _lib.URO_F_EXIT)

    @classmethod
    def signal_best(cls, sig: int, wait: float = 0.25) -> Action:
        """Pick the plan's candidate with the highest badness at this moment
        (see :class:`Candidate`) and signal it through its pidfd; fails with
        ESRCH if no live candidate is left. The step records the pick.

        If a task an earlier pick killed has not exited yet, it waits up to
        ``wait`` seconds for it instead, as the kernel waits for its own
        victim, and once it is gone returns :data:`WAITED` without picking."""
        return cls(ActionKind.SIGNAL_BEST, sig=sig, timeout_ns=_timeout_ns(wait))

    @classmethod
    def signal_pidfd(cls, pidfd: int, sig: int) -> Action:
        """Signal a process through its pidfd; fails with ESRCH if it exited."""
        return cls(ActionKind.SIGNAL_PIDFD, fd=_fd(pidfd), sig=sig)

    @classmethod
    def signal_pid(cls, pid: int, sig: int) -> Action:
        """Signal a pid (prefer pidfds: a pid can be reused)."""
        if pid <= 0:
            raise ValueError(f"pid must be positive, not {pid}")
        return cls(ActionKind.SIGNAL_PID, pid=pid, sig=sig)

    @classmethod
    def write(cls, fd: int, data: bytes) -> Action:
        """Write preformatted bytes at offset 0 of a preopened file."""
        if not 0 < len(data) <= DATA_MAX:
            raise ValueError(f"write payload must be 1..{DATA_MAX} bytes, not {len(data)}")
        return cls(ActionKind.WRITE, fd=_fd(fd), data=bytes(data))

    @classmethod
    def mrelease(cls, pidfd: int) -> Action:
        """Reap a killed process's memory now (process_mrelease, Linux 5.15)."""
        return cls(ActionKind.MRELEASE, fd=_fd(pidfd))

    @classmethod
    def wake(cls, eventfd: int) -> Action:
        """Add 1 to an eventfd (to wake a Python thread)."""
        return cls(ActionKind.WAKE, fd=_fd(eventfd))

    @classmethod
    def await_readable(cls, fd: int, timeout: float, *, read: bool = False) -> Action:
        """Wait until fd is readable (a pidfd: the process exited; an eventfd:
        Python replied), at most ``timeout`` seconds; ``read`` resets an eventfd."""
        return cls(
            ActionKind.AWAIT, fd=_fd(fd), timeout_ns=_timeout_ns(timeout),
            flags=_lib.URO_F_READ if read else 0,
        )

    @classmethod
    def check(cls, timeout: float, *, supersede: bool = False) -> Action:
        """Wait up to ``timeout`` seconds for the plan's check to say the OOM
        is over; the episode ends there if it is. Skipped when no action since
        the previous check took effect. With ``supersede``, a new notification
        of the episode's source (the group ran out again: the action took
        effect) also ends it, and the next episode starts at once."""
        return cls(ActionKind.CHECK, timeout_ns=_timeout_ns(timeout),
                   flags=_lib.URO_F_SUPERSEDE if supersede else 0)


def _fd(fd: int) -> int:
    if not isinstance(fd, int) or fd < 0:
        raise ValueError(f"not a valid fd: {fd!r}")
    return fd


def _actions(value: Iterable[Action]) -> tuple[Action, ...]:
    return tuple(value)


@attrs.frozen
class Candidate:
    """A task :meth:`Action.signal_best` may pick, by the fds the caller
    keeps open while the plan is armed: its pidfd, and ``/proc/<pid>/status``
    opened and read once ahead. Its badness at the pick is VmRSS + VmSwap +
    VmPTE (kB), as the kernel's ``oom_badness()`` counts, plus its
    ``oom_score_adj`` scaled to the group's limit (adj x limit / 1000): read
    at the pick through ``adj_fd`` (``/proc/<pid>/oom_score_adj`` opened
    ahead), or ``adj_kb``, already scaled, without one or if it fails."""

    pidfd: int = attrs.field(converter=_fd)
    status_fd: int = attrs.field(converter=_fd)
    pid: int
    adj_kb: int = 0
    adj_fd: int = -1


def _candidates(value: Iterable[Candidate]) -> tuple[Candidate, ...]:
    return tuple(value)


def _pids(value: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(pid) for pid in value)


@attrs.frozen
class Plan:
    """What the watcher does on an OOM notification, decided ahead of time.

    ``check_fd`` is a preopened file (v1: ``memory.oom_control``) that says
    the OOM is over when it contains ``resolved_needle``, or (v2:
    ``memory.current``) when the number it holds is below ``resolved_below``;
    the watcher reads it before acting (to ignore a notification that needs
    nothing) and at each ``Action.check``.
    """

    actions: tuple[Action, ...] = attrs.field(converter=_actions)
    check_fd: int = -1
    resolved_needle: bytes = attrs.field(default=b"")
    poll_interval: float = 0.0005
    resolved_below: int = attrs.field(default=0, kw_only=True)
    #: What :meth:`Action.signal_best` picks from, in the order ties go to
    #: the later one (the kernel scans the oldest task first).
    candidates: tuple[Candidate, ...] = attrs.field(default=(), kw_only=True, converter=_candidates)
    #: The group's ``cgroup.procs``, through which :meth:`Action.signal_best`
    #: also finds tasks that are not candidates (-1: it does not look).
    procs_fd: int = attrs.field(default=-1, kw_only=True)
    #: Read ``procs_fd`` through a new open file at each pick (cgroup v1,
    #: where an open file lists what its first read listed).
    procs_reopen: bool = attrs.field(default=False, kw_only=True)
    #: Pids never picked through ``procs_fd`` (at most 32).
    protect: tuple[int, ...] = attrs.field(default=(), kw_only=True, converter=_pids)
    #: What such a task's oom_score_adj is scaled by (kB, adj x limit / 1000).
    limit_kb: int = attrs.field(default=0, kw_only=True)

    @protect.validator
    def _validate_protect(self, _: object, value: tuple[int, ...]) -> None:
        if len(value) > 32:
            raise ValueError(f"a plan protects at most 32 pids, not {len(value)}")

    @candidates.validator
    def _validate_candidates(self, _: object, value: tuple[Candidate, ...]) -> None:
        if len(value) > CANDS_MAX:
            raise ValueError(f"a plan holds at most {CANDS_MAX} candidates, not {len(value)}")

    @actions.validator
    def _validate_actions(self, _: object, value: tuple[Action, ...]) -> None:
        if len(value) > PLAN_MAX:
            raise ValueError(f"a plan holds at most {PLAN_MAX} actions, not {len(value)}")

    @resolved_needle.validator
    def _validate_needle(self, _: object, value: bytes) -> None:
        if len(value) > NEEDLE_MAX:
            raise ValueError(f"the needle holds at most {NEEDLE_MAX} bytes")
        if self.check_fd >= 0 and not value and self.resolved_below <= 0:
            raise ValueError("a plan with a check_fd needs a resolved_needle or a resolved_below")


@attrs.frozen
class Step:
    """One executed action: its index in the plan, its kind, its result
    (>= 0 or -errno), when it began and when it returned."""

    index: int
    kind: ActionKind
    result: int
    t0_ns: int
    t_ns: int
    #: SIGNAL_BEST: the index of the candidate picked (-1: none), and its
    #: badness (kB) at that moment.
    pick: int = -1
    points: int = 0
    #: SIGNAL_BEST: the pid picked (a candidate's, or a task found through
    #: the plan's ``procs_fd``, with ``pick`` -1); 0 if none.
    pid: int = 0

    @property
    def ok(self) -> bool:
        return self.result >= 0


@attrs.frozen
class EventRecord:
    """One record of the watcher's ring, copied out of locked memory."""

    seq: int
    #: The :attr:`WatchedGroup.index` of the group, and its episode number
    #: (1, 2, ... per group; 0 for a record of no episode: a forward, a
    #: source gone).
    group: int
    episode: int
    source: int
    outcome: Outcome
    count: int
    notified_ns: int
    acted_ns: int
    resolved_ns: int
    plan_id: int
    plan_slot: int
    steps: tuple[Step, ...]

    @property
    def notify_to_act_ns(self) -> int | None:
        return self.acted_ns - self.notified_ns if self.acted_ns else None

    @property
    def notify_to_resolved_ns(self) -> int | None:
        return self.resolved_ns - self.notified_ns if self.resolved_ns else None


def _record(ev: Any) -> EventRecord:
    steps = tuple(
        Step(int(ev.steps[i].index), ActionKind(ev.steps[i].kind), int(ev.steps[i].result),
             int(ev.steps[i].t0_ns), int(ev.steps[i].t_ns), int(ev.steps[i].pick), int(ev.steps[i].points),
             int(ev.steps[i].pid))
        for i in range(ev.nsteps)
    )
    return EventRecord(
        seq=int(ev.seq), group=int(ev.group), episode=int(ev.episode), source=int(ev.source), outcome=Outcome(ev.outcome), count=int(ev.count),
        notified_ns=int(ev.notified_ns), acted_ns=int(ev.acted_ns),
        resolved_ns=int(ev.resolved_ns), plan_id=int(ev.plan_id), plan_slot=int(ev.plan_slot),
        steps=steps,
    )


def watcher_arena_size() -> int:
    """Bytes each :class:`NativeWatcher` maps and locks: its state, ring and stack."""
    return _pages(int(_ffi.sizeof("struct uro_shared"))) + STACK_SIZE


def group_arena_size() -> int:
    """Bytes each group of a :class:`NativeWatcher` maps and locks: its
    plans, sources and the record of its episode in progress."""
    return _pages(int(_ffi.sizeof("struct uro_group")))


def _pages(size: int) -> int:
    return (size + 4095) // 4096 * 4096


#: Most groups one :class:`NativeWatcher` serves.
GROUPS_MAX: int = _lib.URO_GROUPS_MAX


class NativeWatcher:
    """A native thread that waits on the notifications of many groups and
    runs their armed plans.

    Its state and event ring live in a locked, prefaulted arena, and its
    stack too; each group (:meth:`add_group`) has a locked mapping of its
    own. Once started it needs neither Python nor the GIL. An episode that
    waits (for the OOM to end, a victim to exit, the hooks' reply) does not
    hold the thread: the others' notifications are served meanwhile. Python
    adds groups, arms their plans, and reads the records of all of them
    (waking on :attr:`wake_fd`); a record's ``group`` is the
    :attr:`WatchedGroup.index` of its group.
    """

    def __init__(self, *, lock: bool = True) -> None:
        self._arena: _Arena | None = None
        self._fds: list[_FdOwner] = []
        self._groups: dict[int, WatchedGroup] = {}
        self._lock = lock
        self._watcher = _ffi.new("struct uro_watcher *")
        self._next_seq = 1
        self.lost = 0
        shared_size = _pages(int(_ffi.sizeof("struct uro_shared")))
        self._arena = _Arena(shared_size + STACK_SIZE, lock=lock)
        try:
            self._epoll = Epoll()
            self._control = EventFd()
            self._wake = EventFd()
            self._fds = [self._epoll, self._control, self._wake]
            self._shared = _ffi.cast("struct uro_shared *", self._arena.base)
            _check(
                _lib.uro_shared_init(self._shared, self._epoll.fileno(), self._control.fileno(),
                                     self._wake.fileno()),
                "epoll_ctl",
            )
            self._watcher.shared = self._shared
            self._watcher.stack = _ffi.cast("char *", self._arena.base) + shared_size
            self._watcher.stack_size = STACK_SIZE
            _LIVE_ARENAS.add(self._arena)
        except BaseException:
            self.close()
            raise

    @property
    def arena(self) -> ArenaReport:
        """How much of the watcher's own memory (state, ring, stack) is locked."""
        return self._live_arena().report()

    @property
    def wake_fd(self) -> int:
        """Readable after each new event record."""
        return self._wake.fileno()

    @property
    def running(self) -> bool:
        return bool(self._watcher.running)

    @property
    def state(self) -> int:
        """STATE_EPISODE while an episode of any of its groups is in progress."""
        return int(_lib.uro_state(self._shared))

    @property
    def tid(self) -> int:
        """The watcher thread's kernel thread id while it runs (0 before it starts)."""
        return int(self._shared.tid)

    @property
    def heartbeat(self) -> int:
        """Counts the watcher's wake-ups."""
        return int(self._shared.loops)

    @property
    def closed(self) -> bool:
        return self._arena is None

    @property
    def groups(self) -> tuple[WatchedGroup, ...]:
        return tuple(self._groups.values())

    def _live_arena(self) -> _Arena:
        if self._arena is None:
            raise WatcherError("the watcher is closed")
        return self._arena

    def add_group(self) -> WatchedGroup:
        """A new group for the watcher to serve, also while it runs."""
        self._live_arena()
        group = WatchedGroup(self, self._shared, lock=self._lock)
        self._groups[group.index] = group
        return group

    def _forget(self, group: WatchedGroup) -> None:
        self._groups.pop(group.index, None)

    def start(self) -> CoreLock:
        """Locks the native core's pages and starts the thread."""
        self._live_arena()
        if self.running:
            raise WatcherError("the watcher is already running")
        core = lock_core()
        _check(_lib.uro_watcher_start(self._watcher), "pthread_create")
        return core

    def stop(self) -> None:
        """Stops the thread (once no episode is in progress) and joins it."""
        if self.running:
            _check(_lib.uro_watcher_stop(self._watcher), "pthread_join")

    def records(self) -> list[EventRecord]:
        """The records of every group written since the last call (those
        overwritten are counted in :attr:`lost`)."""
        self._live_arena()
        out = _ffi.new("struct uro_event *")
        head = int(_lib.uro_ring_head(self._shared))
        result = []
        while self._next_seq <= head:
            ret = _lib.uro_ring_read(self._shared, self._next_seq, out)
            if ret == -_errno.ESTALE:
                self.lost += 1
            else:
                _check(ret, "ring_read")
                result.append(_record(out))
            self._next_seq += 1
        return result

    def wait(self, timeout: float | None) -> list[EventRecord]:
        """Blocks (without the GIL) until a record is written or ``timeout``
        passes; returns the new records."""
        if self._wake.wait(timeout):
            self._wake.read()
        return self.records()

    def close(self) -> None:
        """Takes its groups out (ending their episodes in progress), stops
        the thread, closes its fds, and unmaps its memory. Idempotent."""
        if self._arena is None:
            return
        try:
            for group in list(self._groups.values()):
                group.close()
        finally:
            self.stop()
            for owner in self._fds:
                owner.close()
            arena, self._arena = self._arena, None
            arena.close()

    def __enter__(self) -> NativeWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_arena", None) is not None:
            warnings.warn("unclosed NativeWatcher", ResourceWarning, stacklevel=2)
            self.close()


class WatchedGroup:
    """One group a :class:`NativeWatcher` serves: its sources, its armed
    plan, its episode in progress. Made by :meth:`NativeWatcher.add_group`;
    :meth:`close` takes it out of the watcher (ending an episode in progress,
    recorded ``UNRESOLVED``) and unmaps its memory."""

    def __init__(self, watcher: NativeWatcher, shared: Any, *, lock: bool) -> None:
        self._watcher = watcher
        self._shared = shared
        self._plan_id = 0
        self._arena: _Arena | None = _Arena(group_arena_size(), lock=lock)
        try:
            self._group = _ffi.cast("struct uro_group *", self._arena.base)
            _check(_lib.uro_group_init(self._group), "group_init")
            self.index: int = _check(_lib.uro_group_add(shared, self._group), "group_add")
            _LIVE_ARENAS.add(self._arena)
        except BaseException:
            arena, self._arena = self._arena, None
            arena.close()
            raise

    @property
    def arena(self) -> ArenaReport:
        """How much of the group's memory (plans, sources, record) is locked."""
        return self._live_arena().report()

    @property
    def closed(self) -> bool:
        return self._arena is None

    def _live_arena(self) -> _Arena:
        if self._arena is None:
            raise WatcherError("the watched group is closed")
        return self._arena

    def add_source(self, fd: int, kind: SourceKind, wake: Wake = Wake.EVENTFD) -> int:
        """Adds an fd to wait on; returns the source index used in records.

        ``wake`` says how the fd signals (:class:`Wake`). A ``FILE`` source
        must have been read once (which arms it and allocates its kernel
        buffer). When a ``TRIGGER`` polls POLLERR, or a ``FILE`` source that
        woke reads ENODEV, its group is gone: the watcher records a ``GONE``
        event and stops waiting on it. (Removing a group does not signal its
        ``memory.events``: watch the parent's ``cgroup.events`` for that.)
        """
        self._live_arena()
        return _check(_lib.uro_source_add(self._shared, self._group, _fd(fd), int(kind) | int(wake)),
                      "epoll_ctl")

    @property
    def armed_id(self) -> int:
        """The id of the plan armed last (0: none yet)."""
        return self._plan_id

    @property
    def in_episode(self) -> bool:
        """Whether an episode of this group is in progress."""
        return bool(self._arena is not None and self._group.ep.active)

    def current_episode(self) -> tuple[int, int] | None:
        """``(episode, notified_ns)`` of the episode in progress, or None;
        ``episode`` is the number its record will carry."""
        self._live_arena()
        ep = self._group.ep
        if not ep.active:
            return None
        return int(ep.rec.episode), int(ep.rec.notified_ns)

    def arm(self, plan: Plan, *, timeout: float = 5.0) -> int:
        """Makes ``plan`` the one the group's next episode runs; returns its
        id, which the records of the episodes it runs carry as ``plan_id``.

        Waits while the watcher is still reading the spare slot (an episode
        in progress on the previous plan); raises WatcherError after ``timeout``.
        """
        self._live_arena()
        deadline = time.monotonic() + timeout
        while (slot := _lib.uro_plan_begin(self._group)) == -_errno.EBUSY:
            if time.monotonic() > deadline:
                raise WatcherError("the watcher kept the plan busy; cannot arm a new one")
            time.sleep(0.0005)
        _check(slot, "plan_begin")
        self._plan_id += 1
        _fill_plan(self._group.plans[slot], plan, self._plan_id)
        _check(_lib.uro_plan_commit(self._group, slot), "plan_commit")
        return self._plan_id

    def run_episode(self, source: int, count: int = 1) -> None:
        """Runs one episode on the calling thread, as the watcher would."""
        if self._watcher.running:
            raise WatcherError("the watcher thread is running; it runs the episodes")
        self._live_arena()
        _check(_lib.uro_run_episode(self._shared, self._group, source, count), "run_episode")

    def close(self, *, timeout: float = 5.0) -> None:
        """Takes the group out of the watcher and unmaps its memory. Idempotent."""
        if self._arena is None:
            return
        ret = _check(_lib.uro_group_remove(self._shared, self._group), "group_remove")
        deadline = time.monotonic() + timeout
        while ret and _lib.uro_group_state(self._group) != _lib.URO_GROUP_FREE:
            if not self._watcher.running:
                _check(_lib.uro_group_remove(self._shared, self._group), "group_remove")
                break
            if time.monotonic() > deadline:
                # The watcher may still read this memory: keep it mapped.
                raise WatcherError("the watcher did not take the group out; its memory stays mapped")
            time.sleep(0.0002)
        _lib.uro_dying_close(self._group)
        self._watcher._forget(self)
        arena, self._arena = self._arena, None
        arena.close()


def _fill_plan(dst: Any, plan: Plan, plan_id: int) -> None:
    """Writes ``plan`` into a plan slot of locked memory."""
    dst.count = 0
    dst.id = plan_id
    for i, action in enumerate(plan.actions):
        a = dst.actions[i]
        a.kind = int(action.kind)
        a.fd = action.fd
        a.pid = action.pid
        a.sig = action.sig
        a.flags = action.flags
        a.guard = action.guard
        a.timeout_ns = action.timeout_ns
        a.len = len(action.data)
        a.fired = 0
        _ffi.memmove(a.data, action.data.ljust(DATA_MAX, b"\0"), DATA_MAX)
    dst.check_fd = plan.check_fd
    dst.needle_len = len(plan.resolved_needle)
    _ffi.memmove(dst.needle, plan.resolved_needle.ljust(NEEDLE_MAX, b"\0"), NEEDLE_MAX)
    dst.poll_ns = int(plan.poll_interval * 1e9)
    dst.below = plan.resolved_below
    for i, cand in enumerate(plan.candidates):
        c = dst.cands[i]
        c.pidfd = cand.pidfd
        c.status_fd = cand.status_fd
        c.pid = cand.pid
        c.fired = 0
        c.adj_kb = cand.adj_kb
        c.adj_fd = cand.adj_fd
    dst.ncands = len(plan.candidates)
    dst.procs_fd = plan.procs_fd
    dst.procs_reopen = int(plan.procs_reopen)
    for i, pid in enumerate(plan.protect):
        dst.protect[i] = pid
    dst.nprotect = len(plan.protect)
    dst.limit_kb = plan.limit_kb
    dst.count = len(plan.actions)
