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
