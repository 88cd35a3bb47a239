"""The Handler on real v1 OOMs: policies, grant, kernel fallback, events, cleanup."""

from __future__ import annotations

import errno
import os
import signal
import time

import psutil
import pytest

from helpers import MIB, destroy_group, until_resolved, wait_until
from useroom import (
    Group,
    Handler,
    KillByPriority,
    KillLargest,
    KillNewest,
    MoveToOverflow,
    RaiseLimit,
    RootGroupError,
    native,
)

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(90)]


def _hogs(spawn_hog, group: Group, *sizes: int):
    """Hogs that touch and hold ``sizes`` MiB, then wait for them to finish."""
    hogs = [spawn_hog(mib, group=group) for mib in sizes]
    for hog in hogs:
        hog.start()
        assert hog.wait_touched(20)
    return hogs


def _episodes(handler: Handler, count: int, timeout: float = 10.0) -> list:
    """The first ``count`` episodes that needed action (waits for them)."""
    deadline = time.monotonic() + timeout
    while True:
        acted = [e for e in handler.events if e.outcome != "not_needed"]
        left = deadline - time.monotonic()
        if len(acted) >= count or left <= 0:
            return acted
        handler.wait_for_events(len(handler.events) + 1, left)


def _table_has(handler: Handler, pids: set[int]) -> bool:
    return pids <= {v.pid for v in handler.victims}


