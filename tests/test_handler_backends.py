"""The handler's behaviour that both backends share, run on the backend of this machine.

On the host (cgroup v1) the handler disables the kernel OOM killer and the
tasks wait for it at the limit; in the v2 guest (.ci/run runs these there
too) it holds ``memory.high`` as a wall below ``memory.max``. The tests give
the handler the same effective limit on both: the v1 limit, or the v2 wall
(``memory.max`` minus the gap). What only one backend has is tested in
test_handler.py / test_watchdog.py (v1) and test_cgroup_v2.py (v2).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

import attrs
import pytest

from helpers import MIB, Hog, until_resolved, wait_until, SoloWatcher
from useroom import Handler, KillByPriority, KillGroup, KillLargest, KillNewest, OomContext, OomEvent
from useroom.cgroup import Group
from useroom.handler import V2_GAP

SpawnHog = Callable[..., Hog]
EVENT_TIMEOUT = 60.0

pytestmark = pytest.mark.backends


def _limit(group: Group, mib: int) -> Group:
    """Give the handler an effective limit of *mib* MiB on either backend."""
    group.set_limit((mib << 20) + (V2_GAP if group.version == 2 else 0))
    return group


def _settings(group: Group) -> tuple[object, ...]:
    """What the handler changes while it runs and must restore."""
    if group.version == 2:
        return group.high(), group.limit()  # type: ignore[attr-defined]
    return group.limit(), group.oom_control().kill_disabled


def _hogs(spawn_hog: SpawnHog, group: Group, *sizes: int) -> list[Hog]:
    hogs = [spawn_hog(mib, group) for mib in sizes]
    for hog in hogs:
        hog.start()
        assert hog.wait_touched(EVENT_TIMEOUT)
    return hogs


def _in_table(handler: Handler, *hogs: Hog) -> bool:
    return {h.pid for h in hogs} <= {v.pid for v in handler.victims}


def _killed(events: list[OomEvent]) -> list[int]:
    return [v.pid for e in events for v in e.victims if v.result == 0]


@pytest.fixture
def group(scratch_group: Group) -> Group:
    return _limit(scratch_group, 64)


class TestPolicies:
    def test_kill_largest(self, group: Group, spawn_hog: SpawnHog) -> None:
        """The largest task is killed by the plan, the others live, the grower completes, and
        the kernel killed nobody."""
        big, small = _hogs(spawn_hog, group, 30, 10)
        with Handler(group, KillLargest(), thresholds=(), refresh_interval=0.5) as handler:
            grower = spawn_hog(28, group)  # without big the rest fits with room to spare
            assert wait_until(lambda: _in_table(handler, big, small, grower), EVENT_TIMEOUT)
            grower.start()
            assert grower.wait_touched(EVENT_TIMEOUT)
            assert -signal.SIGKILL == big.wait(EVENT_TIMEOUT)
            events = until_resolved(handler, EVENT_TIMEOUT)
        assert "resolved" == events[-1].outcome
        assert [big.pid] == _killed(events)
        assert {"plan"} == {v.by for e in events for v in e.victims}
        assert None is small.returncode
        for event in events:
            assert event.notified_ns <= event.acted_ns <= event.resolved_ns
        assert 0 == group.oom_control().oom_kill

    def test_kill_newest(self, group: Group, spawn_hog: SpawnHog) -> None:
        """The most recently started task goes first."""
        old, = _hogs(spawn_hog, group, 30)
        with Handler(group, KillNewest(), thresholds=(), refresh_interval=0.5) as handler:
            new = spawn_hog(60, group)
            assert wait_until(lambda: _in_table(handler, old, new), EVENT_TIMEOUT)
            new.start()
            assert -signal.SIGKILL == new.wait(EVENT_TIMEOUT)
            events = until_resolved(handler, EVENT_TIMEOUT)
        assert [new.pid] == _killed(events)
        assert None is old.returncode

    def test_kill_by_priority_spares_the_protected(self, group: Group, spawn_hog: SpawnHog) -> None:
        """A priority picks a small task over a big one; a protected pid is never a victim."""
        big, small = _hogs(spawn_hog, group, 24, 16)
        policy = KillByPriority(lambda p: 10 if p.pid == small.pid else 0)
        with Handler(group, policy, thresholds=(), refresh_interval=0.5, protect=(big.pid,)) as handler:
            grower = spawn_hog(36, group)
            assert wait_until(lambda: _in_table(handler, small, grower), EVENT_TIMEOUT)
            assert big.pid not in {v.pid for v in handler.victims}
            grower.start()
            assert -signal.SIGKILL == small.wait(EVENT_TIMEOUT)
            events = until_resolved(handler, EVENT_TIMEOUT)
        assert small.pid == _killed(events)[0]
        assert None is big.returncode


    def test_kill_group_kills_every_task(self, group: Group, spawn_hog: SpawnHog) -> None:
        """KillGroup: every task of the group dies in the episode (v2, handler outside:
        through cgroup.kill; else SIGKILL to each), and the kernel killed nobody."""
        a, b = _hogs(spawn_hog, group, 20, 10)
        with Handler(group, KillGroup(), thresholds=(), refresh_interval=0.5) as handler:
            grower = spawn_hog(60, group)
            assert wait_until(lambda: _in_table(handler, a, b, grower), EVENT_TIMEOUT)
            grower.start()
            for hog in (a, b, grower):
                assert -signal.SIGKILL == hog.wait(EVENT_TIMEOUT)
            events = until_resolved(handler, EVENT_TIMEOUT)
        assert "resolved" == events[-1].outcome
        assert [] == group.procs()
        via_file = any("cgroup.kill" in s.explanation for e in events for s in e.steps)
        assert via_file == (group.version == 2)
        if not via_file:
            assert {a.pid, b.pid, grower.pid} == set(_killed(events))
        assert 0 == group.oom_control().oom_kill


class TestGrantsAndHooks:
    def test_grant_kills_a_task_the_plan_did_not_know(self, group: Group, spawn_hog: SpawnHog) -> None:
        """A task started after the last refresh: the grant wakes the manager, which refreshes
        and kills it; the limit (v1) or wall (v2) is back afterwards."""
        before = _settings(group)
        # KillNewest plans only the tasks of its table (KillLargest's pick
        # finds a newcomer itself: the test below).
        with Handler(group, KillNewest(), reserve="16M", thresholds=(), refresh_interval=3600) as handler:
            during = _settings(group)
            newcomer = spawn_hog(120, group)
            assert not _in_table(handler, newcomer)
            newcomer.start()
            assert -signal.SIGKILL == newcomer.wait(EVENT_TIMEOUT)
            events = until_resolved(handler, EVENT_TIMEOUT)
            assert wait_until(lambda: _settings(group) == during, EVENT_TIMEOUT)
        assert before == _settings(group)
        assert "resolved" == events[-1].outcome
        assert [(newcomer.pid, "handler")] == [(v.pid, v.by) for e in events for v in e.victims]
        assert any(e.fallback for e in events)
        assert 0 == group.oom_control().oom_kill

    def test_the_pick_finds_a_task_started_since_the_refresh(self, group: Group, spawn_hog: SpawnHog) -> None:
        """KillLargest's pick reads cgroup.procs at the OOM: a task the table
        never saw, larger than every candidate, is the one the plan kills (as
        the kernel would), without the grant; the others live."""
        old, = _hogs(spawn_hog, group, 16)
        with Handler(group, KillLargest(), reserve="16M", thresholds=(), refresh_interval=3600) as handler:
            newcomer = spawn_hog(120, group)
            assert not _in_table(handler, newcomer)
            newcomer.start()
            assert -signal.SIGKILL == newcomer.wait(EVENT_TIMEOUT)
            events = until_resolved(handler, EVENT_TIMEOUT)
        assert None is old.returncode
        killed = [v for e in events for v in e.victims if v.result == 0]
        assert [(newcomer.pid, "plan")] == [(v.pid, v.by) for v in killed]
        assert killed[0].badness is not None and killed[0].badness > 16 * MIB
        assert "new since the refresh" in events[0].action
        assert not any(e.fallback for e in events)
        assert 0 == group.oom_control().oom_kill

    def test_on_oom_hook_frees_memory_and_nobody_is_killed(self, group: Group, spawn_hog: SpawnHog) -> None:
        """The on_oom hook runs with headroom granted before any kill; it frees the memory (it
        ends the hog itself, which the handler protects), and the plan kills nobody."""
        hog = spawn_hog(120, group)
        calls: list[OomContext] = []
        handler = Handler(group, KillLargest(), reserve="16M", thresholds=(), refresh_interval=0.5, protect=(hog.pid,))

        @handler.on_oom
        def free(ctx: OomContext) -> bool:
            calls.append(ctx)
            os.kill(hog.pid, signal.SIGKILL)
            hog.wait(EVENT_TIMEOUT)  # reaped: its memory is back
            return True

        with handler:
            hog.start()
            assert -signal.SIGKILL == hog.wait(EVENT_TIMEOUT)
            events = until_resolved(handler, EVENT_TIMEOUT)
        assert calls and "resolved" == events[-1].outcome
        assert [] == _killed(events)
        assert [True] == [h.freed for e in events for h in e.hooks][:1]

    def test_kill_and_resolved_hooks(self, group: Group, spawn_hog: SpawnHog) -> None:
        """on_kill is called for the task the plan killed, on_resolved for the episode."""
        big, = _hogs(spawn_hog, group, 40)  # the largest at the OOM, not only at the refresh
        killed: list[int] = []
        resolved: list[str] = []
        with Handler(group, KillLargest(), thresholds=(), refresh_interval=0.5) as handler:
            handler.on_kill(lambda victim, event: killed.append(victim.pid))
            handler.on_resolved(lambda event: resolved.append(event.outcome))
            grower = spawn_hog(50, group)
            assert wait_until(lambda: _in_table(handler, big, grower), EVENT_TIMEOUT)
            grower.start()
            assert -signal.SIGKILL == big.wait(EVENT_TIMEOUT)
            assert wait_until(lambda: "resolved" in resolved, EVENT_TIMEOUT)
        assert big.pid in killed


class TestLifecycle:
    def test_stop_restores_the_group(self, group: Group) -> None:
        """While it runs the handler holds the group (v1: killer off; v2: the wall); stop puts
        every setting back; a second stop does nothing."""
        before = _settings(group)
        handler = Handler(group, thresholds=(), refresh_interval=0.5).start()
        try:
            assert _settings(group) != before
        finally:
            handler.stop()
        assert before == _settings(group)
        handler.stop()
        assert before == _settings(group)

    def test_kernel_step_is_the_last_resort(self, group: Group, spawn_hog: SpawnHog) -> None:
        """No victim the plan may kill and no reserve: the kernel step lets the kernel act
        (v1: the killer on; v2: the wall lifted), and the handler's setting comes back."""
        _limit(group, 32)
        hog = spawn_hog(100, group)
        with Handler(group, KillLargest(), thresholds=(), refresh_interval=0.5, protect=(hog.pid,), delay=5.0) as handler:
            during = _settings(group)
            hog.start()
            assert -signal.SIGKILL == hog.wait(EVENT_TIMEOUT)
            events = until_resolved(handler, EVENT_TIMEOUT)
            assert wait_until(lambda: _settings(group) == during, EVENT_TIMEOUT)
        assert any(s.phase == "kernel" for e in events for s in e.steps)
        assert 1 == group.oom_control().oom_kill


