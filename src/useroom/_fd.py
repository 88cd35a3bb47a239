"""One fd with exactly one owner: the base of every fd-owning object.

Pure Python, so the cgroup layer can use it without loading the native core.
"""

from __future__ import annotations

import os
import signal
import warnings
from typing import Any

__all__ = ["Fd", "OwnedFd", "can_use_pidfd"]

#: Whether this Python has pidfds (Linux 5.3, Python 3.9): os.pidfd_open
#: and signal.pidfd_send_signal. ``USEROOM_NO_PIDFD=1`` in the environment
#: turns them off, as on a kernel before 5.3: the switch a test uses to run
#: the fallback (signals by pid, each after a membership check) for real,
#: in its own process and in the handler processes it starts.
can_use_pidfd: bool = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal") and \
    os.environ.get("USEROOM_NO_PIDFD", "") != "1"


class OwnedFd:
    """``fileno``, ``closed``, an idempotent ``close`` that forgets the number
    before closing it (a number reused by another thread's ``open()`` is
    never closed twice), a ``with`` block, and a ``ResourceWarning`` if
    dropped open. Subclasses set ``self._fd`` in their constructor."""

    __slots__ = ("_fd", "__weakref__")

    _fd: int

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run (or before the fd was set)."""
        return getattr(self, "_fd", -1) < 0

    def fileno(self) -> int:
        """The fd; raises ValueError once closed."""
        if self.closed:
            raise ValueError(f"{self!r} is closed")
        return self._fd

    def __repr__(self) -> str:
        fd = getattr(self, "_fd", -1)
        return f"<{type(self).__name__} {'closed' if fd < 0 else f'fd={fd}'}>"

    def close(self) -> None:
        """Close the fd; safe to call again."""
        fd, self._fd = getattr(self, "_fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not self.closed:
            try:
                warnings.warn(f"unclosed {type(self).__name__}: {self!r}", ResourceWarning, source=self,
                              stacklevel=1)
            finally:
                self.close()


class Fd(OwnedFd):
    """A plain fd (a control file, a cgroup.procs file ...) and its one owner."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
