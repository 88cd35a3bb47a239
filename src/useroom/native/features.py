"""What this kernel and this build of the core can do.

Each answer is worked out at its first call and kept, never at import: an
import of useroom makes no system call to find out. Tests patch these
functions (``monkeypatch.setattr(native, "can_use_mrelease", lambda: False)``)
to exercise the fallback paths; callers look them up at each use.
"""

from __future__ import annotations

import errno
import functools

from useroom.native._lib import lib

__all__ = ["can_use_mrelease", "raw_syscalls"]


@functools.cache
def can_use_mrelease() -> bool:
    """Whether process_mrelease(2) exists (Linux 5.15)."""
    # An invalid fd gives EBADF where the syscall exists, ENOSYS where not.
    return bool(lib.uro_mrelease(-1) != -errno.ENOSYS)


def raw_syscalls() -> bool:
    """True if the critical path makes raw system calls (no libc)."""
    return bool(lib.uro_raw_syscalls())
