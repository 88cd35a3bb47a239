"""Types of the compiled core (``_build.py`` makes it from ``uro.h``).

At run time every C pointer, array and struct is an object of cffi's one
cdata class; the classes here exist only for the type checker and say what
cffi converts each C type to:

- an integer of any width is an ``int``, in and out: cffi refuses a float,
  so a duration in seconds is turned into nanoseconds before the call;
- ``struct uro_x *`` is ``UroX``, whose attributes are the struct's fields;
  an item of an array of structs (a ``struct uro_x &``) reads the same way;
- ``T *`` and ``T[n]`` are ``Pointer[T]`` and ``Array[T]``, indexed; a
  ``char`` item is one byte, an ``unsigned char`` an ``int``.

``lib`` declares what Python calls through cffi, which releases the GIL
around every call. The functions that must keep the GIL (the hold, the
trim, ``uro_hooks_next``) are left out on purpose: they are called through
``_lib.HELD``, and a call through ``lib`` is a type error here.
``ffi.new`` and ``ffi.cast`` take only the C types Python makes, so that a
misspelt type name fails the type check instead of the first run.
"""

from typing import Final, Generic, Literal, TypeVar, overload

_T = TypeVar("_T")

class CData:
    """A cffi cdata object."""

class VoidPointer(CData):
    """``void *``."""

class CharPointer(VoidPointer):
    """``char *``: arithmetic counts bytes."""

    def __add__(self, offset: int, /) -> CharPointer: ...

class Pointer(VoidPointer, Generic[_T]):
    """``T *``: ``p[i]`` reads and writes the i-th ``T`` from the pointer on."""

    def __getitem__(self, index: int, /) -> _T: ...
    def __setitem__(self, index: int, value: _T, /) -> None: ...

class Array(Pointer[_T]):
    """``T[n]``, which also passes as a ``T *``."""

    def __len__(self) -> int: ...

class Integer(CData):
    """An integer cdata made by ``ffi.cast``; ``int()`` reads it."""

    def __int__(self) -> int: ...
    def __index__(self) -> int: ...

class UroAction(CData):
    kind: int
    fd: int
    pid: int
    sig: int
    flags: int
    guard: int
    len: int
    fired: int
    member_fd: int
    pad: int
    timeout_ns: int
    data: Array[bytes]

class UroCand(CData):
    pidfd: int
    status_fd: int
    pid: int
    fired: int
    adj_kb: int
    adj_fd: int
    cgroup_fd: int

class UroPlan(CData):
    id: int
    count: int
    check_fd: int
    needle_len: int
    needle: Array[bytes]
    poll_ns: int
    actions: Array[UroAction]
    below: int
    ncands: int
    procs_reopen: int
    cands: Array[UroCand]
    procs_fd: int
    nprotect: int
    limit_kb: int
    protect: Array[int]
    member_len: int
    pad2: int
    member: Array[bytes]
    room_fd: int
    pad3: int
    room_below: int

class UroStep(CData):
    t0_ns: int
    t_ns: int
    index: int
    kind: int
    result: int
    pick: int
    points: int
    pid: int
    pad: int

class UroEvent(CData):
    seq: int
    group: int
    pad: int
    episode: int
    source: int
    outcome: int
    count: int
    notified_ns: int
    acted_ns: int
    resolved_ns: int
    plan_id: int
    plan_slot: int
    nsteps: int
    steps: Array[UroStep]

class UroSource(CData):
    fd: int
    kind: int

class UroEpisode(CData):
    active: int
    wait: int
    next: int
    slot: int
    has_check: int
    outcome: int
    acted_since_check: int
    grant_open: int
    ran: int
    t0_ns: int
    deadline_ns: int
    wake_ns: int
    wait_fd: int
    supersede: int
    gone: int
    next_active: int
    pick_index: int
    pick_pid: int
    pick_pidfd: int
    pick_owned: int
    gate: int
    pad_gate: int
    pick_points: int
    rec: UroEvent

class UroGroup(CData):
    index: int
    state: int
    active_plan: int
    busy_plan: int
    nsources: int
    ndying: int
    episodes: int
    sources: Array[UroSource]
    pending: Array[int]
    dying: Array[int]
    plans: Array[UroPlan]
    ep: UroEpisode

