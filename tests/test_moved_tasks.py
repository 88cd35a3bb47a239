"""Tasks moved out of the group after the refresh are never signalled, on either backend.

The table pins each task with a pidfd at the refresh; a pidfd protects
against pid reuse, not against a move. Each case moves the task the plan
would pick (the largest, or the newest) to a sibling group after the last
refresh, with ``thresholds=()`` and a refresh interval of an hour, so that
only the check at the signal stands between it and a SIGKILL; then a task
in the group overruns. The moved task's memory stays charged to the group
(neither backend moves charges by default), so it is the largest in every
count, and the code before the check killed it. Each case checks: it
lives, a task of the group died instead, and the group is not left out of
memory.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
from collections.abc import Callable

import pytest

from helpers import Hog, wait_until
from useroom import (FreezeAndDecide, Group, Handler, KillByPriority, KillGroup, KillLargest, KillNewest,
                     OomEvent, Policy)
from useroom.handler import V2_GAP

pytestmark = [pytest.mark.backends, pytest.mark.timeout(120)]

SpawnHog = Callable[..., Hog]
NOT_MEMBER = "-EXDEV"


@pytest.fixture
def group(scratch_group: Group) -> Group:
    """The handled group, with an effective limit of 64 MiB on either backend."""
    scratch_group.set_limit((64 << 20) + (V2_GAP if scratch_group.version == 2 else 0))
    return scratch_group


def _touched(spawn_hog: SpawnHog, group: Group, mib: int) -> Hog:
    hog = spawn_hog(mib, group)
    hog.start()
    assert hog.wait_touched(30)
    return hog


def _signalled(events: list[OomEvent]) -> set[int]:
    """The pids a kill went out to (SIGTERM or SIGKILL), by the plan or the handler; a SIGSTOP and
    its SIGCONT while the task was still in the group are not kills."""
    return {v.pid for e in events for v in e.victims if v.result == 0 and v.signal in ("SIGTERM", "SIGKILL")}


def _acted(handler: Handler) -> list[OomEvent]:
    return [e for e in handler.events if e.outcome != "not_needed"]


def _over(group: Group) -> bool:
    """Whether the group is left out of memory (v1: under_oom; v2: a task stuck at the wall)."""
    if group.version == 1:
        return group.oom_control().under_oom
    return bool(group.procs()) and group.usage() >= group.high()  # type: ignore[attr-defined]


def _moved_then_overrun(handler: Handler, group: Group, elsewhere: Group, spawn_hog: SpawnHog,
                        mover: Hog) -> Hog:
    """Moves *mover* out (the table still lists it), then starts a task of the group that overruns."""
    assert wait_until(lambda: mover.pid in {v.pid for v in handler.victims}, 10)
    elsewhere.attach(mover.pid)
    assert mover.pid not in group.procs()
    assert mover.pid in {v.pid for v in handler.victims}  # the table is as of before the move
    grower = spawn_hog(100, group)
    grower.start()
    return grower


POLICIES: list[tuple[str, Callable[[], Policy]]] = [
    ("KillLargest", KillLargest),  # the native pick, at the OOM
    ("KillNewest", KillNewest),  # a signal through each planned victim's pidfd
    ("KillByPriority", lambda: KillByPriority({"no-such-task": 9})),  # all equal: the largest first
    ("KillGroup", KillGroup),  # every task of the table (v2, outside the group: cgroup.kill)
]


class TestMovedOut:
    @pytest.mark.parametrize("make", [m for _, m in POLICIES], ids=[n for n, _ in POLICIES])
    def test_a_task_moved_out_before_the_oom_lives(self, group: Group, elsewhere: Group, spawn_hog: SpawnHog,
                                                    make: Callable[[], Policy]) -> None:
        """40 MiB moved out after the refresh: the biggest and newest task the table knows. The grower
        in the group dies (or the small one first); the moved task is not signalled."""
        small = _touched(spawn_hog, group, 8)
        mover = _touched(spawn_hog, group, 40)
        with Handler(group, make(), thresholds=(), refresh_interval=3600) as handler:
            grower = _moved_then_overrun(handler, group, elsewhere, spawn_hog, mover)
            assert -signal.SIGKILL == grower.wait(30)
            assert wait_until(lambda: not _over(group), 10)
            events = _acted(handler)
        assert events
        assert mover.returncode is None and mover.process.status() != "zombie"
        assert mover.pid not in _signalled(events)
        assert _signalled(events) <= {small.pid, grower.pid}

    def test_a_moved_task_with_threads_lives(self, group: Group, elsewhere: Group, spawn_hog: SpawnHog) -> None:
        """The moved process has threads (all of them move with it through cgroup.procs)."""
        small = _touched(spawn_hog, group, 8)
        threaded = subprocess.Popen(
            [sys.executable, "-c",
             "import mmap, sys, threading\n"
             "m = mmap.mmap(-1, 40 << 20)\n"
             "for o in range(0, 40 << 20, 4096): m[o] = 1\n"
             "for _ in range(4): threading.Thread(target=sys.stdin.read, daemon=True).start()\n"
             "print('touched', flush=True); sys.stdin.read()\n"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=lambda: group.attach(os.getpid()))
        try:
            assert threaded.stdout is not None and b"touched\n" == threaded.stdout.readline()
            with Handler(group, KillLargest(), thresholds=(), refresh_interval=3600) as handler:
                assert wait_until(lambda: threaded.pid in {v.pid for v in handler.victims}, 10)
                elsewhere.attach(threaded.pid)
                assert len(os.listdir(f"/proc/{threaded.pid}/task")) == 5
                grower = spawn_hog(100, group)
                grower.start()
                assert -signal.SIGKILL == grower.wait(30)
                assert wait_until(lambda: not _over(group), 10)
                events = _acted(handler)
            assert threaded.poll() is None
            assert threaded.pid not in _signalled(events)
            assert _signalled(events) <= {small.pid, grower.pid}
        finally:
            threaded.kill()
            threaded.communicate()

    def test_the_plan_records_the_refused_signal(self, group: Group, elsewhere: Group,
                                                 spawn_hog: SpawnHog) -> None:
        """KillNewest plans a signal to the moved task through its pidfd: the step records that it
        was not sent (EXDEV, the task is no longer in the group), and the episode goes on to the
        group's own tasks."""
        small = _touched(spawn_hog, group, 8)
        mover = _touched(spawn_hog, group, 40)
        with Handler(group, KillNewest(), thresholds=(), refresh_interval=3600) as handler:
            grower = _moved_then_overrun(handler, group, elsewhere, spawn_hog, mover)
            assert -signal.SIGKILL == grower.wait(30)
            assert wait_until(lambda: not _over(group), 20)
            events = _acted(handler)
        refused = [v for v in events[0].victims if v.pid == mover.pid]
        assert refused and all(-18 == v.result for v in refused)  # -EXDEV
        assert mover.returncode is None
        assert _signalled(events) <= {small.pid, grower.pid}