class TestPolicies:
    @pytest.fixture
    def group(self, scratch_group: Group) -> Group:
        scratch_group.set_limit("64M")
        return scratch_group

    def test_kill_largest(self, group: Group, spawn_hog) -> None:
        """The largest task at the last refresh is killed; the others live and
        the overrunning task completes."""
        big, small = _hogs(spawn_hog, group, 30, 10)
        with Handler(group, KillLargest(), thresholds=(), refresh_interval=0.5) as handler:
            assert wait_until(lambda: _table_has(handler, {big.pid, small.pid}), 5)
            # 30 + 10 + 28 overruns 64M; without big, 10 + 28 fits with room
            # to spare (the interpreters were charged before they joined).
            grower = spawn_hog(28, group=group)
            assert wait_until(lambda: _table_has(handler, {grower.pid}), 5)
            grower.start()
            assert grower.wait_touched(20)
            assert -signal.SIGKILL == big.wait(5)
            events = until_resolved(handler)
        assert None is small.returncode
        assert "resolved" == events[-1].outcome
        assert {"superseded"} >= {e.outcome for e in events[:-1]}
        assert [(big.pid, "SIGKILL", 0, "plan")] == [(v.pid, v.signal, v.result, v.by)
                                                     for e in events for v in e.victims if v.result == 0]
        assert not any(e.fallback for e in events)
        for event in events:
            assert event.notified_ns <= event.acted_ns <= event.resolved_ns
        assert f"SIGKILL {big.pid} " in events[0].action and "at the OOM" in events[0].action
        assert [True] == [v.badness is not None and v.badness > 30 * MIB for e in events for v in e.victims
                          if v.result == 0]

    def test_kill_largest_measures_at_the_oom(self, group: Group, spawn_hog) -> None:
        """The victim is the largest task at the moment of the OOM, not at the
        last refresh: a task that was small when the table was read and
        grew since is the one killed (as the kernel would), and the one
        that was largest then is spared."""
        settled, = _hogs(spawn_hog, group, 16)
        grower = spawn_hog(60, group=group)
        with Handler(group, KillLargest(), thresholds=(), refresh_interval=3600) as handler:
            assert _table_has(handler, {settled.pid, grower.pid})
            sizes = {v.pid: v.rss for v in handler.victims}
            assert sizes[grower.pid] < sizes[settled.pid]  # the refresh saw it small
            grower.start()
            assert -signal.SIGKILL == grower.wait(20)
            events = until_resolved(handler)
        assert None is settled.returncode
        [victim] = [v for e in events for v in e.victims if v.result == 0]
        assert (grower.pid, "plan") == (victim.pid, victim.by)
        assert victim.badness is not None and victim.badness > sizes[settled.pid]

    def test_kill_newest(self, group: Group, spawn_hog) -> None:
        """The most recently started task is killed first."""
        old, = _hogs(spawn_hog, group, 30)
        with Handler(group, KillNewest(), thresholds=(), refresh_interval=0.5) as handler:
            new = spawn_hog(60, group=group)
            assert wait_until(lambda: _table_has(handler, {old.pid, new.pid}), 5)
            new.start()
            assert -signal.SIGKILL == new.wait(20)
            events = _episodes(handler, 1)
        assert None is old.returncode
        assert [new.pid] == [v.pid for e in events for v in e.victims]

    def test_kill_by_priority(self, group: Group, spawn_hog) -> None:
        """A priority callable evaluated at refresh time picks the victim, even a small one."""
        # The hogs' interpreters are charged before they join the group, so
        # the group holds about what they touch: 24 + 16 + 30 overruns 64M,
        # and without small, 24 + 30 fits with room to spare (one kill).
        big, small = _hogs(spawn_hog, group, 24, 16)
        policy = KillByPriority(lambda p: 10 if p.pid == small.pid else 0)
        with Handler(group, policy, thresholds=(), refresh_interval=0.5) as handler:
            grower = spawn_hog(30, group=group)
            assert wait_until(lambda: _table_has(handler, {big.pid, small.pid, grower.pid}), 5)
            grower.start()
            assert grower.wait_touched(20)
            assert -signal.SIGKILL == small.wait(5)
            events = _episodes(handler, 1)
        assert None is big.returncode
        assert [small.pid] == [v.pid for e in events for v in e.victims]
        assert "priority 10" in events[0].action

    def test_priority_spares(self, group: Group, spawn_hog) -> None:
        """Tasks below spare_below are never planned as victims."""
        keep, = _hogs(spawn_hog, group, 30)
        policy = KillByPriority(lambda p: -1 if p.pid == keep.pid else 0, spare_below=0)
        with Handler(group, policy, thresholds=(), refresh_interval=0.5) as handler:
            other = spawn_hog(50, group=group)
            assert wait_until(lambda: _table_has(handler, {keep.pid, other.pid}), 5)
            other.start()
            assert -signal.SIGKILL == other.wait(20)
        assert None is keep.returncode

    def test_raise_limit(self, group: Group, spawn_hog) -> None:
        """RaiseLimit raises in steps up to what resolves the OOM; nobody is killed."""
        with Handler(group, RaiseLimit("32M", "256M"), thresholds=(), refresh_interval=0.5) as handler:
            hog = spawn_hog(100, group=group)
            hog.start()
            assert hog.wait_touched(30)
            events = _episodes(handler, 1)
        assert [] == [v for e in events for v in e.victims]
        assert all(e.outcome == "resolved" for e in events)
        assert 128 * MIB == group.limit()

    def test_term_grace(self, group: Group, spawn_hog) -> None:
        """With term_grace, the victim gets SIGTERM first and dies of it."""
        victim, = _hogs(spawn_hog, group, 30)
        with Handler(group, KillLargest(term_grace=2.0), thresholds=(), refresh_interval=0.5) as handler:
            grower = spawn_hog(50, group=group)
            assert wait_until(lambda: _table_has(handler, {victim.pid, grower.pid}), 5)
            grower.start()
            assert -signal.SIGTERM == victim.wait(20)
            events = _episodes(handler, 1)
        assert [("SIGTERM", 0), ("SIGKILL", -errno.ESRCH)] == [(v.signal, v.result) for v in events[0].victims]


    @pytest.mark.skipif(not native.can_use_mrelease(), reason="process_mrelease needs Linux 5.15")
    def test_the_victims_memory_is_reaped(self, group: Group, spawn_hog) -> None:
        """With pidfds and process_mrelease (as here), the plan's SIGKILL through the victim's
        pidfd is followed at once by the reaping of its memory, on the same pidfd."""
        big, = _hogs(spawn_hog, group, 30)
        with Handler(group, KillLargest(), thresholds=(), refresh_interval=0.2) as handler:
            grower = spawn_hog(48, group=group)
            assert wait_until(lambda: _table_has(handler, {big.pid, grower.pid}), 5)
            grower.start()
            events = until_resolved(handler)
        steps = [s for e in events for s in e.steps]
        kills = [i for i, s in enumerate(steps) if s.kind in ("SIGNAL_PIDFD", "SIGNAL_BEST") and s.ok]
        assert kills and {big.pid, grower.pid} >= {steps[i].pid for i in kills}
        for i in kills:
            # 0, or ESRCH when the victim had exited before the call: its memory was back already.
            assert ("MRELEASE", True) == (steps[i + 1].kind, steps[i + 1].result in (0, -errno.ESRCH))
        assert "resolved" == events[-1].outcome


