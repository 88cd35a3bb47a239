"""Where a supervisor's own threads and watchdog go when this process is
inside a group it handles."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence

from useroom.cgroup import Group
from useroom.exceptions import UseroomError
from useroom.handler.group import GroupHandler
from useroom.handler.history import Recent

__all__ = ["Placement", "watchdog_home"]

logger = logging.getLogger(__name__)


def watchdog_home(handlers: Iterable[GroupHandler], chosen: Group | None) -> Group | None:
    """Where the watchdog of ``handlers`` runs, and where the threads'
    kernel allocations are charged: ``chosen`` (the ``watchdog_group``
    option) if given, else the parent of the first handled group this
    process is inside, else None: this process's group, which a watchdog
    spawned from here inherits without a move. (A move into it, even a
    no-op one, needs write access to its ``cgroup.procs``, which a plain user
    handling their delegated groups from beside them seldom has: a login
    session's scope is root's.)"""
    if chosen is not None:
        return chosen
    for handler in handlers:
        if handler.inside():
            parent = handler.group.parent
            if parent is None:
                raise UseroomError(f"this process is inside {handler.group.relpath}, which has no parent "
                                   "group for the watchdog: pass watchdog_group=")
            return parent
    return None


class Placement:
    """cgroup v1, with this process inside a handled group: the watcher's
    and the manager's kernel allocations are charged to the watchdog's group
    instead, so that the files they open during an episode (``/proc``,
    ``cgroup.procs``, pidfds) do not fail with ENOMEM at the group's limit.
    Their pages stay charged to the process's group. Threads started later
    inherit the placement; :meth:`unplace` moves them all back. Skipped, with
    the reason in the supervisor's ``errors``, if the ``tasks`` file refuses it.
    Only a backend that moves one thread apart from its process
    (``Group.moves_threads``) is placed."""

    def __init__(self, chosen: Group | None) -> None:
        self._chosen = chosen
        self.place: Group | None = None
        self._home: Group | None = None

    def place_for(self, handlers: Sequence[GroupHandler], tids: list[int], errors: Recent[BaseException]) -> None:
        """Places the threads ``tids``, and the hook threads of ``handlers``,
        if this process is inside one of their groups."""
        inside = [h for h in handlers if h.group.moves_threads and h.inside()]
        if not inside:
            return
        home = Group.current()
        try:
            place = watchdog_home(inside, self._chosen) or home  # never None: inside is not empty
            self.place, self._home = place, home
            # The hook threads of hooks registered before start were started
            # by the handler, not the manager: they are moved too.
            for tid in [*tids, *(h.hook_tid for h in handlers)]:
                if tid:
                    place.attach_thread(tid)
        except (OSError, UseroomError) as err:
            errors.append(err)
            logger.warning("the handler's threads stay in %s: their kernel allocations are charged to it (%s)",
                           home.relpath, err, extra={"cause": "threads_not_placed", "group": home.relpath})
            self.unplace()
            return
        for handler in handlers:
            handler.kernel_memory_group = place

    def place_handler(self, handler: GroupHandler) -> None:
        handler.kernel_memory_group = self.place

    def unplace(self) -> None:
        place, home = self.place, self._home
        self.place = self._home = None
        if place is None or home is None:
            return
        for name in os.listdir("/proc/self/task"):
            try:
                if Group.of_thread(int(name)).relpath == place.relpath:
                    home.attach_thread(int(name))
            except (OSError, UseroomError):
                pass  # the thread ended
