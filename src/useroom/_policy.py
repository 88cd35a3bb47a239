"""Policies: who to kill or what to raise, decided ahead and compiled to a native plan.

A policy orders the victim table (at refresh time, when reading ``/proc``
is allowed) and compiles that order into a :class:`useroom._native.Plan`:
a fixed list of actions the native watcher runs on the next OOM without
Python. Each action carries a one-line explanation that ends up in the
episode's event record.

The plan every kill policy compiles to, for victims v1, v2, ...::

    hooks: limit += reserve (opens a grant), wake the hooks, await them,
           restore the limit (resolves)             # only with on_oom hooks
    [SIGTERM v1, wait for v1 to exit (grace)]       # only with term_grace
    SIGKILL v1, process_mrelease v1,
    [wait for v1 to exit, restore the limit]        # only while the hooks' grant is open
    check                                           # done if the OOM is over
    SIGKILL v2, ...                                 # else the next victim
    grant: limit += reserve, wake Python, await its reply, restore the limit
    kernel: oom_kill_disable=0, check, oom_kill_disable=1 (once no task waits)

A victim that already exited is skipped without waiting. A restore runs only
if its grant did, and its success ends the episode: usage fits the limit
again; while a grant is open a check cannot end the episode, only see the
sleepers woken. The hooks' grant lets Python run with the OOM lifted (the
GIL may be held by a thread asleep in the OOM wait; the grant wakes it); the
tail grant lets Python refresh the table (a task forked after the last
refresh is not in the plan) and act; the kernel step is the last resort. If
no restore succeeds the episode ends ``relieved``: nobody waits, the limit
is raised by at most the reserve, and the handler restores it as soon as
usage allows.
"""

from __future__ import annotations

import abc
import enum
import os
import signal
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Union

import attrs
import psutil

from useroom import _native
from useroom.cgroup import Group
from useroom._fd import OwnedFd
from useroom._native import Action, Candidate, Plan
from useroom._units import format_size, parse_size
from useroom._victims import Pidfd, Victim

#: Why KillLargest's pick was killed (the event names the task and its size).
PICK_REASON = "largest RSS + swap + page tables at the OOM"

#: Most processes the hooks' phase stops (each costs two plan actions).
HOLD_PROCESSES_MAX = 6

__all__ = [
    "Phase",
    "StepTag",
    "CompiledPlan",
    "DryRun",
    "FreezeAndDecide",
    "FrozenContext",
    "KillByPriority",
    "KillGroup",
    "KillLargest",
    "KillNewest",
    "MoveToOverflow",
    "PlanContext",
    "Policy",
    "RaiseLimit",
]


class Phase(str, enum.Enum):
    """Which part of a plan an action belongs to (a ``str``: compares equal
    to its value, ``"hooks"``, ``"kill"`` ...)."""

    HOOKS = "hooks"     # the on_oom hooks, with headroom granted
    KILL = "kill"       # the policy's victims
    RAISE = "raise"     # a raised limit
    MOVE = "move"       # tasks moved to the overflow group
    FREEZE = "freeze"   # the group frozen while the handler decides
    GRANT = "grant"     # the tail grant: the handler refreshes and acts
    KERNEL = "kernel"   # the last resort, the kernel OOM killer
    WATCHDOG = "watchdog"  # an episode the watchdog handed to the kernel (no plan step)

    def __str__(self) -> str:
        return self.value


class StepTag(str, enum.Enum):
    """What an action does that code reads back from the records: it opens
    a grant (raises the limit by the reserve) or restores the limit it
    raised. Every other action is ``NONE``. (A ``str``, as in JSON.)"""

    NONE = "none"
    GRANT = "grant"
    RESTORE = "restore"

    def __str__(self) -> str:
        return self.value



