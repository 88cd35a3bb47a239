"""Keeping the memory the OOM path needs resident: the core's own pages,
the heap, the stack, and pymalloc's arenas.

Each is set up ahead of time, outside the OOM path; each reports what it
got, because a refused lock (RLIMIT_MEMLOCK, no CAP_IPC_LOCK) is a result to
report, not an error.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import attrs

from useroom.native._lib import CORE_FILE, HELD, check, ffi, lib

if TYPE_CHECKING:
    from useroom.native._lib import UroPool

__all__ = [
    "CoreLock",
    "PoolReport",
    "core_path",
    "heap_reserve",
    "heap_trim",
    "install_arena_pool",
    "lock_core",
    "mlockall",
    "pool_report",
    "stack_prefault",
]


def core_path() -> str:
    """The compiled core's file: the image :func:`lock_core` locks."""
    return CORE_FILE


@attrs.frozen
class CoreLock:
    """The native core's own pages: how many, how many locked, and why not."""

    image_size: int
    locked: int
    lock_errno: int
    critical_code_size: int


def lock_core() -> CoreLock:
    """mlocks the native core's code, constants and data; reports the result."""
    text = ffi.new("struct uro_text *")
    check(lib.uro_lock_text(text), "mlock")
    return CoreLock(int(text.image_size), int(text.locked), int(text.lock_errno), int(text.crit_size))


def mlockall(*, future: bool) -> int:
    """mlockall(MCL_CURRENT [| MCL_FUTURE]); returns 0 or the errno that refused it."""
    flags = lib.URO_MCL_CURRENT | (lib.URO_MCL_FUTURE if future else 0)
    return -int(lib.uro_mlockall(flags))


def heap_reserve(nbytes: int) -> None:
    """Stops glibc trimming the heap or using fresh mmaps, then grows and
    touches the heap by ``nbytes`` so later allocations reuse resident pages."""
    check(lib.uro_heap_reserve(nbytes), "mallopt")


def heap_trim(keep: int = 0) -> bool:
    """Returns the heap's free pages, in every malloc arena, to the kernel
    but the top ``keep`` bytes of the main heap; True if any were returned.
    Runs with the GIL held: no other Python thread allocates meanwhile."""
    return bool(HELD.uro_heap_trim(keep))


def stack_prefault(nbytes: int) -> None:
    """Touches ``nbytes`` of the calling thread's stack."""
    check(lib.uro_stack_prefault(nbytes), "stack_prefault")


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


_pool: UroPool | None = None


def install_arena_pool(nbytes: int, *, lock: bool) -> PoolReport:
    """Serves pymalloc's arenas from a prefaulted (and, if ``lock``, locked)
    pool of ``nbytes``. Once per process: the pool stays installed, because
    arenas it handed out are freed through whichever allocator is current."""
    global _pool
    if _pool is None:
        pool = ffi.new("struct uro_pool *")
        check(lib.uro_pool_init(pool, nbytes, int(lock)), "mmap")
        allocator = _ArenaAllocator(
            int(ffi.cast("uintptr_t", pool)),
            int(ffi.cast("uintptr_t", lib.uro_pool_alloc_fn())),
            int(ffi.cast("uintptr_t", lib.uro_pool_free_fn())),
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