class UroShared(CData):
    state: int
    stop: int
    epfd: int
    control_fd: int
    wake_fd: int
    tid: int
    ngroups: int
    active: int
    nactive: int
    no_pwait2: int
    head: int
    loops: int
    ring: Array[UroEvent]
    groups: Array[UroGroup]

class UroReady(CData):
    data: int
    events: int

class UroArena(CData):
    base: VoidPointer
    size: int
    locked: int
    lock_errno: int

class UroText(CData):
    crit_start: int
    crit_size: int
    image_size: int
    locked: int
    segments: int
    lock_errno: int

class UroWatcher(CData):
    shared: UroShared
    stack: VoidPointer
    stack_size: int
    running: int
    thread: Array[int]

class UroPool(CData):
    base: CharPointer
    size: int
    chunk: int
    locked: int
    lock_errno: int
    nchunks: int
    used_mask: int
    served: int
    fallbacks: int

class FFI:
    NULL: Final[VoidPointer]

    @overload
    def new(self, cdecl: Literal["uint64_t *"], /) -> Pointer[int]: ...
    @overload
    def new(self, cdecl: Literal["struct uro_ready[]"], length: int, /) -> Array[UroReady]: ...
    @overload
    def new(self, cdecl: Literal["struct uro_arena *"], /) -> UroArena: ...
    @overload
    def new(self, cdecl: Literal["struct uro_text *"], /) -> UroText: ...
    @overload
    def new(self, cdecl: Literal["struct uro_watcher *"], /) -> UroWatcher: ...
    @overload
    def new(self, cdecl: Literal["struct uro_event *"], /) -> UroEvent: ...
    @overload
    def new(self, cdecl: Literal["struct uro_pool *"], /) -> UroPool: ...
    @overload
    def cast(self, cdecl: Literal["uintptr_t"], value: CData, /) -> Integer: ...
    @overload
    def cast(self, cdecl: Literal["char *"], value: VoidPointer, /) -> CharPointer: ...
    @overload
    def cast(self, cdecl: Literal["struct uro_shared *"], value: VoidPointer, /) -> UroShared: ...
    @overload
    def cast(self, cdecl: Literal["struct uro_group *"], value: VoidPointer, /) -> UroGroup: ...
    def sizeof(self, cdecl: Literal["struct uro_shared", "struct uro_group"], /) -> int: ...
    def memmove(self, dest: CData, src: CData | bytes, n: int, /) -> None: ...