class TestFallbacks:
    def test_grant_handles_a_task_not_in_the_table(self, scratch_group: Group, spawn_hog) -> None:
        """A task that arrived after the last refresh is found and killed during a
        headroom grant, and the limit is restored."""
        scratch_group.set_limit("64M")
        # KillNewest plans only the tasks of its table (KillLargest's pick
        # would find the newcomer itself, through cgroup.procs).
        with Handler(scratch_group, KillNewest(), reserve="16M", thresholds=(), refresh_interval=3600) as handler:
            newcomer = spawn_hog(120, group=scratch_group)
            assert not _table_has(handler, {newcomer.pid})
            newcomer.start()
            assert -signal.SIGKILL == newcomer.wait(20)
            events = _episodes(handler, 1)
        [event] = events
        assert "resolved" == event.outcome
        assert True is event.fallback
        assert [(newcomer.pid, "handler")] == [(v.pid, v.by) for v in event.victims]
        assert 64 * MIB == scratch_group.limit()

    def test_a_refresh_without_memory_falls_back_to_the_task_list(self, scratch_group: Group, spawn_hog) -> None:
        """The grant's fallback, reached through the kernel: the manager thread is charged to the
        group (as when the handler's threads could not be moved out of it: v1 charges a thread's
        kernel allocations to its own group), the reserve is 1 MiB, and eight tasks no refresh has
        seen wake into it at once. The refresh of the grant then fails with ENOMEM, and the
        handler kills from the spare cgroup.procs list and the table's open files. Every task
        it signals is one of the group's, the group ends out of the OOM, and the limit is
        restored."""
        scratch_group.set_limit("64M")
        home = Group.current()
        with Handler(scratch_group, KillNewest(), reserve="1M", thresholds=(), refresh_interval=3600) as handler:
            manager = handler.supervisor.manager_tid
            scratch_group.attach_thread(manager)
            # v1 keeps a group's task list a second after its last read (the start's): from
            # then on, a read of the spare file loads the list of now.
            time.sleep(1.6)
            try:
                hogs = [spawn_hog(20, group=scratch_group) for _ in range(8)]
                for hog in hogs:
                    hog.start()
                assert wait_until(lambda: any(v.unrefreshed for e in handler.events for v in e.victims), 30), \
                    [(e.outcome, [(v.pid, v.by, v.result) for v in e.victims]) for e in handler.events] + \
                    [h.returncode for h in hogs] + [repr(e) for e in handler.errors]
                assert wait_until(lambda: not scratch_group.oom_control().under_oom, 15)
                events = list(handler.events)
            finally:
                home.attach_thread(manager)
            # An episode may end "relieved", the limit raised by at most the reserve: the handler
            # restores it as soon as the usage allows, which the survivors' exit does.
            for hog in hogs:
                hog.release()
            assert wait_until(lambda: 64 * MIB == scratch_group.limit(), 15)
        fallback = [v for e in events for v in e.victims if v.unrefreshed]
        assert any(v.result == 0 for v in fallback) and {v.pid for v in fallback} <= {h.pid for h in hogs}
        assert not scratch_group.oom_control().under_oom

    def test_kernel_is_the_last_resort(self, scratch_group: Group, spawn_hog) -> None:
        """With no victim and no reserve the plan lets the kernel OOM killer act once,
        then disables it again."""
        scratch_group.set_limit("32M")
        with Handler(scratch_group, KillNewest(), thresholds=(), refresh_interval=3600) as handler:
            hog = spawn_hog(100, group=scratch_group)
            hog.start()
            assert -signal.SIGKILL == hog.wait(20)
            events = _episodes(handler, 1)
            assert True is scratch_group.oom_control().kill_disabled
        assert True is events[0].fallback
        assert "resolved" == events[0].outcome
        kernel = [(s.kind, s.result) for s in events[0].steps if s.phase == "kernel"]
        assert [("WRITE", 1), ("CHECK", 1), ("WRITE", 1)] == kernel


