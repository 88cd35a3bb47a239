"""Unprivileged, end to end, on cgroup v2: a non-root user in a systemd-delegated subtree.

.ci/run runs these in a systemd guest (tools/vm-run -S, tools/v2-delegated):
a lingering user runs pytest in ``systemd-run --user --scope -p Delegate=yes``.
Elsewhere (a v1 host, or as root) they are skipped with that reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import pytest

from helpers import MIB, Hog
from test_cgroup_v2 import EVENT_TIMEOUT, run_demo_in, run_in_group_handler
from useroom.cgroup import Group
from useroom.cgroup.v2 import MemoryEvents, PressureTrigger, V2Group
from useroom import Handler
from useroom._units import UNLIMITED

SpawnHog = Callable[..., Hog]

pytestmark = pytest.mark.delegated


def test_delegated_scope(own_group: Group) -> None:
    """The tests run as a non-root user in a v2 subtree that user owns, with memory enabled below it."""
    assert os.geteuid() != 0
    assert (2, False, os.geteuid()) == (own_group.version, own_group.is_root, os.stat(own_group.path).st_uid)
    assert isinstance(own_group, V2Group) and "memory" in own_group.subtree_control()


def test_group_operations(scratch_group: Group, spawn_hog: SpawnHog) -> None:
    """Unprivileged: create a limited child, hold a wall, be woken by memory.events and by a PSI
    trigger, freeze, kill, remove."""
    assert isinstance(scratch_group, V2Group)
    child = scratch_group.create_child("app", memory_max="64M")
    assert isinstance(child, V2Group)
    child.set_high("16M")
    with child.events_notifier() as notifier, child.pressure_notifier(0.05, 2.0) as trigger:
        assert isinstance(trigger, PressureTrigger)
        hog = spawn_hog(48, child)
        hog.start()
        assert notifier.wait(EVENT_TIMEOUT) and trigger.wait(EVENT_TIMEOUT)
        assert MemoryEvents.from_text(notifier.read(0)).high > 0
    child.freeze()
    assert child.frozen()
    child.kill()
    assert -9 == hog.wait(EVENT_TIMEOUT)
    child.remove()
    assert [] == scratch_group.children()


def test_handler_inside_the_group(scratch_group: Group, spawn_hog: SpawnHog) -> None:
    """Unprivileged, with useroom.Handler inside the group: the hog that hits the wall is killed
    by the native plan, and the kernel killed nobody."""
    assert isinstance(scratch_group, V2Group)
    hog, events = run_in_group_handler(scratch_group, spawn_hog)
    assert events and hog.pid in [pid for _, pids in events for pid in pids]
    assert 0 == scratch_group.events().oom_kill


def test_handler_outside(scratch_group: Group, spawn_hog: SpawnHog) -> None:
    """Unprivileged, handler outside the group: the wall is set below the user's memory.max,
    the hog is killed at it, and memory.high is restored."""
    assert isinstance(scratch_group, V2Group)
    scratch_group.set_limit("64M")
    hog = spawn_hog(96, scratch_group)
    with Handler(scratch_group, reserve="16M") as handler:
        assert (48 * MIB, 64 * MIB) == (scratch_group.high(), scratch_group.limit())
        time.sleep(0.7)  # a refresh puts the hog in the plan
        hog.start()
        assert -9 == hog.wait(EVENT_TIMEOUT)
        assert handler.wait_for_events(1, EVENT_TIMEOUT)
    assert (UNLIMITED, 64 * MIB) == (scratch_group.high(), scratch_group.limit())
    assert 0 == scratch_group.events().oom_kill


def test_demo_unprivileged(scratch_group: Group) -> None:
    """`useroom demo` as the user in the delegated scope: OOMs handled at the wall, nothing left."""
    assert isinstance(scratch_group, V2Group)
    done = run_demo_in(scratch_group, "--workers", "2", "--size", "100M")
    assert 0 == done.returncode, done.stdout + done.stderr
    assert "kernel OOM kills=0" in done.stdout and "SIGKILL" in done.stdout
    assert [] == scratch_group.children()


def test_doctor_says_ready(own_group: Group) -> None:
    """`useroom doctor --json` as the user in the delegated v2 scope: delegated, ready, no advice."""
    done = subprocess.run([sys.executable, "-m", "useroom", "doctor", "--json"], capture_output=True, text=True,
                          timeout=120, check=False)
    found = json.loads(done.stdout)
    assert (0, True, 2) == (done.returncode, found["ready"], found["memory_version"]), done.stdout + done.stderr
    assert [] == found["advice"]
