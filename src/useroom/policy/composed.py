"""Policies built on a kill policy (``then``): raise the limit, move a task
to an overflow group, freeze and let the user decide, or record what a
policy would do."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterable

import attrs

from useroom.cgroup import Group
from useroom.cgroup.lineage import require_apart
from useroom._fd import Fd, OwnedFd
from useroom.native import Action
from useroom._units import format_size, parse_size
from useroom.exceptions import InvalidSize, SizeOutOfBounds
from useroom._victims import Victim
from useroom.policy.kills import KillLargest, Policy
from useroom.policy.plan import CompiledPlan, Phase, PlanBuilder, PlanContext, StepTag, with_pidfds

__all__ = ["DryRun", "FreezeAndDecide", "FrozenContext", "MoveToOverflow", "RaiseLimit"]


def _positive_size(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if value <= 0:
        raise InvalidSize(f"{attribute.name} must be positive, not {value!r}")


def _step_fits(kind: str, step: int | None, ceiling: int | None) -> None:
    """A step above its ceiling could never be taken: the policy would never raise."""
    if step is not None and ceiling is not None and step > ceiling:
        raise SizeOutOfBounds(
            f"{kind} step {format_size(step)} is above its ceiling {format_size(ceiling)}: the limit could "
            f"never be raised. Give a step of at most the ceiling ({kind}(step, ceiling) raises the limit by "
            "step, up to ceiling)", name="step", value=step, bound=ceiling)


@attrs.frozen
class RaiseLimit(Policy):
    """Raise the limit by ``step`` per episode step, up to ``ceiling``; then
    fall back to ``then`` (a kill policy, KillLargest by default)."""

    step: int = attrs.field(converter=parse_size, validator=_positive_size)
    ceiling: int = attrs.field(converter=parse_size, validator=_positive_size)
    then: Policy = attrs.field(factory=KillLargest)

    def __attrs_post_init__(self) -> None:
        _step_fits("RaiseLimit", self.step, self.ceiling)

    def order(self, victims: tuple[Victim, ...]) -> list[tuple[Victim, str]]:
        return self.then.order(victims)

    def compile(self, ctx: PlanContext) -> CompiledPlan:
        # The grants restore the limit to ctx.limit; after a raise they would
        # lower it, so a raising policy grants nothing and runs no hooks phase.
        ctx = attrs.evolve(ctx, reserve=0)
        b = PlanBuilder(ctx)
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
        self.then.compile_kills(b, ctx)
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
    ancestors (:class:`~useroom.GroupOverlap`: below, charges count against
    the handled group; above, the handled group's count against it), and
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
        require_apart(overflow, group, role="overflow group",
                      why="at or below it, what moves there is still charged to the handled group; above "
                          "it, the handled group's charges count against the overflow group's limit too")
        self.disarm()
        self._procs.append(Fd(overflow.open_file(overflow.procs_file, os.O_WRONLY)))

    def disarm(self) -> None:
        while self._procs:
            self._procs.pop().close()

    def compile(self, ctx: PlanContext) -> CompiledPlan:
        ctx = attrs.evolve(ctx, reserve=0)  # a grant's restore would undo the raise
        b = PlanBuilder(ctx)
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
        self.then.compile_kills(b, ctx)
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
        b = PlanBuilder(attrs.evolve(ctx, hooks_wake_fd=-1, hooks_reply_fd=-1))
        stoppable = with_pidfds(ctx)[: self.max_frozen]
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
                for v, fd in stoppable:
                    b.pidfds.append(fd)
                    thaws.append((len(b.actions), Action.signal_pidfd(fd, signal.SIGCONT),
                                  f"SIGCONT {v.pid}: thaw"))
                    b.add(ctx.signal(v, signal.SIGSTOP).after(grant_at),
                          f"SIGSTOP {v.describe()}: freeze before deciding", Phase.FREEZE, v)
            b.add(Action.wake(ctx.grant_wake_fd).after(grant_at), "wake the handler to decide", Phase.FREEZE)
            b.add(Action.await_readable(ctx.grant_reply_fd, ctx.grant_timeout, read=True).after(grant_at),
                  f"wait up to {ctx.grant_timeout} s for the decision", Phase.FREEZE)
            for at, thaw, why in thaws:
                b.add(thaw.after(at).always(), why, Phase.FREEZE)
            b.restore(grant_at, Phase.FREEZE)
            b.hooks_grant = grant_at
        self.then.compile_kills(b, ctx)
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

    def __attrs_post_init__(self) -> None:
        if (self.step is None) != (self.ceiling is None):
            raise ValueError("DryRun raises the limit only with both step and ceiling: give both or neither")
        _step_fits("DryRun", self.step, self.ceiling)

    def order(self, victims: tuple[Victim, ...]) -> list[tuple[Victim, str]]:
        return self.policy.order(victims)

    def would(self, victims: tuple[Victim, ...]) -> tuple[str, ...]:
        sig = signal.Signals(self.policy.signal).name
        return tuple(f"{sig} {v.describe()}: {reason}"
                     for v, reason in self.policy.order(victims)[: self.policy.max_victims])

    def compile(self, ctx: PlanContext) -> CompiledPlan:
        ctx = attrs.evolve(ctx, reserve=0, hooks_wake_fd=-1, hooks_reply_fd=-1)
        b = PlanBuilder(ctx)
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
