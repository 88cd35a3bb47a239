"""The plan a policy compiles to: its context, its steps' phases and tags,
the compiled result, and the builder every policy uses to lay out the
actions (the hooks' phase, the kills, the wall, the grant, the kernel step).
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Mapping

import attrs
import psutil

from useroom import native
from useroom.native import Action, Candidate, Plan
from useroom._units import PAGE_SIZE, format_size
from useroom._victims import TaskFds, Victim

__all__ = ["CompiledPlan", "HOLD_PROCESSES_MAX", "PICK_REASON", "Phase", "PlanBuilder", "PlanContext", "StepTag"]

PICK_REASON = "largest RSS + swap + page tables at the OOM"

#: Most processes the hooks' phase stops (each costs two plan actions).
HOLD_PROCESSES_MAX = 6


class Phase(str, enum.Enum):
    """Which part of a plan an action belongs to (a ``str``: compares equal
    to its value, ``"hooks"``, ``"kill"`` ...)."""

    HOOKS = "hooks"     # the on_oom hooks, with headroom granted
    KILL = "kill"       # the policy's victims
    RAISE = "raise"     # a raised limit
    MOVE = "move"       # tasks moved to the overflow group
    FREEZE = "freeze"   # the group frozen while the handler decides
    GRANT = "grant"     # the tail grant: the handler refreshes and acts
    ROOM = "room"       # v1: the wait before the kills (a victim exits, or there is room)
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
    pidfds: Mapping[int, TaskFds] = attrs.field(factory=dict, eq=False, repr=False)
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
    #: cgroup v1: ``memory.usage_in_bytes`` opened and read ahead, and the
    #: usage below which the group has room for a page (see
    #: :attr:`useroom.native.Plan.room_fd`); -1, 0 on v2, whose check is
    #: the usage already.
    room_fd: int = -1
    room_below: int = 0
    #: The group's line in ``/proc/<pid>/cgroup`` (see :mod:`useroom._members`):
    #: the plan signals a task only while its file holds it. Empty: no check.
    member: bytes = b""
    #: Whether pidfds exist here: the native pick pins a task it finds
    #: through ``procs_fd`` with one (False: it does not look for them).
    can_pin: bool = True

    def pidfd(self, victim: Victim) -> TaskFds | None:
        """The victim's fd numbers, or None (no pidfds, or it exited before the refresh opened one)."""
        return self.pidfds.get(victim.pid)

    def signal(self, victim: Victim, sig: int) -> Action:
        """Signal *victim*: through its pidfd, which it must have, once its
        cgroup file says it is still in the group."""
        fds = self.pidfds[victim.pid]
        return Action.signal_pidfd(fds.pidfd, sig, pid=victim.pid, member_fd=fds.cgroup)

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
    #: The pidfd numbers the plan names (the table keeps them open).
    pidfds: tuple[int, ...]
    #: What the policy would have done (dry runs), one line each.
    would: tuple[str, ...] = ()
    #: The processes the hooks' phase stops while the hooks run.
    held: tuple[Victim, ...] = ()
    #: Their pidfd numbers, one per process of :attr:`held`.
    held_pidfds: tuple[int, ...] = ()
    #: What the plan's SIGNAL_BEST actions pick from, by the index a step
    #: records (:attr:`useroom.native.Step.pick`).
    candidates: tuple[Victim, ...] = ()
    #: One per action: whether it opens a grant or restores the limit.
    tags: tuple[StepTag, ...] = ()


def with_pidfds(ctx: PlanContext) -> list[tuple[Victim, int]]:
    """The victims that have a pidfd, with its number, in table order."""
    return [(v, p.pidfd) for v in ctx.victims if (p := ctx.pidfd(v)) is not None]


def status_open(fds: TaskFds | None) -> bool:
    """Whether the native pick can read the task's status at the OOM."""
    return fds is not None and fds.status >= 0