@attrs.frozen
class PlanContext:
    """What a policy compiles against: the table and the preopened fds."""

    victims: tuple[Victim, ...]
    limit: int
    limit_fd: int
    check_fd: int
    resolved_needle: bytes
    kill_switch_fd: int = -1
    kill_switch_on: bytes = b"0"
    kill_switch_off: bytes = b"1"
    reserve: int = 0
    grant_wake_fd: int = -1
    grant_reply_fd: int = -1
    grant_timeout: float = 1.0
    hooks_wake_fd: int = -1
    hooks_reply_fd: int = -1
    hooks_timeout: float = 1.0
    check_timeout: float = 0.25
    kernel_timeout: float = 2.0
    #: cgroup v2: the check reads a number (``memory.current``) and the
    #: episode is over below this (the wall); 0 on v1 (the needle decides).
    resolved_below: int = 0
    #: Whether a successful restore of the limit means the usage fits (v1,
    #: which refuses a limit below the usage). v2 accepts any ``memory.high``,
    #: so there a check after the restore decides instead.
    restore_resolves: bool = True
    #: cgroup v2: ``cgroup.freeze`` opened for writing, when the handler's own
    #: process is outside the group (it would freeze itself); -1 otherwise.
    freeze_fd: int = -1
    #: cgroup v2: ``cgroup.kill`` opened for writing, under the same condition.
    kill_fd: int = -1
    #: Stop the group's other processes (SIGSTOP, through their pidfds) before
    #: the hooks' grant, and continue them after: they would take the
    #: headroom before the hooks run. At most :data:`HOLD_PROCESSES_MAX`.
    hold_processes: bool = False
    #: The group's ``cgroup.procs`` for the native pick (see
    #: :mod:`useroom._procs`), and the pids it must never pick: the
    #: protected ones and those already killed (-1, (): none).
    procs_fd: int = -1
    protect: tuple[int, ...] = ()
    #: Whether the pick opens ``procs_fd`` anew to list the tasks of now (v1).
    procs_reopen: bool = False
    #: The victims' pidfds by pid (the table's, borrowed: it closes them
    #: once no armed plan uses them). Without pidfds, empty: the plan
    #: signals by pid.
    pidfds: Mapping[int, Pidfd] = attrs.field(factory=dict, eq=False, repr=False)
    #: cgroup v2: what the kill phase writes to ``limit_fd`` before its
    #: first kill (a higher wall), and ``limit`` after its last. A task over
    #: ``memory.high`` is put to sleep on its way back to user space, for a
    #: time that grows with the square of the overage and with its own last
    #: charge (a 2 MiB huge page counts 512 pages): up to 2 s, and only a
    #: fatal signal ends it. The task that crossed the wall computes that
    #: sleep after it reclaimed, so a wall opened at once spares it, and
    #: those that reach the old wall while the victim dies. Empty on v1 (no
    #: wall: the tasks wait in the OOM and run as soon as the limit fits).
    lift: bytes = b""

    def pidfd(self, victim: Victim) -> Pidfd | None:
        """The victim's pidfd, or None (no pidfds, or it exited before the refresh opened one)."""
        return self.pidfds.get(victim.pid)

    @property
    def can_grant(self) -> bool:
        return self.reserve > 0 and self.limit >= 0

    @property
    def limit_kb(self) -> int:
        """What the kernel scales oom_score_adj by in a memcg OOM: the
        group's limit, or the machine's memory and swap without one (kB)."""
        if self.limit > 0:
            return self.limit // 1024
        return int(psutil.virtual_memory().total + psutil.swap_memory().total) // 1024


@attrs.frozen
class CompiledPlan:
    """A plan, the explanation of each action, and what it relies on."""

    plan: Plan
    #: One line per action: why it is there.
    explanations: tuple[str, ...]
    #: One per action: the part of the plan it belongs to.
    phases: tuple[Phase, ...]
    #: One per action: the victim it signals, if any.
    targets: tuple[Victim | None, ...]
    victims: tuple[Victim, ...]
    pidfds: tuple[Pidfd, ...]
    #: What the policy would have done (dry runs), one line each.
    would: tuple[str, ...] = ()
    #: The processes the hooks' phase stops while the hooks run.
    held: tuple[Victim, ...] = ()
    #: What the plan's SIGNAL_BEST actions pick from, by the index a step
    #: records (:attr:`useroom._native.Step.pick`).
    candidates: tuple[Victim, ...] = ()
    #: One per action: whether it opens a grant or restores the limit.
    tags: tuple[StepTag, ...] = ()


def _with_pidfds(ctx: PlanContext) -> list[tuple[Victim, Pidfd]]:
    """The victims that have a pidfd, with it, in table order."""
    return [(v, p) for v in ctx.victims if (p := ctx.pidfd(v)) is not None]


def _status_open(pidfd: Pidfd | None) -> bool:
    """Whether the native pick can read the task's status at the OOM."""
    return pidfd is not None and pidfd.status is not None


