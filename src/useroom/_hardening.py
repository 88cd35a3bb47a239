"""Memory hardening: make the pages an OOM handler needs exist before the OOM.

During a memory cgroup OOM, a task of the group that touches a page that is
not resident sleeps until the OOM is resolved. What can go missing:

- anonymous pages never touched yet (a fresh heap block, a grown stack, a new
  pymalloc arena): prefaulting them makes them resident, and with no swap the
  kernel cannot take them back; mlock also keeps them with swap;
- file pages (the text of libc, libpython, the native core): the kernel
  reclaims them before it declares the OOM, so only mlock keeps them.

``mlockall`` would cover everything, but for an ordinary user RLIMIT_MEMLOCK
(8 MiB by default) is far below a CPython process, and where it is allowed,
MCL_FUTURE populates every later mapping and every thread's whole stack,
charging it all to the group it protects. So useroom locks the critical set
(the native core's image, the watcher's state, ring and stack, a pymalloc
arena pool) and prefaults the rest; ``mlockall`` is opt-in. The report says
exactly what was locked and why not the rest.

Fitting in RLIMIT_MEMLOCK: without CAP_IPC_LOCK, mlock fails with ENOMEM
once the process's locked pages (``VmLck``) would pass the soft limit. The
native core and the watchers' arenas are what the first response runs on;
the arena pool only keeps pymalloc's arenas resident. So the pool is locked
only if it fits with room left for one watcher arena
(:func:`useroom.native.watcher_arena_size`), and is otherwise prefaulted
without a lock. With the defaults the whole set is about 2.3 MiB (measured
by ``useroom doctor``).
"""

from __future__ import annotations

import errno
import gc
import os
import resource
import sys
import threading

import attrs

from useroom import native
from useroom._units import format_size, parse_size
from useroom.exceptions import MemoryLockError

__all__ = ["HardeningReport", "lock_memory", "release_memory", "vm_locked"]

DEFAULT_HEAP = 8 << 20
DEFAULT_STACK = 256 << 10
DEFAULT_POOL = 2 << 20


def _memlock_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return -1 if soft == resource.RLIM_INFINITY else soft


def _memlock_hard_limit() -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return -1 if hard == resource.RLIM_INFINITY else hard


#: The kernel rule behind every refusal to lock (mlock(2), ENOMEM or EPERM).
MEMLOCK_RULE = (
    "mlock(2): without CAP_IPC_LOCK a process may lock at most its soft RLIMIT_MEMLOCK, "
    "counted over all its locked pages (VmLck)"
)


def memlock_refusal(what: str, requested: int, *, err: int = errno.ENOMEM) -> MemoryLockError:
    """The error for locking *requested* more bytes of *what* than RLIMIT_MEMLOCK leaves (0: the whole process)."""
    limit, hard, locked = _memlock_limit(), _memlock_hard_limit(), vm_locked()
    shown = "unlimited" if limit < 0 else format_size(limit)
    size = f"{format_size(requested)} of " if requested else ""
    message = f"cannot lock {size}{what}: RLIMIT_MEMLOCK is {shown} and {format_size(locked)} is locked already"
    return MemoryLockError(
        err, message, what=what, requested=requested, limit=limit, locked=locked,
        rule=MEMLOCK_RULE, advice=memlock_advice(locked + requested if requested else 0, limit, hard),
    )


