"""The supervisor: one process, any number of handled groups.

Whatever a handler needs once per process lives here, shared by every
group it serves:

- one native watcher thread (:class:`~useroom.native.NativeWatcher`)
  waits on every group's notifications in one epoll set and runs their
  plans; an episode that waits (for the OOM to end, a victim to exit, the
  hooks' reply) does not hold it, so one group's episode never delays
  another's first action;
- one manager thread (Python, :class:`~useroom.handler.manager.Manager`)
  waits on the watcher's records and on every group's own fds (grants,
  hook changes, usage thresholds), and steps only the groups that
  something happened to;
- one watchdog process guards all the groups
  (:class:`~useroom.handler.guardian.Guardian`);
- the hardening of the process, and (cgroup v1, inside a handled group)
  the placement of the two threads' kernel allocations outside it
  (:class:`~useroom.handler.placement.Placement`).

Each group served gets a :class:`~useroom.handler.group.Host` from the
supervisor (the supervisor's side of the boundary between them), and the
supervisor calls the group only through the section "served by a
supervisor" of :class:`~useroom.handler.group.GroupHandler`.

A :class:`Handler` made on its own is a supervisor of one group: its
``start()`` makes a private supervisor.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import attrs

from useroom import _fd, native
from useroom._hardening import HardeningReport, lock_memory, vm_locked
from useroom._limits import exhausted
from useroom.cgroup import Group
from useroom.exceptions import PressureWatchError, WatcherError
from useroom.handler.group import GroupHandler
from useroom.handler.guardian import Guardian
from useroom.handler.history import ERRORS_KEPT, Recent
from useroom.handler.host import ProcessOptions
from useroom.handler.link import WatchdogLink
from useroom.handler.manager import Manager
from useroom.handler.pressure import ServicePressure
from useroom.handler.degraded import Degradation, Degradations, DegradedMode
from useroom.handler.placement import Placement, watchdog_home
from useroom.policy import Policy
from useroom.watchdog.process import DEFAULT_DELAY
from useroom.watchdog.protocol import Takeover

__all__ = ["Handler", "Supervisor"]

logger = logging.getLogger(__name__)


class Supervisor:
    """Handles the OOMs of many memory cgroups from this process.

    ``delay`` is how long an episode may last before the watchdog hands it
    to the kernel (seconds or ``"2s"``); ``harden``, ``mlockall``,
    ``watchdog``, ``watchdog_group``, ``watchdog_log`` and
    ``heartbeat_timeout`` mean what they mean for a :class:`~useroom.Handler`,
    for the whole process. ``service_pressure`` (default True) honours
    systemd's memory pressure protocol: when the process runs with
    ``$MEMORY_PRESSURE_WATCH`` set, each signal of that source runs the
    ``on_pressure`` hooks of the groups it covers (see
    :mod:`useroom.handler.pressure`); a source that cannot be opened is
    logged (and kept in :attr:`errors`), never fatal. :meth:`add` returns the group's handler, whose
    hooks, events and victims are its own; groups are added and removed
    before :meth:`start` or while it runs.
    """

    def __init__(
        self,
        *,
        delay: float | str = DEFAULT_DELAY,
        harden: bool = True,
        mlockall: bool = False,
        watchdog: bool = True,
        watchdog_group: Group | None = None,
        watchdog_log: str | None = None,
        heartbeat_timeout: float = 5.0,
        service_pressure: bool = True,
    ) -> None:
        self.options = ProcessOptions(delay, harden, mlockall, watchdog, watchdog_group, watchdog_log,
                                      heartbeat_timeout, service_pressure)
        #: What :func:`lock_memory` did; None before start or with harden=False.
        self.hardening: HardeningReport | None = None
        #: This process's locked bytes (VmLck) once started.
        self.locked_bytes = 0
        #: Errors the manager thread met and survived, and the watchdog's: the
        #: newest ERRORS_KEPT, and how many older ones were dropped (``errors.dropped``).
        self.errors: Recent[BaseException] = Recent(ERRORS_KEPT)
        self._handlers: dict[int, GroupHandler] = {}  # key -> its handler
        self._next_key = 1
        self._admin = threading.RLock()  # add, remove, start, stop: one at a time
        self._watcher: native.NativeWatcher | None = None
        self._manager: Manager | None = None
        self._guardian: Guardian | None = None
        #: systemd's memory pressure source while it is watched, else None.
        self.service_pressure: ServicePressure | None = None
        self._placement = Placement(self.options.watchdog_group)
        self._degradations = Degradations()
        self._running = False

    # -- public ------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    @property
    def handlers(self) -> tuple[GroupHandler, ...]:
        """The handlers of the groups served, in the order they were added."""
        return tuple(self._handlers.values())

    @property
    def degraded(self) -> tuple[DegradedMode, ...]:
        """The weaker modes this supervisor has run in (each also logged and
        warned about once, as a :class:`~useroom.DegradedWarning`): memory
        not all locked, no pidfds, no process_mrelease, no watchdog."""
        return self._degradations.modes

    @property
    def watchdog(self) -> WatchdogLink | None:
        """The watchdog process while it runs (None without one)."""
        return self._guardian.link if self._guardian is not None else None

    @property
    def watcher_tid(self) -> int:
        """The native watcher thread's id while it runs, else 0."""
        return self._watcher.tid if self._watcher is not None and not self._watcher.closed else 0

    @property
    def manager_tid(self) -> int:
        """The manager thread's id while it runs, else 0."""
        return self._manager.tid if self._manager is not None else 0

    @property
    def kernel_memory_group(self) -> Group | None:
        """Where the threads' kernel allocations are charged while this
        process runs inside a handled group (cgroup v1), or None."""
        return self._placement.place

    @property
    def lost(self) -> int:
        """Watcher records overwritten before they were read (0 normally)."""
        return self._watcher.lost if self._watcher is not None else 0

    def add(self, group: Group, policy: Policy | None = None, **options: Any) -> Handler:
        """Serves ``group`` with ``policy`` (KillLargest by default); returns
        its :class:`~useroom.Handler`. ``options`` are the handler's
        per-group options (``reserve``, ``thresholds``, hooks' timeouts,
        ``protect``, ``keep_events`` ...); the process-wide ones are the supervisor's."""
        for name in _PROCESS_OPTIONS:
            if name in options:
                raise TypeError(f"{name} is the supervisor's, for every group: pass it to Supervisor()")
        with self._admin:
            if any(h.group.path == group.path for h in self._handlers.values()):
                raise ValueError(f"{group.relpath} is served already")
            handler = Handler(group, policy, **attrs.asdict(self.options, recurse=False), **options)
            self._adopt(handler)
            return handler

    def _adopt(self, handler: GroupHandler) -> None:
        with self._admin:
            key = self._next_key
            self._next_key += 1
            handler.bind(_Host(self, key, handler))
            self._handlers[key] = handler
            if self._running:
                try:
                    self._begin(handler)
                except BaseException as err:
                    del self._handlers[key]
                    handler.unbind()
                    limited = exhausted(err, f"cannot start the handler of {handler.group.relpath}", _own_memory)
                    if limited is not None:
                        raise limited from err
                    raise

    def remove(self, group: Group | GroupHandler) -> None:
        """Stops serving a group (or a handler): its settings are put back,
        its fds closed. An episode in progress ends first (or is ended)."""
        with self._admin:
            handler = self._find(group)
            if handler is None:
                raise ValueError(f"{getattr(group, 'relpath', group)!r} is not served by this supervisor")
            try:
                if self._running:
                    self._end(handler)
            finally:
                self._handlers.pop(handler.key, None)
                handler.unbind()

    def _names(self) -> str:
        """The groups served, for an error message."""
        return ", ".join(h.group.relpath for h in self._handlers.values()) or "no group"

    def _find(self, group: Group | GroupHandler) -> GroupHandler | None:
        for handler in self._handlers.values():
            if handler is group or handler.group.path == getattr(group, "path", None):
                return handler
        return None

    def start(self) -> Supervisor:
        """Hardens the process, starts the watcher, the manager and the
        watchdog, and every group added so far."""
        with self._admin:
            if self._running:
                raise WatcherError("the supervisor is already running")
            try:
                self._start()
            except BaseException as err:
                self._stop()
                # Out of fds or memory: say which limit, and how to raise it.
                limited = exhausted(err, f"cannot start the handler of {self._names()}", _own_memory)
                if limited is not None:
                    raise limited from err
                raise
        return self

    def stop(self) -> None:
        """Stops every group (each group's settings are put back), then the
        threads and the watchdog. Idempotent."""
        with self._admin:
            self._stop()

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- running -------------------------------------------------------------

    def _start(self) -> None:
        if self.options.harden:
            self.hardening = lock_memory(mlockall=self.options.mlockall)
            self._warn_partial_lock(self.hardening)
        if not _fd.can_use_pidfd:
            self._degradations.note(Degradation.NO_PIDFD, "no pidfds (Linux 5.3 and Python 3.9 have them): "
                                    "victims are signalled by pid, each just after a check that it is in the "
                                    "group, and a new process may reuse a pid in between")
        if not native.can_use_mrelease():
            self._degradations.note(Degradation.NO_MRELEASE, "no process_mrelease (Linux 5.15): a killed "
                                    "victim's memory comes back only as fast as it exits")
        self._watcher = native.NativeWatcher()
        self._manager = Manager(self._watcher, guardian=lambda: self._guardian, note=self._note,
                                route=self._route_takeover)
        if self.options.service_pressure:
            self.service_pressure = self._open_service_pressure()
            if self.service_pressure is not None:
                self._manager.watch_pressure(self.service_pressure)
        started = []
        for handler in list(self._handlers.values()):
            handler.open(self._watcher.add_group())
            started.append(handler)
        self._watcher.start()
        for handler in started:
            handler.activate()
        self._running = True
        self._manager.start(list(self._handlers.values()))
        self._placement.place_for(self.handlers, [self.watcher_tid, self.manager_tid], self.errors)
        needing = [h for h in started if h.declare().needs_watchdog]
        if self.options.watchdog and needing:
            self._guardian = self._new_guardian(self._watchdog_place(needing))
            for handler in needing:
                self._guardian.add(handler)
            self._guardian.start()
        elif needing:
            self._warn_no_watchdog(needing)
        self.locked_bytes = vm_locked()

    def _begin(self, handler: GroupHandler) -> None:
        """A group added while running: open, arm, activate, guard."""
        assert self._watcher is not None and self._manager is not None
        handler.open(self._watcher.add_group())
        try:
            handler.activate()
            self._placement.place_handler(handler)
            self._manager.enlist(handler)
            if handler.declare().needs_watchdog and self.options.watchdog:
                if self._guardian is None:
                    self._guardian = self._new_guardian(self._watchdog_place([handler]))
                    self._guardian.add(handler)
                    self._guardian.start()
                else:
                    self._guardian.add(handler)
            elif handler.declaration is not None and handler.declaration.needs_watchdog:
                self._warn_no_watchdog([handler])
        except BaseException:
            self._end(handler)
            raise

    def _end(self, handler: GroupHandler) -> None:
        """Stops one group: out of the manager, settings back, out of the watchdog."""
        if self._manager is not None:
            self._manager.discharge(handler)
        try:
            handler.restore()
        finally:
            if self._guardian is not None:
                self._guardian.remove(handler)
            handler.drop_slot()
            if self._manager is not None:
                self._manager.collect()  # its last records, before its index is reused
            handler.dispose()

    def _stop(self) -> None:
        self._running = False
        manager, self._manager = self._manager, None
        if manager is not None:
            manager.stop()
        for handler in list(self._handlers.values()):
            try:
                handler.restore()
            except Exception as err:  # noqa: BLE001 - each group is put back, whatever one of them raises
                self.errors.append(err)
        guardian, self._guardian = self._guardian, None
        if guardian is not None:
            for takeover in guardian.stop():
                self._route_takeover(takeover)
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            try:
                watcher.stop()
                if manager is not None:
                    manager.collect_from(watcher)
            finally:
                for handler in list(self._handlers.values()):
                    handler.drop_slot()
                watcher.close()
        self._placement.unplace()
        source, self.service_pressure = self.service_pressure, None
        if source is not None:
            source.close()
        for handler in list(self._handlers.values()):
            handler.dispose()

    def _open_service_pressure(self) -> ServicePressure | None:
        try:
            source = ServicePressure.from_environment()
        except PressureWatchError as err:
            self._note(err)
            logger.warning("%s: on_pressure hooks run from usage only", err,
                           extra={"cause": "pressure_watch", "variable": err.variable})
            return None
        if source is not None:
            logger.info("on_pressure hooks also run at the service manager's signals (%s)", source.watch.path,
                        extra={"path": source.watch.path, "kind": source.kind.value})
        return source

    def _route_takeover(self, takeover: Takeover) -> None:
        for handler in list(self._handlers.values()):  # the manager's thread: add() may run meanwhile
            if handler.group.relpath == takeover.group:
                handler.record_takeover(takeover)
                return

    def _protect(self, pid: int) -> None:
        """A watchdog just spawned is never a victim, in any group, from now on."""
        for handler in list(self._handlers.values()):
            handler.protect_pid(pid)

    def _watchdog_place(self, handlers: list[GroupHandler]) -> Group | None:
        if not all(h.group.parent_holds_processes for h in handlers):
            # A v2 parent with memory enabled for its children cannot hold
            # processes: inside the group, the watchdog stays with us.
            return self.options.watchdog_group
        return watchdog_home(handlers, self.options.watchdog_group)

    def _new_guardian(self, place: Group | None) -> Guardian:
        return Guardian(place, self.options, watcher_tid=self.watcher_tid, manager_tid=self.manager_tid,
                        protect=self._protect, note=self._note, changed=self._link_changed,
                        stopped=self._watchdog_stopped)

    def _link_changed(self) -> None:
        if self._manager is not None:
            self._manager.link_changed()

    def _watchdog_stopped(self) -> None:
        """The watchdog process stopped (its sentry's thread): the manager wakes, looks at it and kills it."""
        if self._manager is not None:
            self._manager.wake()

    def _note(self, err: BaseException) -> None:
        self.errors.append(err)

    def _warn_partial_lock(self, report: HardeningReport) -> None:
        """The critical set is not all locked: the native core, the arena
        pool, or mlockall where it was asked for."""
        pool = report.pool
        partial = bool(report.core.lock_errno) or (pool is not None and pool.locked < pool.size) \
            or (self.options.mlockall and not report.mlockall)
        if partial:
            self._degradations.note(Degradation.PARTIAL_LOCK,
                                    f"memory only partly locked: {'; '.join(report.notes)}",
                                    locked_bytes=report.locked_bytes, memlock_limit=report.memlock_limit,
                                    notes=list(report.notes))

    def _warn_no_watchdog(self, handlers: Sequence[GroupHandler]) -> None:
        """Groups that need the watchdog run without it (``watchdog=False``)."""
        groups = [h.group.relpath for h in handlers]
        self._degradations.note(Degradation.NO_WATCHDOG,
                                f"no watchdog (watchdog=False) for {', '.join(groups)}: an episode the "
                                "handler does not end is never handed to the kernel", groups=groups)