class TestLifecycle:
    def test_kernel_killer_setting_restored(self, scratch_group: Group) -> None:
        """The kernel killer is off while the handler runs, back on after stop()."""
        scratch_group.set_limit("64M")
        handler = Handler(scratch_group)
        handler.start()
        try:
            assert True is scratch_group.oom_control().kill_disabled
        finally:
            handler.stop()
        assert False is scratch_group.oom_control().kill_disabled
        handler.stop()

    def test_a_refresh_that_changes_nothing_keeps_the_armed_plan(self, scratch_group: Group, spawn_hog) -> None:
        """KillLargest's plan is compiled again only when what it reads changed: in an OOM
        storm the table is refreshed several times per episode. A grown task is not such a
        change (the pick reads the sizes at the OOM); a new task is."""
        scratch_group.set_limit("256M")
        first = spawn_hog(8, group=scratch_group)
        with Handler(scratch_group, KillLargest(), thresholds=(), refresh_interval=3600) as handler:
            handler._refresh(grant=False)
            armed = handler.watched.armed_id
            first.start()
            first.expect("touched", 10)
            handler._refresh(grant=False)
            handler._refresh(grant=False)
            assert armed == handler.watched.armed_id
            assert [first.pid] == [v.pid for v in handler.victims]
            spawn_hog(8, group=scratch_group)
            handler._refresh(grant=False)
            assert armed < handler.watched.armed_id
            assert 2 == len(handler.victims)

    def test_wake_ups_in_a_burst_share_one_refresh(self, scratch_group: Group, spawn_hog) -> None:
        """Wake-ups closer than REFRESH_GAP to the last refresh are answered by one refresh at
        the gap's end: never two refreshes closer than that, and none skipped for good."""
        from useroom.handler.group import REFRESH_GAP

        scratch_group.set_limit("256M")
        spawn_hog(8, group=scratch_group)
        # A usage threshold far below the usage: its eventfd, written here,
        # wakes the manager for this group as a crossing would.
        with Handler(scratch_group, KillLargest(), thresholds=(0.001,), refresh_interval=3600) as handler:
            [threshold] = handler.arming.thresholds
            times: list[float] = []
            table = handler._table
            real = table.refresh

            def refresh():  # type: ignore[no-untyped-def]
                times.append(time.monotonic())
                return real()

            table.refresh = refresh  # type: ignore[method-assign]
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                os.eventfd_write(threshold.fileno(), 1)
                time.sleep(0.001)
            assert wait_until(lambda: times and times[-1] > deadline - 0.001, 2)
        gaps = [b - a for a, b in zip(times, times[1:])]
        assert 0.5 / REFRESH_GAP / 2 <= len(times) <= 0.5 / REFRESH_GAP + 2
        assert min(gaps) >= REFRESH_GAP * 0.9

    def test_protects_its_own_process(self, scratch_group: Group) -> None:
        """The handler's process is never in its victim table, even inside the group."""
        scratch_group.set_limit("256M")
        with Handler(scratch_group, protect=[12345]) as handler:
            scratch_group.attach(os.getpid())
            try:
                handler._refresh(grant=False)
                assert os.getpid() not in {v.pid for v in handler.victims}
            finally:
                Group.open(os.path.dirname(scratch_group.path)).attach(os.getpid())

    def test_root_group_refused(self, own_group: Group) -> None:
        """The root memcg has no OOM notifications: a clear error."""
        root = own_group
        while root.parent is not None:
            root = root.parent
        with pytest.raises(RootGroupError, match="root"):
            Handler(root)

    def test_bad_arguments(self, scratch_group: Group) -> None:
        """Thresholds outside (0, 1) and non-positive timeouts are refused."""
        with pytest.raises(ValueError, match="thresholds"):
            Handler(scratch_group, thresholds=(1.5,))
        with pytest.raises(ValueError, match="refresh_interval"):
            Handler(scratch_group, refresh_interval=0)

    def test_start_failure_cleans_up(self, scratch_group: Group, monkeypatch) -> None:
        """If arming fails half-way, every fd is closed and the group's setting is untouched."""
        before = len(os.listdir("/proc/self/fd"))

        def refuse(*args: object) -> None:
            raise OSError(errno.EPERM, "refused")

        monkeypatch.setattr(type(scratch_group), "usage_threshold", refuse)
        scratch_group.set_limit("64M")
        with pytest.raises(OSError, match="refused"):
            Handler(scratch_group).start()
        assert before == len(os.listdir("/proc/self/fd"))
        assert False is scratch_group.oom_control().kill_disabled