class TestMovedDuringDecide:
    def test_a_task_moved_while_the_handler_decides_lives(self, group: Group, elsewhere: Group,
                                                          spawn_hog: SpawnHog) -> None:
        """decide() chooses the largest task of the group it was shown, and the task leaves the
        group before the handler signals it (here decide() moves it itself, to close the race
        for certain): the handler's signal from Python is refused, and the plan's fallback
        kills a task of the group instead."""
        moved: list[int] = []

        def decide(ctx):
            largest = max(ctx.victims, key=lambda v: v.rss)
            elsewhere.attach(largest.pid)
            moved.append(largest.pid)
            return [largest.pid]

        small = _touched(spawn_hog, group, 8)
        mover = _touched(spawn_hog, group, 40)
        with Handler(group, FreezeAndDecide(decide), reserve="16M", thresholds=(), refresh_interval=3600) as handler:
            assert wait_until(lambda: mover.pid in {v.pid for v in handler.victims}, 10)
            grower = spawn_hog(100, group)
            grower.start()
            assert -signal.SIGKILL == grower.wait(30) or -signal.SIGKILL == small.wait(30)
            assert wait_until(lambda: not _over(group), 10)
            events = _acted(handler)
        assert [mover.pid] == moved[:1]
        assert mover.returncode is None
        assert mover.pid not in _signalled(events)
        kills = [v for e in events for v in e.victims if v.pid == mover.pid and v.signal == "SIGKILL"]
        assert kills and all(v.result == -18 and v.by == "handler" for v in kills)
        # Stopped in the group with the others, and thawed after its move: a SIGCONT always goes out.
        assert wait_until(lambda: mover.process.status() != "stopped", 5)


