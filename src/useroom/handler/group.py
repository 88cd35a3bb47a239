"""The handler of one group: arms a native plan for it and keeps it fresh.

Two threads of its :class:`~useroom.Supervisor` (shared by every group it
serves) do the work:

- the native watcher (C, locked memory, no GIL) waits on the group's OOM
  notification and runs the armed plan: kill from the victim table, grant
  headroom, let the kernel act as a last resort. It needs nothing from
  Python, so it works while every Python thread of the process, the one
  holding the GIL included, sleeps in the OOM wait;
- the manager (a Python thread) keeps the plan fresh between episodes:
  it refreshes the victim table (on usage thresholds, after each episode,
  and every ``refresh_interval`` if one is given), recompiles the policy,
  re-arms, turns the watcher's records into :class:`OomEvent` values, and
  answers headroom grants: with the OOM lifted by the grant, it refreshes
  the table (a task forked since the last refresh is not in the plan) and
  kills by policy.

A :class:`GroupHandler` holds its collaborators: its
:class:`~useroom.handler.arming.Arming` (what the group's backend needs),
its :class:`~useroom.handler.grants.Grants` (the headroom grant), and the
:class:`~useroom.handler.host.Host` its supervisor gives it. Between it and
the supervisor there is a named boundary: the supervisor's side is the
``Host``, the group's side the section "served by a supervisor" of
:class:`GroupHandler`.

A handler made on its own (``Handler(group, ...)``) is a supervisor of one
group: its :meth:`Handler.start` makes a private supervisor.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import os
import threading
import time
import types
from collections.abc import Iterable, Mapping
from typing import IO, Any

import attrs

from useroom import _fd, native
from useroom._declare import Declaration, probe
from useroom._hardening import HardeningReport
from useroom._hooks import Hook, HookRecord, HookRegistry, HookRunner
from useroom._last_resort import LastResorts
from useroom._procs import ProcsFiles
from useroom._settle import GrantCloser
from useroom._units import parse_size
from useroom._victims import Pidfd, Victim, VictimTable
from useroom.cgroup import Group
from useroom.exceptions import GroupGone, OutputError, RootGroupError, WatcherError
from useroom.handler import validate
from useroom.handler.arming import Arming, arming_for
from useroom.handler.degraded import DegradedMode
from useroom.handler.events import OomEvent, episode_event, episode_log, grant_acted, grant_left_open
from useroom.handler.export import EventLog
from useroom.handler.grants import Grants
from useroom.handler.history import DEFAULT_KEEP, ERRORS_KEPT, EventHistory, Recent
from useroom.handler.stale import StaleTable
from useroom.handler.subtree import NestedTasks, refuse_nested
from useroom.handler.host import Host, ProcessOptions
from useroom.handler.link import WatchdogLink
from useroom.handler.pressure import run_service_pressure, run_usage_pressure
from useroom.native import EventFd, EventRecord, Plan, WatchedGroup
from useroom.policy import CompiledPlan, PlanContext, Policy
from useroom.watchdog.process import DEFAULT_DELAY
from useroom.watchdog.protocol import Takeover

__all__ = ["DEFAULT_HOOK_RESERVE", "PENDING_POLL", "REFRESH_GAP", "GroupHandler"]

logger = logging.getLogger(__name__)

#: The reserve used when on_oom hooks are registered and none was given.
DEFAULT_HOOK_RESERVE = 16 << 20

#: Wake-ups sooner than this after a refresh are answered by one refresh at
#: its end: in an OOM storm the manager wakes four to nine times per kill
#: (the episode's end, each usage threshold the refilling group crosses),
#: and each refresh's CPU time is taken from the workload.
REFRESH_GAP = 0.025
#: How often a limit that must be put back is tried while the usage does
#: not fit yet (seconds), when no ``refresh_interval`` is given.
PENDING_POLL = 0.1


@attrs.frozen
class _ArmedPlan:
    compiled: CompiledPlan
    plan_id: int
    #: The policy and its ``plan_key`` of the context it was compiled from.
    key: object = None


class GroupHandler:
    """The handler of one group, as a supervisor serves it: its fds, its
    victim table, its plans, its hooks and its events. The public
    :class:`~useroom.Handler` adds a life of its own (``start``/``stop``)."""

    def __init__(
        self,
        group: Group,
        policy: Policy | None = None,
        *,
        reserve: int | str | None = None,
        thresholds: Iterable[float] = (0.25, 0.5, 0.75, 0.9),
        refresh_interval: float | None = None,
        check_timeout: float = 0.25,
        grant_timeout: float = 1.0,
        hook_timeout: float = 1.0,
        kernel_fallback: bool = True,
        protect: Iterable[int] = (),
        harden: bool = True,
        mlockall: bool = False,
        delay: float | str = DEFAULT_DELAY,
        watchdog: bool = True,
        watchdog_group: Group | None = None,
        watchdog_log: str | None = None,
        heartbeat_timeout: float = 5.0,
        service_pressure: bool = True,
        hold_threads: bool = True,
        hold_arm_at: float = 0.0,
        hold_processes: bool = True,
        event_log: str | os.PathLike[str] | IO[str] | EventLog | None = None,
        keep_events: int = DEFAULT_KEEP,
    ) -> None:
        if group.is_root:
            raise RootGroupError("the root memory cgroup has no limit and no OOM notifications")
        self.group = group
        # Checked now, against the group's limit where it matters (again at start: see open()).
        self.policy = validate.policy(policy, group)
        self.reserve = validate.reserve(reserve, group)
        self.thresholds = validate.fractions(thresholds)
        #: Each signal goes only to a task whose /proc/<pid>/cgroup holds this line.
        self.member = validate.membership(group, native.MEMBER_MAX)
        validate.timeouts(refresh_interval=1.0 if refresh_interval is None else refresh_interval,
                          check_timeout=check_timeout, grant_timeout=grant_timeout, hook_timeout=hook_timeout)
        self.refresh_interval = refresh_interval
        self.check_timeout = check_timeout
        self.grant_timeout = grant_timeout
        self.hook_timeout = hook_timeout
        self.kernel_fallback = kernel_fallback
        self.protect = frozenset(protect)
        #: The process-wide options (the supervisor's, when it has one).
        self.options = ProcessOptions(delay, harden, mlockall, watchdog, watchdog_group, watchdog_log,
                                      heartbeat_timeout, service_pressure)
        self.options.check_apart(group)  # GroupOverlap: the watchdog would share the group's OOM wait
        if not 0 <= hold_arm_at < 1:
            raise ValueError(f"hold_arm_at is a fraction of the limit in [0, 1), not {hold_arm_at!r}")
        self.hold_threads = hold_threads
        self.hold_arm_at = hold_arm_at
        self.hold_processes = hold_processes
        #: How many episodes :attr:`events` keeps in full (the counters count them all).
        self.keep_events = validate.keep_events(keep_events)
        self._event_log = event_log if isinstance(event_log, EventLog) or event_log is None else EventLog(event_log)
        #: What :meth:`declare` found: ``kernel`` or ``shim`` per feature.
        self.declaration: Declaration | None = None
        #: Where the handler's own threads' kernel allocations are charged
        #: while it runs inside the group (cgroup v1), or None.
        self.kernel_memory_group: Group | None = None
        #: Errors the manager thread met and survived (ENOMEM during an OOM, ...):
        #: the newest ERRORS_KEPT, and how many older ones were dropped (``errors.dropped``).
        self.errors: Recent[BaseException] = Recent(ERRORS_KEPT)
        self._nested = NestedTasks()
        self._stale = StaleTable()
        #: Episodes that found nothing left to kill with the usage above the
        #: limit (the kernel OOM killer, the plan's last resort, comes next).
        self.last_resorts = LastResorts()
        self._history = EventHistory(self.keep_events)
        self._running = False
        #: What the supervisor serving this group gives it (None while no supervisor does).
        self._host: Host | None = None
        self._slot: WatchedGroup | None = None
        #: The watcher's records of this group, routed by the manager.
        self._inbox: collections.deque[EventRecord] = collections.deque()
        #: The manager steps this group with it held; removal takes it.
        self._step_lock = threading.RLock()
        self._registered: dict[int, int] = {}  # fd -> its epoll data in the manager's set
        self._owned: list[Any] = []
        self._plans: dict[int, _ArmedPlan] = {}
        self._armed: list[_ArmedPlan] = []
        self._next_refresh = float("inf")  # time.monotonic() of the next timed refresh
        self._last_refresh = 0.0  # and of the last refresh from a wake-up
        self._deferred = False  # a wake-up's refresh waits for the end of REFRESH_GAP
        self._backoff_until = 0.0  # after an error, no timed step before this
        self._hooks = HookRegistry()
        self._runner: HookRunner | None = None
        self._closer: GrantCloser | None = None
        self._poke: EventFd | None = None
        # Raises UnsupportedKernel for a backend no arming serves.
        self._arming = arming_for(group, fractions=self.thresholds, hooks=self._hooks, errors=self.errors,
                                  collect=self._collect, tell_limit=self._tell_limit)
        self._grants = Grants(group, self.policy, self._arming, check_timeout=check_timeout, note=self.note,
                              errors=self.errors, last_resort=self._last_resort, member=self.member)

    # -- hooks -------------------------------------------------------------

    def on_oom(self, fn: Hook | None = None, *, priority: int = 0) -> Any:
        """Registers ``fn(ctx: OomContext) -> bool`` to run on each OOM episode,
        before any kill, with headroom granted; it returns whether it freed
        memory. Higher ``priority`` runs first, then registration order. Use
        as ``@handler.on_oom`` or ``@handler.on_oom(priority=10)``."""
        def register(f: Hook) -> Hook:
            self._hooks.add("oom", f, priority=priority)
            self._changed()
            return f
        return register(fn) if fn is not None else register

    def on_pressure(self, threshold: float | int | str) -> Any:
        """Registers ``fn(ctx: PressureContext)`` to run (on the handler's
        thread, free to allocate) when usage crosses ``threshold`` upward: a
        fraction of the limit in (0, 1), or a size. Under systemd's memory
        pressure protocol (``$MEMORY_PRESSURE_WATCH``, see
        :mod:`useroom.handler.pressure`) it also runs at each signal of
        the service manager (``ctx.source``)."""
        if isinstance(threshold, float):
            if not 0 < threshold < 1:
                raise ValueError(f"a fractional threshold must be in (0, 1), not {threshold!r}")
        else:
            parse_size(threshold)

        def register(f: Hook) -> Hook:
            self._hooks.add("pressure", f, arg=threshold)
            self._changed()
            return f
        return register

    def on_resolved(self, fn: Hook) -> Hook:
        """Registers ``fn(event: OomEvent)``, called after each episode that
        needed action (free to allocate and log)."""
        self._hooks.add("resolved", fn)
        return fn

    def on_kill(self, fn: Hook) -> Hook:
        """Registers ``fn(victim: VictimRecord, event: OomEvent)``, called for
        each task signalled during an episode."""
        self._hooks.add("kill", fn)
        return fn

    def remove_hook(self, fn: Hook) -> bool:
        """Unregisters ``fn`` wherever it was registered; True if it was."""
        found = self._hooks.remove(fn)
        if found:
            self._changed()
        return found

    def _changed(self) -> None:
        """Hooks changed: the manager re-arms (and re-registers thresholds)."""
        self._hooks_dirty = True
        poke = self._poke
        if poke is not None and not poke.closed:
            poke.write(1)

    _hooks_dirty = True

    # -- public ------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    @property
    def events(self) -> list[OomEvent]:
        """The newest ``keep_events`` episodes, oldest first (a copy); the
        older ones are counted in :attr:`history` (``dropped``, ``counts``)."""
        return self._history.events

    @property
    def history(self) -> EventHistory:
        """The episodes kept in full, how many were dropped, and the
        counters over all of them (what metrics are made of)."""
        return self._history

    @property
    def lost(self) -> int:
        """Watcher records overwritten before they were read (0 normally)."""
        return self._host.supervisor.lost if self._host is not None else 0

    @property
    def supervisor(self) -> Any:
        """The :class:`~useroom.Supervisor` serving this group (a private
        one for a handler started on its own), or None."""
        return self._host.supervisor if self._host is not None else None

    @property
    def degraded(self) -> tuple[DegradedMode, ...]:
        """The supervisor's weaker modes (:attr:`~useroom.Supervisor.degraded`); () before start."""
        return self._host.supervisor.degraded if self._host is not None else ()

    @property
    def watchdog(self) -> WatchdogLink | None:
        """The watchdog process guarding this group while it runs (shared by
        the supervisor's groups), or None without one."""
        return self._host.watchdog if self._host is not None else None

    @property
    def hardening(self) -> HardeningReport | None:
        """What :func:`lock_memory` did for the process; None before start or with harden=False."""
        return self._host.supervisor.hardening if self._host is not None else None

    @property
    def locked_bytes(self) -> int:
        """This process's locked bytes (VmLck) once started."""
        return self._host.supervisor.locked_bytes if self._host is not None else 0

    @property
    def victims(self) -> tuple[Victim, ...]:
        """The victim table as of the last refresh."""
        return self._table.victims if self._running else ()

    def wait_for_events(self, count: int, timeout: float | None = None) -> list[OomEvent]:
        """Blocks until at least ``count`` episodes were ever recorded
        (``history.total``) or ``timeout`` passes; returns :attr:`events`."""
        return self._history.wait(count, timeout)

    @property
    def delay(self) -> float:
        """How long an episode may last before the watchdog hands it to the kernel (seconds)."""
        return self.options.delay

    def declare(self) -> Declaration:
        """Registers this handler as the group's declared OOM handler.

        Probes the group for each proposed kernel interface (see
        :mod:`useroom._declare`) and uses those that exist: the delay and
        the reserve are written to their files. The features the kernel
        lacks are served by the watchdog (the shim). Called on start;
        returns what is in use, also kept as :attr:`declaration`.
        """
        declaration = probe(self.group)
        files = declaration.found
        if "delay" in files:
            self.group.write_file(files["delay"], str(int(self.delay * 1000)))
        if "reserve" in files and self._reserve:
            self.group.write_file(files["reserve"], str(self._reserve))
        if "handler" in files:
            tid = self._host.watcher_tid if self._host is not None else 0
            self.group.write_file(files["handler"], str(tid))
        self.declaration = declaration
        return declaration

    # -- served by a supervisor ------------------------------------------------
    #
    # The group's side of the boundary with its supervisor (whose side is the
    # Host): what the supervisor, its manager thread, its watchdog guardian
    # and its thread placement call. A program using a handler calls none of
    # these.

    @property
    def host(self) -> Host | None:
        """What the supervisor serving this group gives it, or None."""
        return self._host

    def bind(self, host: Host) -> None:
        """A supervisor serves this group from now on."""
        self._host = host

    def unbind(self) -> None:
        """No supervisor serves this group any more."""
        self._host = None

    @property
    def key(self) -> int:
        """The group's key in its supervisor (0 without one)."""
        return self._host.key if self._host is not None else 0

    @property
    def arming(self) -> Arming[Any]:
        """What the group's backend holds: the limit (or wall) held, the
        settings from before the handler (for the watchdog)."""
        return self._arming

    @property
    def slot(self) -> WatchedGroup | None:
        """The group's slot in the watcher, while it has one."""
        return self._slot

    @property
    def watched(self) -> WatchedGroup:
        """The group's slot in the watcher; raises WatcherError without one."""
        if self._slot is None:
            raise WatcherError(f"{self.group.relpath} is not served by a running watcher")
        return self._slot

    @property
    def step_lock(self) -> threading.RLock:
        """Held while the manager steps this group; removal takes it."""
        return self._step_lock

    @property
    def hook_tid(self) -> int:
        """The hook thread's id while the group has ``on_oom`` hooks, else 0."""
        return self._runner.tid if self._runner is not None else 0

    def open(self, slot: WatchedGroup) -> None:
        """Prepares every fd and arms the first plan in the watcher's
        ``slot`` for this group (the supervisor's watcher)."""
        group = self.group
        self._slot = slot
        try:
            validate.sizes_fit(group, self.reserve, self.policy)  # the limit may have changed since __init__
            if self._event_log is not None:  # first: a bad path fails the start, before the group is touched
                self._event_log.open()
                self._own(self._event_log)
            refuse_nested(group)  # also before the group is touched
            self._poke = self._own(EventFd())
            self._table = self._own(VictimTable(group, self.protect))
            self._own(self._grants)
            self._grants.open(self._table)
            self._procs = self._own(ProcsFiles(group))
            self._own(self._arming)
            self._arming.open(slot, inside=self.inside(), reserve=self.reserve, kernel_fallback=self.kernel_fallback)
            self._update_hooks()
            self.policy.arm(group)
            self._owned.append(types.SimpleNamespace(close=self.policy.disarm))  # closed with the rest
            self._refresh(grant=False)
            if self.refresh_interval is not None:
                self._next_refresh = time.monotonic() + self.refresh_interval
        except BaseException:
            self.restore()
            self.drop_slot()
            self.dispose()
            raise

    def activate(self) -> None:
        """The watcher runs: from now on it acts for the group."""
        self._arming.activate()
        self._running = True

    def register(self, ep: native.Epoll, base: int) -> None:
        """Puts this group's fds in the manager's epoll set (data ``base |
        kind``: 1 a grant, 3 a hook change, 4 + i usage threshold i), and
        takes out those it no longer has."""
        want: dict[int, int] = {}
        if self._slot is None:
            return
        want[self._grants.wake.fileno()] = base | 1
        if self._poke is not None:
            want[self._poke.fileno()] = base | 3
        for i, reg in enumerate(self._arming.thresholds):
            want[reg.fileno()] = base | (4 + i)
        for fd, data in list(self._registered.items()):
            if want.get(fd) != data:
                with contextlib.suppress(OSError):  # closed already: the kernel dropped it
                    ep.remove(fd)
                del self._registered[fd]
        for fd, data in want.items():
            if fd not in self._registered:
                ep.add(fd, data)
                self._registered[fd] = data

    def unregister(self, ep: native.Epoll) -> None:
        for fd in self._registered:
            with contextlib.suppress(OSError):
                ep.remove(fd)
        self._registered = {}

    def deliver(self, record: EventRecord) -> None:
        """A watcher's record of this group, routed by the manager: its next step turns it into an event."""
        self._inbox.append(record)

    def due(self) -> float:
        """When (time.monotonic()) the manager must step this group even if
        nothing wakes it: a deferred or timed refresh, a limit to restore,
        a hook that may never return; inf if never."""
        due = self._next_refresh
        if self._deferred:
            due = min(due, self._last_refresh + REFRESH_GAP)
        if self._arming.pending_restore is not None:
            due = min(due, self._last_refresh + (self.refresh_interval or PENDING_POLL))
        runner = self._runner
        if runner is not None and runner.busy_since_ns:
            due = min(due, (runner.busy_since_ns + 2 * self.hook_timeout * 1e9) / 1e9)
        return max(due, self._backoff_until)

    def step(self, kinds: list[int]) -> None:
        """One step of the manager for this group: ``kinds`` are the epoll
        data kinds of its fds that were ready. Something woke it if one was,
        or if a record of it came."""
        woke = bool(kinds) or bool(self._inbox)
        crossed = []
        poked = False
        thresholds = self._arming.thresholds
        for kind in kinds:
            if kind == 1:
                self._grants.grant()
            elif kind == 3:
                assert self._poke is not None
                self._poke.read()
                poked = True  # new hooks: a plan that wakes them now
            elif kind >= 4 and kind - 4 < len(thresholds):
                reg = thresholds[kind - 4]
                with contextlib.suppress(BlockingIOError):
                    os.read(reg.fileno(), 8)
                crossed.append(reg)
        if self._hooks_dirty:
            self._update_hooks()
        if self._runner is not None:
            self._runner.update_hold()  # first: the step may be the last before an episode
        self._collect()
        self._check_runner()
        # The table is refreshed after any wake-up (an episode's end, a
        # grant, a threshold) and every refresh_interval if one is given,
        # but at most once per REFRESH_GAP.
        now = time.monotonic()
        due = woke or self._arming.pending_restore is not None or self._deferred
        if now >= self._next_refresh or poked or (due and now >= self._last_refresh + REFRESH_GAP):
            self._last_refresh = now
            self._deferred = False
            if self.refresh_interval is not None:
                self._next_refresh = now + self.refresh_interval
            self._refresh(grant=False)
        elif due:
            self._deferred = True
        for size, hooks in self._arming.pressure_due(crossed):
            run_usage_pressure(self.group, size, hooks, self._arming.limit, self.note)

    def service_pressure(self) -> None:
        """The service manager reported memory pressure: every ``on_pressure`` hook runs once."""
        run_service_pressure(self.group, self._hooks.get("pressure"), self._arming.limit, self.note)

    def note(self, err: BaseException) -> None:
        """An error the manager survived, stepping this group."""
        self.errors.append(err)
        if isinstance(err, GroupGone):
            self._running = False  # the manager steps it no more
            moved = self._arming.moved_to()
            if moved is not None:  # the native plan acts on at the OOM; stop() restores through open files
                logger.warning("%s was renamed to %s: it is handled no more; handle it there", self.group.relpath,
                               moved, extra={"group": self.group.relpath, "cause": "group_renamed", "path": moved})
            return
        # Never spin on a repeating error, but never sleep either: the
        # manager thread serves every group. The group's timed step waits.
        # Under the OOM (ENOMEM) the watcher resolves it meanwhile.
        enomem = isinstance(err, OSError) and err.errno == errno.ENOMEM
        self._backoff_until = time.monotonic() + (0.005 if enomem else 0.05)

    def inside(self) -> bool:
        """Whether this process (its main thread) is in the handled group or below it."""
        mine = Group.current()
        return (mine.relpath.rstrip("/") + "/").startswith(self.group.relpath.rstrip("/") + "/")

    def protect_pid(self, pid: int) -> None:
        """A watchdog just spawned is never a victim, from now on, before it
        is ready (on v2 it may start in the handled group, at its wall); the
        poke has the manager re-arm without it."""
        self._table.protect = self._table.protect | {pid}
        if self._poke is not None and not self._poke.closed:
            self._poke.write(1)

    def record_takeover(self, takeover: Takeover) -> None:
        """The watchdog handed an episode of this group to the kernel."""
        self._history.record(OomEvent.from_takeover(takeover))

    def watchdog_replaced(self, err: WatcherError) -> None:
        """The watchdog could not act (it was stopped) and was replaced: recorded in :attr:`errors`."""
        self.errors.append(err)
        logger.warning("%s", err, extra={"group": self.group.relpath, "cause": "watchdog_replaced"})

    def watchdog_lost(self, err: BaseException) -> None:
        """The watchdog died and could not be restarted: the group is guarded
        without it (v1: by the kernel OOM killer)."""
        lost = WatcherError(f"the watchdog of {self.group.relpath} could not be restarted ({err}); "
                            f"{self._arming.fallback}")
        self.errors.append(lost)
        logger.warning("no watchdog: %s", lost, extra={"group": self.group.relpath, "cause": "watchdog_lost"})
        try:
            self._arming.watchdog_lost()
        except OSError as error:
            self.errors.append(error)

    def restore(self) -> None:
        """Puts the group's settings back (the manager steps it no more):
        its kernel OOM killer first, never leaving a window with neither."""
        self._running = False
        self._quiesce_watcher()
        self._arming.restore()

    def drop_slot(self) -> None:
        """Takes the group out of the watcher (ending an episode still in
        progress): from now on nothing runs its plans."""
        slot, self._slot = self._slot, None
        if slot is not None:
            try:
                slot.close()
            except WatcherError as err:
                # The watcher may still read the plan: its fds stay open.
                self.errors.append(err)
                self._owned = []

    def dispose(self) -> None:
        """Once out of the watcher: its last records (routed after its slot
        closed) become events, then what its plans used is closed."""
        self._drain()
        self._inbox.clear()
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.stop()
        self._arming.drop_thresholds()
        self._hooks_dirty = True
        self._poke = None
        owned, self._owned = self._owned, []
        for obj in reversed(owned):
            obj.close()
        self._closer = None
        self._armed = []

    # -- arming ------------------------------------------------------------

    def _own(self, obj: Any) -> Any:
        self._owned.append(obj)
        return obj

    def _update_hooks(self) -> None:
        """After hooks changed: thresholds, the hook runner, the plan."""
        self._hooks_dirty = False
        self._arming.register_thresholds()
        wants_runner = bool(self._hooks.get("oom"))
        if wants_runner and self._runner is None:
            self._runner = self._new_runner()
            self._runner.update_hold()  # armed before the first episode, not at the first step
        elif not wants_runner and self._runner is not None:
            runner, self._runner = self._runner, None
            runner.stop()

    def _new_runner(self) -> HookRunner:
        if self._closer is None:
            self._closer = self._own(GrantCloser.open(self.group, lambda: self._arming.limit))
        # The manager is held too: it would compete with the hooks for the GIL.
        return HookRunner(self.group, self._hooks, self.watched, self._closer, self.hook_timeout,
                          hold_threads=self.hold_threads, hold_arm_at=self.hold_arm_at, held=self._held,
                          unsettled=self._hooks_unsettled)

    def _held(self) -> tuple[tuple[Victim, ...], Mapping[int, Pidfd]]:
        """The processes the armed plan stops while the hooks run, and their
        pidfds by pid (the table's, lent to the hook thread: one closed
        since is skipped, never a number reused)."""
        if not self._armed:
            return (), {}
        compiled = self._armed[-1].compiled
        lent = {v.pid: self._table.named(fd) for v, fd in zip(compiled.held, compiled.held_pidfds, strict=True)}
        return compiled.held, {pid: pidfd for pid, pidfd in lent.items() if pidfd is not None}

    @property
    def _reserve(self) -> int:
        if self.reserve or self._runner is None:
            return self.reserve
        return DEFAULT_HOOK_RESERVE

    def _context(self, procs_fd: int) -> PlanContext:
        stale = self._stale.active  # the safe mode: nobody from the table
        return PlanContext(
            victims=() if stale else self._table.victims,
            grant_wake_fd=self._grants.wake.fileno() if self.reserve else -1,
            grant_reply_fd=self._grants.reply.fileno() if self.reserve else -1,
            grant_timeout=self.grant_timeout,
            hooks_wake_fd=self._runner.wake.fileno() if self._runner else -1,
            hooks_reply_fd=self._runner.reply.fileno() if self._runner else -1,
            # A thread asleep at the wall when the episode began may hold the GIL.
            hooks_timeout=self.hook_timeout + self.group.wall_sleep_max,
            check_timeout=self.check_timeout,
            hold_processes=self.hold_processes,
            procs_fd=procs_fd,
            pidfds={} if stale else self._table.pidfds,
            procs_reopen=not self.group.procs_pread_relists,
            protect=tuple(sorted(self._table.protect)) + tuple(sorted(self._table.dying - self._table.protect)),
            member=self.member.line,
            can_pin=_fd.can_use_pidfd,
            **self._arming.plan_fields(self._reserve, self.delay),
        )

    def _refresh(self, *, grant: bool) -> None:
        """Refreshes the table and re-arms; outside an episode unless ``grant``.
        Outside a grant, the arming puts back a limit to restore and adopts
        one the user changed."""
        if not grant and self.watched.in_episode:
            return
        if not grant:
            self._arming.before_refresh()
        try:
            self._table.refresh()
        except OSError as err:
            if self._stale.failed(err, time.monotonic()):
                self.errors.append(self._stale.enter(self.group.relpath, err))
                self._arming.safe_mode(True)
            if self._stale.active:
                with contextlib.suppress(OSError):  # (a no-op once armed) retried at each failure
                    self._arm()
            raise
        if self._stale.succeeded():
            self._stale.leave(self.group.relpath)
            self._arming.safe_mode(False)
        self._nested.check(self.group, self.errors.append)
        self._grants.renew_spare_procs()
        if not grant:
            self._arming.after_refresh(self._reserve)
        self._arm()

    def _tell_limit(self, limit: int) -> None:
        """The arming adopted a limit the user changed: the watchdog restores that one."""
        if self._host is not None:
            self._host.guard_limit(limit)

    def _arm(self) -> None:
        # A new plan gets a cgroup.procs file of its own (on v1 a new one
        # each time: see useroom._procs); the plan armed keeps its file.
        key = self.policy.plan_key(self._context(self._procs.last))
        last = self._armed[-1] if self._armed else None
        if key is not None and last is not None and last.plan_id == self.watched.armed_id \
                and last.key == (self.policy, key):
            self._table.release(p for a in self._armed for p in a.compiled.pidfds)
            return  # the plan armed is the one this context compiles to
        ctx = self._context(self._procs.for_plan())
        key = self.policy.plan_key(ctx)
        compiled = self.policy.compile(ctx)
        plan_id = self.watched.arm(compiled.plan)
        armed = _ArmedPlan(compiled, plan_id, None if key is None else (self.policy, key))
        self._plans[plan_id] = armed
        self._armed = [*self._armed[-1:], armed]
        for old in [k for k in self._plans if k < plan_id - 16]:
            del self._plans[old]
        self._table.release(p for a in self._armed for p in a.compiled.pidfds)

    # -- the manager's step ------------------------------------------------

    def _check_runner(self) -> None:
        """A hook that never returns: abandon its thread, start a new one, re-arm."""
        runner = self._runner
        if runner is None or not runner.busy_since_ns:
            return
        if time.monotonic_ns() - runner.busy_since_ns > 2 * self.hook_timeout * 1e9:
            where = runner.where()
            runner.abandon()
            self._runner = self._new_runner()
            self._runner.update_hold()
            err = TimeoutError(f"an on_oom hook did not return within {self.hook_timeout} s"
                               f"; its thread was abandoned (at {where or 'an unknown place'})")
            self.errors.append(err)
            logger.warning("%s: %s", self.group.relpath, err,
                           extra={"group": self.group.relpath, "cause": "hook_abandoned"})

    def _hooks_unsettled(self, seq: int, records: tuple[HookRecord, ...]) -> None:
        """The hooks could not close their grant: if the group has no other
        task to kill, the last resort comes next. Called by the hook thread,
        with the service's threads still held (the manager, at the tail
        grant, may not get the GIL before the kernel acts)."""
        pidfds = [self._table.pidfd(v.pid) for v in self._table.victims]
        if not any(p is None or not p.exited for p in pidfds):
            self._last_resort(seq, records)

    def _last_resort(self, seq: int | None = None, records: tuple[HookRecord, ...] | None = None) -> None:
        """Nothing is left to kill and the usage does not fit: the plan's
        next step is the kernel OOM killer, which will take this process
        (the only task left). Its events die with it, so the watchdog
        records what the hooks did in its log (``last-resort``)."""
        if seq is None:
            current = self.watched.current_episode()
            seq = current[0] if current else 0
        if records is None:
            records = self._runner.records.get(seq, ()) if self._runner is not None else ()
        note = self.last_resorts.record(seq, records, self._arming.limit, kernel_next=self.kernel_fallback)
        if note is not None and self.watchdog is not None:
            self.watchdog.last_resort(note)

    # -- events ------------------------------------------------------------

    def _collect(self) -> None:
        """Turns the watcher's new records of this group into events."""
        if self._host is not None:
            self._host.collect()
        self._drain()

    def _drain(self) -> None:
        while self._inbox:
            record = self._inbox.popleft()
            event = self._event(record)
            if grant_left_open(event):
                self._arming.restore_later()
            self._table.dying.update(v.pid for v in event.victims if v.signal == "SIGKILL" and v.result == 0)
            self._history.record(event)
            if logger.isEnabledFor(logging.INFO):
                line, fields = episode_log(event, self.group.relpath)
                logger.info("%s", line, extra=fields)
            if self._event_log is not None:
                try:
                    self._event_log.write(event, self.group.relpath)
                except OutputError as err:  # the line went to stderr; the event is in self.events
                    self.note(err)
            if event.steps:
                self._after(event)

    def _event(self, record: EventRecord) -> OomEvent:
        armed = self._plans.get(record.plan_id)
        compiled = armed.compiled if armed is not None else None
        runner = self._runner
        hooks: tuple[HookRecord, ...] = runner.records.pop(record.episode, ()) if runner is not None else ()
        actions = self._grants.take_actions() if grant_acted(record, compiled) else ()
        return episode_event(record, compiled, hooks, actions, self._arming.limit)

    def _after(self, event: OomEvent) -> None:
        for fn, _ in self._hooks.get("kill"):
            for victim in event.victims:
                try:
                    fn(victim, event)
                except Exception as err:  # noqa: BLE001 - a user's on_kill hook: recorded, never fatal
                    self.note(err)
        for fn, _ in self._hooks.get("resolved"):
            try:
                fn(event)
            except Exception as err:  # noqa: BLE001 - a user's on_resolved hook: recorded, never fatal
                self.note(err)

    # -- teardown ----------------------------------------------------------

    def _quiesce_watcher(self) -> None:
        """Before the group's settings are put back: arm a plan that does
        nothing, and let an episode in progress end. Otherwise its later
        steps (a grant, the kernel step's "disable the kernel OOM killer
        again") could undo the restore that follows."""
        slot = self._slot
        host = self._host
        if slot is None or slot.closed or host is None or not host.watcher_running:
            return
        try:
            slot.arm(Plan(()))
        except WatcherError as err:
            self.errors.append(err)
            return
        longest = self.hook_timeout + self.grant_timeout + self.delay + 4 * self.check_timeout
        deadline = time.monotonic() + longest
        while slot.in_episode and time.monotonic() < deadline:
            time.sleep(0.001)
