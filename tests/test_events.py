"""The episode record -> event conversion (a pure function) and the choice
of a backend's arming: no kernel needed (pid-only victims, records made here)."""

from __future__ import annotations

from typing import Any

import pytest

from useroom import KillNewest, native
from useroom.policy import CompiledPlan, Phase, PlanContext, StepTag
from useroom._units import UNLIMITED
from useroom._victims import Victim
from useroom.cgroup import Group, V1Group, V2Group
from useroom.exceptions import UnsupportedKernel
from useroom.handler import EventOutcome, V1Arming, V2Arming, VictimRecord, arming_for
from useroom.handler.events import episode_event, grant_acted, grant_left_open
from useroom.handler.group import GroupHandler

MIB = 1 << 20
VICTIMS = (Victim(11, "small", 10 * MIB, 1.0, 1000), Victim(13, "new", 20 * MIB, 3.0, 1000))
NOTIFIED = 1_000_000


def _plan() -> CompiledPlan:
    """KillNewest with a reserve: kill 13, check, kill 11, check, the grant (4-7), the kernel (8-10)."""
    ctx = PlanContext(victims=VICTIMS, limit=64 * MIB, limit_fd=5, check_fd=6, resolved_needle=b"under_oom 0",
                      reserve=8 * MIB, grant_wake_fd=8, grant_reply_fd=9, kill_switch_fd=7)
    return KillNewest().compile(ctx)


def _record(plan: CompiledPlan, results: dict[int, int], outcome: native.Outcome, resolved_at: int = 0,
            **fields: Any) -> native.EventRecord:
    """The watcher's record of an episode that ran the actions ``results`` (index -> result), 1 µs apart
    from 1 µs after the notification."""
    steps = tuple(
        native.Step(i, plan.plan.actions[i].kind, result, NOTIFIED + 1000 * n, NOTIFIED + 1000 * n + 500)
        for n, (i, result) in enumerate(sorted(results.items()), start=1)
    )
    base: dict[str, Any] = dict(seq=1, group=0, episode=7, source=0, outcome=outcome, count=1,
                                notified_ns=NOTIFIED, acted_ns=NOTIFIED + 1000,
                                resolved_ns=NOTIFIED + resolved_at if resolved_at else 0,
                                plan_id=3, plan_slot=0, steps=steps)
    base.update(fields)
    return native.EventRecord(**base)


class TestEpisodeEvent:
    def test_a_planned_kill(self) -> None:
        """A victim of the plan resolves the episode: its step names it, the event's victim is
        the plan's, and the kill phase resolved it; the limit is the one given."""
        plan = _plan()
        record = _record(plan, {0: 0, 1: 1}, native.Outcome.RESOLVED, resolved_at=1600)
        event = episode_event(record, plan, (), (), 64 * MIB)
        assert (7, EventOutcome.RESOLVED, Phase.KILL, False) == (event.seq, event.outcome, event.resolved_by,
                                                                 event.fallback)
        assert [("SIGNAL_PID", 13), ("CHECK", 0)] == [(s.kind, s.pid) for s in event.steps]
        assert [VictimRecord(13, "new", 20 * MIB, "SIGKILL", 0, "plan")] == list(event.victims)
        assert (64 * MIB, 1000) == (event.limit, event.notify_to_signal_ns)
        assert event.action.startswith("SIGKILL 13 (new")

    def test_the_grant_brings_the_handlers_actions(self) -> None:
        """An episode that reached the grant takes what the handler did meanwhile, after the
        plan's victims; the grant restored the limit, so none is left open."""
        plan = _plan()
        record = _record(plan, {0: 0, 1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 0, 7: 0}, native.Outcome.RESOLVED,
                         resolved_at=7600)
        assert grant_acted(record, plan)
        handler_kill = VictimRecord(21, "?", 0, "SIGKILL", 0, "handler")
        event = episode_event(record, plan, (), [handler_kill], UNLIMITED)
        assert [13, 11, 21] == [v.pid for v in event.victims]
        assert (True, Phase.GRANT, 0) == (event.fallback, event.resolved_by, event.limit)
        assert [StepTag.GRANT, StepTag.RESTORE] == [s.tag for s in event.steps if s.tag is not StepTag.NONE]
        assert False is grant_left_open(event)

    def test_a_grant_left_open(self) -> None:
        """A grant whose restore failed is left open (the handler restores it later)."""
        plan = _plan()
        record = _record(plan, {4: 0, 5: 0, 6: 0, 7: -16}, native.Outcome.RELIEVED)
        event = episode_event(record, plan, (), (), 64 * MIB)
        assert (EventOutcome.RELIEVED, None, True) == (event.outcome, event.resolved_by, grant_left_open(event))

    def test_a_kill_only_episode_takes_no_grant_actions(self) -> None:
        """Without a grant phase the handler's actions wait for the episode that has one."""
        plan = _plan()
        assert False is grant_acted(_record(plan, {0: 0, 1: 1}, native.Outcome.RESOLVED), plan)

    def test_a_plan_no_longer_known(self) -> None:
        """A record of a plan armed long before: the steps stand without explanations or
        phases, and no victim is named."""
        plan = _plan()
        record = _record(plan, {0: 0, 1: 1}, native.Outcome.RESOLVED, resolved_at=1600)
        event = episode_event(record, None, (), (), 64 * MIB)
        assert [("SIGNAL_PID", "", None)] == [(s.kind, s.explanation, s.phase) for s in event.steps][:1]
        assert ((), None, "nothing", False) == (event.victims, event.resolved_by, event.action,
                                                grant_acted(record, None))


class _Unknown(Group):
    """A backend no arming serves (its abstract methods are never called)."""

    version = 3


_Unknown.__abstractmethods__ = frozenset()


class _V1Subclass(V1Group):
    __slots__ = ()


class TestArmingFor:
    @pytest.mark.parametrize(("backend", "arming"), [(V1Group, V1Arming), (V2Group, V2Arming),
                                                     (_V1Subclass, V1Arming)])
    def test_by_backend_class(self, backend: type[Group], arming: type[Any]) -> None:
        """Each backend class (or a subclass of one) gets its own arming."""
        group = backend("/sys/fs/cgroup/x", "/x", None)  # type: ignore[arg-type]
        chosen = arming_for(group, fractions=(), hooks=None, errors=[], collect=lambda: None,
                            tell_limit=lambda limit: None)
        assert arming is type(chosen)

    def test_unknown_backend(self) -> None:
        """A backend no arming serves: UnsupportedKernel, from the handler's constructor too."""
        group = _Unknown("/sys/fs/cgroup/x", "/x", None)  # type: ignore[arg-type]
        with pytest.raises(UnsupportedKernel, match="cgroup v3"):
            GroupHandler(group)
