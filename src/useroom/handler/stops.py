"""Hears that the watchdog process was stopped, without waking to look.

A stopped watchdog (SIGSTOP) hands no episode to the kernel, and
nothing it holds tells the handler so: its pidfd becomes readable only at
its exit, its socket only when it writes. Reading its state in
``/proc/PID/stat`` finds it, but only when the handler looks, and an idle
handler wakes for nothing (the supervisor's promise: no wake-up at all
while nothing changes).

The kernel does tell one process: the parent. A child that stops is
reported to ``waitid(..., WSTOPPED)``, in any thread of the parent (a
thread may wait for the children of its whole thread group), and the
handler is the watchdog's parent. So one thread sleeps in ``waitid`` on
the watchdog's pidfd (``P_PIDFD``, Linux 5.4; a pid otherwise, safe here
because only a child of this process can match it) and wakes the manager
when the watchdog stops; the manager's look then kills it and starts
another. The thread costs no wake-up while the watchdog runs. (A
debugger's stop is reported to the debugger, not to the parent: that one
is found by the manager's next look.)

It must not take what :mod:`subprocess` waits for: the exit is only
peeked at (``WNOWAIT`` leaves the zombie for ``Popen.wait``), and each
stop report is consumed with a second, non-blocking ``waitid`` that asks
for stops alone (``Popen`` never asks for those), so the next ``waitid``
sleeps until the next stop rather than returning the same one again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from useroom._fd import OwnedFd
from useroom._limits import spawning

__all__ = ["StopSentry"]

#: How long the end of a watchdog waits for its sentry's thread, in seconds.
#: The thread has ended already (the watchdog's exit woke it) or ends at
#: once; the bound only keeps a caller from hanging on a thread that cannot run.
JOIN_TIMEOUT = 2.0


class _WaitFd(OwnedFd):
    """The sentry's own copy of the watchdog's pidfd (close-on-exec)."""

    __slots__ = ()

    def __init__(self, pidfd: int) -> None:
        self._fd = os.dup(pidfd)


class StopSentry:
    """A thread asleep in ``waitid`` on one child process: ``stopped`` is
    called (from that thread) each time the child stops. It ends when the
    child exits or is reaped; :meth:`close` waits for that and closes its fd.

    ``pid`` is the child's, ``pidfd`` a pidfd of it (or None: the pid is
    used); the sentry keeps its own copy of the fd.
    """

    def __init__(self, pid: int, pidfd: int | None, stopped: Callable[[], None]) -> None:
        self.pid = pid
        self.stops = 0  #: stops reported so far
        self._stopped = stopped
        use_fd = pidfd is not None and hasattr(os, "P_PIDFD")
        self._fd = _WaitFd(pidfd) if use_fd and pidfd is not None else None
        self._thread = threading.Thread(target=self._run, name="useroom-watchdog-stops", daemon=True)
        try:
            with spawning("the watchdog's stop sentry thread"):
                self._thread.start()
        except BaseException:
            if self._fd is not None:
                self._fd.close()
            raise

    def _target(self) -> tuple[int, int]:
        if self._fd is not None:
            return os.P_PIDFD, self._fd.fileno()
        return os.P_PID, self.pid

    def _run(self) -> None:
        kind, ident = self._target()
        while True:
            try:
                # Sleeps until the child stops or exits; the exit stays for Popen.
                info = os.waitid(kind, ident, os.WSTOPPED | os.WEXITED | os.WNOWAIT)
            except ChildProcessError:
                return  # reaped already
            except InterruptedError:
                continue
            if info is None or info.si_code != os.CLD_STOPPED:
                return  # it exited (or was killed): the pidfd tells the manager
            try:
                # Consume this stop, and only a stop: the next waitid then
                # sleeps until the next one.
                os.waitid(kind, ident, os.WSTOPPED | os.WNOHANG)
            except ChildProcessError:
                return
            self.stops += 1
            self._stopped()

    def close(self) -> None:
        """After the child exited (or was killed): wait for the thread to
        end, then close the fd it waited on."""
        self._thread.join(JOIN_TIMEOUT)
        if self._fd is not None and not self._thread.is_alive():
            self._fd.close()