class _Builder:
    def __init__(self, ctx: PlanContext) -> None:
        self.ctx = ctx
        self.actions: list[Action] = []
        self.why: list[str] = []
        self.phases: list[Phase] = []
        self.tags: list[StepTag] = []
        self.targets: list[Victim | None] = []
        self.victims: list[Victim] = []
        self.pidfds: list[Pidfd] = []
        #: Index of the hooks' grant while it may still be on.
        self.hooks_grant: int | None = None
        self.held: list[Victim] = []
        self.candidates: list[Victim] = []
        #: SIGNAL_BEST also looks for tasks that are not candidates.
        self.finding = False
        #: Index of the write that opened the wall (``PlanContext.lift``), until closed.
        self.opened: int | None = None

    def room(self) -> int:
        return _native.PLAN_MAX - len(self.actions)

    def add(self, action: Action, why: str, phase: Phase, target: Victim | None = None, *,
            tag: StepTag = StepTag.NONE) -> None:
        self.actions.append(action)
        self.why.append(why)
        self.phases.append(phase)
        self.targets.append(target)
        self.tags.append(tag)

    def kill(self, victim: Victim, reason: str, sig: int, term_grace: float | None) -> None:
        self.open_wall()
        who = victim.describe()
        pidfd = self.ctx.pidfd(victim)
        if pidfd is not None:
            self.pidfds.append(pidfd)
            fd = pidfd.fileno()
            if term_grace is not None:
                self.add(Action.signal_pidfd(fd, signal.SIGTERM), f"SIGTERM {who}: {reason}", Phase.KILL, victim)
                self.add(Action.await_readable(fd, term_grace), f"wait up to {term_grace} s for {victim.pid} to exit", Phase.KILL)
            signal_at = len(self.actions)
            self.add(Action.signal_pidfd(fd, sig), f"{signal.Signals(sig).name} {who}: {reason}", Phase.KILL, victim)
            if _native.can_use_mrelease and sig == signal.SIGKILL:
                self.add(Action.mrelease(fd), f"reap the memory of {victim.pid} now", Phase.KILL)
            if self.hooks_grant is not None:
                # The restore that follows needs the memory back: wait for the exit.
                self.add(Action.await_readable(fd, self.ctx.check_timeout).after(signal_at),
                         f"wait up to {self.ctx.check_timeout} s for {victim.pid} to exit", Phase.KILL)
        else:
            if term_grace is not None:
                self.add(Action.signal_pid(victim.pid, signal.SIGTERM), f"SIGTERM {who}: {reason}", Phase.KILL, victim)
            self.add(Action.signal_pid(victim.pid, sig), f"{signal.Signals(sig).name} {who}: {reason}", Phase.KILL, victim)
        if self.hooks_grant is not None:
            self.restore(self.hooks_grant, Phase.KILL)
        check = Action.check(self.ctx.check_timeout, supersede=True)
        if self.ctx.lift and pidfd is not None:
            check = check.until_exit(pidfd.fileno())
        self.add(check, self.check_why, Phase.KILL)
        self.victims.append(victim)

    @property
    def check_why(self) -> str:
        if self.ctx.lift:
            return "check whether the usage is back under the wall (until the victim has exited)"
        return "check whether the OOM is over"

    def kill_best(self, sig: int, reason: str) -> None:
        """Kill the candidate with the highest badness at the OOM (one of
        :attr:`candidates`, which the caller has set): the same steps as
        :meth:`kill`, on the pidfd the pick chose."""
        self.open_wall()
        signal_at = len(self.actions)
        self.add(Action.signal_best(sig, self.ctx.check_timeout), f"{signal.Signals(sig).name} the task with the {reason}",
                 Phase.KILL)
        if _native.can_use_mrelease and sig == signal.SIGKILL:
            self.add(Action.mrelease(0).on_pick(), "reap the memory of the pick now", Phase.KILL)
        if self.hooks_grant is not None:
            self.add(Action.await_readable(0, self.ctx.check_timeout).on_pick().after(signal_at),
                     f"wait up to {self.ctx.check_timeout} s for the pick to exit", Phase.KILL)
            self.restore(self.hooks_grant, Phase.KILL)
        check = Action.check(self.ctx.check_timeout, supersede=True)
        self.add(check.until_exit().on_pick() if self.ctx.lift else check, self.check_why, Phase.KILL)

    def open_wall(self) -> None:
        """Before the first kill (v2): the wall steps up to ``ctx.lift``."""
        if self.ctx.lift and self.opened is None:
            self.opened = len(self.actions)
            self.add(Action.write(self.ctx.limit_fd, self.ctx.lift),
                     f"open the wall while the handler kills (memory.high {self.ctx.lift.decode()}): "
                     "a task over it now would be put to sleep for up to 2 s", Phase.KILL)

    def close_wall(self) -> None:
        """After the kills: the wall back (whether they resolved the episode or not)."""
        if self.opened is not None:
            self.add(Action.write(self.ctx.limit_fd, str(self.ctx.limit).encode()).after(self.opened).always(),
                     f"close the wall again: memory.high {format_size(self.ctx.limit)}", Phase.KILL)
            self.opened = None

    def kill_cost(self, term_grace: float | None) -> int:
        return (2 + int(_native.can_use_mrelease) + (2 if term_grace is not None else 0)
                + (1 + self.restore_cost) * int(self.hooks_grant is not None))

    @property
    def restore_cost(self) -> int:
        """Actions of one restore: the write, and on v2 the check after it."""
        return 1 if self.ctx.restore_resolves else 2

    def restore(self, grant_at: int, phase: Phase) -> None:
        """Restore the limit if the grant at ``grant_at`` was made; success
        ends the episode (usage fits the limit again)."""
        limit = self.ctx.limit
        if not self.ctx.restore_resolves:
            self.add(Action.write(self.ctx.limit_fd, str(limit).encode()).after(grant_at).always(),
                     f"restore the wall to {format_size(limit)}", phase, tag=StepTag.RESTORE)
            self.add(Action.check(self.ctx.check_timeout).after(grant_at),
                     "check whether the usage is back under the wall", phase)
            return
        self.add(
            Action.write(self.ctx.limit_fd, str(limit).encode()).after(grant_at).always().resolving(),
            f"restore the limit to {format_size(limit)}",
            phase,
            tag=StepTag.RESTORE,
        )

    def grant(self, wake_fd: int, reply_fd: int, timeout: float, phase: Phase, who: str, *,
              settles: bool = False, then: tuple[tuple[int, Action, str], ...] = ()) -> int:
        """Raise the limit by the reserve, wake ``who``, await its reply,
        restore. With ``settles``, ``who`` may restore the limit itself and
        reply :data:`useroom._native.SETTLED`, which resolves the episode.
        ``then`` are (guard, action, why): run after the reply, always, if
        their guard ran."""
        ctx = self.ctx
        granted = ctx.limit + ctx.reserve
        grant_at = len(self.actions)
        raise_ = Action.write(ctx.limit_fd, str(granted).encode())
        self.add(
            raise_.opening() if ctx.restore_resolves else raise_,
            f"grant headroom: limit {format_size(ctx.limit)} -> {format_size(granted)}",
            phase,
            tag=StepTag.GRANT,
        )
        self.add(Action.wake(wake_fd).after(grant_at), f"wake {who}", phase)
        awaited = Action.await_readable(reply_fd, timeout, read=True).after(grant_at)
        self.add(awaited.settling() if settles else awaited, f"wait up to {timeout} s for {who}", phase)
        for guard, action, why in then:
            self.add(action.after(guard).always(), why, phase)
        self.restore(grant_at, phase)
        return grant_at

    def head(self) -> None:
        """The hooks' phase, when there are hooks and a reserve to grant."""
        ctx = self.ctx
        if ctx.can_grant and ctx.hooks_wake_fd >= 0 and ctx.hooks_reply_fd >= 0:
            # The other processes stop before the grant: the ones asleep in
            # the OOM wait take the stop as they return from the fault,
            # instead of the headroom.
            resume = []
            if ctx.hold_processes:
                for v, pidfd in _with_pidfds(ctx)[:HOLD_PROCESSES_MAX]:
                    self.pidfds.append(pidfd)
                    self.held.append(v)
                    fd = pidfd.fileno()
                    resume.append((len(self.actions), Action.signal_pidfd(fd, signal.SIGCONT), f"SIGCONT {v.pid}"))
                    self.add(Action.signal_pidfd(fd, signal.SIGSTOP),
                             f"SIGSTOP {v.describe()}: hold it while the hooks run", Phase.HOOKS)
            self.hooks_grant = self.grant(ctx.hooks_wake_fd, ctx.hooks_reply_fd, ctx.hooks_timeout,
                                          Phase.HOOKS, "the on_oom hooks", settles=True, then=tuple(resume))

    def tail(self) -> None:
        """The wall closed after the kills, then the grant and the kernel
        fallback, when the context allows them."""
        self.close_wall()
        ctx = self.ctx
        if ctx.can_grant and ctx.grant_wake_fd >= 0 and ctx.grant_reply_fd >= 0:
            self.grant(ctx.grant_wake_fd, ctx.grant_reply_fd, ctx.grant_timeout, Phase.GRANT,
                       "the handler to refresh and act")
        if ctx.kill_switch_fd >= 0:
            enable_at = len(self.actions)
            self.add(Action.write(ctx.kill_switch_fd, ctx.kill_switch_on), "last resort: let the kernel OOM killer act", Phase.KERNEL)
            self.add(Action.check(ctx.kernel_timeout), "check whether the kernel resolved it", Phase.KERNEL)
            # Disabled again only once no task waits: if the kernel has not
            # acted yet, it stays enabled and the handler disables it later.
            self.add(
                Action.write(ctx.kill_switch_fd, ctx.kill_switch_off).after(enable_at).always().if_clear(),
                "disable the kernel OOM killer again", Phase.KERNEL,
            )

    def tail_cost(self) -> int:
        ctx = self.ctx
        grant = 3 + self.restore_cost if ctx.can_grant and ctx.grant_wake_fd >= 0 and ctx.grant_reply_fd >= 0 else 0
        # The wall's opening and closing around the kills (v2).
        return grant + (3 if ctx.kill_switch_fd >= 0 else 0) + 2 * int(bool(ctx.lift))

    def build(self) -> CompiledPlan:
        candidates = []
        for v in self.candidates:
            pidfd = self.ctx.pidfd(v)
            assert pidfd is not None and pidfd.status is not None
            self.pidfds.append(pidfd)
            candidates.append(Candidate(pidfd.fileno(), pidfd.status.fileno(), v.pid,
                                        v.oom_score_adj * self.ctx.limit_kb // 1000,
                                        pidfd.adj.fileno() if pidfd.adj is not None else -1))
        # Tasks started since the refresh are found through cgroup.procs;
        # with more pids to protect than the plan holds, none are looked for.
        find = self.finding and len(self.ctx.protect) <= 32
        plan = Plan(tuple(self.actions), check_fd=self.ctx.check_fd, resolved_needle=self.ctx.resolved_needle,
                    resolved_below=self.ctx.resolved_below, candidates=candidates,
                    procs_fd=self.ctx.procs_fd if find else -1, protect=self.ctx.protect if find else (),
                    procs_reopen=self.ctx.procs_reopen,
                    limit_kb=self.ctx.limit_kb)
        return CompiledPlan(
            plan, tuple(self.why), tuple(self.phases), tuple(self.targets), tuple(self.victims),
            tuple(self.pidfds), held=tuple(self.held), candidates=tuple(self.candidates), tags=tuple(self.tags),
        )


