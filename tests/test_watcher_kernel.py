"""The native watcher against real v1 OOMs (kernel OOM killer disabled).

Every test runs in a ``scratch_group`` whose teardown re-enables the kernel
killer, lifts the limit, kills what is left and removes the group.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import pytest

from helpers import MIB, Hog, SoloWatcher
from useroom.cgroup import Group
from useroom.native import Action, Outcome, Plan, SourceKind

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(60)]

RESOLVED = b"under_oom 0"


class _Armed:
    """A watcher outside the group, armed on the group's OOM eventfd."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.oom = group.oom_notifier()
        self.check_fd = group.open_file("memory.oom_control", os.O_RDONLY)
        os.pread(self.check_fd, 256, 0)
        self.limit_fd = group.open_file("memory.limit_in_bytes", os.O_WRONLY)
        self.watcher = SoloWatcher()
        self.source = self.watcher.add_source(self.oom.fileno(), SourceKind.OOM)

    def arm(self, *actions: Action) -> None:
        self.watcher.arm(Plan(actions, check_fd=self.check_fd, resolved_needle=RESOLVED))

    def close(self) -> None:
        self.watcher.close()
        self.oom.close()
        os.close(self.check_fd)
        os.close(self.limit_fd)


@pytest.fixture
def armed(scratch_group: Group):
    scratch_group.set_limit("32M")
    scratch_group.set_oom_kill(False)
    a = _Armed(scratch_group)
    yield a
    a.close()


class TestRealOom:
    def test_raising_the_limit_resolves(self, armed: _Armed, spawn_hog) -> None:
        """The watcher raises the limit from its plan; the hog finishes, nobody is killed."""
        armed.arm(Action.write(armed.limit_fd, str(256 * MIB).encode()), Action.check(5))
        armed.watcher.start()
        hog = spawn_hog(96, group=armed.group)
        hog.start()
        assert hog.wait_touched(20)
        [rec] = armed.watcher.wait(5)
        assert Outcome.RESOLVED == rec.outcome
        assert [len(str(256 * MIB)), 1] == [s.result for s in rec.steps]
        assert rec.notified_ns < rec.acted_ns < rec.resolved_ns
        control = armed.group.oom_control()
        assert (False, 0) == (control.under_oom, control.oom_kill)
        assert 256 * MIB == armed.group.limit()

    def test_signal_plan_kills_the_victim(self, armed: _Armed, spawn_hog) -> None:
        """A pidfd SIGKILL plan kills the hog that overran; the kernel killed nobody."""
        hog = spawn_hog(96, group=armed.group)
        pidfd = os.pidfd_open(hog.pid)
        try:
            armed.arm(Action.signal_pidfd(pidfd, signal.SIGKILL), Action.mrelease(pidfd), Action.check(5))
            armed.watcher.start()
            hog.start()
            assert -signal.SIGKILL == hog.wait(20)
            [rec] = armed.watcher.wait(5)
            assert Outcome.RESOLVED == rec.outcome
            # process_mrelease finds nothing to reap (ESRCH) when the victim,
            # woken by SIGKILL on another CPU, exited before it ran.
            kill, release, check = (s.result for s in rec.steps)
            assert (0, True, 1) == (kill, release in (0, -errno.ESRCH), check)
            assert 0 == armed.group.oom_control().oom_kill
        finally:
            os.close(pidfd)

    def test_records_an_unresolved_episode(self, armed: _Armed, spawn_hog) -> None:
        """A plan whose actions free nothing ends UNRESOLVED, and the hog stays
        asleep in the OOM wait (the safety net then releases it)."""
        with Hog(0) as bystander:
            bystander_fd = os.pidfd_open(bystander.pid)
            try:
                armed.arm(Action.signal_pidfd(bystander_fd, signal.SIGCONT), Action.check(0.05))
                armed.watcher.start()
                hog = spawn_hog(96, group=armed.group)
                hog.start()
                [rec] = armed.watcher.wait(10)
                assert Outcome.UNRESOLVED == rec.outcome
                assert True is armed.group.oom_control().under_oom
                armed.group.set_oom_kill(True)
                assert -signal.SIGKILL == hog.wait(10)
            finally:
                os.close(bystander_fd)

    def test_group_removal_is_not_an_oom(self, own_group: Group, spawn_hog) -> None:
        """rmdir signals the OOM eventfd once; the watcher sees the group gone and acts on nothing."""
        group = own_group.create_child(f"useroom-test-{os.getpid()}-rmdir")
        try:
            a = _Armed(group)
            with Hog(0) as bystander:
                pidfd = os.pidfd_open(bystander.pid)
                try:
                    a.arm(Action.signal_pidfd(pidfd, signal.SIGKILL))
                    a.watcher.start()
                    os.rmdir(group.path)
                    [rec] = a.watcher.wait(10)
                    assert Outcome.GONE == rec.outcome
                    assert () == rec.steps
                    assert None is bystander.returncode
                finally:
                    os.close(pidfd)
                    a.close()
        finally:
            if os.path.isdir(group.path):
                group.remove(force=True)


_IN_GROUP = r"""
import json, mmap, os, sys
from useroom.cgroup import Group
from useroom.native import Action, NativeWatcher, Plan, SourceKind
group = Group.open(sys.argv[1])
oom = group.oom_notifier()
check = group.open_file("memory.oom_control", os.O_RDONLY)
os.pread(check, 256, 0)
limit = group.open_file("memory.limit_in_bytes", os.O_WRONLY)
w = NativeWatcher()
g = w.add_group()
g.add_source(oom.fileno(), SourceKind.OOM)
g.arm(Plan([Action.write(limit, sys.argv[2].encode()), Action.check(5)],
           check_fd=check, resolved_needle=b"under_oom 0"))
w.start()
group.attach(os.getpid())
# This thread holds the GIL while it faults: during the OOM it sleeps in the
# kernel with the GIL held, so only the native watcher can act.
size = 96 << 20
m = mmap.mmap(-1, size)
for off in range(0, size, mmap.PAGESIZE):
    m[off] = 1
recs = w.wait(5)
w.close()
print(json.dumps([[r.outcome.name, r.resolved_ns > 0] for r in recs]))
"""


class TestNoPythonOnThePath:
    def test_watcher_resolves_while_its_own_python_thread_sleeps(self, scratch_group: Group) -> None:
        """A process inside the group whose only Python thread overruns the limit
        (and sleeps in the OOM wait holding the GIL) is rescued by its own native
        watcher raising the limit."""
        scratch_group.set_limit("32M")
        scratch_group.set_oom_kill(False)
        out = subprocess.run(
            [sys.executable, "-c", _IN_GROUP, scratch_group.path, str(256 * MIB)],
            capture_output=True, text=True, timeout=30,
        )
        assert 0 == out.returncode, out.stderr
        assert [["RESOLVED", True]] == json.loads(out.stdout)
        assert 0 == scratch_group.oom_control().oom_kill
