"""Policies: ordering and what they compile to (no kernel needed: pid-only victims)."""

from __future__ import annotations

import mmap
import signal

import attrs
import pytest

from useroom import FreezeAndDecide, KillByPriority, KillGroup, KillLargest, KillNewest, RaiseLimit, native
from useroom.policy import PlanContext
from useroom._victims import Victim

MIB = 1 << 20


def _victim(pid: int, rss_mib: int, created: float, name: str = "w") -> Victim:
    return Victim(pid, name, rss_mib * MIB, created, 1000)


VICTIMS = (_victim(11, 10, 1.0, "small"), _victim(12, 30, 2.0, "big"), _victim(13, 20, 3.0, "new"))


def _ctx(**overrides) -> PlanContext:
    base = dict(victims=VICTIMS, limit=64 * MIB, limit_fd=5, check_fd=6, resolved_needle=b"under_oom 0")
    base.update(overrides)
    return PlanContext(**base)


def _shape(compiled) -> list[tuple[str, int, str]]:
    """(kind, pid or fd, phase) per action: a signal through a pidfd by its fd."""
    return [(a.kind.name, a.fd if a.kind.name == "SIGNAL_PIDFD" else a.pid or max(a.fd, 0), p)
            for a, p in zip(compiled.plan.actions, compiled.phases)]


class TestOrder:
    def test_largest(self) -> None:
        """KillLargest orders by RSS, largest first."""
        assert [12, 13, 11] == [v.pid for v, _ in KillLargest().order(VICTIMS)]

    def test_newest(self) -> None:
        """KillNewest orders by start time, newest first."""
        assert [13, 12, 11] == [v.pid for v, _ in KillNewest().order(VICTIMS)]

    def test_priority_mapping(self) -> None:
        """A mapping of names to priorities: highest first, ties by RSS, default for the rest."""
        policy = KillByPriority({"small": 5, "new": 5}, default=1)
        assert [13, 11, 12] == [v.pid for v, _ in policy.order(VICTIMS)]

    def test_priority_spare_below(self) -> None:
        """Tasks below spare_below are left out of the order."""
        policy = KillByPriority({"big": -1}, spare_below=0)
        assert [13, 11] == [v.pid for v, _ in policy.order(VICTIMS)]


