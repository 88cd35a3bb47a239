"""What a supervisor gives each group it serves: the process-wide options
(:class:`ProcessOptions`) and a :class:`Host`, the supervisor's side of the
boundary between them. The group's side is the section "served by a
supervisor" of :class:`~useroom.handler.group.GroupHandler`."""

from __future__ import annotations

from typing import Any, Protocol

import attrs

from useroom._units import parse_duration
from useroom.cgroup import Group
from useroom.cgroup.lineage import Relation, require_apart
from useroom.handler import validate
from useroom.handler.link import WatchdogLink
from useroom.watchdog.process import DEFAULT_DELAY

__all__ = ["Host", "ProcessOptions"]


@attrs.frozen
class ProcessOptions:
    """What a process that handles OOMs sets once, for every group it
    serves: the watchdog's ``delay`` and its other settings, and the
    hardening (see :class:`~useroom.Handler`)."""

    delay: float = attrs.field(default=DEFAULT_DELAY, converter=parse_duration)
    harden: bool = True
    mlockall: bool = False
    watchdog: bool = True
    watchdog_group: Group | None = attrs.field(default=None)
    watchdog_log: str | None = attrs.field(default=None)
    heartbeat_timeout: float = attrs.field(default=5.0)
    #: Honour systemd's memory pressure protocol (``$MEMORY_PRESSURE_WATCH``).
    service_pressure: bool = True

    def check_apart(self, group: Group) -> None:
        """Raises :class:`~useroom.GroupOverlap` if ``watchdog_group`` is
        ``group`` or below it. A group above it (the parent, where the
        watchdog goes by default when this process is inside the handled
        group) or beside it is fine: its charges never reach the handled
        group's limit."""
        chosen = self.watchdog_group
        if chosen is None:  # else a Group: the field's validator checked it
            return
        require_apart(chosen, group, role="watchdog group", refuse=(Relation.SAME, Relation.BELOW),
                      why="the watchdog's memory would be charged to the handled group, so it would wait for "
                          "memory with the group's tasks (on cgroup v1 in the very OOM wait it must end); pass a "
                          "group outside it, such as its parent or a sibling")

    @heartbeat_timeout.validator
    def _check_heartbeat(self, _: object, value: float) -> None:
        if not value > 0:
            raise ValueError(f"heartbeat_timeout must be > 0 seconds, not {value!r}")

    @watchdog_group.validator
    def _check_watchdog_group(self, _: object, value: object) -> None:
        validate.watchdog_group(value)

    @watchdog_log.validator
    def _check_watchdog_log(self, _: object, value: str | None) -> None:
        if value is not None:
            validate.writable_path(value, "the watchdog's log")


class Host(Protocol):
    """What a supervisor gives each group it serves: the supervisor's side
    of the boundary between them. (The group's side is the section "served
    by a supervisor" of :class:`~useroom.handler.group.GroupHandler`.)"""

    @property
    def key(self) -> int:
        """The group's key in the supervisor (its fds' epoll data in the manager's set)."""

    @property
    def supervisor(self) -> Any:
        """The :class:`~useroom.Supervisor` (typed loosely: its module imports this one)."""

    @property
    def watcher_tid(self) -> int:
        """The native watcher thread's id while it runs, else 0."""

    @property
    def watcher_running(self) -> bool:
        """Whether the native watcher thread runs."""

    @property
    def watchdog(self) -> WatchdogLink | None:
        """The watchdog process guarding this group, or None."""

    def collect(self) -> None:
        """Reads the watcher's new records and routes each to its group (this one's to ``GroupHandler.deliver``)."""

    def guard_limit(self, limit: int) -> None:
        """Tells the watchdog the limit this group holds now (restored if the process dies with a grant open)."""
