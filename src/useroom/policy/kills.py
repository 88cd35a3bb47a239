"""The kill policies: order the victim table, then compile the kills."""

from __future__ import annotations

import abc
import signal
from collections.abc import Callable, Mapping
from typing import Any, Union

import attrs
import psutil

from useroom import native
from useroom.cgroup import Group
from useroom.native import Action
from useroom._victims import Victim
from useroom.policy.plan import PICK_REASON, CompiledPlan, Phase, PlanBuilder, PlanContext, status_open

__all__ = ["KillByPriority", "KillGroup", "KillLargest", "KillNewest", "Policy"]


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
        b = PlanBuilder(ctx)
        b.head()
        self.compile_kills(b, ctx)
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

    def compile_kills(self, b: PlanBuilder, ctx: PlanContext) -> None:
        """Adds this policy's kill steps to ``b``: what :meth:`compile` puts
        between the hooks' phase and the tail, and what a policy built on
        this one (``then``) runs after its own steps."""
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
        finds = ctx.procs_fd >= 0 and ctx.can_pin and type(self).order is KillLargest.order
        return self.term_grace is None and bool(picks or finds) and \
            all(status_open(ctx.pidfd(v)) for v in picks)

    def compile_kills(self, b: PlanBuilder, ctx: PlanContext) -> None:
        # order() says who may be killed (a subclass may narrow it); the
        # native pick ranks them at the OOM.
        picks = [v for v, _ in self.order(ctx.victims)]
        finds = ctx.procs_fd >= 0 and ctx.can_pin and type(self).order is KillLargest.order
        if not self._picks_at_oom(ctx, picks):
            super().compile_kills(b, ctx)
            return
        # The kernel scans the oldest task first and a tie goes to the later one.
        b.candidates = sorted(picks, key=lambda v: (v.create_time, v.pid))[:native.CANDS_MAX]
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
        b = PlanBuilder(ctx)
        b.head()
        if ctx.kill_fd >= 0:
            b.add(Action.write(ctx.kill_fd, b"1"), "kill the whole group (cgroup.kill)", Phase.KILL)
        else:
            budget = b.room() - b.tail_cost() - 1 - (b.restore_cost if b.hooks_grant is not None else 0)
            b.gate_room()
            each = 1 + int(native.can_use_mrelease())
            chosen = [v for v, _ in self.order(ctx.victims)][: max(0, budget // each)]
            for v in chosen:
                b.victims.append(v)
                why = f"SIGKILL {v.describe()}: the whole group"
                fds = ctx.pidfd(v)
                if fds is None:
                    b.add(Action.signal_pid(v.pid, signal.SIGKILL), why, Phase.KILL, v)
                    continue
                b.pidfds.append(fds.pidfd)
                b.add(ctx.signal(v, signal.SIGKILL), why, Phase.KILL, v)
            if native.can_use_mrelease():
                for v in chosen:
                    fds = ctx.pidfd(v)
                    if fds is not None:
                        b.add(Action.mrelease(fds.pidfd), f"reap the memory of {v.pid} now", Phase.KILL)
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


