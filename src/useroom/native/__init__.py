"""The native core and its typed wrappers.

The C core (``uro.h``, used as the cffi cdef, and ``uro.c``, the body)
waits on the groups' notifications and runs, without Python and without
allocating, the plans Python decided ahead of time. It is built by
``_build.py`` into ``useroom.native._core``, which only ``_lib`` imports;
the modules here wrap it, split by concern:

- :mod:`~useroom.native.fds`: eventfds, epoll sets and waits on fds; every
  fd-owning object is a :class:`useroom._fd.OwnedFd`.
- :mod:`~useroom.native.plan`: plans, their actions and candidates, and the
  records of what the watcher did (pure values).
- :mod:`~useroom.native.watcher`: the watcher thread, the groups it serves,
  and their locked arenas; writes plans in, reads records out.
- :mod:`~useroom.native.locking`: keeping resident what the OOM path needs
  (the core's pages, the heap, the stack, pymalloc's arenas).
- :mod:`~useroom.native.hold`: the hook thread's pause of the main thread
  and hold of the other Python threads.
- :mod:`~useroom.native.features`: what this kernel and build can do.

Importing the package makes no system call to probe anything and runs no
one-time setup of the core: each probe runs at its first call and keeps its
answer; the hold's lookups in the interpreter run at its first use.
Every C function returns ``>= 0`` or ``-errno``; the wrappers raise the
matching :class:`OSError` subclass with the function named. Decisions are
made here and in the layers above; C only executes them.
"""

from __future__ import annotations

from useroom.native.fds import (
    EPOLLIN,
    Epoll,
    EventFd,
    monotonic_ns,
    mrelease,
    wait_readable,
)
from useroom.native.features import can_use_mrelease, raw_syscalls
from useroom.native.hold import (
    HOLD_EXEMPT_MAX,
    can_hold_threads,
    can_lower_switch_interval,
    hold_arm,
    hold_begin,
    hold_disarm,
    hold_end,
    holds,
    hooks_done,
    hooks_next,
    hooks_wait,
    main_thread_pauses,
)
from useroom.native.locking import (
    CoreLock,
    PoolReport,
    core_path,
    heap_reserve,
    heap_trim,
    install_arena_pool,
    lock_core,
    mlockall,
    pool_report,
    stack_prefault,
)
from useroom.native.plan import (
    CANDS_MAX,
    DATA_MAX,
    MEMBER_MAX,
    NEEDLE_MAX,
    NOT_MEMBER,
    PLAN_MAX,
    SETTLED,
    WAITED,
    Action,
    ActionFlag,
    ActionKind,
    Candidate,
    EventRecord,
    Outcome,
    Plan,
    SourceKind,
    Step,
    Wake,
)
from useroom.native.watcher import (
    GROUPS_MAX,
    RING_SIZE,
    SOURCES_MAX,
    STACK_SIZE,
    STATE_EPISODE,
    STATE_WAITING,
    ArenaReport,
    NativeWatcher,
    WatchedGroup,
    group_arena_size,
    watcher_arena_size,
)

__all__ = [
    "CANDS_MAX",
    "DATA_MAX",
    "EPOLLIN",
    "GROUPS_MAX",
    "HOLD_EXEMPT_MAX",
    "MEMBER_MAX",
    "NEEDLE_MAX",
    "NOT_MEMBER",
    "PLAN_MAX",
    "RING_SIZE",
    "SETTLED",
    "SOURCES_MAX",
    "STACK_SIZE",
    "STATE_EPISODE",
    "STATE_WAITING",
    "WAITED",
    "Action",
    "ActionFlag",
    "ActionKind",
    "ArenaReport",
    "Candidate",
    "CoreLock",
    "Epoll",
    "EventFd",
    "EventRecord",
    "NativeWatcher",
    "Outcome",
    "Plan",
    "PoolReport",
    "SourceKind",
    "Step",
    "Wake",
    "WatchedGroup",
    "can_hold_threads",
    "can_lower_switch_interval",
    "can_use_mrelease",
    "core_path",
    "group_arena_size",
    "heap_reserve",
    "heap_trim",
    "hold_arm",
    "hold_begin",
    "hold_disarm",
    "hold_end",
    "holds",
    "hooks_done",
    "hooks_next",
    "hooks_wait",
    "install_arena_pool",
    "lock_core",
    "main_thread_pauses",
    "mlockall",
    "monotonic_ns",
    "mrelease",
    "pool_report",
    "raw_syscalls",
    "stack_prefault",
    "wait_readable",
    "watcher_arena_size",
]
