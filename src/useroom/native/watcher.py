"""The native watcher: a thread of the core that waits on the notifications
of many groups and runs their armed plans without Python.

Its state, event ring and stack, and each group's plans and sources, live
in arenas: mapped, prefaulted and locked (where allowed) ahead of time.
Python writes plans into them and copies the records out.
"""

from __future__ import annotations

import errno
import os
import time
import warnings
import weakref
from typing import TYPE_CHECKING

import attrs

from useroom._fd import OwnedFd
from useroom._limits import spawning
from useroom.exceptions import WatcherError
from useroom.native._lib import check, ffi, lib, valid_fd
from useroom.native.fds import Epoll, EventFd
from useroom.native.locking import CoreLock, lock_core
from useroom.native.plan import (
    DATA_MAX,
    MEMBER_MAX,
    NEEDLE_MAX,
    ActionKind,
    EventRecord,
    Outcome,
    Plan,
    SourceKind,
    Step,
    Wake,
)

if TYPE_CHECKING:
    from useroom.native._lib import UroEvent, UroPlan, UroShared, VoidPointer

__all__ = [
    "GROUPS_MAX",
    "RING_SIZE",
    "SOURCES_MAX",
    "STACK_SIZE",
    "STATE_EPISODE",
    "STATE_WAITING",
    "ArenaReport",
    "NativeWatcher",
    "WatchedGroup",
    "group_arena_size",
    "watcher_arena_size",
]

RING_SIZE: int = lib.URO_RING_SIZE
SOURCES_MAX: int = lib.URO_SOURCES_MAX
#: Most groups one :class:`NativeWatcher` serves.
GROUPS_MAX: int = lib.URO_GROUPS_MAX
STACK_SIZE = 128 * 1024
STATE_WAITING: int = lib.URO_STATE_WAITING
STATE_EPISODE: int = lib.URO_STATE_EPISODE


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
        self._arena = ffi.new("struct uro_arena *")
        check(lib.uro_arena_map(size, int(lock), self._arena), "mmap")

    @property
    def base(self) -> VoidPointer:
        return self._arena.base

    @property
    def closed(self) -> bool:
        return bool(self._arena.base == ffi.NULL)

    def report(self) -> ArenaReport:
        return ArenaReport(int(self._arena.size), int(self._arena.locked), int(self._arena.lock_errno))

    def close(self) -> None:
        check(lib.uro_arena_unmap(self._arena), "munmap")

    def __del__(self) -> None:
        if not self.closed:
            self.close()


#: The watchers' arenas, copied again in the parent after each fork
#: (see uro_arena_touch).
_LIVE_ARENAS: weakref.WeakSet[_Arena] = weakref.WeakSet()


def _touch_arenas_in_parent() -> None:
    for arena in list(_LIVE_ARENAS):
        if not arena.closed:
            lib.uro_arena_touch(arena._arena)


os.register_at_fork(after_in_parent=_touch_arenas_in_parent)


def _record(ev: UroEvent) -> EventRecord:
    steps = tuple(
        Step(int(ev.steps[i].index), ActionKind(ev.steps[i].kind), int(ev.steps[i].result),
             int(ev.steps[i].t0_ns), int(ev.steps[i].t_ns), int(ev.steps[i].pick), int(ev.steps[i].points),
             int(ev.steps[i].pid))
        for i in range(ev.nsteps)
    )
    return EventRecord(
        seq=int(ev.seq), group=int(ev.group), episode=int(ev.episode), source=int(ev.source),
        outcome=Outcome(ev.outcome), count=int(ev.count),
        notified_ns=int(ev.notified_ns), acted_ns=int(ev.acted_ns),
        resolved_ns=int(ev.resolved_ns), plan_id=int(ev.plan_id), plan_slot=int(ev.plan_slot),
        steps=steps,
    )


def watcher_arena_size() -> int:
    """Bytes each :class:`NativeWatcher` maps and locks: its state, ring and stack."""
    return _pages(int(ffi.sizeof("struct uro_shared"))) + STACK_SIZE


def group_arena_size() -> int:
    """Bytes each group of a :class:`NativeWatcher` maps and locks: its
    plans, sources and the record of its episode in progress."""
    return _pages(int(ffi.sizeof("struct uro_group")))


