"""A handler stopped or killed while its FreezeAndDecide plan has a cgroup v2 group frozen.

The plan raises the wall (memory.high) and freezes the group (cgroup.freeze)
while decide() runs; the native watcher thaws it, and dies or stops with the
handler's process. The watchdog must thaw it then. Runs in the v2 guest.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from helpers import MIB, wait_until
from test_watchdog import Service, _is_watchdog, _state
from useroom import Group
from useroom._units import UNLIMITED

pytestmark = [pytest.mark.cgroup2, pytest.mark.timeout(300)]


@pytest.fixture
def group(scratch_group: Group) -> Group:
    scratch_group.set_limit("64M")
    return scratch_group


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
def test_v2_a_handler_stopped_or_killed_while_the_group_is_frozen(group: Group, spawn_hog, tmp_path: Path,
                                                                  sig: signal.Signals) -> None:
    """cgroup v2, FreezeAndDecide with the handler outside the group: its plan raised the wall
    and froze the group (cgroup.freeze) to ask decide(). The handler stopped or killed then,
    nobody would thaw it: the watchdog thaws it and lifts the wall at once, and the kernel
    (memory.max) kills the overrunning task. Continued, the handler stops cleanly with the
    group's settings back; killed, the watchdog puts them back and leaves."""
    log = tmp_path / "watchdog.jsonl"
    svc = Service("slow-decide", group, log, 30.0, join=False)  # only a fault ends the freeze early
    stopped = False
    try:
        hog = spawn_hog(100, group=group)
        time.sleep(0.5)  # a refresh puts the hog in the table
        hog.start()
        assert wait_until(group.frozen, 60)
        os.kill(svc.pid, sig)
        stopped = sig == signal.SIGSTOP
        assert -signal.SIGKILL == hog.wait(60)  # by the kernel at memory.max, once thawed
        assert not group.frozen()
        if sig == signal.SIGSTOP:
            [t] = [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "takeover"]
            assert "handler-stopped" == t["reason"]
            os.kill(svc.pid, signal.SIGCONT)
            stopped = False
            result = svc.finish()
            assert ["handler-stopped"] == [e["takeover"]["reason"] for e in result["events"] if e["takeover"]]
        else:
            [r] = [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "handler-exited"]
            assert {"memory.high": UNLIMITED, "memory.max": 64 * MIB} == r["restored"]
        assert wait_until(lambda: (UNLIMITED, 64 * MIB) == (group.high(), group.limit()), 10)
        assert wait_until(lambda: not _is_watchdog(svc.watchdog_pid), 10)
        assert not group.frozen()
        assert [] == group.procs() and [] == group.children()
    finally:
        if stopped:
            os.kill(svc.pid, signal.SIGCONT)
        svc.close()


@pytest.mark.parametrize("mode", ["slow-decide", "slow-hook"])
def test_v2_a_handler_inside_stopped_while_its_plan_holds_the_others_stopped(group: Group, spawn_hog,
                                                                            tmp_path: Path, mode: str) -> None:
    """cgroup v2, the handler inside the group: it cannot freeze the group (it would freeze
    itself), so its plan raised the wall and SIGSTOPped the others (FreezeAndDecide's decision,
    or the hold while its hooks run). The handler stopped then, they would stay stopped for good:
    nothing is frozen for the watchdog to see. It sees the grant open through memory.events,
    continues the group's tasks and lifts the wall (grant-reclaimed), and the overrunning task
    dies. Continued, the handler stops cleanly with the group's settings back."""
    log = tmp_path / "watchdog.jsonl"
    svc = Service(mode, group, log, 30.0, join=True)  # 30 s: no freeze here, only the grant's watch acts
    stopped = False
    try:
        hog = spawn_hog(100, group=group)
        time.sleep(0.5)  # a refresh puts the hog in the table
        hog.start()
        assert wait_until(lambda: _state(hog.pid) == "T", 60)  # stopped by the plan, its grant open
        assert group.high() > 48 * MIB
        os.kill(svc.pid, signal.SIGSTOP)
        stopped = True
        assert -signal.SIGKILL == hog.wait(60)

        def reclaimed() -> list[dict]:
            return [r for r in map(json.loads, log.read_text().splitlines()) if r["event"] == "grant-reclaimed"]

        assert wait_until(lambda: reclaimed(), 10)
        [r] = reclaimed()
        assert ("handler-stopped", svc.pid, True) == (r["reason"], r["handler_pid"], r["wall_lifted"])
        assert r["continued"] >= 1
        os.kill(svc.pid, signal.SIGCONT)
        stopped = False
        result = svc.finish()
        assert [] == [e for e in result["errors"] if "Takeover" in e]
        assert (UNLIMITED, 64 * MIB) == (group.high(), group.limit())
        assert wait_until(lambda: not _is_watchdog(svc.watchdog_pid), 10)
        assert [] == group.procs() and [] == group.children()
    finally:
        if stopped:
            os.kill(svc.pid, signal.SIGCONT)
        svc.close()

