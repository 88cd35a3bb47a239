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

A handler made on its own (``Handler(group, ...)``) is a supervisor of one
group: its :meth:`Handler.start` makes a private supervisor.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import json
import os
import select
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from useroom import native
from useroom._fd import OwnedFd
from useroom.cgroup import EventRegistration, Group
from useroom._declare import Declaration, probe
from useroom._hardening import HardeningReport
from useroom._hooks import (
    Hook,
    HookRecord,
    HookRegistry,
    HookRunner,
    PressureContext,
    hooks_short_by,
)
from useroom.native import EventFd, EventRecord, Plan, SourceKind, WatchedGroup
from useroom._last_resort import LastResorts
from useroom._settle import GrantCloser
from useroom.policy import (
    PICK_REASON,
    CompiledPlan,
    Phase,
    StepTag,
    FreezeAndDecide,
    FrozenContext,
    KillLargest,
    PlanContext,
    Policy,
)
from useroom._procs import ProcsFiles
from useroom._units import UNLIMITED, format_size, parse_duration, parse_size
from useroom._victims import Pidfd, Victim, VictimTable
from useroom.exceptions import GroupGone, RootGroupError, UnsupportedKernel, WatcherError
from useroom.handler.link import WatchdogLink
from useroom.watchdog import DEFAULT_DELAY, Takeover

__all__ = ["EventOutcome", "GroupHandler", "OomEvent", "ProcessOptions", "StepRecord", "VictimRecord"]

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
#: cgroup v2: the least gap between the wall (memory.high) and the backstop (memory.max).
V2_GAP = 16 << 20


class EventOutcome(str, enum.Enum):
    """How an episode ended (a ``str``: compares equal to its value); see
    :class:`OomEvent`."""

    RESOLVED = "resolved"
    SUPERSEDED = "superseded"
    RELIEVED = "relieved"
    UNRESOLVED = "unresolved"
    NOT_NEEDED = "not_needed"
    GONE = "gone"
    NO_PLAN = "no_plan"
    ACTED = "acted"
    FORWARDED = "forwarded"

    def __str__(self) -> str:
        return self.value


#: The watcher's outcome of a record, as an event's.
_OUTCOMES: dict[native.Outcome, EventOutcome] = {
    native.Outcome.RESOLVED: EventOutcome.RESOLVED,
    native.Outcome.SUPERSEDED: EventOutcome.SUPERSEDED,
    native.Outcome.RELIEVED: EventOutcome.RELIEVED,
    native.Outcome.UNRESOLVED: EventOutcome.UNRESOLVED,
    native.Outcome.NOT_NEEDED: EventOutcome.NOT_NEEDED,
    native.Outcome.GONE: EventOutcome.GONE,
    native.Outcome.NO_PLAN: EventOutcome.NO_PLAN,
    native.Outcome.ACTED: EventOutcome.ACTED,
    native.Outcome.FORWARDED: EventOutcome.FORWARDED,
}


@attrs.frozen
class StepRecord:
    """One action the native plan ran during an episode: when it began
    (``started_ns``) and returned (``t_ns``), and its result (>= 0, or -errno)."""

    kind: str
    explanation: str
    #: None for a step of a plan no longer known (armed long before).
    phase: Phase | None
    result: int
    started_ns: int
    t_ns: int
    #: Whether the action opened a grant (raised the limit by the reserve)
    #: or restored the limit; ``StepTag.NONE`` for every other.
    tag: StepTag = StepTag.NONE
    #: The pid a signal step signalled (its target, or the pick); 0 if none.
    pid: int = 0

    @property
    def ok(self) -> bool:
        return self.result >= 0

    @property
    def settled(self) -> bool:
        """The hooks' wait, answered by a hook thread that closed the grant itself."""
        return self.kind == "AWAIT" and self.phase is Phase.HOOKS and self.result == native.SETTLED


@attrs.frozen
class VictimRecord:
    """A task signalled during an episode, and how the signal went."""

    pid: int
    name: str
    #: As of the refresh the plan was compiled from (0 for a task the pick
    #: found at the OOM); ``badness`` is the size at the OOM.
    rss: int
    signal: str
    result: int
    by: str  # "plan" (native) or "handler" (Python, during a grant)
    #: Picked at the OOM by badness (KillLargest): RSS + swap + page tables
    #: + the scaled oom_score_adj, in bytes, as read at that moment.
    badness: int | None = None