class TestWithoutPidfds:
    """The fallback for kernels before 5.3, forced through the library's switch: signals by pid,
    each after a read of the task's cgroup file says it is still in the group."""

    @pytest.mark.parametrize("make", [m for n, m in POLICIES if n != "KillGroup"],
                             ids=[n for n, _ in POLICIES if n != "KillGroup"])
    def test_a_task_moved_out_lives_without_pidfds(self, group: Group, elsewhere: Group, spawn_hog: SpawnHog,
                                                   make: Callable[[], Policy],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr("useroom._fd.can_use_pidfd", False)
        small = _touched(spawn_hog, group, 8)
        mover = _touched(spawn_hog, group, 40)
        with Handler(group, make(), thresholds=(), refresh_interval=3600) as handler:
            grower = _moved_then_overrun(handler, group, elsewhere, spawn_hog, mover)
            assert -signal.SIGKILL == grower.wait(30)
            assert wait_until(lambda: not _over(group), 10)
            events = _acted(handler)
        kinds = {s.kind for e in events for s in e.steps}
        assert "SIGNAL_PID" in kinds and not kinds & {"SIGNAL_PIDFD", "SIGNAL_BEST"}
        assert mover.returncode is None
        assert mover.pid not in _signalled(events)
        assert _signalled(events) <= {small.pid, grower.pid}

    def test_the_switch_reaches_a_handler_process(self, group: Group, elsewhere: Group, spawn_hog: SpawnHog,
                                                  tmp_path: pathlib.Path) -> None:
        """USEROOM_NO_PIDFD=1 in the environment of ``useroom handle``: the handler says it runs
        without pidfds, signals by pid, and still spares the moved task."""
        small = _touched(spawn_hog, group, 8)
        mover = _touched(spawn_hog, group, 40)
        env = dict(os.environ, USEROOM_NO_PIDFD="1")
        out = tmp_path / "events.json"
        cli = subprocess.Popen(
            [sys.executable, "-m", "useroom", "handle", group.path, "--policy", "kill-newest",
             "--events-out", str(out)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert wait_until(lambda: group.oom_control().kill_disabled if group.version == 1
                              else group.high() < group.limit(), 20)  # type: ignore[attr-defined]
            elsewhere.attach(mover.pid)
            grower = spawn_hog(100, group)
            grower.start()
            assert wait_until(lambda: small.returncode is not None or grower.returncode is not None, 30)
            assert wait_until(lambda: not _over(group), 10)
            assert mover.returncode is None
        finally:
            cli.send_signal(signal.SIGINT)
            _, err = cli.communicate(timeout=30)
        assert "no pidfds" in err
        assert mover.returncode is None
        steps = out.read_text()
        assert "SIGNAL_PID" in steps and "SIGNAL_PIDFD" not in steps and "SIGNAL_BEST" not in steps



class TestMembershipLine:
    def test_a_line_matches_whole_lines_only(self) -> None:
        from useroom._members import MembershipLine

        line = MembershipLine(b"7:memory:/a/b\n")
        assert line.holds(b"12:pids:/x\n7:memory:/a/b\n1:name=systemd:/\n")
        assert line.holds(b"7:memory:/a/b\n")
        assert not line.holds(b"7:memory:/a/b/c\n")  # a child group is another group
        assert not line.holds(b"17:memory:/a/b\n")
        assert not line.holds(b"7:memory:/a/b")  # cut short: no end of line
        assert not line.holds(b"")
        with pytest.raises(ValueError):
            MembershipLine(b"7:memory:/a\n8:cpu:/\n")

    def test_the_group_line_is_what_a_task_of_the_group_shows(self, group: Group, spawn_hog: SpawnHog) -> None:
        from useroom._members import member_line

        hog = spawn_hog(0, group)
        with open(f"/proc/{hog.pid}/cgroup", "rb") as file:
            text = file.read()
        assert member_line(group).holds(text)
        assert not member_line(Group.current()).holds(text)

    def test_python_signals_go_to_members_only(self, group: Group, elsewhere: Group, spawn_hog: SpawnHog) -> None:
        """GroupSignals: 0 for a task of the group, NOT_MEMBER (nothing sent) for one moved out,
        ESRCH for one that exited; through a pidfd opened then for a task the table never saw."""
        from useroom import native
        from useroom._members import member_line
        from useroom._victims import VictimTable
        from useroom.handler.signals import GroupSignals

        inside, moved, gone = (spawn_hog(0, group) for _ in range(3))
        table = VictimTable(group)
        try:
            table.refresh()
            signals = GroupSignals(table, member_line(group))
            elsewhere.attach(moved.pid)
            gone.kill()
            assert wait_until(lambda: gone.process.status() == "zombie", 5)
            assert native.NOT_MEMBER == signals.send(moved.pid, signal.SIGKILL)
            assert -3 == signals.send(gone.pid, signal.SIGKILL)  # ESRCH
            assert 0 == signals.send(inside.pid, signal.SIGKILL)
            assert -signal.SIGKILL == inside.wait(5)
            assert moved.returncode is None
            unseen = spawn_hog(0, elsewhere)
            assert native.NOT_MEMBER == signals.send(unseen.pid, signal.SIGKILL)
            assert unseen.returncode is None
        finally:
            table.close()