class TestCompile:
    def test_kill_group_signals_every_task_then_checks_once(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """KillGroup: SIGKILL to every task of the table, then one check; then the tail."""
        monkeypatch.setattr(native, "can_use_mrelease", lambda: False)
        compiled = KillGroup().compile(_ctx(kill_switch_fd=7))
        assert [("SIGNAL_PID", 11, "kill"), ("SIGNAL_PID", 12, "kill"), ("SIGNAL_PID", 13, "kill"),
                ("CHECK", 0, "kill")] == _shape(compiled)[:4]
        assert [11, 12, 13] == [v.pid for v in compiled.victims]
        assert {"kernel"} == set(compiled.phases[4:])

    def test_kill_group_through_cgroup_kill(self) -> None:
        """With a cgroup.kill fd (v2, handler outside the group) one write kills the group."""
        compiled = KillGroup().compile(_ctx(kill_fd=9))
        assert [("WRITE", 9, "kill"), ("CHECK", 0, "kill")] == _shape(compiled)
        assert b"1" == compiled.plan.actions[0].data
        assert "cgroup.kill" in compiled.explanations[0]

    def test_kill_plan_shape(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Each victim: signal, then a check; then the kernel fallback with its guarded restore."""
        monkeypatch.setattr(native, "can_use_mrelease", lambda: False)
        compiled = KillLargest().compile(_ctx(kill_switch_fd=7))
        assert [
            ("SIGNAL_PID", 12, "kill"), ("CHECK", 0, "kill"),
            ("SIGNAL_PID", 13, "kill"), ("CHECK", 0, "kill"),
            ("SIGNAL_PID", 11, "kill"), ("CHECK", 0, "kill"),
            ("WRITE", 7, "kernel"), ("CHECK", 0, "kernel"), ("WRITE", 7, "kernel"),
        ] == _shape(compiled)
        restore = compiled.plan.actions[-1]
        assert (b"1", 6) == (restore.data, restore.guard)
        assert [12, 13, 11] == [v.pid for v in compiled.victims]
        assert all(a.sig == signal.SIGKILL for a in compiled.plan.actions if a.kind.name == "SIGNAL_PID")

    def test_grant_tail(self) -> None:
        """With a reserve: raise the limit (opening a grant), wake, await, restore
        (each guarded by the raise; the restore resolves the episode)."""
        compiled = KillLargest(max_victims=1).compile(_ctx(reserve=16 * MIB, grant_wake_fd=8, grant_reply_fd=9))
        tail = compiled.plan.actions[-4:]
        at = len(compiled.plan.actions) - 4
        assert [("WRITE", -1), ("WAKE", at), ("AWAIT", at), ("WRITE", at)] == [(a.kind.name, a.guard) for a in tail]
        assert str(80 * MIB).encode() == tail[0].data
        assert native.ActionFlag.OPENS & tail[0].flags
        assert str(64 * MIB).encode() == tail[3].data
        assert native.ActionFlag.RESOLVES & tail[3].flags

    def test_hooks_head(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """With hooks: a grant for the hooks first, and after each kill a restore
        guarded by that grant."""
        monkeypatch.setattr(native, "can_use_mrelease", lambda: False)
        compiled = KillLargest(max_victims=1).compile(
            _ctx(reserve=16 * MIB, hooks_wake_fd=8, hooks_reply_fd=9))
        kinds = [(a.kind.name, a.guard, p) for a, p in zip(compiled.plan.actions, compiled.phases)]
        assert [
            ("WRITE", -1, "hooks"), ("WAKE", 0, "hooks"), ("AWAIT", 0, "hooks"), ("WRITE", 0, "hooks"),
            ("WRITE", 3, "hooks"), ("SIGNAL_PID", -1, "kill"), ("WRITE", 0, "kill"), ("CHECK", -1, "kill"),
        ] == kinds

    def test_the_hooks_restore_needs_room(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """v1: after the hooks the limit is first written a page lower (refused at a usage
        at the limit, where the OOM left it), skipped once the hook thread closed the grant
        (not ALWAYS); only if that took does the limit's restore follow and resolve."""
        monkeypatch.setattr(native, "can_use_mrelease", lambda: False)
        compiled = KillLargest(max_victims=1).compile(
            _ctx(reserve=16 * MIB, hooks_wake_fd=8, hooks_reply_fd=9))
        probe, restore = compiled.plan.actions[3:5]
        assert (str(64 * MIB - mmap.PAGESIZE).encode(), 0) == (probe.data, probe.guard)
        assert not probe.flags & (native.ActionFlag.ALWAYS | native.ActionFlag.RESOLVES)
        assert (str(64 * MIB).encode(), 3) == (restore.data, restore.guard)
        assert native.ActionFlag.ALWAYS | native.ActionFlag.RESOLVES == restore.flags & (
            native.ActionFlag.ALWAYS | native.ActionFlag.RESOLVES)
        assert ("none", "restore") == tuple(str(t) for t in compiled.tags[3:5])

    def _v2(self, **overrides) -> PlanContext:
        return _ctx(lift=b"max", restore_resolves=False, resolved_below=64 * MIB, resolved_needle=b"",
                    kill_switch_on=b"max", kill_switch_off=str(64 * MIB).encode(), **overrides)

    def test_v2_kills_open_the_wall(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """cgroup v2: the wall opens before the first kill and closes after
        the last (always, guarded by the opening), before the kernel step."""
        monkeypatch.setattr(native, "can_use_mrelease", lambda: False)
        compiled = KillLargest(max_victims=2).compile(self._v2(kill_switch_fd=7))
        assert [
            ("WRITE", 5, "kill"), ("SIGNAL_PID", 12, "kill"), ("CHECK", 0, "kill"),
            ("SIGNAL_PID", 13, "kill"), ("CHECK", 0, "kill"), ("WRITE", 5, "kill"),
            ("WRITE", 7, "kernel"), ("CHECK", 0, "kernel"), ("WRITE", 7, "kernel"),
        ] == _shape(compiled)
        opened, closed = compiled.plan.actions[0], compiled.plan.actions[5]
        assert (b"max", -1) == (opened.data, opened.guard)
        assert (str(64 * MIB).encode(), 0) == (closed.data, closed.guard)
        assert native.ActionFlag.ALWAYS & closed.flags

    def test_v2_pick_checks_end_at_the_exit(self) -> None:
        """cgroup v2: the check after a pick ends once the pick has exited
        (its memory is back: over the wall still, the next kill goes at
        once); on v1 it waits for the sleepers as before."""
        from useroom.policy import PlanBuilder as _Builder

        for ctx, exits in ((self._v2(), True), (_ctx(), False)):
            b = _Builder(ctx)
            b.kill_best(signal.SIGKILL, "largest")
            check = b.actions[-1]
            assert "CHECK" == check.kind.name
            assert exits == bool(check.flags & native.ActionFlag.EXIT)
            assert exits == bool(check.flags & native.ActionFlag.PICKED)
            assert exits == (b.actions[0].kind.name == "WRITE")

    def test_v1_plans_have_no_wall(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(native, "can_use_mrelease", lambda: False)
        compiled = KillLargest(max_victims=1).compile(_ctx())
        assert ["SIGNAL_PID", "CHECK"] == [a.kind.name for a in compiled.plan.actions]

    def test_term_grace(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """term_grace adds SIGTERM before SIGKILL (waiting on a pidfd needs one; pid-only victims
        get SIGTERM then SIGKILL without a wait)."""
        monkeypatch.setattr(native, "can_use_mrelease", lambda: False)
        compiled = KillLargest(term_grace=1.0, max_victims=1).compile(_ctx())
        assert [(a.kind.name, a.sig) for a in compiled.plan.actions] == [
            ("SIGNAL_PID", signal.SIGTERM), ("SIGNAL_PID", signal.SIGKILL), ("CHECK", 0),
        ]

    def test_plan_never_overflows(self) -> None:
        """However many victims, the plan fits the native table and keeps its fallback tail."""
        many = tuple(_victim(100 + i, i + 1, float(i)) for i in range(40))
        compiled = KillLargest(max_victims=40).compile(
            _ctx(victims=many, kill_switch_fd=7, reserve=MIB, grant_wake_fd=8, grant_reply_fd=9))
        assert len(compiled.plan.actions) <= native.PLAN_MAX
        assert ["grant"] * 4 + ["kernel"] * 3 == list(compiled.phases[-7:])
        v2 = KillLargest(max_victims=40).compile(_ctx(
            victims=many, kill_switch_fd=7, reserve=MIB, grant_wake_fd=8, grant_reply_fd=9, hooks_wake_fd=10,
            hooks_reply_fd=11, lift=b"max", restore_resolves=False, resolved_below=64 * MIB, resolved_needle=b""))
        assert len(v2.plan.actions) <= native.PLAN_MAX
        assert ["kill"] + ["grant"] * 5 + ["kernel"] * 3 == list(v2.phases[-9:])  # the wall closed, then the tail

    def test_raise_limit(self) -> None:
        """RaiseLimit raises in steps to the ceiling, then kills; it grants nothing."""
        compiled = RaiseLimit("32M", "128M", max_victims=1).compile(
            _ctx(reserve=MIB, grant_wake_fd=8, grant_reply_fd=9))
        writes = [a.data for a in compiled.plan.actions if a.kind.name == "WRITE"]
        assert [str(96 * MIB).encode(), str(128 * MIB).encode()] == writes
        assert "grant" not in compiled.phases
        assert "kill" in compiled.phases

    def test_unlimited_group_plans_no_raise_or_grant(self) -> None:
        """With no limit (-1) there is nothing to raise or restore."""
        compiled = RaiseLimit("32M", "128M").compile(_ctx(limit=-1, reserve=MIB, grant_wake_fd=8,
                                                          grant_reply_fd=9))
        assert {"kill"} == set(compiled.phases)


class TestValidation:
    def test_bad_signal(self) -> None:
        """A non-signal number is refused."""
        with pytest.raises(ValueError, match="signal"):
            KillLargest(signal=1000)

    def test_bad_grace(self) -> None:
        """A negative grace is refused."""
        with pytest.raises(ValueError, match="term_grace"):
            KillLargest(term_grace=-1)

    def test_bad_max(self) -> None:
        """At least one victim."""
        with pytest.raises(ValueError, match="max_victims"):
            KillNewest(max_victims=0)

    def test_raise_limit_sizes(self) -> None:
        """Step and ceiling must be positive sizes."""
        with pytest.raises(ValueError):
            RaiseLimit("0", "1G")
        with pytest.raises(ValueError):
            RaiseLimit("lots", "1G")


class TestDryRunAndFreeze:
    def test_dry_run_plans_no_signal(self) -> None:
        """A dry run plans raises and the kernel fallback, never a signal, and says what it would do."""
        from useroom import DryRun

        compiled = DryRun(KillNewest(), step="32M", ceiling="128M").compile(_ctx(kill_switch_fd=7))
        assert not [a for a in compiled.plan.actions if a.kind.name.startswith("SIGNAL")]
        assert [13, 12, 11] == [int(w.split()[1]) for w in compiled.would]
        assert "kernel" in compiled.phases

    def test_freeze_needs_pidfds_and_a_reserve(self) -> None:
        """Without pidfds (or without a reserve) there is nothing to stop: the kill plan remains."""
        from useroom import FreezeAndDecide

        compiled = FreezeAndDecide(lambda ctx: []).compile(_ctx(reserve=MIB, grant_wake_fd=8, grant_reply_fd=9))
        assert "freeze" not in compiled.phases
        assert "kill" in compiled.phases


class TestPlanKey:
    """What a handler compares to skip compiling the plan it has armed."""

    @pytest.fixture
    def pinned(self):
        """Pidfds for VICTIMS with a real status file (this process's), as the table gives them."""
        import os

        from useroom._victims import Pidfd

        pidfd = Pidfd(os.getpid())
        try:
            yield {v.pid: pidfd.numbers() for v in VICTIMS}
        finally:
            pidfd.close()

    def test_by_default_every_refresh_compiles(self) -> None:
        """None: a policy's order may read more than the table (a priority callable)."""
        assert None is KillByPriority({"w": 1}).plan_key(_ctx())
        assert None is KillGroup().plan_key(_ctx())

    def test_a_subclass_compiles_every_time(self) -> None:
        class Mine(KillLargest):
            pass

        assert None is Mine().plan_key(_ctx())

    def test_the_pick_at_the_oom_ignores_the_sizes_of_the_refresh(self, pinned) -> None:
        import attrs

        ctx = _ctx(pidfds=pinned, procs_fd=9)
        grown = _ctx(victims=tuple(attrs.evolve(v, rss=v.rss * 3) for v in VICTIMS), pidfds=pinned, procs_fd=9)
        policy = KillLargest()
        assert policy.plan_key(ctx) == policy.plan_key(grown)
        assert [a.kind.name for a in policy.compile(ctx).plan.actions] == \
            [a.kind.name for a in policy.compile(grown).plan.actions]

    def test_what_the_plan_reads_makes_a_new_key(self, pinned) -> None:
        """A task gone or new, a new oom_score_adj, a pid killed meanwhile (protected), a new limit."""
        import attrs

        policy = KillLargest()
        key = policy.plan_key(_ctx(pidfds=pinned, procs_fd=9))
        for other in (_ctx(victims=VICTIMS[:2], pidfds=pinned, procs_fd=9),
                      _ctx(victims=(*VICTIMS[:2], attrs.evolve(VICTIMS[2], oom_score_adj=500)), pidfds=pinned,
                           procs_fd=9),
                      _ctx(pidfds=pinned, procs_fd=9, protect=(12,)),
                      _ctx(pidfds=pinned, procs_fd=9, limit=128 * MIB)):
            assert key != policy.plan_key(other)

    def test_an_order_of_the_refresh_reads_the_sizes(self) -> None:
        """Without status files (or with a SIGTERM grace) the plan kills in the refresh's order of
        sizes: a size that changes makes a new key."""
        import attrs

        grown = _ctx(victims=(*VICTIMS[:2], attrs.evolve(VICTIMS[2], rss=99 * MIB)))
        assert KillLargest().plan_key(_ctx()) != KillLargest().plan_key(grown)
        assert KillNewest().plan_key(_ctx()) == KillNewest().plan_key(_ctx())


class TestNoResourceInValues:
    """Plans and their contexts are values: they name fds by number, and own none."""

    @staticmethod
    def _owners(value, seen=None) -> list:
        import attrs

        from useroom._fd import OwnedFd

        seen = set() if seen is None else seen
        if id(value) in seen:
            return []
        seen.add(id(value))
        if isinstance(value, OwnedFd):
            return [value]
        owners = TestNoResourceInValues._owners
        if attrs.has(type(value)):
            return [o for f in attrs.fields(type(value)) for o in owners(getattr(value, f.name), seen)]
        if hasattr(value, "items"):
            return [o for k, v in value.items() for o in owners(k, seen) + owners(v, seen)]
        if isinstance(value, (tuple, list, frozenset, set)):
            return [o for v in value for o in owners(v, seen)]
        return []

    @pytest.mark.parametrize("policy", [KillLargest(), KillNewest(), KillGroup(), KillByPriority({"w": 1}),
                                        FreezeAndDecide(lambda ctx: ())], ids=lambda p: type(p).__name__)
    def test_a_compiled_plan_owns_no_fd(self, policy) -> None:
        import os

        from useroom._victims import Pidfd

        with Pidfd(os.getpid()) as pidfd:
            ctx = _ctx(pidfds={v.pid: pidfd.numbers() for v in VICTIMS}, procs_fd=9, reserve=16 * MIB,
                       grant_wake_fd=7, grant_reply_fd=8, hooks_wake_fd=10, hooks_reply_fd=11, hold_processes=True)
            compiled = policy.compile(ctx)
            assert [] == self._owners(ctx) == self._owners(compiled)
            assert pidfd.fileno() in compiled.pidfds  # named by number



class TestCompileWithPidfds:
    """The shapes above with pidfds and process_mrelease (kernels since 5.15): each SIGKILL
    through a pidfd is followed by the reaping of that victim's memory."""

    FDS = {11: 21, 12: 22, 13: 23}

    def _ctx(self, **overrides) -> PlanContext:
        from useroom._victims import TaskFds

        return _ctx(pidfds={pid: TaskFds(fd) for pid, fd in self.FDS.items()}, **overrides)

    @pytest.fixture(autouse=True)
    def _mrelease(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(native, "can_use_mrelease", lambda: True)

    def test_kill_plan_shape(self) -> None:
        """Each victim: SIGKILL through its pidfd, reap its memory, check; then the kernel."""
        compiled = KillLargest().compile(self._ctx(kill_switch_fd=7))
        assert [
            ("SIGNAL_PIDFD", 22, "kill"), ("MRELEASE", 22, "kill"), ("CHECK", 0, "kill"),
            ("SIGNAL_PIDFD", 23, "kill"), ("MRELEASE", 23, "kill"), ("CHECK", 0, "kill"),
            ("SIGNAL_PIDFD", 21, "kill"), ("MRELEASE", 21, "kill"), ("CHECK", 0, "kill"),
            ("WRITE", 7, "kernel"), ("CHECK", 0, "kernel"), ("WRITE", 7, "kernel"),
        ] == _shape(compiled)
        assert [22, 23, 21] == list(compiled.pidfds)

    def test_kill_group_signals_all_then_reaps_all(self) -> None:
        """KillGroup: every SIGKILL first (all die at once), then every reap, then one check."""
        compiled = KillGroup().compile(self._ctx(kill_switch_fd=7))
        assert [("SIGNAL_PIDFD", 21, "kill"), ("SIGNAL_PIDFD", 22, "kill"), ("SIGNAL_PIDFD", 23, "kill"),
                ("MRELEASE", 21, "kill"), ("MRELEASE", 22, "kill"), ("MRELEASE", 23, "kill"),
                ("CHECK", 0, "kill")] == _shape(compiled)[:7]

    def test_hooks_head(self) -> None:
        """With hooks: after the kill and the reap, the plan waits for the exit (the restore
        needs the memory back), then restores the hooks' grant, then checks."""
        compiled = KillLargest(max_victims=1).compile(self._ctx(reserve=16 * MIB, hooks_wake_fd=8,
                                                                hooks_reply_fd=9))
        kinds = [(a.kind.name, a.guard, p) for a, p in zip(compiled.plan.actions, compiled.phases)]
        assert [
            ("WRITE", -1, "hooks"), ("WAKE", 0, "hooks"), ("AWAIT", 0, "hooks"), ("WRITE", 0, "hooks"),
            ("WRITE", 3, "hooks"), ("SIGNAL_PIDFD", -1, "kill"), ("MRELEASE", -1, "kill"), ("AWAIT", 5, "kill"),
            ("WRITE", 0, "kill"), ("CHECK", -1, "kill"),
        ] == kinds

    def test_v2_kills_open_the_wall(self) -> None:
        """cgroup v2: the wall opens before the first kill and closes after the last, the reaps
        between."""
        ctx = _ctx(lift=b"max", restore_resolves=False, resolved_below=64 * MIB, resolved_needle=b"",
                   kill_switch_on=b"max", kill_switch_off=str(64 * MIB).encode(), kill_switch_fd=7)
        from useroom._victims import TaskFds

        ctx = attrs.evolve(ctx, pidfds={pid: TaskFds(fd) for pid, fd in self.FDS.items()})
        compiled = KillLargest(max_victims=2).compile(ctx)
        kinds = [k for k, _, _ in _shape(compiled)]
        assert ["WRITE", "SIGNAL_PIDFD", "MRELEASE", "CHECK", "SIGNAL_PIDFD", "MRELEASE", "CHECK", "WRITE"] == \
            kinds[:8]
