"""Things that vanish under a running handler: a group renamed, a victim whose pid is reused."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
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