class Lib:
    URO_PLAN_MAX: Final[int]
    URO_RING_SIZE: Final[int]
    URO_DATA_MAX: Final[int]
    URO_NEEDLE_MAX: Final[int]
    URO_SOURCES_MAX: Final[int]
    URO_GROUPS_MAX: Final[int]
    URO_CANDS_MAX: Final[int]
    URO_MEMBER_MAX: Final[int]
    URO_ACT_SIGNAL_PIDFD: Final[int]
    URO_ACT_SIGNAL_PID: Final[int]
    URO_ACT_WRITE: Final[int]
    URO_ACT_MRELEASE: Final[int]
    URO_ACT_WAKE: Final[int]
    URO_ACT_AWAIT: Final[int]
    URO_ACT_CHECK: Final[int]
    URO_ACT_SIGNAL_BEST: Final[int]
    URO_WAITED: Final[int]
    URO_F_READ: Final[int]
    URO_F_ALWAYS: Final[int]
    URO_F_RESOLVES: Final[int]
    URO_F_OPENS: Final[int]
    URO_F_IF_CLEAR: Final[int]
    URO_F_SUPERSEDE: Final[int]
    URO_F_SETTLES: Final[int]
    URO_SETTLED: Final[int]
    URO_F_PICKED: Final[int]
    URO_F_EXIT: Final[int]
    URO_F_GATE: Final[int]
    URO_SRC_OOM: Final[int]
    URO_SRC_FORWARD: Final[int]
    URO_SRC_PRI: Final[int]
    URO_SRC_REREAD: Final[int]
    URO_OUT_RESOLVED: Final[int]
    URO_OUT_UNRESOLVED: Final[int]
    URO_OUT_NOT_NEEDED: Final[int]
    URO_OUT_GONE: Final[int]
    URO_OUT_NO_PLAN: Final[int]
    URO_OUT_ACTED: Final[int]
    URO_OUT_FORWARDED: Final[int]
    URO_OUT_RELIEVED: Final[int]
    URO_OUT_SUPERSEDED: Final[int]
    URO_STATE_WAITING: Final[int]
    URO_STATE_EPISODE: Final[int]
    URO_GROUP_FREE: Final[int]
    URO_MCL_CURRENT: Final[int]
    URO_MCL_FUTURE: Final[int]

    # Clock, eventfds, epoll and waits on fds.
    def uro_monotonic_ns(self) -> int: ...
    def uro_eventfd_create(self, initval: int, nonblock: int, /) -> int: ...
    def uro_eventfd_read(self, fd: int, value: Pointer[int], /) -> int: ...
    def uro_eventfd_write(self, fd: int, value: int, /) -> int: ...
    def uro_epoll_create(self) -> int: ...
    def uro_epoll_add(self, epfd: int, fd: int, events: int, data: int, /) -> int: ...
    def uro_epoll_del(self, epfd: int, fd: int, /) -> int: ...
    def uro_epoll_wait(self, epfd: int, out: Pointer[UroReady], max: int, deadline_ns: int, /) -> int: ...
    def uro_wait_readable(self, fd: int, timeout_ns: int, /) -> int: ...
    def uro_mrelease(self, pidfd: int, /) -> int: ...
    def uro_raw_syscalls(self) -> int: ...

    # Arenas and the watcher.
    def uro_arena_map(self, size: int, lock: int, out: UroArena, /) -> int: ...
    def uro_arena_unmap(self, arena: UroArena, /) -> int: ...
    def uro_arena_touch(self, arena: UroArena, /) -> int: ...
    def uro_shared_init(self, shared: UroShared, epfd: int, control_fd: int, wake_fd: int, /) -> int: ...
    def uro_group_init(self, group: UroGroup, /) -> int: ...
    def uro_group_add(self, shared: UroShared, group: UroGroup, /) -> int: ...
    def uro_source_add(self, shared: UroShared, group: UroGroup, fd: int, kind: int, /) -> int: ...
    def uro_group_remove(self, shared: UroShared, group: UroGroup, /) -> int: ...
    def uro_group_state(self, group: UroGroup, /) -> int: ...
    def uro_plan_begin(self, group: UroGroup, /) -> int: ...
    def uro_plan_commit(self, group: UroGroup, slot: int, /) -> int: ...
    def uro_ring_read(self, shared: UroShared, seq: int, out: UroEvent, /) -> int: ...
    def uro_ring_head(self, shared: UroShared, /) -> int: ...
    def uro_state(self, shared: UroShared, /) -> int: ...
    def uro_watcher_start(self, w: UroWatcher, /) -> int: ...
    def uro_watcher_stop(self, w: UroWatcher, /) -> int: ...
    def uro_dying_close(self, group: UroGroup, /) -> int: ...
    def uro_run_episode(self, shared: UroShared, group: UroGroup, src: int, count: int, /) -> int: ...

    # Keeping memory resident.
    def uro_lock_text(self, out: UroText, /) -> int: ...
    def uro_mlockall(self, flags: int, /) -> int: ...
    def uro_heap_reserve(self, bytes: int, /) -> int: ...
    def uro_stack_prefault(self, bytes: int, /) -> int: ...
    def uro_pool_init(self, pool: UroPool, size: int, lock: int, /) -> int: ...
    def uro_pool_alloc_fn(self) -> VoidPointer: ...
    def uro_pool_free_fn(self) -> VoidPointer: ...

    # The hook thread and the hold (the calls that need no GIL).
    def uro_hooks_wait(self, wake_fd: int, resume_fd: int, pause_ns: int, /) -> int: ...
    def uro_hooks_done(self, resume_fd: int, /) -> int: ...
    def uro_hooks_init(self) -> int: ...
    def uro_pauses(self) -> int: ...
    def uro_hold_init(self) -> int: ...
    def uro_holds(self) -> int: ...

ffi: FFI
lib: Lib
