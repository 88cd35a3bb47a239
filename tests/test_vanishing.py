"""Things that vanish under a running handler: a group renamed, a victim whose pid is reused."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import wait_until
from useroom import Group, Handler, KillLargest, KillNewest

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(90)]


@pytest.fixture
def group(scratch_group: Group) -> Group:
    scratch_group.set_limit("64M")
    return scratch_group


class TestRenamed:
    def test_a_group_renamed_while_handled(self, group: Group, spawn_hog,
                                           caplog: pytest.LogCaptureFixture) -> None:
        """Renamed under a running handler: an OOM there still ends, the handler says where the group
        went, and stop() puts the kernel killer setting back at the new path (through the files it
        opened), so the group is not left with the killer off and nobody to act."""
        caplog.set_level(logging.WARNING, logger="useroom")
        renamed = group.path + "-renamed"
        with Handler(group, KillLargest(), thresholds=(), refresh_interval=0.1) as handler:
            assert group.oom_control().kill_disabled
            os.rename(group.path, renamed)
            there = Group.open(renamed)
            hog = spawn_hog(100, group=there)
            hog.start()
            assert -signal.SIGKILL == hog.wait(15)
            assert not there.oom_control().under_oom
            assert wait_until(lambda: any(getattr(r, "cause", None) == "group_renamed" for r in caplog.records), 5)
        try:
            assert not there.oom_control().kill_disabled  # the user's setting, at the new path
            assert [renamed] == [r.path for r in caplog.records if getattr(r, "cause", None) == "group_renamed"]
            assert [] == there.procs()
        finally:
            os.rename(renamed, group.path)  # for the fixture's teardown
        assert handler.errors


def _fork_with_pid(pid: int, tries: int = 50) -> subprocess.Popen[bytes] | None:
    """A sleeper outside the group with pid *pid* (root: the next pid is set through
    ns_last_pid; another process forking in between spoils a try)."""
    for _ in range(tries):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        proc = subprocess.Popen(["sleep", "60"])
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    return None


def _recycle_then_overrun(group: Group, spawn_hog, policy) -> tuple[Handler, int]:
    """A task the table pinned exits, a process outside the group gets its pid before the next
    refresh, then a task of the group overruns and is killed. Returns the handler (stopped) and
    the recycled pid; the stranger with that pid must still live (checked here)."""
    first = spawn_hog(20, group=group)
    first.start()
    assert first.wait_touched(10)
    with Handler(group, policy, thresholds=(), refresh_interval=60) as handler:
        assert first.pid in [v.pid for v in handler.victims]
        first.release()
        assert 0 == first.wait(10)
        stranger = _fork_with_pid(first.pid)
        if stranger is None:
            pytest.skip("another process took the pid each time")
        try:
            hog = spawn_hog(100, group=group)
            hog.start()
            assert -signal.SIGKILL == hog.wait(15)
            time.sleep(0.3)
            assert None is stranger.poll()
        finally:
            stranger.kill()
            stranger.wait()
    return handler, first.pid


class TestRecycledPid:
    @pytest.mark.skipif(os.geteuid() != 0, reason="setting the next pid (ns_last_pid) needs root")
    def test_a_victims_pid_reused_outside_is_never_signalled(self, group: Group, spawn_hog) -> None:
        """A task the table pinned exits, and a process outside the group gets its pid before the
        next refresh; then the group overruns. The plan skips the pinned task (its pidfd says it
        exited) and kills the overrunning one; the process with the recycled pid lives."""
        handler, pid = _recycle_then_overrun(group, spawn_hog, KillLargest())
        assert pid not in [v.pid for e in handler.events for v in e.victims if v.result == 0]

    @pytest.mark.skipif(os.geteuid() != 0, reason="setting the next pid (ns_last_pid) needs root")
    @pytest.mark.parametrize("policy", [KillNewest(), KillLargest()], ids=["KillNewest", "KillLargest"])
    def test_without_pidfds_a_recycled_pid_outside_is_never_signalled(self, group: Group, spawn_hog, policy,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
        """The same without pidfds (the library's switch, as on a kernel before 5.3): the plan
        signals the planned victims by pid, and the pid now names a process outside the group.
        The check of its cgroup file just before the signal refuses it (-EXDEV)."""
        monkeypatch.setattr("useroom._fd.can_use_pidfd", False)
        handler, pid = _recycle_then_overrun(group, spawn_hog, policy)
        sent = [(v.signal, v.result) for e in handler.events for v in e.victims if v.pid == pid]
        assert sent and ("SIGKILL", 0) not in sent


_STUBBORN = """\
import mmap, signal, sys
signal.signal(signal.SIGTERM, signal.SIG_IGN)
m = mmap.mmap(-1, 40 << 20)
for o in range(0, 40 << 20, 4096):
    m[o] = 1
print("touched", flush=True)
sys.stdin.read()
"""


class TestGroupRemovedMidEpisode:
    def test_the_victim_moved_out_of_a_removed_group_lives(self, group: Group, elsewhere: Group,
                                                          spawn_hog) -> None:
        """The plan sends SIGTERM to the largest task (which ignores it) and waits for it to exit;
        meanwhile the group's tasks leave and the group is removed. The SIGKILL that follows would
        reach a task of another group: it is not sent, and the handler stops cleanly."""
        stubborn = subprocess.Popen([sys.executable, "-c", _STUBBORN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    preexec_fn=lambda: group.attach(os.getpid()))
        try:
            assert stubborn.stdout is not None and b"touched\n" == stubborn.stdout.readline()
            with Handler(group, KillLargest(term_grace=3.0), thresholds=(), refresh_interval=3600) as handler:
                grower = spawn_hog(100, group)
                grower.start()
                assert wait_until(lambda: group.oom_control().under_oom, 10)
                assert wait_until(lambda: grower.in_oom_wait(), 10)
                elsewhere.attach(stubborn.pid)
                grower.kill()
                grower.wait(10)
                assert wait_until(lambda: not group.procs(), 5)
                os.rmdir(group.path)
                assert wait_until(lambda: not handler.running or any(e.outcome == "gone" for e in handler.events), 10)
                events = list(handler.events)
            assert stubborn.poll() is None
            sent = [(v.signal, v.result) for e in events for v in e.victims if v.pid == stubborn.pid]
            assert ("SIGTERM", 0) in sent  # while it was in the group
            assert ("SIGKILL", 0) not in sent
        finally:
            stubborn.kill()
            stubborn.communicate()
