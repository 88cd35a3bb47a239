"""The compiled core, the package's only importer of ``_core``.

Two ways in: :data:`lib` (cffi), which releases the GIL around every call,
and :data:`HELD`, a ctypes handle on the same loaded module that keeps it.
Every C function returns ``>= 0`` or ``-errno``; :func:`check` turns the
latter into the matching :class:`OSError` subclass with the function named.

The cdata types of ``_core.pyi`` are re-exported here for annotations only
(under ``TYPE_CHECKING``: they do not exist at run time).
"""

from __future__ import annotations

import ctypes
import os
from typing import TYPE_CHECKING, Protocol

from useroom.native import _core
from useroom.native._core import ffi, lib

if TYPE_CHECKING:
    from useroom.native._core import UroEvent as UroEvent
    from useroom.native._core import UroPlan as UroPlan
    from useroom.native._core import UroPool as UroPool
    from useroom.native._core import UroShared as UroShared
    from useroom.native._core import VoidPointer as VoidPointer

__all__ = ["CORE_FILE", "HELD", "check", "ffi", "lib", "valid_fd"]

#: The compiled core's file.
CORE_FILE: str = str(_core.__file__)


def check(ret: int, syscall: str) -> int:
    """``ret`` if it is ``>= 0``; else raises the OSError of ``-ret``, naming ``syscall``."""
    if ret < 0:
        err = -ret
        raise OSError(err, f"{syscall}: {os.strerror(err)}")
    return ret


def valid_fd(fd: int) -> int:
    """``fd`` if it can name an open file; ValueError if not (fd 0 can)."""
    if not isinstance(fd, int) or fd < 0:
        raise ValueError(f"not a valid fd: {fd!r}")
    return fd


class _Held(Protocol):
    """The functions called through :data:`HELD`, as :func:`_open_held`
    declares them to ctypes (which turns each result into an ``int``)."""

    def uro_heap_trim(self, keep: int, /) -> int: ...

    def uro_hold_begin(self, release_fd: int, deadline_ns: int, stall_ns: int,
                       exempt: ctypes.Array[ctypes.c_uint64], nexempt: int, /) -> int: ...

    def uro_hold_end(self, release_fd: int, /) -> int: ...

    def uro_hold_arm(self, release_fd: int, stall_ns: int, exempt: ctypes.Array[ctypes.c_uint64],
                     nexempt: int, /) -> int: ...

    def uro_hold_disarm(self) -> int: ...

    def uro_hold_reset(self) -> int: ...

    def uro_hooks_next(self, reply_fd: int, reply: int, hold_fd: int, wake_fd: int, resume_fd: int,
                       pause_ns: int, /) -> int: ...


def _open_held() -> ctypes.PyDLL:
    dll = ctypes.PyDLL(CORE_FILE)
    dll.uro_heap_trim.argtypes = [ctypes.c_size_t]
    dll.uro_heap_trim.restype = ctypes.c_int
    dll.uro_hold_begin.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                   ctypes.POINTER(ctypes.c_uint64), ctypes.c_int]
    dll.uro_hold_begin.restype = ctypes.c_int
    dll.uro_hold_end.argtypes = [ctypes.c_int]
    dll.uro_hold_end.restype = ctypes.c_int
    dll.uro_hold_arm.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.POINTER(ctypes.c_uint64), ctypes.c_int]
    dll.uro_hold_arm.restype = ctypes.c_int
    dll.uro_hold_disarm.argtypes = []
    dll.uro_hold_disarm.restype = ctypes.c_int
    dll.uro_hold_reset.argtypes = []
    dll.uro_hold_reset.restype = ctypes.c_int
    dll.uro_hooks_next.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_int64]
    dll.uro_hooks_next.restype = ctypes.c_int64
    return dll


# cffi releases the GIL around every call. Some functions must run with it
# held (the hold walks the thread states; a trim must not let other Python
# threads refill the heap): they are called through a ctypes.PyDLL handle on
# the same loaded module, which keeps the GIL. Opening it finds the module
# already loaded and runs nothing in the core; doing it here spares the
# first trim, on the OOM path, the allocations it makes.
HELD: _Held = _open_held()