def _own_memory() -> tuple[str, int]:
    """This process's memory cgroup and its limit, for an ENOMEM at start."""
    group = Group.current()
    return group.relpath, group.limit()


#: Options of a Handler that are the process's, set on the Supervisor.
_PROCESS_OPTIONS = ("delay", "harden", "mlockall", "watchdog", "watchdog_group", "watchdog_log",
                    "heartbeat_timeout", "service_pressure")


class _Host:
    """What the supervisor gives each group it serves (a
    :class:`~useroom.handler.group.Host`): its key, the watcher's state,
    the manager's collection of records and the watchdog's guard."""

    def __init__(self, supervisor: Supervisor, key: int, handler: GroupHandler) -> None:
        self._sup = supervisor
        self._key = key
        self._handler = handler

    @property
    def key(self) -> int:
        return self._key

    @property
    def supervisor(self) -> Supervisor:
        return self._sup

    @property
    def watcher_tid(self) -> int:
        return self._sup.watcher_tid

    @property
    def watcher_running(self) -> bool:
        watcher = self._sup._watcher
        return watcher is not None and watcher.running

    @property
    def watchdog(self) -> WatchdogLink | None:
        guardian = self._sup._guardian
        return guardian.link if guardian is not None and guardian.guards(self._handler) else None

    def collect(self) -> None:
        manager = self._sup._manager
        if manager is not None:
            manager.collect()

    def guard_limit(self, limit: int) -> None:
        guardian = self._sup._guardian
        if guardian is not None:
            guardian.set_limit(self._handler, limit)



