"""The one watchdog process of a supervisor, and the groups it guards."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from useroom.cgroup import Group
from useroom.exceptions import WatcherError
from useroom.handler.group import GroupHandler
from useroom.handler.host import ProcessOptions
from useroom.handler.link import KillCause, WatchdogLink
from useroom.watchdog.protocol import Takeover

__all__ = ["LOOK_INTERVAL", "LOOK_SLACK", "Guardian"]

#: How often the manager looks at the watchdog process while it may have to
#: act (see :meth:`Guardian.look`), in seconds.
LOOK_INTERVAL: Final = 0.05
#: How long after the delay from the last episode the manager goes on
#: looking, in seconds: the watchdog's takeover, and its report, take that.
LOOK_SLACK: Final = 1.0


class Guardian:
    """The one watchdog process of a supervisor: started with the groups
    that need it, told of groups added and removed, restarted if it dies;
    if it cannot be, each group it guarded is guarded without it
    (:meth:`GroupHandler.watchdog_lost`).

    ``place`` is where the watchdog runs (None: this process's group);
    ``watcher_tid`` and ``manager_tid`` are the supervisor's threads it
    watches; ``protect`` is called with the pid of each watchdog spawned
    (never a victim), ``note`` with an error survived, ``changed`` once the
    watchdog runs (its socket and pidfd are new), ``stopped`` (from a thread
    of its own) when the watchdog process stops: the manager must then wake
    and :meth:`look`, idle or not.
    """

    def __init__(
        self,
        place: Group | None,
        options: ProcessOptions,
        *,
        watcher_tid: int,
        manager_tid: int,
        protect: Callable[[int], None],
        note: Callable[[BaseException], None],
        changed: Callable[[], None],
        stopped: Callable[[], None] | None = None,
    ) -> None:
        self._protect_pid = protect
        self._note = note
        self._changed = changed
        self._guarded: dict[GroupHandler, None] = {}  # in the order they were added
        self._delay = options.delay
        self._look_until = 0.0  # time.monotonic() until which the watchdog may have to act
        self._looked = 0.0  # time.monotonic() of the last look
        self.link: WatchdogLink | None = WatchdogLink(
            place, delay=options.delay,
            handler_tids=[t for t in (watcher_tid,) if t],
            helper_tids=[t for t in (manager_tid,) if t],
            heartbeat_timeout=options.heartbeat_timeout, log=options.watchdog_log,
            spawned=protect, stopped=stopped,
        )

    def add(self, handler: GroupHandler) -> None:
        if self.link is not None:
            arming = handler.arming
            self.link.add(handler.group, limit=arming.limit, kill_enabled=arming.kill_enabled, saved=arming.saved)
            self._guarded[handler] = None

    def remove(self, handler: GroupHandler) -> None:
        if self.link is not None and handler in self._guarded:
            self.link.remove(handler.group)
            del self._guarded[handler]

    def guards(self, handler: GroupHandler) -> bool:
        """Whether the watchdog guards the group of ``handler``."""
        return handler in self._guarded

    def set_limit(self, handler: GroupHandler, limit: int) -> None:
        if self.link is not None and handler in self._guarded:
            self.link.set_limit(handler.group, limit)

    def start(self) -> None:
        assert self.link is not None
        self.link.start()
        self._protect()
        self._changed()

    def _protect(self) -> None:
        link = self.link
        if link is not None and link.pid is not None:
            self._protect_pid(link.pid)

    def beat(self) -> None:
        if self.link is not None:
            self.link.beat()

    def look(self, now: float, *, episode: bool) -> None:
        """Look at the watchdog process: one that is stopped (SIGSTOP, a
        debugger) can hand no episode to the kernel, so it is killed, and
        its pidfd has the manager start another (:meth:`restart`) that
        guards every group, an OOM under way included.

        The manager looks whenever it wakes for something (``episode``: for
        a watcher's record), and from an episode until the delay and
        :data:`LOOK_SLACK` have passed, every :data:`LOOK_INTERVAL`
        (:meth:`due`): the span in which the watchdog may have to act. A
        watchdog that stops while nothing else happens wakes it through
        ``stopped`` (:class:`~useroom.handler.stops.StopSentry`)."""
        link = self.link
        if link is None:
            return
        if episode:
            self._look_until = now + self._delay + LOOK_SLACK
        self._looked = now
        if link.stopped():
            pid = link.pid
            link.kill(KillCause.STOPPED, "it was stopped (SIGSTOP or a debugger) while it guarded the groups")
            err = WatcherError(f"the watchdog (pid {pid}) was stopped (SIGSTOP or a debugger): it could hand no "
                               "episode to the kernel; it was killed and another is started")
            self._note(err)
            for handler in self._guarded:
                handler.watchdog_replaced(err)

    def due(self) -> float:
        """When (time.monotonic()) the manager must look at the watchdog
        even if nothing wakes it; inf if never."""
        if self.link is None or self._looked >= self._look_until:
            return float("inf")
        return min(self._looked + LOOK_INTERVAL, self._look_until)

    def send(self, message: bytes) -> None:
        if self.link is not None:
            self.link.send(message)

    def receive(self) -> list[Takeover]:
        return self.link.receive() if self.link is not None else []

    def restart(self) -> None:
        """The watchdog died: start it again, or guard each group without it."""
        link = self.link
        if link is None:
            return
        link.reap()
        try:
            link.start()
            link.restarts += 1
            link.history.append({"event": "watchdog-restarted", "pid": link.pid, "at_ns": time.monotonic_ns()})
            self._protect()
        except Exception as err:  # noqa: BLE001 - a restart that fails: recorded, the groups are guarded without it
            self._note(err)
            # The groups are guarded without it first (v1: the kernel killer
            # back on); only then does `watchdog` say there is none.
            lost, self._guarded = list(self._guarded), {}
            for handler in lost:
                handler.watchdog_lost(err)
            self.link = None

    def stop(self) -> list[Takeover]:
        link, self.link = self.link, None
        if link is None:
            return []
        takeovers = link.receive()
        link.stop()
        return takeovers