@attrs.frozen
class OomEvent:
    """One OOM episode of a handled group.

    Times are CLOCK_MONOTONIC nanoseconds (``time.monotonic_ns()``):
    ``notified_ns`` when the watcher read the notification, ``acted_ns`` when
    the first action began, ``resolved_ns`` when the watcher saw ``under_oom``
    clear (None if it did not). ``outcome`` is one of ``resolved``,
    ``superseded`` (the action took effect and the group ran out again
    before the check saw it clear: the next episode follows at once),
    ``relieved`` (no task waits, but the limit is still raised by at most
    the reserve; the handler restores it as soon as usage allows),
    ``unresolved``, ``not_needed`` (a notification with nothing to do),
    ``gone`` (the group was removed), ``no_plan``, ``acted``. ``resolved_by``
    names the phase that ended it: ``hooks`` (the ``on_oom`` hooks freed
    enough), ``kill`` (a victim of the plan), ``raise``, ``grant`` (the
    handler acted with headroom granted) or ``kernel``. ``fallback`` is True
    when the hooks and the planned victims were not enough and the headroom
    grant or the kernel OOM killer was used. ``hooks`` records each hook run;
    ``would``, under a :class:`DryRun` policy, what the policy would have done;
    ``moved``, under :class:`MoveToOverflow`, the pids moved out of the group.

    An episode the watchdog handed to the kernel is an event of its own with
    ``takeover`` set (its reason and timings), ``resolved_by == "watchdog"``
    and no steps.
    """

    seq: int
    notified_ns: int
    acted_ns: int | None
    resolved_ns: int | None
    outcome: EventOutcome
    action: str
    victims: tuple[VictimRecord, ...]
    steps: tuple[StepRecord, ...]
    fallback: bool
    plan_id: int
    resolved_by: Phase | None = None
    hooks: tuple[HookRecord, ...] = ()
    would: tuple[str, ...] = ()
    moved: tuple[int, ...] = ()
    takeover: Takeover | None = None
    #: The limit (v1) or wall (v2) the episode was about, in bytes; 0 if unknown.
    limit: int = 0

    @property
    def released(self) -> int:
        """Bytes the ``on_oom`` hooks gave back to the kernel in this episode
        (the usage's fall across each hook and the trim after it)."""
        return sum(h.released for h in self.hooks)

    @property
    def hooks_short_by(self) -> int | None:
        """After the hooks' last round, how many bytes the usage still
        exceeded the limit by (0 if it fitted); None if no hook ran."""
        return hooks_short_by(self.hooks, self.limit)

    @classmethod
    def from_takeover(cls, takeover: Takeover) -> OomEvent:
        ms = takeover.takeover_ns / 1e6
        return cls(
            seq=-1,
            notified_ns=takeover.notified_ns,
            acted_ns=takeover.acted_ns,
            resolved_ns=takeover.resolved_ns,
            outcome=EventOutcome.RESOLVED if takeover.resolved_ns is not None else EventOutcome.GONE,
            action=f"watchdog ({takeover.reason}): kernel OOM killer enabled {ms:.1f} ms after the notification",
            victims=(),
            steps=(),
            fallback=True,
            plan_id=-1,
            resolved_by=Phase.WATCHDOG,
            takeover=takeover,
        )

    @property
    def notify_to_hook_ns(self) -> int | None:
        """From the notification to the first hook starting."""
        return self.hooks[0].started_ns - self.notified_ns if self.hooks else None

    @property
    def notify_to_signal_ns(self) -> int | None:
        """From the notification to the first signal being sent (the system
        call's entry: its return can come after the woken victim has run)."""
        for step in self.steps:
            if step.kind in ("SIGNAL_PIDFD", "SIGNAL_PID", "SIGNAL_BEST") and step.ok:
                return step.started_ns - self.notified_ns
        return None

    @property
    def duration_ns(self) -> int | None:
        """From the notification to the OOM being over."""
        return None if self.resolved_ns is None else self.resolved_ns - self.notified_ns

    def to_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["notify_to_signal_ns"] = self.notify_to_signal_ns
        out["notify_to_hook_ns"] = self.notify_to_hook_ns
        out["duration_ns"] = self.duration_ns
        out["released"] = self.released
        out["hooks_short_by"] = self.hooks_short_by
        for hook, record in zip(out["hooks"], self.hooks):
            hook["released"] = record.released
        return out


@attrs.frozen
class _ArmedPlan:
    compiled: CompiledPlan
    plan_id: int
    #: The policy and its ``plan_key`` of the context it was compiled from.
    key: object = None


