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
from collections.abc import Callable

import pytest

from helpers import MIB, Hog
from test_cgroup_v2 import _IN_GROUP_HANDLER, EVENT_TIMEOUT
from useroom._cgroup import Group
from useroom._cgroup_v2 import MemoryEvents, PressureTrigger, V2Group
from useroom._wall import WallHandler

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


def test_wall_handler_inside_the_group(scratch_group: Group, spawn_hog: SpawnHog) -> None:
    """Unprivileged, with the handler inside the group: the hog that hits the wall is killed by the
    native plan, and the kernel killed nobody."""
    handler = subprocess.Popen(
        [sys.executable, "-c", _IN_GROUP_HANDLER, scratch_group.path, str(48 * MIB), str(EVENT_TIMEOUT)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert handler.stdout is not None
        assert "ready" == handler.stdout.readline().strip()
        hog = spawn_hog(96, scratch_group)
        hog.start()
        assert -9 == hog.wait(EVENT_TIMEOUT)
        records = json.loads(handler.stdout.readline())
        assert 0 == handler.wait(EVENT_TIMEOUT)
    finally:
        handler.kill()
        handler.wait()
        if handler.stdout is not None:
            handler.stdout.close()
    assert "RESOLVED" == records[0][0]
    assert isinstance(scratch_group, V2Group) and 0 == scratch_group.events().oom_kill


def test_wall_handler_outside(scratch_group: Group, spawn_hog: SpawnHog) -> None:
    """Unprivileged, handler outside the group: the wall and backstop are set and restored."""
    assert isinstance(scratch_group, V2Group)
    hog = spawn_hog(48, scratch_group)
    with WallHandler(scratch_group, wall="16M", reserve="32M") as handler:
        assert 48 * MIB == scratch_group.limit()
        hog.start()
        assert -9 == hog.wait(EVENT_TIMEOUT)
        assert handler.wait_for_records(1, EVENT_TIMEOUT)