class TestPickFindsNewTasks:
    """The native pick's cgroup.procs, read again at each pick of one armed
    plan (signal 0: the pick is recorded, nobody is killed)."""

    def _pick(self, watcher, source: int) -> int:  # type: ignore[no-untyped-def]
        watcher.run_episode(source)
        [step] = watcher.records()[-1].steps
        return int(step.pid)

    def test_each_pick_lists_the_tasks_of_now(self, group: Group, spawn_hog: SpawnHog) -> None:
        """A task started after the plan was armed, and after a first pick read
        cgroup.procs, is found by the next pick of the same plan (cgroup v1
        lists an open file's first read again: the pick opens it anew)."""
        from useroom.native import Action, EventFd, Plan, SourceKind
        from useroom._procs import ProcsFiles

        first, = _hogs(spawn_hog, group, 8)
        files = ProcsFiles(group)
        try:
            fd = files.for_plan()
            os.pread(fd, 4096, 0)  # listed once before the plan runs: v1 keeps this list for the file
            plan = Plan([Action.signal_best(0)], procs_fd=fd, limit_kb=64 << 10)
            with SoloWatcher(lock=False) as watcher, EventFd() as source:
                idx = watcher.add_source(source.fileno(), SourceKind.OOM)
                watcher.arm(plan)
                assert first.pid == self._pick(watcher, idx)
                second, = _hogs(spawn_hog, group, 24)  # larger: the pick's answer, if it sees it
                if group.version == 1:
                    # The plan's own file lists its first read's tasks again.
                    assert first.pid == self._pick(watcher, idx)
                watcher.arm(attrs.evolve(plan, procs_reopen=not group.procs_pread_relists))
                assert second.pid == self._pick(watcher, idx)
        finally:
            files.close()
        assert (None, None) == (first.returncode, second.returncode)