class PlanBuilder:
    def __init__(self, ctx: PlanContext) -> None:
        self.ctx = ctx
        self.actions: list[Action] = []
        self.why: list[str] = []
        self.phases: list[Phase] = []
        self.tags: list[StepTag] = []
        self.targets: list[Victim | None] = []
        self.victims: list[Victim] = []
        self.pidfds: list[int] = []
        #: Index of the hooks' grant while it may still be on.
        self.hooks_grant: int | None = None
        self.held: list[Victim] = []
        self.held_pidfds: list[int] = []
        self.candidates: list[Victim] = []
        #: SIGNAL_BEST also looks for tasks that are not candidates.
        self.finding = False
        #: Index of the write that opened the wall (``PlanContext.lift``), until closed.
        self.opened: int | None = None
        #: The room gate is in the plan (:meth:`gate_room`).
        self.room_gated = False

    def room(self) -> int:
        return native.PLAN_MAX - len(self.actions)

    def add(self, action: Action, why: str, phase: Phase, target: Victim | None = None, *,
            tag: StepTag = StepTag.NONE) -> None:
        self.actions.append(action)
        self.why.append(why)
        self.phases.append(phase)
        self.targets.append(target)
        self.tags.append(tag)

    def kill(self, victim: Victim, reason: str, sig: int, term_grace: float | None) -> None:
        self.before_kills()
        who = victim.describe()
        fds = self.ctx.pidfd(victim)
        if fds is not None:
            fd = fds.pidfd
            self.pidfds.append(fd)
            if term_grace is not None:
                self.add(self.ctx.signal(victim, signal.SIGTERM), f"SIGTERM {who}: {reason}", Phase.KILL, victim)
                self.add(Action.await_readable(fd, term_grace),
                         f"wait up to {term_grace} s for {victim.pid} to exit", Phase.KILL)
            signal_at = len(self.actions)
            self.add(self.ctx.signal(victim, sig), f"{signal.Signals(sig).name} {who}: {reason}", Phase.KILL, victim)
            if native.can_use_mrelease() and sig == signal.SIGKILL:
                self.add(Action.mrelease(fd), f"reap the memory of {victim.pid} now", Phase.KILL)
            if self.hooks_grant is not None:
                # The restore that follows needs the memory back: wait for the exit.
                self.add(Action.await_readable(fd, self.ctx.check_timeout).after(signal_at),
                         f"wait up to {self.ctx.check_timeout} s for {victim.pid} to exit", Phase.KILL)
        else:
            if term_grace is not None:
                self.add(Action.signal_pid(victim.pid, signal.SIGTERM), f"SIGTERM {who}: {reason}", Phase.KILL, victim)
            self.add(Action.signal_pid(victim.pid, sig), f"{signal.Signals(sig).name} {who}: {reason}",
                     Phase.KILL, victim)
        if self.hooks_grant is not None:
            self.restore(self.hooks_grant, Phase.KILL)
        check = Action.check(self.ctx.check_timeout, supersede=True)
        if self.ctx.lift and fds is not None:
            check = check.until_exit(fds.pidfd)
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
        self.before_kills()
        signal_at = len(self.actions)
        self.add(Action.signal_best(sig, self.ctx.check_timeout),
                 f"{signal.Signals(sig).name} the task with the {reason}",
                 Phase.KILL)
        if native.can_use_mrelease() and sig == signal.SIGKILL:
            self.add(Action.mrelease(0).on_pick(), "reap the memory of the pick now", Phase.KILL)
        if self.hooks_grant is not None:
            self.add(Action.await_readable(0, self.ctx.check_timeout).on_pick().after(signal_at),
                     f"wait up to {self.ctx.check_timeout} s for the pick to exit", Phase.KILL)
            self.restore(self.hooks_grant, Phase.KILL)
        check = Action.check(self.ctx.check_timeout, supersede=True)
        self.add(check.until_exit().on_pick() if self.ctx.lift else check, self.check_why, Phase.KILL)

    def before_kills(self) -> None:
        """Before the first kill: on v1, wait while the group has room (see
        :meth:`gate_room`); on v2, open the wall (:meth:`open_wall`)."""
        self.gate_room()
        self.open_wall()

    def gate_room(self) -> None:
        """Before the first kill (v1): :meth:`Action.gate`, which waits, up
        to ``ctx.check_timeout``, while a task killed before still exits or
        the group has room for a page under its limit, and returns at once
        otherwise. A victim's memory comes back page by page as it exits,
        and cgroup v1 wakes the tasks in the OOM at each uncharge: they take
        it, run out again while the victim still exits, and a new episode
        starts before its memory is all back. The kernel's killer kills
        nobody while its victim exits or while there is room for the
        charge, and the kills here wait as long."""
        if self.ctx.room_fd >= 0 and not self.room_gated:
            self.room_gated = True
            self.add(Action.gate(self.ctx.check_timeout),
                     "wait while a task killed before still exits or the group has room", Phase.ROOM)

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
        return (2 + int(native.can_use_mrelease()) + (2 if term_grace is not None else 0)
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

    def restore_with_room(self, grant_at: int, phase: Phase) -> None:
        """Restore the limit only if the usage leaves room under it, before
        anyone is killed. A group under OOM sits at its limit, and cgroup v1
        takes a limit equal to the usage: restored there, the limit "fits",
        the episode counts resolved, and the task that faulted faults again
        as soon as it runs, a new episode (with the hooks run again) in a
        loop that ends only when that task takes the headroom before the
        restore. So the limit is first written a page lower, which v1
        refuses unless the usage is below the limit (after reclaiming what
        it can, as for any restore); only then is the limit put back, which
        resolves the episode. Not a restore once the episode is resolved:
        the hook thread closed the grant itself. v2 checks the usage against
        the wall after its restore (below it, strictly) already."""
        lower = self.ctx.limit - PAGE_SIZE
        if not self.ctx.restore_resolves or lower <= 0:
            self.restore(grant_at, phase)
            return
        probe_at = len(self.actions)
        self.add(Action.write(self.ctx.limit_fd, str(lower).encode()).after(grant_at),
                 f"room under the limit? (limit {format_size(lower)}: refused at the usage of the OOM)", phase)
        self.add(
            Action.write(self.ctx.limit_fd, str(self.ctx.limit).encode()).after(probe_at).always().resolving(),
            f"restore the limit to {format_size(self.ctx.limit)}",
            phase,
            tag=StepTag.RESTORE,
        )

    def grant(self, wake_fd: int, reply_fd: int, timeout: float, phase: Phase, who: str, *,
              settles: bool = False, then: tuple[tuple[int, Action, str], ...] = (), room: bool = False) -> int:
        """Raise the limit by the reserve, wake ``who``, await its reply,
        restore. With ``settles``, ``who`` may restore the limit itself and
        reply :data:`useroom.native.SETTLED`, which resolves the episode.
        ``then`` are (guard, action, why): run after the reply, always, if
        their guard ran. With ``room``, the restore needs room under the
        limit (:meth:`restore_with_room`)."""
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
        if room:
            self.restore_with_room(grant_at, phase)
        else:
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
                for v, fd in with_pidfds(ctx)[:HOLD_PROCESSES_MAX]:
                    self.pidfds.append(fd)
                    self.held.append(v)
                    self.held_pidfds.append(fd)
                    resume.append((len(self.actions), Action.signal_pidfd(fd, signal.SIGCONT), f"SIGCONT {v.pid}"))
                    self.add(ctx.signal(v, signal.SIGSTOP),
                             f"SIGSTOP {v.describe()}: hold it while the hooks run", Phase.HOOKS)
            self.hooks_grant = self.grant(ctx.hooks_wake_fd, ctx.hooks_reply_fd, ctx.hooks_timeout,
                                          Phase.HOOKS, "the on_oom hooks", settles=True, then=tuple(resume),
                                          room=True)

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
            self.add(Action.write(ctx.kill_switch_fd, ctx.kill_switch_on),
                     "last resort: let the kernel OOM killer act", Phase.KERNEL)
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
        # The wall's opening and closing around the kills (v2), the room
        # gate before them (v1).
        return grant + (3 if ctx.kill_switch_fd >= 0 else 0) + 2 * int(bool(ctx.lift)) + int(ctx.room_fd >= 0)

    def build(self) -> CompiledPlan:
        candidates = []
        for v in self.candidates:
            fds = self.ctx.pidfd(v)
            assert fds is not None and fds.status >= 0
            self.pidfds.append(fds.pidfd)
            candidates.append(Candidate(fds.pidfd, fds.status, v.pid, v.oom_score_adj * self.ctx.limit_kb // 1000,
                                        fds.adj, fds.cgroup))
        # Tasks started since the refresh are found through cgroup.procs;
        # with more pids to protect than the plan holds, none are looked for.
        find = self.finding and len(self.ctx.protect) <= 32
        plan = Plan(tuple(self.actions), check_fd=self.ctx.check_fd, resolved_needle=self.ctx.resolved_needle,
                    resolved_below=self.ctx.resolved_below, candidates=candidates,
                    procs_fd=self.ctx.procs_fd if find else -1, protect=self.ctx.protect if find else (),
                    procs_reopen=self.ctx.procs_reopen,
                    limit_kb=self.ctx.limit_kb, member=self.ctx.member,
                    room_fd=self.ctx.room_fd, room_below=self.ctx.room_below)
        return CompiledPlan(
            plan, tuple(self.why), tuple(self.phases), tuple(self.targets), tuple(self.victims),
            tuple(self.pidfds), held=tuple(self.held), held_pidfds=tuple(self.held_pidfds),
            candidates=tuple(self.candidates), tags=tuple(self.tags),
        )


