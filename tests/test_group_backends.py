"""Behaviour that both backends share, run on the backend of this machine.

On the host the memory controller is on cgroup v1, so these run on
``V1Group``; .ci/run runs them again in a cgroup v2 guest (tools/vm-run),
where they run on ``V2Group``. The version-specific behaviour is in
test_cgroup_v1.py and test_cgroup_v2.py.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from collections.abc import Callable

import pytest

from helpers import MIB, Hog, run_as, wait_until
from useroom.cgroup import Group, Notifier, backend_class
from useroom._units import UNLIMITED
from useroom.exceptions import CgroupPermissionError, GroupBusy, GroupExists, GroupGone, ProcessGone

SpawnHog = Callable[..., Hog]
NOBODY = 65534
EVENT_TIMEOUT = 60.0

pytestmark = pytest.mark.backends


class TestBothBackends:
    def test_backend_matches_hierarchy(self, scratch_group: Group) -> None:
        """A group is an instance of the backend of its hierarchy's version."""
        assert backend_class(scratch_group.hierarchy.version) is type(scratch_group)

    def test_create_limit_remove(self, scratch_group: Group) -> None:
        """A child is created with a limit, listed, read back, and removed."""
        child = scratch_group.create_child("app", memory_max="64M")
        assert ([child], 64 * MIB) == (scratch_group.children(), child.limit())
        with pytest.raises(GroupExists):
            scratch_group.create_child("app")
        child.set_limit("max")
        assert UNLIMITED == child.limit()
        child.remove()
        assert [] == scratch_group.children()

    def test_attach_usage_stats(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """An attached process is listed, and the pages it touches are charged to the group."""
        hog = spawn_hog(16, scratch_group)
        hog.start()
        assert hog.wait_touched(EVENT_TIMEOUT)
        assert [hog.pid] == scratch_group.procs()
        assert scratch_group == Group.of_pid(hog.pid)
        assert scratch_group.usage() >= 16 * MIB and scratch_group.stats().rss >= 16 * MIB

    def test_attach_gone_process(self, scratch_group: Group) -> None:
        """Attaching a pid that no longer exists raises ProcessGone."""
        hog = Hog(0, hold=False)
        hog.start()
        hog.close()
        with pytest.raises(ProcessGone):
            scratch_group.attach(hog.pid)

    def test_remove_busy_and_forced(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """A group with a task refuses plain removal (GroupBusy); force kills the task and removes it."""
        child = scratch_group.create_child("busy")
        hog = spawn_hog(0, child)
        with pytest.raises(GroupBusy):
            child.remove()
        child.remove(force=True)
        assert (False, -9) == (os.path.exists(child.path), hog.wait(EVENT_TIMEOUT))
        with pytest.raises(GroupGone):
            child.limit()

    def test_kernel_kill_at_the_limit(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """With the kernel OOM killer on (the default), a hog over the limit is killed and counted."""
        scratch_group.set_limit("32M")
        hog = spawn_hog(64, scratch_group, False)
        hog.start()
        assert -9 == hog.wait(EVENT_TIMEOUT)
        assert wait_until(lambda: scratch_group.oom_control().oom_kill == 1, EVENT_TIMEOUT)

    def test_oom_notifier_fires_at_the_oom(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """Either backend's OOM notifier is a Notifier: quiet until the group hits its limit, then ready."""
        scratch_group.set_limit("32M")
        with scratch_group.oom_notifier() as notifier:
            assert isinstance(notifier, Notifier)
            assert not notifier.wait(0)
            hog = spawn_hog(64, scratch_group, False)
            hog.start()
            assert notifier.wait(EVENT_TIMEOUT)
            assert -9 == hog.wait(EVENT_TIMEOUT)
        assert notifier.closed

    def test_create_without_permission(self, scratch_group: Group) -> None:
        """Creating a child without write permission on the directory raises CgroupPermissionError."""
        with pytest.raises(CgroupPermissionError) as info:
            run_as(NOBODY, lambda: Group.open(scratch_group.path).create_child("a"))
        assert info.value.rule and info.value.advice
        assert [] == scratch_group.children()

    def test_oom_counter_starts_quiet(self, scratch_group: Group) -> None:
        """A fresh OOM counter is 0 and not ready; an update without a change raises TimeoutError; closed,
        it has no fd."""
        counter = scratch_group.oom_counter()
        with counter:
            poller = select.poll()
            poller.register(counter, counter.poll_events)
            assert (0, []) == (counter.count, poller.poll(0))
            with pytest.raises(TimeoutError):
                counter.update()
            assert 0 == counter.count
        counter.close()  # again: nothing happens
        with pytest.raises(ValueError):
            counter.fileno()

    def test_oom_counter_counts_a_kernel_kill(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """A hog over the limit (the kernel killer on) makes the counter ready, and the update counts it."""
        scratch_group.set_limit("32M")
        with scratch_group.oom_counter() as counter:
            hog = spawn_hog(64, scratch_group, False)
            hog.start()
            assert -9 == hog.wait(EVENT_TIMEOUT)
            poller = select.poll()
            poller.register(counter, counter.poll_events)
            assert poller.poll(round(EVENT_TIMEOUT * 1000))
            assert 1 <= counter.update() == counter.count


#: Run in a group, as a service started there: make a limited child, move in, report.
_ENTER = """
import json, os, sys
from useroom.cgroup import Group
home = Group.current()
try:
    child = home.enter_child("svc", sys.argv[1])
except Exception as err:
    print(json.dumps({"error": type(err).__name__, "here": Group.current().relpath,
                      "children": [g.relpath for g in home.children()]}))
else:
    print(json.dumps({"here": Group.current().relpath, "child": child.relpath, "limit": child.limit()}))
"""


def enter_child_in(group: Group, limit: str, *others: int) -> dict[str, object]:
    """Runs _ENTER in a process started in *group* (beside the pids *others*); its JSON line."""
    join = 'echo $$ > "$0" && exec "$@"'
    done = subprocess.run(["/bin/sh", "-c", join, os.path.join(group.path, group.procs_file), sys.executable,
                           "-c", _ENTER, limit], capture_output=True, text=True, timeout=60, check=False)
    assert 0 == done.returncode, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


class TestEnterChild:
    def test_a_service_makes_its_limited_group_and_moves_in(self, scratch_group: Group) -> None:
        """``Group.current().enter_child(name, limit)`` from a process in a group with no children:
        the child exists, the process runs in it, with the limit; the group it left is empty."""
        result = enter_child_in(scratch_group, "64M")
        child = scratch_group.relpath + "/svc"
        assert {"here": child, "child": child, "limit": 64 * MIB} == result
        assert [] == scratch_group.procs()

    def test_a_bad_limit_makes_nothing(self, scratch_group: Group) -> None:
        """A limit that is no size is refused before any group is made or any process moves."""
        result = enter_child_in(scratch_group, "lots")
        assert {"error": "InvalidSize", "here": scratch_group.relpath, "children": []} == result