class Handler(GroupHandler):
    """The OOM handler of one memory cgroup; it may live inside that group.

    ``policy`` decides victims (KillLargest by default). ``reserve`` (bytes
    or a size like ``"16M"``) enables the headroom grant: when the planned
    victims are not enough, the watcher raises the limit by the reserve,
    wakes this handler to refresh and act, then restores the limit. The
    parent group must allow the raised limit. A reserve (or a
    :class:`~useroom.RaiseLimit` step) larger than the group's limit, or
    than the machine's memory for a group without one, and ``"max"`` are
    refused with :class:`~useroom.SizeOutOfBounds`, when the handler is
    made and again at start. ``thresholds`` are fractions
    of the limit at which the victim table is refreshed. The kernel OOM
    killer is disabled for the group while the handler runs (its previous
    setting is restored on stop) and re-enabled for one episode as the last
    resort when ``kernel_fallback`` is true. ``protect`` lists pids never to
    kill; this process is always protected.

    Hooks: :meth:`on_oom` (free memory before anything is killed; needs a
    reserve, ``DEFAULT_HOOK_RESERVE`` if none is given, and runs within
    ``hook_timeout``), :meth:`on_pressure`, :meth:`on_resolved`,
    :meth:`on_kill`. They may be registered and removed while it runs.

    Declared handler: on start the handler calls :meth:`declare`. Where
    the kernel lacks the proposed interfaces (every kernel today), a
    watchdog process outside the group (``watchdog=True``) hands an episode
    to the kernel OOM killer when it outlasts ``delay`` (seconds, or
    ``"2s"``/``"500ms"``), at once when this handler is stopped, exited,
    has a declared thread asleep in the OOM wait or sent no heartbeat for
    ``heartbeat_timeout``, and restores the limit if
    this process dies with a grant open. ``watchdog_group`` is where it
    runs (default: the handled group's parent when this process is inside
    the handled group, else this process's group); the handled group or a
    group below it is refused here with :class:`~useroom.GroupOverlap`, as
    the watchdog would wait for memory with the group's tasks.
    ``watchdog_log`` is a file for its JSON log. If the watchdog dies it is
    restarted; if it cannot be, the kernel OOM killer is re-enabled for the
    group.

    Inside the group (cgroup v1), the handler's own threads are moved to
    the watchdog's group (``kernel_memory_group``) so that the files they
    open during an episode are not charged to the group at its limit; the
    process and its pages stay in the group, and :meth:`stop` moves the
    threads back.

    While the ``on_oom`` hooks run, the process's other Python threads are
    held at their next call or return (``hold_threads``, where the
    interpreter allows it): they would take the headroom back. The hold
    works through each thread's profile function (``sys.setprofile``): it is
    installed ahead of an episode once the usage reaches ``hold_arm_at`` of
    the limit (0: always), so that it stops the threads the moment the hooks
    are woken, and removed below half of that. While it is installed, Python
    code runs slower (about 1.2-4x, most for call-heavy code, on CPython
    3.11); a profiler the process runs on its threads is replaced and then
    cleared. Pass ``hold_threads=False`` to do without. The group's other
    processes are stopped (SIGSTOP) before the hooks' grant and continued
    (SIGCONT) after the hooks (``hold_processes``, at most six, the table's
    first); a hook that needs them to act calls ``ctx.resume_others()``.

    Use it as a context manager or with :meth:`start` / :meth:`stop`; or
    get it from :meth:`Supervisor.add`, which serves many groups from one
    watcher thread, one manager thread and one watchdog (the process-wide
    options ``delay``, ``harden``, ``mlockall``, ``watchdog*`` and
    ``heartbeat_timeout`` are then the supervisor's).

    ``refresh_interval`` (seconds) adds a timed refresh of the victim
    table; by default (None) it is refreshed from events only: usage
    thresholds (cgroup v1), each episode's end, grants, hook changes. With
    nothing happening, the handler's threads sleep.

    ``event_log`` (a path, ``"-"`` for standard output, an open text file,
    or an :class:`~useroom.EventLog` shared by several handlers) gets one
    JSON line per episode as it ends (see :mod:`useroom.handler.export`).
    A path that cannot be written is refused when the handler is made
    (:class:`~useroom.OutputError`); it is opened at :meth:`start`. A line
    the file cannot take later goes to standard error, with the error in
    :attr:`errors`. The same holds for ``watchdog_log``.

    ``keep_events`` (default 1000) bounds :attr:`events`: the newest
    episodes are kept in full, the oldest dropped to make room, so that a
    handler that runs for months in a storm does not grow by an event per
    episode. What was dropped is counted: ``history.dropped``, and
    ``history.counts`` (:class:`~useroom.handler.history.EpisodeCounts`)
    counts every episode, exactly, for metrics. 0 keeps only the counters;
    a value that is not a whole number >= 0 is refused when the handler is
    made. :attr:`errors` keeps the newest 100 (``errors.dropped``).

    Arguments of the wrong type (``policy``, ``watchdog_group``) raise
    TypeError when the handler is made, not at :meth:`start`.
    """

    #: The private supervisor of a handler started on its own.
    _private: Supervisor | None = None

    def start(self) -> Handler:
        """Hardens the process, prepares every fd, arms the plan, starts the
        threads: a private supervisor of this one group. (A handler got from
        :meth:`Supervisor.add` starts with its supervisor.)"""
        if self.running:
            raise WatcherError("the handler is already running")
        if self.host is not None and self._private is None:
            raise WatcherError("this handler belongs to a supervisor: start the supervisor")
        if self._private is None:
            self._private = Supervisor(**attrs.asdict(self.options, recurse=False))
            self._private._adopt(self)
        self._private.start()
        return self

    def stop(self) -> None:
        """Stops the threads, restores the group's kernel OOM killer setting,
        closes every fd. Idempotent. (A handler got from
        :meth:`Supervisor.add` is stopped by :meth:`Supervisor.remove`.)"""
        if self._private is not None:
            self._private.stop()
        elif self.host is not None:
            self.host.supervisor.remove(self)

    def __enter__(self) -> Handler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