def _pages(size: int) -> int:
    return (size + 4095) // 4096 * 4096


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
        self._fds: list[OwnedFd] = []
        self._groups: dict[int, WatchedGroup] = {}
        self._lock = lock
        self._watcher = ffi.new("struct uro_watcher *")
        self._next_seq = 1
        self.lost = 0
        shared_size = _pages(int(ffi.sizeof("struct uro_shared")))
        self._arena = _Arena(shared_size + STACK_SIZE, lock=lock)
        try:
            # Each is closed by close() below as soon as it exists: out of
            # fds, none is left open.
            self._epoll = Epoll()
            self._fds.append(self._epoll)
            self._control = EventFd()
            self._fds.append(self._control)
            self._wake = EventFd()
            self._fds.append(self._wake)
            self._shared = ffi.cast("struct uro_shared *", self._arena.base)
            check(
                lib.uro_shared_init(self._shared, self._epoll.fileno(), self._control.fileno(),
                                     self._wake.fileno()),
                "epoll_ctl",
            )
            self._watcher.shared = self._shared
            self._watcher.stack = ffi.cast("char *", self._arena.base) + shared_size
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
        return int(lib.uro_state(self._shared))

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
        with spawning("the native watcher thread"):
            check(lib.uro_watcher_start(self._watcher), "pthread_create")
        return core

    def stop(self) -> None:
        """Stops the thread (once no episode is in progress) and joins it."""
        if self.running:
            check(lib.uro_watcher_stop(self._watcher), "pthread_join")

    def records(self) -> list[EventRecord]:
        """The records of every group written since the last call (those
        overwritten are counted in :attr:`lost`)."""
        self._live_arena()
        out = ffi.new("struct uro_event *")
        head = int(lib.uro_ring_head(self._shared))
        result = []
        while self._next_seq <= head:
            ret = lib.uro_ring_read(self._shared, self._next_seq, out)
            if ret == -errno.ESTALE:
                self.lost += 1
            else:
                check(ret, "ring_read")
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

    def __init__(self, watcher: NativeWatcher, shared: UroShared, *, lock: bool) -> None:
        self._watcher = watcher
        self._shared = shared
        self._plan_id = 0
        self._arena: _Arena | None = _Arena(group_arena_size(), lock=lock)
        try:
            self._group = ffi.cast("struct uro_group *", self._arena.base)
            check(lib.uro_group_init(self._group), "group_init")
            self.index: int = check(lib.uro_group_add(shared, self._group), "group_add")
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
        return check(lib.uro_source_add(self._shared, self._group, valid_fd(fd), int(kind) | int(wake)),
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
        while (slot := lib.uro_plan_begin(self._group)) == -errno.EBUSY:
            if time.monotonic() > deadline:
                raise WatcherError("the watcher kept the plan busy; cannot arm a new one")
            time.sleep(0.0005)
        check(slot, "plan_begin")
        self._plan_id += 1
        _fill_plan(self._group.plans[slot], plan, self._plan_id)
        check(lib.uro_plan_commit(self._group, slot), "plan_commit")
        return self._plan_id

    def run_episode(self, source: int, count: int = 1) -> None:
        """Runs one episode on the calling thread, as the watcher would."""
        if self._watcher.running:
            raise WatcherError("the watcher thread is running; it runs the episodes")
        self._live_arena()
        check(lib.uro_run_episode(self._shared, self._group, source, count), "run_episode")

    def close(self, *, timeout: float = 5.0) -> None:
        """Takes the group out of the watcher and unmaps its memory. Idempotent."""
        if self._arena is None:
            return
        ret = check(lib.uro_group_remove(self._shared, self._group), "group_remove")
        deadline = time.monotonic() + timeout
        while ret and lib.uro_group_state(self._group) != lib.URO_GROUP_FREE:
            if not self._watcher.running:
                check(lib.uro_group_remove(self._shared, self._group), "group_remove")
                break
            if time.monotonic() > deadline:
                # The watcher may still read this memory: keep it mapped.
                raise WatcherError("the watcher did not take the group out; its memory stays mapped")
            time.sleep(0.0002)
        lib.uro_dying_close(self._group)
        self._watcher._forget(self)
        arena, self._arena = self._arena, None
        arena.close()


def _fill_plan(dst: UroPlan, plan: Plan, plan_id: int) -> None:
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
        a.member_fd = action.member_fd
        ffi.memmove(a.data, action.data.ljust(DATA_MAX, b"\0"), DATA_MAX)
    dst.check_fd = plan.check_fd
    dst.needle_len = len(plan.resolved_needle)
    ffi.memmove(dst.needle, plan.resolved_needle.ljust(NEEDLE_MAX, b"\0"), NEEDLE_MAX)
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
        c.cgroup_fd = cand.cgroup_fd
    dst.ncands = len(plan.candidates)
    dst.procs_fd = plan.procs_fd
    dst.procs_reopen = int(plan.procs_reopen)
    for i, pid in enumerate(plan.protect):
        dst.protect[i] = pid
    dst.nprotect = len(plan.protect)
    dst.limit_kb = plan.limit_kb
    dst.member_len = len(plan.member)
    ffi.memmove(dst.member, plan.member.ljust(MEMBER_MAX, b"\0"), MEMBER_MAX)
    dst.room_fd = plan.room_fd
    dst.room_below = plan.room_below
    dst.count = len(plan.actions)