@attrs.frozen
class ProcessOptions:
    """What a process that handles OOMs sets once, for every group it
    serves: the watchdog's ``delay`` and its other settings, and the
    hardening (see :class:`~useroom.Handler`)."""

    delay: float = attrs.field(default=DEFAULT_DELAY, converter=parse_duration)
    harden: bool = True
    mlockall: bool = False
    watchdog: bool = True
    watchdog_group: Group | None = None
    watchdog_log: str | None = None
    heartbeat_timeout: float = attrs.field(default=5.0)

    @heartbeat_timeout.validator
    def _check_heartbeat(self, _: object, value: float) -> None:
        if not value > 0:
            raise ValueError(f"heartbeat_timeout must be > 0 seconds, not {value!r}")


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
        hold_threads: bool = True,
        hold_arm_at: float = 0.0,
        hold_processes: bool = True,
    ) -> None:
        if group.is_root:
            raise RootGroupError("the root memory cgroup has no limit and no OOM notifications")
        if group.version not in (1, 2):
            raise UnsupportedKernel(errno.ENOTSUP, f"no handler backend for cgroup v{group.version}")
        self.group = group
        self.policy = policy if policy is not None else KillLargest()
        self.reserve = 0 if reserve is None else parse_size(reserve)
        self.thresholds = tuple(sorted(thresholds))
        for fraction in self.thresholds:
            if not 0 < fraction < 1:
                raise ValueError(f"thresholds are fractions of the limit in (0, 1), not {fraction!r}")
        for name, value in (("refresh_interval", 1.0 if refresh_interval is None else refresh_interval),
                            ("check_timeout", check_timeout), ("grant_timeout", grant_timeout),
                            ("hook_timeout", hook_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, not {value!r}")
        self.refresh_interval = refresh_interval
        self.check_timeout = check_timeout
        self.grant_timeout = grant_timeout
        self.hook_timeout = hook_timeout
        self.kernel_fallback = kernel_fallback
        self.protect = frozenset(protect)
        #: The process-wide options (the supervisor's, when it has one).
        self.options = ProcessOptions(delay, harden, mlockall, watchdog, watchdog_group, watchdog_log,
                                      heartbeat_timeout)
        if not 0 <= hold_arm_at < 1:
            raise ValueError(f"hold_arm_at is a fraction of the limit in [0, 1), not {hold_arm_at!r}")
        self.hold_threads = hold_threads
        self.hold_arm_at = hold_arm_at
        self.hold_processes = hold_processes
        #: What :meth:`declare` found: ``kernel`` or ``shim`` per feature.
        self.declaration: Declaration | None = None
        #: Where the handler's own threads' kernel allocations are charged
        #: while it runs inside the group (cgroup v1), or None.
        self.kernel_memory_group: Group | None = None
        self._degraded = False
        #: Errors the manager thread met and survived (ENOMEM during an OOM, ...).
        self.errors: list[BaseException] = []
        #: Episodes that found nothing left to kill with the usage above the
        #: limit (the kernel OOM killer, the plan's last resort, comes next).
        self.last_resorts = LastResorts()
        self._events: list[OomEvent] = []
        self._events_lock = threading.Lock()
        self._event_cond = threading.Condition(self._events_lock)
        self._running = False
        #: The supervisor serving this group (a private one for a handler
        #: started on its own), its key there, and the watcher's group.
        self._supervisor: Any = None
        self._private: Any = None
        self._key = 0
        self._slot: WatchedGroup | None = None
        #: The watcher's records of this group, routed by the manager.
        self._inbox: collections.deque[EventRecord] = collections.deque()
        #: The manager steps this group with it held; removal takes it.
        self._step_lock = threading.RLock()
        self._registered: dict[int, int] = {}  # fd -> its epoll data in the manager's set
        self._guarded = False  # the supervisor's watchdog guards it
        self._owned: list[Any] = []
        self._thresholds: list[EventRegistration] = []
        self._plans: dict[int, _ArmedPlan] = {}
        self._armed: list[_ArmedPlan] = []
        self._grant_actions: list[VictimRecord] = []
        self._limit = UNLIMITED
        self._pending_restore: int | None = None
        self._next_refresh = float("inf")  # time.monotonic() of the next timed refresh
        self._last_refresh = 0.0  # and of the last refresh from a wake-up
        self._deferred = False  # a wake-up's refresh waits for the end of REFRESH_GAP
        self._backoff_until = 0.0  # after an error, no timed step before this
        self._restore_kill_setting: bool | None = None
        self._hooks = HookRegistry()
        self._runner: HookRunner | None = None
        self._closer: GrantCloser | None = None
        self._pressure: list[tuple[EventRegistration, int, list[Hook]]] = []
        #: v2's pressure hooks: [size, hooks, above at the last look].
        self._polled: list[list[Any]] = []
        self._saved_v2: tuple[int, int] | None = None
        self._freeze_fd: _Fd | None = None
        self._kill_fd: _Fd | None = None
        self._backstop = UNLIMITED
        self._poke: EventFd | None = None
        self._spare_procs: _Fd | None = None

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
        fraction of the limit in (0, 1), or a size."""
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
        """The episodes so far, oldest first (a copy)."""
        with self._events_lock:
            return list(self._events)

    @property
    def lost(self) -> int:
        """Watcher records overwritten before they were read (0 normally)."""
        return self._supervisor.lost if self._supervisor is not None else 0

    @property
    def supervisor(self) -> Any:
        """The :class:`~useroom.Supervisor` serving this group (a private
        one for a handler started on its own), or None."""
        return self._supervisor

    @property
    def watchdog(self) -> WatchdogLink | None:
        """The watchdog process guarding this group while it runs (shared by
        the supervisor's groups), or None without one."""
        sup = self._supervisor
        return sup.watchdog if sup is not None and self._guarded else None

    @property
    def hardening(self) -> HardeningReport | None:
        """What :func:`lock_memory` did for the process; None before start or with harden=False."""
        return self._supervisor.hardening if self._supervisor is not None else None

    @property
    def locked_bytes(self) -> int:
        """This process's locked bytes (VmLck) once started."""
        return self._supervisor.locked_bytes if self._supervisor is not None else 0

    @property
    def victims(self) -> tuple[Victim, ...]:
        """The victim table as of the last refresh."""
        return self._table.victims if self._running else ()

    def wait_for_events(self, count: int, timeout: float | None = None) -> list[OomEvent]:
        """Blocks until at least ``count`` episodes are recorded or ``timeout`` passes."""
        with self._event_cond:
            self._event_cond.wait_for(lambda: len(self._events) >= count, timeout)
            return list(self._events)

    @property
    def delay(self) -> float:
        """How long an episode may last before the watchdog hands it to the kernel (seconds)."""
        return self.options.delay

    # -- arming ------------------------------------------------------------

    def _own(self, obj: Any) -> Any:
        self._owned.append(obj)
        return obj

    def _open(self, slot: WatchedGroup) -> None:
        """Prepares every fd and arms the first plan in the watcher's
        ``slot`` for this group (the supervisor's watcher)."""
        group = self.group
        self._slot = slot
        try:
            self._grant_wake = self._own(EventFd())
            self._grant_reply = self._own(EventFd())
            self._poke = self._own(EventFd())
            self._table = self._own(VictimTable(group, self.protect))
            self._procs = self._own(ProcsFiles(group))
            if group.version == 2:
                self._open_v2()
            else:
                self._open_v1()
            self._update_hooks()
            self.policy.arm(group)
            self._owned.append(_Closing(self.policy.disarm))
            self._refresh(grant=False)
            if self.refresh_interval is not None:
                self._next_refresh = time.monotonic() + self.refresh_interval
        except BaseException:
            self._close()
            self._drop_slot()
            self._closed()
            raise

    def _activate(self) -> None:
        """The watcher runs: from now on it acts for the group."""
        if self._restore_kill_setting is not None:
            self.group.set_oom_kill(False)  # v1: the watcher acts from now on
        self._running = True

    @property
    def _watched(self) -> WatchedGroup:
        """The group's slot in the watcher, while it has one."""
        if self._slot is None:
            raise WatcherError(f"{self.group.relpath} is not served by a running watcher")
        return self._slot

    def _declare_and_needs_watchdog(self) -> bool:
        return self.declare().needs_watchdog

    def _open_v1(self) -> None:
        """v1: the OOM eventfd wakes the watcher; the kernel killer is switched off."""
        group = self.group
        oom_file = group.oom_control_file  # type: ignore[attr-defined]
        self._check_fd = self._own(_Fd(group.open_file(oom_file, os.O_RDONLY)))
        # The first read allocates the seq_file buffer; later preads from
        # the watcher reuse it, so it can read the file even during the OOM.
        os.pread(self._check_fd.fileno(), 256, 0)
        self._limit_fd = self._own(_Fd(group.open_file(group.limit_file, os.O_WRONLY)))
        self._switch_fd = (
            self._own(_Fd(group.open_file(oom_file, os.O_WRONLY))) if self.kernel_fallback else None
        )
        self._oom = self._own(group.oom_notifier())
        self._watched.add_source(self._oom.fileno(), SourceKind.OOM)
        # The kernel killer goes off only once the watcher runs (see
        # _start): a group at its limit meanwhile would leave this process
        # asleep in the OOM wait with nobody to act.
        self._restore_kill_setting = not group.oom_control().kill_disabled
        self._limit = group.limit()

    def _open_v2(self) -> None:
        """v2: ``memory.high`` is the wall, ``memory.max`` the kernel's backstop.

        The wall is the group's ``memory.high`` if it is below
        ``memory.max``, else ``memory.max`` minus the gap (the reserve, at
        least :data:`V2_GAP`), so the user's hard limit stays what it was;
        with no ``memory.max`` the backstop becomes the wall plus the gap.
        ``memory.events`` changes wake the watcher; the check reads
        ``memory.current``; the kernel step lifts the wall for ``delay``.
        """
        group = self.group
        high, backstop = group.high(), group.limit()  # type: ignore[attr-defined]
        gap = max(self.reserve, V2_GAP)
        if high != UNLIMITED and (backstop == UNLIMITED or high < backstop):
            wall = high
        elif backstop != UNLIMITED:
            wall = backstop - gap
        else:
            raise ValueError(f"{group.relpath} has neither memory.max nor memory.high: set one (the handler "
                             "holds memory.high as its wall below memory.max)")
        if wall <= 0:
            raise ValueError(f"memory.max of {group.relpath} ({format_size(backstop)}) leaves no room for a wall "
                             f"{format_size(gap)} below it")
        self._saved_v2 = (high, backstop)
        if backstop == UNLIMITED:
            backstop = wall + gap
            group.set_limit(backstop)
        group.set_high(wall)  # type: ignore[attr-defined]
        self._backstop = backstop
        self._check_fd = self._own(_Fd(group.open_file(group.usage_file, os.O_RDONLY)))
        os.pread(self._check_fd.fileno(), 64, 0)
        high_file = group.high_file  # type: ignore[attr-defined]
        self._limit_fd = self._own(_Fd(group.open_file(high_file, os.O_WRONLY)))
        self._switch_fd = self._own(_Fd(group.open_file(high_file, os.O_WRONLY))) if self.kernel_fallback else None
        self._oom = self._own(group.events_notifier())  # type: ignore[attr-defined]
        self._watched.add_source(self._oom.fileno(), SourceKind.OOM, native.Wake.FILE)
        self._freeze_fd = self._kill_fd = None
        if not self._inside():
            # Outside the group only: cgroup.freeze and cgroup.kill would reach this process too.
            for attr, name in (("_freeze_fd", group.freeze_file), ("_kill_fd", group.kill_file)):  # type: ignore[attr-defined]
                if os.path.exists(os.path.join(group.path, name)):
                    setattr(self, attr, self._own(_Fd(group.open_file(name, os.O_WRONLY))))
        self._limit = wall

    def _register_thresholds(self) -> None:
        for reg in self._thresholds:
            reg.close()
        self._thresholds = []
        self._pressure = []
        self._polled = []
        if self._limit == UNLIMITED:
            return
        if self.group.version == 2:
            # No usage thresholds on v2: the manager compares memory.current
            # with the pressure hooks' sizes at each step.
            for fn, threshold in self._hooks.get("pressure"):
                size = int(self._limit * threshold) if isinstance(threshold, float) else parse_size(threshold)
                self._polled.append([size, [fn], self.group.usage() >= size])
            return
        for fraction in self.thresholds:
            self._thresholds.append(self.group.usage_threshold(int(self._limit * fraction)))
        by_size: dict[int, list[Hook]] = {}
        for fn, threshold in self._hooks.get("pressure"):
            size = int(self._limit * threshold) if isinstance(threshold, float) else parse_size(threshold)
            by_size.setdefault(size, []).append(fn)
        for size, hooks in sorted(by_size.items()):
            reg = self.group.usage_threshold(size)
            self._thresholds.append(reg)
            self._pressure.append((reg, size, hooks))

    def _update_hooks(self) -> None:
        """After hooks changed: thresholds, the hook runner, the plan."""
        self._hooks_dirty = False
        self._register_thresholds()
        wants_runner = bool(self._hooks.get("oom"))
        if wants_runner and self._runner is None:
            self._runner = self._new_runner()
            self._runner.update_hold()  # armed before the first episode, not at the first step
        elif not wants_runner and self._runner is not None:
            runner, self._runner = self._runner, None
            runner.stop()

    def _new_runner(self) -> HookRunner:
        if self._closer is None:
            self._closer = self._own(GrantCloser.open(self.group, lambda: self._limit))
        # The manager is held too: it would compete with the hooks for the GIL.
        return HookRunner(self.group, self._hooks, self._watched, self._closer, self.hook_timeout,
                          hold_threads=self.hold_threads, hold_arm_at=self.hold_arm_at, held=self._held,
                          unsettled=self._hooks_unsettled)

    def _held(self) -> tuple[tuple[Victim, ...], Mapping[int, Pidfd]]:
        """The processes the armed plan stops while the hooks run, and their pidfds by pid."""
        if not self._armed:
            return (), {}
        compiled = self._armed[-1].compiled
        return compiled.held, {p.pid: p for p in compiled.pidfds}

    @property
    def _reserve(self) -> int:
        if self.reserve or self._runner is None:
            return self.reserve
        return DEFAULT_HOOK_RESERVE

    def _context(self, procs_fd: int) -> PlanContext:
        shared = dict(
            victims=self._table.victims,
            limit_fd=self._limit_fd.fileno(),
            check_fd=self._check_fd.fileno(),
            kill_switch_fd=self._switch_fd.fileno() if self._switch_fd else -1,
            grant_wake_fd=self._grant_wake.fileno() if self.reserve else -1,
            grant_reply_fd=self._grant_reply.fileno() if self.reserve else -1,
            grant_timeout=self.grant_timeout,
            hooks_wake_fd=self._runner.wake.fileno() if self._runner else -1,
            hooks_reply_fd=self._runner.reply.fileno() if self._runner else -1,
            # A thread asleep at the wall when the episode began may hold the GIL.
            hooks_timeout=self.hook_timeout + self.group.wall_sleep_max,
            check_timeout=self.check_timeout,
            hold_processes=self.hold_processes,
            procs_fd=procs_fd,
            pidfds=self._table.pidfds,
            procs_reopen=not self.group.procs_pread_relists,
            protect=tuple(sorted(self._table.protect)) + tuple(sorted(self._table.dying - self._table.protect)),
        )
        if self.group.version == 2:
            wall = self._limit
            return PlanContext(
                limit=wall, resolved_needle=b"", resolved_below=wall, restore_resolves=False,
                lift=b"max",
                kill_switch_on=b"max", kill_switch_off=str(wall).encode(), kernel_timeout=self.delay,
                # Half the gap at most: the tasks a grant wakes must not reach
                # memory.max (the kernel) while the manager refreshes.
                reserve=min(self._reserve, max(0, (self._backstop - wall) // 2)),
                freeze_fd=self._freeze_fd.fileno() if self._freeze_fd is not None else -1,
                kill_fd=self._kill_fd.fileno() if self._kill_fd is not None else -1, **shared,
            )
        return PlanContext(limit=-1 if self._limit == UNLIMITED else self._limit, resolved_needle=b"under_oom 0",
                           reserve=self._reserve, **shared)

    def _refresh(self, *, grant: bool) -> None:
        """Refreshes the table and re-arms; outside an episode unless ``grant``."""
        if not grant and self._watched.in_episode:
            return
        if self.group.version == 2:
            self._refresh_v2(grant)
            return
        if self._pending_restore is not None and not grant and self.group.usage() <= self._pending_restore:
            try:
                self.group.set_limit(self._pending_restore)
                self._pending_restore = None
            except OSError as err:
                self.errors.append(err)
        self._table.refresh()
        self._renew_spare_procs()
        if not grant and self._restore_kill_setting is not None and not self._degraded:
            # The plan's last resort left the kernel killer on (tasks still
            # waited when it ended): turn it off again once no task waits.
            control = self.group.oom_control()
            if not control.kill_disabled and not control.under_oom:
                self.group.set_oom_kill(False)
        if not grant and self._pending_restore is None:
            limit = self.group.limit()
            if not self._watched.in_episode and limit != self._limit:
                self._collect()  # an episode that just ended may have raised it
            if self._pending_restore is None and not self._watched.in_episode \
                    and limit != self._limit:
                if self._limit != UNLIMITED and limit == self._limit + self._reserve:
                    # A grant of ours is still open: restore, never adopt it.
                    self._pending_restore = self._limit
                else:
                    self._limit = limit  # the user (or a raising policy) changed it
                    self._register_thresholds()
                    guardian = self._supervisor._guardian if self._supervisor is not None else None
                    if guardian is not None:
                        guardian.set_limit(self, limit)
        self._arm()

    def _refresh_v2(self, grant: bool) -> None:
        """v2: refresh, put back a wall the kernel step lifted (once the usage
        fits), adopt a wall the user moved, re-arm."""
        self._table.refresh()
        self._renew_spare_procs()
        if not grant:
            high = self.group.high()  # type: ignore[attr-defined]
            if high != self._limit:
                self._collect()  # an episode that just ended may have lifted or raised it
                high = self.group.high()  # type: ignore[attr-defined]
            if high == UNLIMITED or self._pending_restore is not None:
                # Lifted by the kernel step, or raised by the plan (a move)
                # and not put back: the wall returns once the usage fits.
                if high != self._limit and self.group.usage() < self._limit:
                    self.group.set_high(self._limit)  # type: ignore[attr-defined]
                    self._pending_restore = None
                elif high == self._limit:
                    self._pending_restore = None
            elif high != self._limit:
                self._limit = high  # the user moved the wall
                self._register_thresholds()
        self._arm()

    def _arm(self) -> None:
        # A new plan gets a cgroup.procs file of its own (on v1 a new one
        # each time: see useroom._procs); the plan armed keeps its file.
        key = self.policy.plan_key(self._context(self._procs.last))
        last = self._armed[-1] if self._armed else None
        if key is not None and last is not None and last.plan_id == self._watched.armed_id \
                and last.key == (self.policy, key):
            self._table.release(p for a in self._armed for p in a.compiled.pidfds)
            return  # the plan armed is the one this context compiles to
        ctx = self._context(self._procs.for_plan())
        key = self.policy.plan_key(ctx)
        compiled = self.policy.compile(ctx)
        plan_id = self._watched.arm(compiled.plan)
        armed = _ArmedPlan(compiled, plan_id, None if key is None else (self.policy, key))
        self._plans[plan_id] = armed
        self._armed = [*self._armed[-1:], armed]
        for old in [k for k in self._plans if k < plan_id - 16]:
            del self._plans[old]
        self._table.release(p for a in self._armed for p in a.compiled.pidfds)

    # -- the manager's step (called by the supervisor's manager thread) ------

    def _register(self, ep: native.Epoll, base: int) -> None:
        """Puts this group's fds in the manager's epoll set (data ``base |
        kind``: 1 a grant, 3 a hook change, 4 + i usage threshold i), and
        takes out those it no longer has."""
        want: dict[int, int] = {}
        if self._slot is None:
            return
        want[self._grant_wake.fileno()] = base | 1
        if self._poke is not None:
            want[self._poke.fileno()] = base | 3
        for i, reg in enumerate(self._thresholds):
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

    def _unregister(self, ep: native.Epoll) -> None:
        for fd in self._registered:
            with contextlib.suppress(OSError):
                ep.remove(fd)
        self._registered = {}

    def _due(self) -> float:
        """When (time.monotonic()) the manager must step this group even if
        nothing wakes it: a deferred or timed refresh, a limit to restore,
        a hook that may never return; inf if never."""
        due = self._next_refresh
        if self._deferred:
            due = min(due, self._last_refresh + REFRESH_GAP)
        if self._pending_restore is not None:
            due = min(due, self._last_refresh + (self.refresh_interval or PENDING_POLL))
        runner = self._runner
        if runner is not None and runner.busy_since_ns:
            due = min(due, (runner.busy_since_ns + 2 * self.hook_timeout * 1e9) / 1e9)
        return max(due, self._backoff_until)

    def _step(self, kinds: list[int], woke: bool) -> None:
        """One step of the manager for this group: ``kinds`` are the epoll
        data kinds of its fds that were ready; ``woke`` whether anything
        (an fd or a record) woke it."""
        crossed = []
        poked = False
        for kind in kinds:
            if kind == 1:
                self._grant()
            elif kind == 3:
                assert self._poke is not None
                self._poke.read()
                poked = True  # new hooks: a plan that wakes them now
            elif kind >= 4 and kind - 4 < len(self._thresholds):
                reg = self._thresholds[kind - 4]
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
        due = woke or self._pending_restore is not None or self._deferred
        if now >= self._next_refresh or poked or (due and now >= self._last_refresh + REFRESH_GAP):
            self._last_refresh = now
            self._deferred = False
            if self.refresh_interval is not None:
                self._next_refresh = now + self.refresh_interval
            self._refresh(grant=False)
        elif due:
            self._deferred = True
        for reg, size, hooks in self._pressure:
            if reg in crossed:
                self._run_pressure(size, hooks)
        if self._polled:
            usage = self.group.usage()
            for entry in self._polled:
                size, hooks, above = entry
                entry[2] = usage >= size
                if entry[2] and not above:
                    self._run_pressure(size, hooks)

    # -- the declared handler ----------------------------------------------

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
            self.group.write_file(files["handler"], str(self._supervisor.watcher_tid))
        self.declaration = declaration
        return declaration

    def _inside(self) -> bool:
        """Whether this process (its main thread) is in the handled group or below it."""
        mine = Group.current()
        return (mine.relpath.rstrip("/") + "/").startswith(self.group.relpath.rstrip("/") + "/")

    def _protect_pid(self, pid: int) -> None:
        """A watchdog just spawned is never a victim, from now on, before it
        is ready (on v2 it may start in the handled group, at its wall); the
        poke has the manager re-arm without it."""
        self._table.protect = self._table.protect | {pid}
        if self._poke is not None and not self._poke.closed:
            self._poke.write(1)

    def _takeover(self, takeover: Takeover) -> None:
        """The watchdog handed an episode of this group to the kernel."""
        with self._event_cond:
            self._events.append(OomEvent.from_takeover(takeover))
            self._event_cond.notify_all()

    def _watchdog_lost(self, err: BaseException) -> None:
        """The watchdog died and could not be restarted: the kernel OOM
        killer guards the group instead (v1)."""
        self._guarded = False
        self._degraded = True
        what = ("the kernel OOM killer is enabled for it instead" if self.group.version == 1 else
                "nothing will restore its memory.high and memory.max if this process dies")
        self.errors.append(WatcherError(f"the watchdog of {self.group.relpath} could not be restarted ({err}); "
                                        f"{what}"))
        try:
            self.group.set_oom_kill(True)  # v2: nothing to switch
        except OSError as error:
            self.errors.append(error)

    def _run_pressure(self, size: int, hooks: list[Hook]) -> None:
        usage = self.group.usage()
        if usage < size:
            return  # crossed downward
        ctx = PressureContext(self.group, size, usage, self._limit)
        for fn in hooks:
            try:
                fn(ctx)
            except Exception as err:
                self._note(err)

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
            self.errors.append(TimeoutError(f"an on_oom hook did not return within {self.hook_timeout} s"
                                            f"; its thread was abandoned (at {where or 'an unknown place'})"))

    def _note(self, err: BaseException) -> None:
        self.errors.append(err)
        del self.errors[:-100]
        if isinstance(err, GroupGone):
            self._running = False  # the manager steps it no more
            return
        # Never spin on a repeating error, but never sleep either: the
        # manager thread serves every group. The group's timed step waits.
        # Under the OOM (ENOMEM) the watcher resolves it meanwhile.
        enomem = isinstance(err, OSError) and err.errno == errno.ENOMEM
        self._backoff_until = time.monotonic() + (0.005 if enomem else 0.05)

    def _grant(self) -> None:
        """With headroom granted: refresh, kill by policy from Python until
        the limit can be restored (other tasks may take what one victim
        freed), then reply."""
        self._grant_wake.read()
        try:
            try:
                self._table.refresh()
            except OSError as err:
                if err.errno != errno.ENOMEM:
                    raise
                # The woken tasks took the headroom before this thread could
                # open /proc: act with what needs no new file.
                self._kill_unseen()
                return
            if isinstance(self.policy, FreezeAndDecide):
                self._decide(self.policy)
                return
            killed = False
            for victim, _ in self.policy.order(self._table.victims):
                pidfd = self._table.pidfd(victim.pid)
                if pidfd is not None and pidfd.exited:
                    continue
                if self._kill_now(victim, self.policy.signal) != 0:
                    continue
                killed = True
                # Its memory comes back when it has exited: judge the fit
                # then, or the next victim dies for memory already freed.
                if self._limit_fits() or (self._exited(victim) and self._limit_fits()):
                    break
            if not killed and not self._limit_fits():
                self._last_resort()
        finally:
            self._grant_reply.write(1)

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
            current = self._watched.current_episode()
            seq = current[0] if current else 0
        if records is None:
            records = self._runner.records.get(seq, ()) if self._runner is not None else ()
        note = self.last_resorts.record(seq, records, self._limit, kernel_next=self.kernel_fallback)
        if note is not None and self.watchdog is not None:
            self.watchdog.send(b"last-resort " + json.dumps(note).encode())

    def _kill_unseen(self) -> None:
        """Kill, by pid, the tasks no refresh has seen (the newest first),
        then the table's live ones in policy order, until the limit fits.

        Runs when the refresh failed with ENOMEM: it opens no file. The
        tasks come from the spare ``cgroup.procs`` fd opened at the last
        refresh and never read (cgroup v1 loads the task list on an fd's
        first read; a read fd would list its first read's tasks again for a
        second), the kill is ``kill(2)``, and the fit is tried through the
        open limit fd. A pid is killed only if it was in the group's task
        list read just before.
        """
        spare, self._spare_procs = self._spare_procs, None
        if spare is None:
            return
        with spare:
            pids = [int(p) for p in os.pread(spare.fileno(), 1 << 20, 0).split()]
        table = self._table
        known = {v.pid: v for v in table.victims}
        skip = table.protect | table.dying
        unseen = sorted((p for p in pids if p not in known and p not in skip), reverse=True)
        ranked = [v.pid for v, _ in self.policy.order(table.victims) if v.pid in pids and v.pid not in skip]
        deadline_step = self.check_timeout
        for pid in [*unseen, *ranked]:
            victim = known.get(pid)
            try:
                os.kill(pid, signal.SIGKILL)
                result = 0
            except OSError as err:
                result = -(err.errno or errno.EIO)
            self._grant_actions.append(VictimRecord(pid, victim.name if victim else "?", victim.rss if victim else 0,
                                                    "SIGKILL", result, "handler"))
            if result != 0:
                continue
            table.dying.add(pid)
            deadline = time.monotonic() + deadline_step
            while True:
                if self._limit_fits():
                    return
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.001)  # the victim is exiting: its memory comes back

    def _decide(self, policy: FreezeAndDecide) -> None:
        """The group is stopped: ask the user's callback whom to kill."""
        victims = {v.pid: v for v in self._table.victims}
        ctx = FrozenContext(tuple(victims.values()), self.group.usage(), self._limit)
        try:
            chosen = list(policy.decide(ctx))
        except Exception as err:
            self._note(err)
            return
        killed = []
        for pid in chosen:
            victim = victims.get(pid)
            pidfd = self._table.pidfd(pid)
            if victim is None or pidfd is None:
                self.errors.append(ValueError(f"decide() chose {pid}, which is not a task of the group"))
                continue
            if self._kill_now(victim, signal.SIGKILL) == 0:
                killed.append(pidfd)
        # The plan restores the limit once this returns: let the memory come back first.
        deadline = time.monotonic() + self.check_timeout
        for pidfd in killed:
            select.select([pidfd], [], [], max(0.0, deadline - time.monotonic()))

    def _kill_now(self, victim: Victim, sig: int) -> int:
        """Signals a victim from Python (headroom granted), reaps its memory
        after SIGKILL, and records it; returns 0 or -errno."""
        result = 0
        pidfd = self._table.pidfd(victim.pid)
        try:
            if pidfd is None:
                os.kill(victim.pid, sig)  # no pidfds: the table was refreshed just now
            else:
                signal.pidfd_send_signal(pidfd.fileno(), sig)
                if native.can_use_mrelease() and sig == signal.SIGKILL:
                    try:
                        native.mrelease(pidfd.fileno())
                    except OSError:
                        pass  # it exited already: its memory is back
        except OSError as err:
            result = -(err.errno or errno.EIO)
        self._grant_actions.append(VictimRecord(victim.pid, victim.name, victim.rss, signal.Signals(sig).name,
                                                result, "handler"))
        if result == 0 and sig == signal.SIGKILL:
            self._table.dying.add(victim.pid)
        return result

    def _renew_spare_procs(self) -> None:
        """Keeps one unread ``cgroup.procs`` fd for :meth:`_kill_unseen`."""
        if self._spare_procs is not None and not self._spare_procs.closed:
            return
        try:
            self._spare_procs = self._own(_Fd(self.group.open_file(self.group.procs_file, os.O_RDONLY)))
        except OSError:
            self._spare_procs = None

    def _exited(self, victim: Victim) -> bool:
        """Waits up to ``check_timeout`` for a signalled victim to exit;
        True if it did (false at once without a pidfd to wait on)."""
        pidfd = self._table.pidfd(victim.pid)
        if pidfd is None:
            return False
        ready, _, _ = select.select([pidfd], [], [], self.check_timeout)
        return bool(ready)

    def _limit_fits(self) -> bool:
        """True if the limit can be restored now (it is, as a side effect).

        Written through the fd opened at start: this runs under the OOM,
        where opening the file may fail for want of memory.
        """
        if self._limit == UNLIMITED:
            return True
        if self.group.version == 2:
            # memory.high takes any value: the usage tells, and the plan
            # puts the wall back itself.
            try:
                return int(os.pread(self._check_fd.fileno(), 64, 0)) < self._limit
            except (OSError, ValueError):
                return False
        try:
            os.pwrite(self._limit_fd.fileno(), str(self._limit).encode(), 0)
        except OSError:
            return False
        return True

    def _collect(self) -> None:
        """Turns the watcher's new records of this group into events."""
        manager = self._supervisor._manager if self._supervisor is not None else None
        if manager is not None:
            manager.collect()
        self._drain()

    def _drain(self) -> None:
        while self._inbox:
            record = self._inbox.popleft()
            event = self._event(record)
            if self._grant_left_open(event):
                self._pending_restore = self._limit
            self._table.dying.update(v.pid for v in event.victims if v.signal == "SIGKILL" and v.result == 0)
            with self._event_cond:
                self._events.append(event)
                self._event_cond.notify_all()
            if event.steps:
                self._after(event)

    @staticmethod
    def _grant_left_open(event: OomEvent) -> bool:
        """True if the episode raised the limit and no restore succeeded after it."""
        open_ = False
        for step in event.steps:
            if step.ok and step.tag is StepTag.GRANT:
                open_ = True
            elif step.ok and step.tag is StepTag.RESTORE:
                open_ = False
            elif step.settled:
                open_ = False  # the hook thread restored it
        return open_

    def _after(self, event: OomEvent) -> None:
        for fn, _ in self._hooks.get("kill"):
            for victim in event.victims:
                try:
                    fn(victim, event)
                except Exception as err:
                    self._note(err)
        for fn, _ in self._hooks.get("resolved"):
            try:
                fn(event)
            except Exception as err:
                self._note(err)

    def _event(self, record: EventRecord) -> OomEvent:
        armed = self._plans.get(record.plan_id)
        steps = []
        victims = []
        for step in record.steps:
            i = step.index
            why = armed.compiled.explanations[i] if armed else ""
            phase = armed.compiled.phases[i] if armed else None
            tag = armed.compiled.tags[i] if armed else StepTag.NONE
            target = armed.compiled.targets[i] if armed else None
            badness = None
            if step.kind == native.ActionKind.SIGNAL_BEST and step.pid == 0 and step.result == native.WAITED:
                why = "waited for the last victim to exit before picking another"
            if armed and step.kind == native.ActionKind.SIGNAL_BEST and step.pid > 0:
                # A candidate, or a task started since the refresh that the
                # pick found through cgroup.procs (no name known).
                badness = step.points * 1024
                target = armed.compiled.candidates[step.pick] if step.pick >= 0 else \
                    Victim(step.pid, "", 0, 0.0, -1)
                sig_name = signal.Signals(armed.compiled.plan.actions[i].sig).name
                who = f"{target.name}, " if target.name else "new since the refresh, "
                why = f"{sig_name} {target.pid} ({who}{format_size(badness)}): {PICK_REASON}"
            signalled = target.pid if target is not None and step.kind.name.startswith("SIGNAL") else 0
            steps.append(StepRecord(step.kind.name, why, phase, step.result, step.t0_ns, step.t_ns, tag, signalled))
            if armed and target is not None and step.kind.name.startswith("SIGNAL"):
                sig = signal.Signals(armed.compiled.plan.actions[i].sig).name
                victims.append(VictimRecord(target.pid, target.name, target.rss, sig, step.result, "plan", badness))
        fallback = any(s.phase in (Phase.GRANT, Phase.KERNEL) for s in steps)
        resolved_by = None
        if record.outcome in (native.Outcome.RESOLVED, native.Outcome.SUPERSEDED) and steps:
            resolved_by = steps[-1].phase
            for s_ in steps:
                if s_.t_ns >= record.resolved_ns:
                    resolved_by = s_.phase
                    break
        hooks: tuple[HookRecord, ...] = ()
        for runner in (self._runner,):
            if runner is not None:
                hooks = runner.records.pop(record.episode, ())
        if any(s.phase in (Phase.GRANT, Phase.FREEZE) for s in steps) and self._grant_actions:
            victims.extend(self._grant_actions)
            self._grant_actions = []
        moved = tuple(armed.compiled.targets[st.index].pid for st in record.steps  # type: ignore[union-attr]
                      if armed and st.result >= 0 and armed.compiled.phases[st.index] is Phase.MOVE
                      and armed.compiled.targets[st.index] is not None)
        taken = [s.explanation for s in steps if s.ok and s.kind != "CHECK" and s.explanation]
        action = "; ".join(taken) if taken else "nothing"
        return OomEvent(
            seq=record.episode,
            notified_ns=record.notified_ns,
            acted_ns=record.acted_ns or None,
            resolved_ns=record.resolved_ns or None,
            outcome=_OUTCOMES[record.outcome],
            action=action,
            victims=tuple(victims),
            steps=tuple(steps),
            fallback=fallback,
            plan_id=record.plan_id,
            resolved_by=resolved_by,
            hooks=hooks,
            would=armed.compiled.would if armed else (),
            moved=moved,
            limit=0 if self._limit == UNLIMITED else self._limit,
        )

    # -- teardown (called by the supervisor) ---------------------------------

    def _quiesce_watcher(self) -> None:
        """Before the group's settings are put back: arm a plan that does
        nothing, and let an episode in progress end. Otherwise its later
        steps (a grant, the kernel step's "disable the kernel OOM killer
        again") could undo the restore that follows."""
        slot = self._slot
        sup = self._supervisor
        if slot is None or slot.closed or sup is None or sup._watcher is None or not sup._watcher.running:
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

    def _close(self) -> None:
        """Puts the group's settings back (the manager steps it no more):
        its kernel OOM killer first, never leaving a window with neither."""
        self._running = False
        self._quiesce_watcher()
        if self._restore_kill_setting is not None:
            try:
                if self._restore_kill_setting:
                    self.group.set_oom_kill(True)
            except GroupGone:
                pass
            self._restore_kill_setting = None
        if self._pending_restore is not None and self.group.version == 1:
            with contextlib.suppress(OSError):
                self.group.set_limit(self._pending_restore)
        self._pending_restore = None
        freeze, self._freeze_fd = self._freeze_fd, None
        if freeze is not None and not freeze.closed:
            with contextlib.suppress(OSError):
                os.pwrite(freeze.fileno(), b"0", 0)  # never leave the group frozen
        saved, self._saved_v2 = self._saved_v2, None
        if saved is not None:
            # memory.high first to max, so it never sits above memory.max.
            try:
                self.group.set_high(UNLIMITED)  # type: ignore[attr-defined]
                self.group.set_limit(saved[1])
                self.group.set_high(saved[0])  # type: ignore[attr-defined]
            except OSError as err:
                self.errors.append(err)
        self._degraded = False

    def _drop_slot(self) -> None:
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

    def _closed(self) -> None:
        """Once out of the watcher: its last records (routed after its slot
        closed) become events, then what its plans used is closed."""
        self._drain()
        self._inbox.clear()
        runner, self._runner = self._runner, None
        if runner is not None:
            runner.stop()
        for reg in self._thresholds:
            reg.close()
        self._thresholds = []
        self._pressure = []
        self._hooks_dirty = True
        self._poke = None
        owned, self._owned = self._owned, []
        for obj in reversed(owned):
            obj.close()
        self._closer = None
        self._armed = []


class _Closing:
    """Calls ``fn`` on close (an owned clean-up step)."""

    def __init__(self, fn: Any) -> None:
        self._fn = fn

    def close(self) -> None:
        self._fn()


class _Fd(OwnedFd):
    """A plain fd with one owner."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