class TestMorePolicies:
    @pytest.fixture
    def group(self, scratch_group: Group) -> Group:
        scratch_group.set_limit("64M")
        return scratch_group

    def test_dry_run_kills_nobody_and_records_what_it_would_do(self, group: Group, spawn_hog) -> None:
        """DryRun raises the limit within its ceiling instead of killing, and the event
        says whom the policy would have killed, and why."""
        big, = _hogs(spawn_hog, group, 30)
        from useroom import DryRun

        with Handler(group, DryRun(KillLargest(), step="32M", ceiling="256M"), thresholds=(), refresh_interval=0.5) as handler:
            grower = spawn_hog(50, group=group)
            assert wait_until(lambda: _table_has(handler, {big.pid, grower.pid}), 5)
            grower.start()
            assert grower.wait_touched(20)
            events = _episodes(handler, 1)
        assert (None, None) == (big.returncode, grower.returncode)
        assert [] == [v for e in events for v in e.victims]
        assert events[0].would[0].startswith(f"SIGKILL {big.pid} ")
        assert "largest RSS" in events[0].would[0]
        assert 96 * MIB == group.limit()

    def test_freeze_and_decide(self, group: Group, spawn_hog) -> None:
        """The tasks are stopped, the callback picks the victim (not the largest), the
        rest are thawed and finish."""
        from useroom import FreezeAndDecide

        big, small = _hogs(spawn_hog, group, 24, 20)
        seen = []

        def decide(ctx) -> list[int]:
            seen.append(sorted(v.pid for v in ctx.victims))
            # SIGSTOP was sent; the task stops when it next runs, which on a
            # busy machine can be after the callback starts (well within the
            # decision's deadline, grant_timeout).
            wait_until(lambda: psutil.Process(big.pid).status() == psutil.STATUS_STOPPED, 0.5)
            seen.append(psutil.Process(big.pid).status())
            return [small.pid]

        with Handler(group, FreezeAndDecide(decide), reserve="16M", thresholds=(), refresh_interval=0.5) as handler:
            grower = spawn_hog(30, group=group)
            assert wait_until(lambda: _table_has(handler, {big.pid, small.pid, grower.pid}), 5)
            grower.start()
            assert grower.wait_touched(20)
            assert -signal.SIGKILL == small.wait(5)
            events = _episodes(handler, 1)
        assert sorted([big.pid, small.pid, grower.pid]) == seen[0]
        assert psutil.STATUS_STOPPED == seen[1]  # stopped while deciding
        assert None is big.returncode, [(e.outcome, e.action) for e in handler.events]
        assert psutil.STATUS_STOPPED != big.process.status()  # thawed
        [event] = [e for e in events if any(s.phase == "freeze" for s in e.steps)][:1]
        assert [(small.pid, "handler")] == [(v.pid, v.by) for v in event.victims if v.result == 0 and v.by == "handler"]
        assert "resolved" == event.outcome
        assert "freeze" == event.resolved_by


