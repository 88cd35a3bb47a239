"""Faults injected into a handler at each phase of an episode, on the kernel.

SIGKILL or SIGSTOP (then SIGCONT) the handler's process before the OOM,
during a hook (its grant open), during FreezeAndDecide's callback (the group
stopped, the grant open), and right after its plan killed the victim. Each
case must end the same way: the overrunning task dies, the group is not left
under OOM, the limit is the handler's again, the user's kernel killer
setting is back once the handler is gone, nothing is left in the group, and
no watchdog outlives its handler.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from helpers import MIB, wait_until
from test_watchdog import Service, _is_watchdog, _settled
from useroom import Group

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]

#: Phase -> the service's mode, and what says the phase has come.
PHASES = {
    "before-the-oom": "plain",
    "during-a-hook": "slow-hook",
    "during-decide": "slow-decide",
    "after-the-kill": "plain",
}


@pytest.fixture
def group(scratch_group: Group) -> Group:
    scratch_group.set_limit("64M")
    return scratch_group


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
@pytest.mark.parametrize("phase", list(PHASES))
def test_a_fault_in_the_handler_at_each_phase(group: Group, spawn_hog, tmp_path: Path, phase: str,
                                              sig: signal.Signals) -> None:
    svc = Service(PHASES[phase], group, tmp_path / "watchdog.jsonl", 2.0, join=False)
    stopped = False
    try:
        hog = spawn_hog(100, group=group)
        if phase == "before-the-oom":
            os.kill(svc.pid, sig)
            stopped = sig == signal.SIGSTOP
            hog.start()
        else:
            time.sleep(0.3)  # a refresh puts the hog in the table
            hog.start()
            if phase == "after-the-kill":
                assert -signal.SIGKILL == hog.wait(10)
            else:
                assert wait_until(lambda: group.limit() == 80 * MIB, 10)  # the grant: 64M + 16M
            os.kill(svc.pid, sig)
            stopped = sig == signal.SIGSTOP
        assert -signal.SIGKILL == hog.wait(15)
        assert wait_until(lambda: not group.oom_control().under_oom, 10)
        if sig == signal.SIGKILL:
            # The watchdog put back the limit and the user's setting, and left.
            assert wait_until(lambda: group.limit() == 64 * MIB, 10)
            assert wait_until(lambda: _settled(group, kill_disabled=False), 10)
            assert wait_until(lambda: not _is_watchdog(svc.watchdog_pid), 10)
        else:
            os.kill(svc.pid, signal.SIGCONT)
            stopped = False
            result = svc.finish()  # it goes on, and stops cleanly
            assert [] == [e for e in result["errors"] if "Takeover" in e]
            assert group.limit() == 64 * MIB
            assert _settled(group, kill_disabled=False)
            assert wait_until(lambda: not _is_watchdog(svc.watchdog_pid), 10)
        assert [] == group.procs() and [] == group.children()
    finally:
        if stopped:
            os.kill(svc.pid, signal.SIGCONT)
        svc.close()


def _watchdogs(first: int, history: list[dict]) -> set[int]:
    """Every watchdog a handler ran: the first and each one started after it."""
    return {first} | {r["pid"] for r in history if r["event"] == "watchdog-restarted"}


def _continue_if_ours(pid: int) -> None:
    """SIGCONT a watchdog this test stopped, if it is still there."""
    if _is_watchdog(pid):
        os.kill(pid, signal.SIGCONT)


#: The phases a watchdog fault is injected at (the slow hook frees nothing:
#: its plan kills the hog after it).
WATCHDOG_PHASES = ["before-the-oom", "during-a-hook", "during-decide", "after-the-kill"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
@pytest.mark.parametrize("phase", WATCHDOG_PHASES)
def test_a_fault_in_the_watchdog_at_each_phase(group: Group, spawn_hog, tmp_path: Path, phase: str,
                                               sig: signal.Signals) -> None:
    """The watchdog killed or stopped at each phase: the handler's plan still ends the episode
    and puts the limit back; the handler replaces the watchdog (a killed one at its exit, a
    stopped one as soon as the kernel reports the stop, or at the latest at the stop), records
    why, and no watchdog outlives the stop."""
    svc = Service(PHASES[phase], group, tmp_path / "watchdog.jsonl", 2.0, join=False)
    dog = svc.watchdog_pid
    assert dog is not None
    try:
        hog = spawn_hog(100, group=group)
        if phase == "before-the-oom":
            os.kill(dog, sig)
            hog.start()
        else:
            time.sleep(0.3)  # a refresh puts the hog in the table
            hog.start()
            if phase == "after-the-kill":
                assert -signal.SIGKILL == hog.wait(10)
            else:
                assert wait_until(lambda: group.limit() == 80 * MIB, 10)  # the grant: 64M + 16M
            os.kill(dog, sig)
        assert -signal.SIGKILL == hog.wait(15)
        assert wait_until(lambda: not group.oom_control().under_oom, 10)
        assert wait_until(lambda: group.limit() == 64 * MIB, 10)
        result = svc.finish()
        history = result["watchdog"]
        ended = [(r["event"], r.get("returncode"), r.get("why", "")) for r in history
                 if r["event"] in ("watchdog-killed", "watchdog-exited")]
        if sig == signal.SIGKILL:
            assert [("watchdog-exited", -signal.SIGKILL, "")] == ended
        else:
            assert ("watchdog-killed", None) == ended[0][:2] and "stopped" in ended[0][2], history
        assert ["resolved"] == [e["outcome"] for e in result["events"] if e["takeover"] is None][-1:]
        assert [] == [e for e in result["events"] if e["takeover"]]  # the plan ended it, not the kernel
        assert _settled(group, kill_disabled=False)
        for pid in _watchdogs(dog, history):
            assert wait_until(lambda pid=pid: not _is_watchdog(pid), 10), pid
        assert [] == group.procs() and [] == group.children()
    finally:
        _continue_if_ours(dog)
        svc.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["SIGKILL", "SIGSTOP"])
@pytest.mark.parametrize("when", ["before-the-oom", "during-the-oom"])
def test_a_lost_watchdog_is_replaced_when_only_it_can_end_the_episode(group: Group, spawn_hog, tmp_path: Path,
                                                                      when: str, sig: signal.Signals) -> None:
    """The plan has no victim and no kernel fallback: only the watchdog ends this episode. Killed
    or stopped before or during it, it is replaced, and its successor hands the episode to the
    kernel after the delay; the handler records why it replaced it."""
    delay = 0.5
    svc = Service("nothing", group, tmp_path / "watchdog.jsonl", delay, join=False)
    dog = svc.watchdog_pid
    assert dog is not None
    try:
        hog = spawn_hog(100, group=group)
        if when == "before-the-oom":
            os.kill(dog, sig)
            hog.start()
        else:
            hog.start()
            assert wait_until(hog.in_oom_wait, 10)
            os.kill(dog, sig)
        assert -signal.SIGKILL == hog.wait(10)  # by the kernel, which the new watchdog let act
        assert wait_until(lambda: not group.oom_control().under_oom, 10)
        result = svc.finish()
        history = result["watchdog"]
        takeovers = [e["takeover"] for e in result["events"] if e["takeover"]]
        assert takeovers and {"delay"} == {t["reason"] for t in takeovers}
        assert ["watchdog-exited", "watchdog-restarted"] == [
            r["event"] for r in history if r["event"] in ("watchdog-exited", "watchdog-restarted")][:2]
        if sig == signal.SIGSTOP:
            [killed] = [r for r in history if r["event"] == "watchdog-killed"][:1]
            assert (dog, "stopped") == (killed["pid"], killed["cause"])
            assert [e for e in result["errors"] if "WatcherError" in e and f"pid {dog}" in e]
        assert _settled(group, kill_disabled=False)
        for pid in _watchdogs(dog, history):
            assert wait_until(lambda pid=pid: not _is_watchdog(pid), 10), pid
        assert [] == group.procs() and [] == group.children()
    finally:
        _continue_if_ours(dog)
        svc.close()
