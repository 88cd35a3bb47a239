"""Notifiers: what every backend's notifications offer (:class:`Notifier`),
and the v1 one, an eventfd registered on a control file."""

from __future__ import annotations

import abc
import os
import select
import sys
import warnings
from typing import ClassVar, Protocol, runtime_checkable

from useroom._fd import Fd

__all__ = ["EventRegistration", "Notifier", "OomCounter"]


@runtime_checkable
class Notifier(Protocol):
    """A group's notification, as every backend gives it: an fd that
    becomes readable (v1: an eventfd, ``POLLIN``) or signals a change (v2:
    a control file, ``POLLPRI``), for ``select``/``epoll`` or the native
    watcher; what a notification carries is the backend's own (a count on
    v1, the file's new text on v2)."""

    @property
    def closed(self) -> bool: ...

    def fileno(self) -> int: ...

    def close(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until it has fired, without consuming it; False if *timeout* passes first."""
        ...


class EventRegistration:
    """An eventfd the kernel signals on a cgroup event, and the control file it watches.

    It owns two fds (both close-on-exec): the eventfd (:meth:`fileno`, for
    ``select``/``epoll`` or the native watcher) and the control file the
    event was registered on. Close it with :meth:`close` or a ``with`` block;
    dropping it open warns with ``ResourceWarning``.

    Kernel behaviour a reader must know (cgroup v1, measured on Linux 6.18):

    - each event adds 1 to the eventfd counter; :meth:`read` returns and
      resets it;
    - the event is unregistered when the eventfd is released, that is when
      its last fd is closed: an fd duplicated into native code keeps it alive;
    - removing the group signals the eventfd once (asynchronously, a few ms
      after ``rmdir``), so a wakeup does not prove an OOM: check
      :meth:`Group.oom_control`, which raises :class:`GroupGone` then.

    The eventfd is blocking; :meth:`read` and :meth:`wait` poll it first, so
    use one reader at a time.
    """

    __slots__ = ("_eventfd", "_control", "description", "__weakref__")

    def __init__(self, eventfd: int, control_fd: int, description: str) -> None:
        # Each fd has one owner: closing the eventfd unregisters the event
        # (its last reference), closing the control file ends the watch.
        self._eventfd = Fd(eventfd)
        self._control = Fd(control_fd)
        #: What is watched, e.g. ``"OOM of /a/b"``.
        self.description = description

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._eventfd.fileno()}"
        return f"<EventRegistration {self.description} {state}>"

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has run."""
        return self._eventfd.closed

    def fileno(self) -> int:
        """The eventfd; raises ValueError once closed."""
        if self._eventfd.closed:
            raise ValueError(f"{self!r} is closed")
        return self._eventfd.fileno()

    @property
    def control_fd(self) -> int:
        """The fd of the watched control file (owned by the registration); raises ValueError once closed."""
        if self._control.closed:
            raise ValueError(f"{self!r} is closed")
        return self._control.fileno()

    def close(self) -> None:
        """Close both fds (unregistering the event); safe to call again."""
        self._eventfd.close()
        self._control.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the event has fired (the counter is non-zero), without consuming it.

        Returns False if *timeout* seconds (None: forever) pass first.
        """
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN)
        # poll() retries EINTR itself, with the timeout recomputed (PEP 475).
        return bool(poller.poll(None if timeout is None else max(0, round(timeout * 1000))))

    def read(self, timeout: float | None = None) -> int:
        """Return how many times the event fired since the last read, and reset the count.

        Blocks until it fires at least once; raises TimeoutError if *timeout*
        seconds pass first.
        """
        if not self.wait(timeout):
            raise TimeoutError(f"{self.description}: no event within {timeout} s")
        return int.from_bytes(os.read(self.fileno(), 8), sys.byteorder)

    def __enter__(self) -> EventRegistration:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        eventfd = getattr(self, "_eventfd", None)
        if eventfd is not None and not eventfd.closed:
            try:
                warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self, stacklevel=1)
            finally:
                self.close()


class OomCounter(abc.ABC):
    """How many OOMs a group has had since the counter was made (:meth:`Group.oom_counter`).

    Poll :meth:`fileno` for :attr:`poll_events`; once it is ready,
    :meth:`update` reads what changed and returns :attr:`count`. What
    counts as one OOM is the kernel's notion: a notification on v1, the
    ``oom`` field of ``memory.events`` on v2 (see the backends). It owns its
    notifier: close it with :meth:`close` or a ``with`` block.
    """

    #: The poll(2) events of :meth:`fileno` that say the count may have changed.
    poll_events: ClassVar[int]

    def __init__(self) -> None:
        #: The group's OOMs since the counter was made, as of the last :meth:`update`.
        self.count = 0

    @abc.abstractmethod
    def fileno(self) -> int:
        """The fd to poll for :attr:`poll_events`; raises ValueError once closed."""

    @abc.abstractmethod
    def update(self) -> int:
        """Read what changed since the last update and return :attr:`count`.

        Call it once :meth:`fileno` polled ready: it does not wait, and
        raises TimeoutError if nothing changed.
        """

    @abc.abstractmethod
    def close(self) -> None:
        """Close the notifier; safe to call again."""

    def __enter__(self) -> OomCounter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