class TestMoveToOverflow:
    @pytest.fixture
    def groups(self, scratch_group: Group, own_group: Group):
        """The handled group (64 MiB) and a sibling overflow group, both destroyed afterwards."""
        scratch_group.set_limit("64M")
        path = scratch_group.path + "-overflow"
        os.mkdir(path)
        try:
            yield scratch_group, Group.open(path)
        finally:
            destroy_group(path, below=own_group.path)

    def test_moves_instead_of_killing(self, groups, spawn_hog) -> None:
        """The largest task moves to the overflow group and lives; the grower completes;
        the limit raised for the charge left behind comes back once that is freed."""
        group, overflow = groups
        big, = _hogs(spawn_hog, group, 40)
        with Handler(group, MoveToOverflow(overflow), thresholds=(), refresh_interval=0.1) as handler:
            grower = spawn_hog(36, group=group)
            assert wait_until(lambda: _table_has(handler, {big.pid, grower.pid}), 5)
            grower.start()
            assert grower.wait_touched(20)
            events = until_resolved(handler)
            assert (None, None) == (big.returncode, grower.returncode)
            assert [big.pid] == overflow.procs()
            assert big.pid not in group.procs()
            assert "resolved" == events[-1].outcome
            assert "move" == events[-1].resolved_by
            assert [big.pid] == [pid for e in events for pid in e.moved]
            assert [] == [v for e in events for v in e.victims]
            assert group.limit() > 64 * MIB  # its 40 MiB stay charged here
            big.release()
            assert big.wait(5) == 0
            assert wait_until(lambda: group.limit() == 64 * MIB, 5)
        assert None is grower.returncode

    def test_overflow_must_be_outside_the_group(self, groups) -> None:
        """The group itself, a child of it or its parent is refused as the overflow."""
        group, _ = groups
        child = group.create_child("inner")
        try:
            for bad in (group, child, group.parent):
                with pytest.raises(ValueError, match="overflow"):
                    Handler(group, MoveToOverflow(bad), thresholds=()).start()
            assert not group.oom_control().kill_disabled  # nothing left armed
        finally:
            child.remove()

    def test_bad_arguments(self, groups) -> None:
        _, overflow = groups
        with pytest.raises(ValueError, match="max_moved"):
            MoveToOverflow(overflow, max_moved=0)
        with pytest.raises(ValueError, match="max_raise"):
            MoveToOverflow(overflow, max_raise=0)

    def test_plan_shape(self, groups) -> None:
        """Each move is followed by the raise it guards and a check, then the kill plan."""
        from useroom.policy import PlanContext
        from useroom._victims import Victim

        group, overflow = groups
        policy = MoveToOverflow(overflow, max_raise="8M")
        policy.arm(group)
        try:
            victims = (Victim(11, "a", 30 * MIB, 1.0, 1000), Victim(12, "b", 10 * MIB, 2.0, 1000))
            compiled = policy.compile(PlanContext(victims=victims, limit=64 * MIB, limit_fd=5, check_fd=6,
                                                  resolved_needle=b"under_oom 0", reserve=MIB))
        finally:
            policy.disarm()
        kinds = [(a.kind.name, p) for a, p in zip(compiled.plan.actions, compiled.phases)]
        assert [("WRITE", "move"), ("WRITE", "move"), ("CHECK", "move")] == kinds[:3]
        assert b"11" == compiled.plan.actions[0].data
        assert str(72 * MIB).encode() == compiled.plan.actions[1].data  # capped by max_raise
        assert compiled.plan.actions[1].guard == 0
        assert "kill" in compiled.phases
        assert "grant" not in compiled.phases