def _valid_signal(_: object, attribute: attrs.Attribute[Any], value: int) -> None:
    try:
        signal.Signals(value)
    except ValueError:
        raise ValueError(f"{attribute.name} must be a signal number, not {value!r}") from None


@attrs.frozen
class Policy(abc.ABC):
    """Base of the kill policies: order the victims, then compile.

    ``signal`` is sent to each victim (SIGKILL by default); with
    ``term_grace`` (seconds) SIGTERM is sent first and the victim gets that
    long to exit, timed by its pidfd. At most ``max_victims`` are planned.
    """

    signal: int = attrs.field(default=signal.SIGKILL, validator=_valid_signal, kw_only=True)
    term_grace: float | None = attrs.field(default=None, kw_only=True)
    max_victims: int = attrs.field(default=8, kw_only=True)

    @term_grace.validator
    def _check_grace(self, _: object, value: float | None) -> None:
        if value is not None and not value >= 0:
            raise ValueError(f"term_grace must be >= 0 seconds, not {value!r}")

    @max_victims.validator
    def _check_max(self, _: object, value: int) -> None:
        if value < 1:
            raise ValueError(f"max_victims must be >= 1, not {value!r}")

    @abc.abstractmethod
    def order(self, victims: tuple[Victim, ...]) -> list[tuple[Victim, str]]:
        """The victims in kill order, each with the reason it is there."""

    def arm(self, group: Group) -> None:
        """Called by the handler before the first plan is compiled for
        ``group``: open what the plans will use (none by default)."""

    def disarm(self) -> None:
        """Called by the handler when it stops: close what :meth:`arm` opened."""

    def compile(self, ctx: PlanContext) -> CompiledPlan:
        b = _Builder(ctx)
        b.head()
        self._compile_kills(b, ctx)
        b.tail()
        return b.build()

    def plan_key(self, ctx: PlanContext) -> object | None:
        """What :meth:`compile` reads of ``ctx``: a handler that refreshed
        its table and finds the key of the plan it has armed skips the
        compile. Equal keys must compile to the same plan.

        None (the default) compiles after every refresh, as a policy whose
        :meth:`order` may read more than the table (a priority callable, a
        file) needs. In an OOM storm the table is refreshed several times
        per episode, and the handler's CPU time comes out of the workload's.
        """
        return None

    def _compile_kills(self, b: _Builder, ctx: PlanContext) -> None:
        budget = b.room() - b.tail_cost()
        cost = b.kill_cost(self.term_grace)
        for victim, reason in self.order(ctx.victims)[: self.max_victims]:
            if budget < cost:
                break
            b.kill(victim, reason, self.signal, self.term_grace)
            budget -= cost