def memlock_advice(needed: int, limit: int, hard: int) -> str:
    """What an administrator could grant so that *needed* bytes (0: the whole process) can be locked."""
    if needed:
        kib = -(-needed // 1024)
        amount = (f"to at least {format_size(needed)} (pam_limits: '<user> - memlock {kib}' in "
                  f"/etc/security/limits.conf; systemd: LimitMEMLOCK={kib}K)")
    else:
        amount = "to 'unlimited' (pam_limits: '<user> - memlock unlimited'; systemd: LimitMEMLOCK=infinity)"
    advice = f"an administrator could raise the user's RLIMIT_MEMLOCK {amount}, or grant CAP_IPC_LOCK"
    if needed and limit >= 0 and (hard < 0 or hard >= needed) and hard != limit:
        advice += f"; the hard limit allows it already: raise the soft limit yourself (ulimit -l {kib})"
    return advice


def _has_swap() -> bool:
    try:
        with open("/proc/swaps", encoding="ascii") as f:
            return len(f.read().splitlines()) > 1
    except OSError:
        return True  # unknown: assume the worse case


def vm_locked() -> int:
    """VmLck of this process in bytes (what the kernel counts against the rlimit)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmLck:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _free_threaded() -> bool:
    is_gil_enabled = getattr(sys, "_is_gil_enabled", None)
    return is_gil_enabled is not None and not is_gil_enabled()


@attrs.frozen
class HardeningReport:
    """What :func:`lock_memory` did, and why not more.

    ``locked_bytes`` is the process's locked memory as the kernel counts it
    against RLIMIT_MEMLOCK (``VmLck``), taken after hardening; native
    watchers started later add their arena and are reported by the handler.
    """

    mlockall: bool
    mlockall_errno: int
    memlock_limit: int
    locked_bytes: int
    core: native.CoreLock
    heap_reserved: int
    stack_prefaulted: int
    pool: native.PoolReport | None
    gc_frozen: bool
    swap: bool
    #: False where the critical path goes through libc's syscall() (not x86-64 or arm64).
    raw_syscalls: bool
    notes: tuple[str, ...]

    def describe(self) -> str:
        """A few human-readable lines."""
        limit = "unlimited" if self.memlock_limit < 0 else f"{self.memlock_limit} bytes"
        lines = [
            f"locked {self.locked_bytes} bytes (RLIMIT_MEMLOCK {limit})",
            f"mlockall: {'yes' if self.mlockall else 'no'}",
            f"native core: {self.core.locked} of {self.core.image_size} bytes locked",
            f"heap prefaulted: {self.heap_reserved} bytes; stack: {self.stack_prefaulted} bytes",
        ]
        if self.pool:
            lines.append(f"pymalloc arena pool: {self.pool.size} bytes, {self.pool.locked} locked")
        lines.extend(self.notes)
        return "\n".join(lines)


_lock = threading.Lock()
_done: HardeningReport | None = None


def lock_memory(
    *,
    mlockall: bool = False,
    heap: int | str = DEFAULT_HEAP,
    stack: int | str = DEFAULT_STACK,
    pool: int | str = DEFAULT_POOL,
    freeze_gc: bool = True,
    strict: bool = False,
) -> HardeningReport:
    """Hardens this process for running an OOM handler; idempotent.

    Locks the native core, prefaults ``heap`` bytes of glibc heap (and stops
    glibc trimming it), ``stack`` bytes of the calling thread's stack, and a
    pool of ``pool`` bytes that pymalloc takes its arenas from (locked when
    RLIMIT_MEMLOCK allows), then freezes the garbage collector's current
    objects. With ``mlockall=True`` it also tries ``mlockall(MCL_CURRENT |
    MCL_FUTURE)`` and reports a refusal instead of raising.

    The pool is locked only if it fits in RLIMIT_MEMLOCK with room left for
    a watcher's arena. With ``strict=True`` a refusal (mlockall, or a pool
    that does not fit) raises :class:`~useroom.MemoryLockError` instead,
    naming the rule and what an administrator could grant; a pool that does
    not fit is refused before anything is changed.
    """
    global _done
    with _lock:
        if _done is not None and not (mlockall and not _done.mlockall):
            return _done
        notes: list[str] = []
        limit = _memlock_limit()
        heap_bytes = parse_size(heap)
        stack_bytes = parse_size(stack)
        pool_bytes = parse_size(pool)
        wanted = pool_bytes + native.watcher_arena_size()
        if strict and pool_bytes and not _free_threaded() and native.pool_report() is None and not _fits(wanted, limit):
            raise memlock_refusal("the pymalloc arena pool and a watcher's arena", wanted)

        ok, err = False, 0
        if mlockall:
            err = native.mlockall(future=True)
            ok = err == 0
            if not ok:
                refusal = memlock_refusal("the whole process (mlockall)", 0, err=err)
                if strict:
                    raise refusal
                notes.append(
                    f"mlockall refused ({errno.errorcode.get(err, err)}): {refusal.strerror}; locked the "
                    f"critical set instead. Rule: {refusal.rule}. To allow it: {refusal.advice}"
                )
        core = native.lock_core()
        if core.lock_errno:
            notes.append(f"native core not fully locked: {os.strerror(core.lock_errno)}")

        native.heap_reserve(heap_bytes)
        native.stack_prefault(stack_bytes)

        pool_report = None
        if pool_bytes and _free_threaded():
            notes.append("no pymalloc arena pool: free-threaded builds do not use pymalloc arenas")
        elif pool_bytes:
            # Checked again: locking the core used some of the limit.
            fits = _fits(wanted, limit)
            if strict and not fits and native.pool_report() is None:
                raise memlock_refusal("the pymalloc arena pool and a watcher's arena", wanted)
            pool_report = native.install_arena_pool(pool_bytes, lock=fits)
            if pool_report.lock_errno or not fits:
                refusal = memlock_refusal("the pymalloc arena pool and a watcher's arena", wanted)
                notes.append(
                    f"pymalloc arena pool prefaulted but not locked: RLIMIT_MEMLOCK too small to lock it and "
                    f"leave room for a watcher ({refusal.strerror}). To allow it: {refusal.advice}"
                )

        if freeze_gc:
            gc.collect()
            gc.freeze()

        raw = native.raw_syscalls()
        if not raw:
            notes.append("this architecture's critical path calls libc's syscall(), whose page is not locked")
        swap = _has_swap()
        if swap and not ok:
            notes.append("swap is on: unlocked prefaulted pages can be swapped out")
        _done = HardeningReport(
            mlockall=ok, mlockall_errno=err, memlock_limit=limit, locked_bytes=vm_locked(),
            core=core, heap_reserved=heap_bytes, stack_prefaulted=stack_bytes,
            pool=pool_report, gc_frozen=freeze_gc, swap=swap, raw_syscalls=raw, notes=tuple(notes),
        )
        return _done


def _fits(nbytes: int, limit: int) -> bool:
    """Whether *nbytes* more can be locked now, on top of what is locked already."""
    return limit < 0 or vm_locked() + nbytes <= limit or _can_lock_beyond_limit()


def _can_lock_beyond_limit() -> bool:
    """True if this process has CAP_IPC_LOCK (effective)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) & (1 << 14))
    except OSError:
        pass
    return False


def release_memory() -> bool:
    """Gives the memory this process freed back to the kernel: trims every
    malloc arena (glibc's ``malloc_trim(0)``) with the GIL held, so that no
    other Python thread refills the heap meanwhile. Freed memory otherwise
    stays in the process, charged to its group: glibc keeps freed chunks
    for reuse, and useroom's hardening stops it trimming on its own.

    The hook thread calls it after each ``on_oom`` hook; a worker process a
    hook tells to shed calls it after dropping what it holds. Returns True
    if memory was released. With another allocator (jemalloc, tcmalloc
    preloaded) it releases nothing: use that allocator's own purge.
    """
    return native.heap_trim()
