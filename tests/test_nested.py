"""A handled group with processes in child groups: refused at start, reported once at run time."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest

from helpers import wait_until
from useroom import Group, Handler, NestedTasksError

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(60)]


def _children_of_this_process() -> set[int]:
    with open(f"/proc/self/task/{os.getpid()}/children") as f:
        return {int(pid) for pid in f.read().split()}


@pytest.fixture
def group(scratch_group: Group) -> Group:
    scratch_group.set_limit("64M")
    return scratch_group


class TestNested:
    def test_refused_at_start_with_nothing_touched(self, group: Group, spawn_hog) -> None:
        """Processes two levels down: start raises NestedTasksError naming that group and the
        remedy; the group's settings are as they were, no watchdog was started."""
        deep = group.create_child("a").create_child("b")
        hog = spawn_hog(0, group=deep)
        before = (group.oom_control().kill_disabled, group.limit(), _children_of_this_process())
        handler = Handler(group)
        with pytest.raises(NestedTasksError) as caught:
            handler.start()
        assert {deep.relpath: 1} == caught.value.nested
        assert f"{deep.relpath} (1 process)" in str(caught.value) and "handle the child groups" in str(caught.value)
        assert before == (group.oom_control().kill_disabled, group.limit(), _children_of_this_process())
        assert not handler.supervisor.running and hog.pid in deep.procs()

    def test_empty_child_groups_are_fine(self, group: Group) -> None:
        """Child groups without processes do not stop a handler."""
        group.create_child("a").create_child("b")
        with Handler(group, thresholds=()) as handler:
            assert handler.supervisor.running

    def test_the_command_says_why(self, group: Group, spawn_hog) -> None:
        """``useroom handle`` on such a group exits 1 with the reason, and no traceback."""
        hog = spawn_hog(0, group=group.create_child("svc"))
        done = subprocess.run([sys.executable, "-m", "useroom", "handle", group.path, "-q"],
                              capture_output=True, text=True, timeout=30)
        assert (1, "") == (done.returncode, done.stdout)
        assert done.stderr.startswith(f"useroom: {group.relpath} has processes in its child groups")
        assert "Traceback" not in done.stderr and hog.pid in group.children()[0].procs()

    def test_processes_that_appear_below_are_reported_once(self, group: Group, spawn_hog,
                                                           caplog: pytest.LogCaptureFixture) -> None:
        """A process moved into a new child group while the handler runs: the next refresh
        reports it once (handler.errors, a warning with cause nested_tasks), and it goes on."""
        caplog.set_level(logging.WARNING, logger="useroom")
        with Handler(group, thresholds=(), refresh_interval=0.05) as handler:
            child = group.create_child("late")
            spawn_hog(0, group=child)
            assert wait_until(lambda: any(isinstance(e, NestedTasksError) for e in handler.errors), 5)
            time.sleep(0.3)  # more refreshes
            nested = [e for e in handler.errors if isinstance(e, NestedTasksError)]
            assert [{child.relpath: 1}] == [e.nested for e in nested]
            assert handler.supervisor.running
        assert ["nested_tasks"] == [getattr(r, "cause") for r in caplog.records if hasattr(r, "cause")]