@attrs.frozen
class KillLargest(Policy):
    """Kill the task the kernel's OOM killer would pick: the largest
    badness (resident + swapped-out + page-table memory, plus
    ``oom_score_adj`` scaled to the limit), measured at the OOM itself.

    The plan's native core reads each task's ``/proc/<pid>/status`` at the
    moment of the OOM (through fds opened at the refresh), so a task that
    grew since the refresh is seen at its size now, and one that exited is
    skipped. Tasks with ``oom_score_adj`` -1000 are never picked, as by the
    kernel. With ``term_grace``, or where those files could not be opened,
    the order is the largest RSS seen at the last refresh.
    """

    def order(self, victims: tuple[Victim, ...]) -> list[tuple[Victim, str]]:
        ranked = sorted((v for v in victims if v.oom_score_adj > -1000), key=lambda v: (-v.rss, -v.create_time))
        return [(v, "largest RSS at refresh") for v in ranked]

    def plan_key(self, ctx: PlanContext) -> object | None:
        if type(self) is not KillLargest:
            return None  # a subclass may order by anything
        if not self._picks_at_oom(ctx, [v for v, _ in self.order(ctx.victims)]):
            return ctx
        # The pick reads the sizes at the OOM: those of the refresh do not
        # make a new plan (the candidates are ordered by start time).
        return attrs.evolve(ctx, victims=tuple(attrs.evolve(v, rss=0) for v in ctx.victims))

    def _picks_at_oom(self, ctx: PlanContext, picks: list[Victim]) -> bool:
        """Whether the plan ranks the tasks at the OOM (rather than by the
        order of the refresh): no SIGTERM grace, something to pick, and each
        candidate's status file open."""
        finds = ctx.procs_fd >= 0 and type(self).order is KillLargest.order
        return self.term_grace is None and bool(picks or finds) and \
            all(_status_open(ctx.pidfd(v)) for v in picks)

    def _compile_kills(self, b: _Builder, ctx: PlanContext) -> None:
        # order() says who may be killed (a subclass may narrow it); the
        # native pick ranks them at the OOM.
        picks = [v for v, _ in self.order(ctx.victims)]
        finds = ctx.procs_fd >= 0 and type(self).order is KillLargest.order
        if not self._picks_at_oom(ctx, picks):
            super()._compile_kills(b, ctx)
            return
        # The kernel scans the oldest task first and a tie goes to the later one.
        b.candidates = sorted(picks, key=lambda v: (v.create_time, v.pid))[:_native.CANDS_MAX]
        b.finding = finds
        budget = b.room() - b.tail_cost()
        cost = b.kill_cost(None)
        for _ in range(self.max_victims if finds else min(self.max_victims, len(b.candidates))):
            if budget < cost:
                break
            b.kill_best(self.signal, PICK_REASON)
            budget -= cost


