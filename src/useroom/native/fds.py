"""The fds the native layer opens, and the waits and system calls on fds.

Every fd-owning object here is a :class:`useroom._fd.OwnedFd`, the one fd
base class of useroom; every fd is opened close-on-exec.
"""

from __future__ import annotations

import errno

from useroom._fd import OwnedFd
from useroom.native._lib import check, ffi, lib

__all__ = ["EPOLLIN", "Epoll", "EventFd", "monotonic_ns", "mrelease", "wait_readable"]

EPOLLIN = 0x001


def monotonic_ns() -> int:
    """CLOCK_MONOTONIC in nanoseconds, the clock of every event record."""
    return check(lib.uro_monotonic_ns(), "clock_gettime")


def mrelease(pidfd: int) -> None:
    """process_mrelease(2): reap a SIGKILLed process's memory now (Linux 5.15)."""
    check(lib.uro_mrelease(pidfd), "process_mrelease")


def wait_readable(fd: int, timeout: float | None) -> bool:
    """Blocks (without the GIL) until ``fd`` is readable; False on timeout."""
    ns = -1 if timeout is None else max(0, int(timeout * 1e9))
    while True:
        ret = lib.uro_wait_readable(fd, ns)
        if ret != -errno.EINTR:
            return check(ret, "ppoll") > 0


class EventFd(OwnedFd):
    """An eventfd (close-on-exec)."""

    def __init__(self, initval: int = 0, *, nonblocking: bool = False) -> None:
        self._fd = check(lib.uro_eventfd_create(initval, int(nonblocking)), "eventfd")

    def read(self) -> int:
        """Returns and resets the counter; blocks (without the GIL) if it is 0."""
        value = ffi.new("uint64_t *")
        while True:
            ret = lib.uro_eventfd_read(self.fileno(), value)
            if ret != -errno.EINTR:
                check(ret, "read")
                return int(value[0])

    def write(self, value: int = 1) -> None:
        check(lib.uro_eventfd_write(self.fileno(), value), "write")

    def wait(self, timeout: float | None) -> bool:
        """True once the counter is non-zero, False after ``timeout`` seconds."""
        return wait_readable(self.fileno(), timeout)


class Epoll(OwnedFd):
    """An epoll set with deadline-based waits."""

    def __init__(self) -> None:
        self._fd = check(lib.uro_epoll_create(), "epoll_create1")

    def add(self, fd: int, data: int, events: int = EPOLLIN) -> None:
        check(lib.uro_epoll_add(self.fileno(), fd, events, data), "epoll_ctl")

    def remove(self, fd: int) -> None:
        check(lib.uro_epoll_del(self.fileno(), fd), "epoll_ctl")

    def wait(self, timeout: float | None, max_events: int = 16) -> list[tuple[int, int]]:
        """Returns ``(data, events)`` pairs; empty once ``timeout`` has passed.

        An interrupted wait is resumed with the time that is left.
        """
        deadline = -1 if timeout is None else monotonic_ns() + max(0, int(timeout * 1e9))
        out = ffi.new("struct uro_ready[]", max_events)
        while True:
            ret = lib.uro_epoll_wait(self.fileno(), out, max_events, deadline)
            if ret != -errno.EINTR:
                break
        n = check(ret, "epoll_wait")
        return [(int(out[i].data), int(out[i].events)) for i in range(n)]