@attrs.frozen
class KillNewest(Policy):
    """Kill the most recently started task first."""

    def order(self, victims: tuple[Victim, ...]) -> list[tuple[Victim, str]]:
        ranked = sorted(victims, key=lambda v: (-v.create_time, -v.rss))
        return [(v, "newest task") for v in ranked]

    def plan_key(self, ctx: PlanContext) -> object | None:
        return ctx if type(self) is KillNewest else None


@attrs.frozen
class KillGroup(Policy):
    """Kill every task of the group at once, as ``memory.oom.group`` and
    systemd-oomd do: for a service whose processes make sense only together.

    On cgroup v2, with the handler's process outside the group, the plan
    writes ``cgroup.kill``: the kernel kills every task of the subtree,
    those started since the last refresh included. Otherwise (v1, or the
    handler inside the group, which must survive) it sends SIGKILL to every
    task of the table through its pidfd, then reaps their memory with
    ``process_mrelease``, then checks. Protected pids and the handler's
    own process are spared as always.
    """

    def order(self, victims: tuple[Victim, ...]) -> list[tuple[Victim, str]]:
        return [(v, "the whole group") for v in sorted(victims, key=lambda v: v.pid)]

    def compile(self, ctx: PlanContext) -> CompiledPlan:
        b = _Builder(ctx)
        b.head()
        if ctx.kill_fd >= 0:
            b.add(Action.write(ctx.kill_fd, b"1"), "kill the whole group (cgroup.kill)", Phase.KILL)
        else:
            budget = b.room() - b.tail_cost() - 1 - (b.restore_cost if b.hooks_grant is not None else 0)
            each = 1 + int(_native.can_use_mrelease)
            chosen = [v for v, _ in self.order(ctx.victims)][: max(0, budget // each)]
            for v in chosen:
                b.victims.append(v)
                why = f"SIGKILL {v.describe()}: the whole group"
                pidfd = ctx.pidfd(v)
                if pidfd is None:
                    b.add(Action.signal_pid(v.pid, signal.SIGKILL), why, Phase.KILL, v)
                    continue
                b.pidfds.append(pidfd)
                b.add(Action.signal_pidfd(pidfd.fileno(), signal.SIGKILL), why, Phase.KILL, v)
            if _native.can_use_mrelease:
                for v in chosen:
                    pidfd = ctx.pidfd(v)
                    if pidfd is not None:
                        b.add(Action.mrelease(pidfd.fileno()), f"reap the memory of {v.pid} now", Phase.KILL)
        if b.hooks_grant is not None:
            b.restore(b.hooks_grant, Phase.KILL)
        b.add(Action.check(ctx.check_timeout, supersede=True), "check whether the OOM is over", Phase.KILL)
        b.tail()
        return b.build()


PriorityFn = Callable[[psutil.Process], int]


@attrs.frozen
class KillByPriority(Policy):
    """Kill by a priority the user gives: highest first, then largest RSS.

    ``priority`` maps process names to priorities, or is a callable taking a
    ``psutil.Process`` and returning one; it is evaluated at refresh time,
    never during the OOM. Unlisted tasks get ``default``; tasks with a
    priority below ``spare_below`` are never killed.
    """

    priority: Union[Mapping[str, int], PriorityFn] = attrs.field(default=attrs.Factory(dict))
    default: int = 0
    spare_below: int | None = None

    def rank(self, victim: Victim) -> int:
        if callable(self.priority):
            try:
                return int(self.priority(psutil.Process(victim.pid)))
            except psutil.Error:
                return self.default
        return int(self.priority.get(victim.name, self.default))

    def order(self, victims: tuple[Victim, ...]) -> list[tuple[Victim, str]]:
        ranked = [(self.rank(v), v) for v in victims]
        if self.spare_below is not None:
            ranked = [(p, v) for p, v in ranked if p >= self.spare_below]
        ranked.sort(key=lambda pv: (-pv[0], -pv[1].rss))
        return [(v, f"priority {p}") for p, v in ranked]


def _positive_size(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive")


@attrs.frozen
class RaiseLimit(Policy):
    """Raise the limit by ``step`` per episode step, up to ``ceiling``; then
    fall back to ``then`` (a kill policy, KillLargest by default)."""

    step: int = attrs.field(converter=parse_size, validator=_positive_size)
    ceiling: int = attrs.field(converter=parse_size, validator=_positive_size)
    then: Policy = attrs.field(factory=KillLargest)

    def order(self, victims: tuple[Victim, ...]) -> list[tuple[Victim, str]]:
        return self.then.order(victims)

    def compile(self, ctx: PlanContext) -> CompiledPlan:
        # The grants restore the limit to ctx.limit; after a raise they would
        # lower it, so a raising policy grants nothing and runs no hooks phase.
        ctx = attrs.evolve(ctx, reserve=0)
        b = _Builder(ctx)
        limit = ctx.limit
        if limit >= 0:
            while limit + self.step <= self.ceiling and b.room() - b.tail_cost() > 2 + 3:
                limit += self.step
                b.add(
                    Action.write(ctx.limit_fd, str(limit).encode()),
                    f"raise the limit to {format_size(limit)} (ceiling {format_size(self.ceiling)})",
                    Phase.RAISE,
                )
                b.add(Action.check(ctx.check_timeout, supersede=True), "check whether the OOM is over", Phase.RAISE)
        self.then._compile_kills(b, ctx)
        b.tail()
        return b.build()


@attrs.frozen
class MoveToOverflow(Policy):
    """Move the task the ``select`` policy would kill into ``overflow``, a
    group of the user's own, instead of killing it.

    The task keeps running; what it charges from then on is charged to
    ``overflow`` and limited there. What it had charged already stays
    charged to the handled group: cgroup v2 never moves charges, and on
    cgroup v1 ``memory.move_charge_at_immigrate`` no longer does anything
    on current kernels. So the plan moves the task, then raises the handled
    group's limit by the charge the task leaves behind (its RSS as of the
    last refresh, at most ``max_raise``): the tasks asleep in the OOM wait
    wake up and the episode ends without a kill. The raise is temporary:
    the handler lowers the limit back as soon as usage fits it again (as
    the moved task frees or exits). Up to ``max_moved`` tasks are moved,
    each followed by a check; if the group is still out of memory, ``then``
    (KillLargest by default) runs as usual, then the kernel fallback.

    ``overflow`` must not be the handled group, one of its descendants or
    ancestors (charges there count against the handled group too), and
    the caller must be allowed to move the tasks (on v1 a non-root user
    moves only its own processes). Like :class:`RaiseLimit`, this policy
    grants no headroom of its own, so it runs no ``on_oom`` hooks phase.
    """

    overflow: Group
    select: Policy = attrs.field(factory=KillLargest)
    then: Policy = attrs.field(factory=KillLargest)
    max_moved: int = attrs.field(default=1)
    max_raise: int | None = attrs.field(default=None, converter=attrs.converters.optional(parse_size))
    _procs: list[OwnedFd] = attrs.field(factory=list, init=False, eq=False, repr=False)

    @max_moved.validator
    def _check_moved(self, _: object, value: int) -> None:
        if value < 1:
            raise ValueError(f"max_moved must be >= 1, not {value!r}")

    @max_raise.validator
    def _check_raise(self, _: object, value: int | None) -> None:
        if value is not None and value <= 0:
            raise ValueError(f"max_raise must be positive, not {value!r}")

    def order(self, victims: tuple[Victim, ...]) -> list[tuple[Victim, str]]:
        return self.select.order(victims)

    def arm(self, group: Group) -> None:
        overflow = self.overflow
        if overflow.version != group.version or overflow.hierarchy != group.hierarchy:
            raise ValueError(f"the overflow group {overflow.relpath} is not in the hierarchy of {group.relpath}")
        inside = (overflow.relpath.rstrip("/") + "/").startswith(group.relpath.rstrip("/") + "/")
        above = (group.relpath.rstrip("/") + "/").startswith(overflow.relpath.rstrip("/") + "/")
        if inside or above:
            relation = "the handled group or below it" if inside else "an ancestor of the handled group"
            raise ValueError(f"the overflow group {overflow.relpath} is {relation} ({group.relpath}): "
                             "what moves there is still charged to the handled group")
        self.disarm()
        self._procs.append(_File(overflow.open_file(overflow.procs_file, os.O_WRONLY)))

    def disarm(self) -> None:
        while self._procs:
            self._procs.pop().close()

    def compile(self, ctx: PlanContext) -> CompiledPlan:
        ctx = attrs.evolve(ctx, reserve=0)  # a grant's restore would undo the raise
        b = _Builder(ctx)
        then_cost = b.kill_cost(self.then.term_grace)
        if self._procs and ctx.limit >= 0:
            where = self.overflow.relpath
            left_behind = 0
            for victim, reason in self.order(ctx.victims)[: self.max_moved]:
                if b.room() - b.tail_cost() - then_cost < 3:
                    break
                who = victim.describe()
                move_at = len(b.actions)
                b.add(Action.write(self._procs[0].fileno(), str(victim.pid).encode()),
                      f"move {who} to {where}: {reason}", Phase.MOVE, victim)
                left_behind += victim.rss
                raised = ctx.limit + (left_behind if self.max_raise is None else min(left_behind, self.max_raise))
                b.add(Action.write(ctx.limit_fd, str(raised).encode()).after(move_at),
                      f"grant headroom: limit {format_size(ctx.limit)} -> {format_size(raised)}, "
                      f"for what {victim.pid} leaves charged here", Phase.MOVE, tag=StepTag.GRANT)
                b.add(Action.check(ctx.check_timeout, supersede=True), "check whether the OOM is over", Phase.MOVE)
        self.then._compile_kills(b, ctx)
        b.tail()
        return b.build()


@attrs.frozen
class FrozenContext:
    """What a :class:`FreezeAndDecide` callback is told: the group's tasks,
    stopped, as of a refresh made with headroom granted."""

    victims: tuple[Victim, ...]
    usage: int
    limit: int


Decide = Callable[[FrozenContext], Iterable[int]]


@attrs.frozen
class FreezeAndDecide(Policy):
    """Stop the group's tasks, let ``decide`` choose whom to kill, then thaw.

    The plan grants headroom (the tasks asleep in the OOM wait wake up and
    stop: SIGSTOP is taken as they return from the fault), stops the tasks of
    the table, wakes the handler, which refreshes the table and calls
    ``decide(ctx)`` for the pids to kill, kills them, and replies; the plan
    then sends SIGCONT to every task it stopped and restores the limit. If
    that does not fit, ``then`` (KillLargest by default) runs as usual.
    cgroup v1's freezer is a separate hierarchy, so tasks are stopped by
    signal, which works in a delegated memory subtree with no other
    controller. At most ``max_frozen`` tasks are stopped. On cgroup v2,
    with the handler's process outside the group, the plan freezes the
    whole group through ``cgroup.freeze`` instead (tasks started since the
    last refresh included) and thaws it the same way.
    """

    decide: Decide = attrs.field(kw_only=False)
    then: Policy = attrs.field(factory=KillLargest)
    max_frozen: int = 6

    def order(self, victims: tuple[Victim, ...]) -> list[tuple[Victim, str]]:
        return self.then.order(victims)

    def compile(self, ctx: PlanContext) -> CompiledPlan:
        b = _Builder(attrs.evolve(ctx, hooks_wake_fd=-1, hooks_reply_fd=-1))
        stoppable = _with_pidfds(ctx)[: self.max_frozen]
        if ctx.can_grant and ctx.grant_wake_fd >= 0 and ctx.grant_reply_fd >= 0 and (stoppable or ctx.freeze_fd >= 0):
            grant_at = len(b.actions)
            granted = ctx.limit + ctx.reserve
            raise_ = Action.write(ctx.limit_fd, str(granted).encode())
            b.add(raise_.opening() if ctx.restore_resolves else raise_,
                  f"grant headroom: limit {format_size(ctx.limit)} -> {format_size(granted)}", Phase.FREEZE,
                  tag=StepTag.GRANT)
            thaws = []
            if ctx.freeze_fd >= 0:
                # cgroup v2: the whole group at once, newcomers included.
                thaws.append((len(b.actions), Action.write(ctx.freeze_fd, b"0"), "thaw the group"))
                b.add(Action.write(ctx.freeze_fd, b"1").after(grant_at),
                      "freeze the group (cgroup.freeze) before deciding", Phase.FREEZE)
            else:
                for v, pidfd in stoppable:
                    b.pidfds.append(pidfd)
                    thaws.append((len(b.actions), Action.signal_pidfd(pidfd.fileno(), signal.SIGCONT),
                                  f"SIGCONT {v.pid}: thaw"))
                    b.add(Action.signal_pidfd(pidfd.fileno(), signal.SIGSTOP).after(grant_at),
                          f"SIGSTOP {v.describe()}: freeze before deciding", Phase.FREEZE, v)
            b.add(Action.wake(ctx.grant_wake_fd).after(grant_at), "wake the handler to decide", Phase.FREEZE)
            b.add(Action.await_readable(ctx.grant_reply_fd, ctx.grant_timeout, read=True).after(grant_at),
                  f"wait up to {ctx.grant_timeout} s for the decision", Phase.FREEZE)
            for at, thaw, why in thaws:
                b.add(thaw.after(at).always(), why, Phase.FREEZE)
            b.restore(grant_at, Phase.FREEZE)
            b.hooks_grant = grant_at
        self.then._compile_kills(b, ctx)
        b.ctx = attrs.evolve(b.ctx, grant_wake_fd=-1, grant_reply_fd=-1)  # the grant was the decision's
        b.tail()
        return b.build()


@attrs.frozen
class DryRun(Policy):
    """Decide as ``policy`` would and record it, but kill nobody.

    Each episode's event lists what ``policy`` would have done
    (``OomEvent.would``), and the episode is resolved by the least
    disruptive means allowed: the limit raised in ``step`` increments up to
    ``ceiling`` when given, else the kernel OOM killer for that episode.
    """

    policy: Policy = attrs.field(factory=KillLargest)
    step: int | None = attrs.field(default=None, converter=attrs.converters.optional(parse_size))
    ceiling: int | None = attrs.field(default=None, converter=attrs.converters.optional(parse_size))

    def order(self, victims: tuple[Victim, ...]) -> list[tuple[Victim, str]]:
        return self.policy.order(victims)

    def would(self, victims: tuple[Victim, ...]) -> tuple[str, ...]:
        sig = signal.Signals(self.policy.signal).name
        return tuple(f"{sig} {v.describe()}: {reason}"
                     for v, reason in self.policy.order(victims)[: self.policy.max_victims])

    def compile(self, ctx: PlanContext) -> CompiledPlan:
        ctx = attrs.evolve(ctx, reserve=0, hooks_wake_fd=-1, hooks_reply_fd=-1)
        b = _Builder(ctx)
        if self.step and self.ceiling and ctx.limit >= 0:
            limit = ctx.limit
            while limit + self.step <= self.ceiling and b.room() - b.tail_cost() > 2:
                limit += self.step
                b.add(Action.write(ctx.limit_fd, str(limit).encode()),
                      f"dry run: raise the limit to {format_size(limit)}", Phase.RAISE)
                b.add(Action.check(ctx.check_timeout, supersede=True), "check whether the OOM is over", Phase.RAISE)
        b.tail()
        compiled = b.build()
        return attrs.evolve(compiled, would=self.would(ctx.victims))


class _File(OwnedFd):
    """A control file a policy opened ahead (the overflow group's ``cgroup.procs``)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

