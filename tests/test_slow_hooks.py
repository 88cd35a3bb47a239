"""A slow on_oom hook on the real kernel: what comes after it.

The hook's grant stays open while it runs (here up to 4 s, within a 10 s
hook_timeout). A hook that frees nothing leaves the group at its limit,
where a group under OOM sits; cgroup v1 takes the limit back there, and the
episode used to count resolved while the task that faulted faulted again at
once: a new episode, the hook run again, in a loop that ended only when the
hog took the headroom before the restore. Now the limit comes back after the
hooks only with room under it: whatever the hook returns, the policy kills
the hog in the episode that found no room, and a hook that frees enough
still saves everyone.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

from helpers import MIB, ServiceProcess, wait_until
from useroom import Group

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(40)]

SERVICE = Path(__file__).resolve().parent / "_slow_hook_service.py"


class SlowHookService(ServiceProcess):
    """tests/_slow_hook_service.py in a child process; killed at the end."""

    def __init__(self, group: Group, seconds: float, returns: bool, shed_mib: int = 0, *, join: bool = False) -> None:
        super().__init__([sys.executable, str(SERVICE), group.path, str(seconds), "true" if returns else "false",
                          str(shed_mib), *(["--join"] if join else [])])


@pytest.fixture
def group(scratch_group: Group) -> Group:
    scratch_group.set_limit("64M")
    return scratch_group


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _hooks(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [h for e in result["events"] for h in e["hooks"]]


def _assert_killed_after_the_hooks(result: dict[str, Any], hog: int) -> dict[str, Any]:
    """The episode whose hooks left the group at its limit ended with the policy's kill of the
    hog. One episode before it may have been resolved by the hooks, only if they put the limit
    back with room under it (the usage was below the limit at the OOM: with several tasks, the
    kernel gave back some pages meanwhile); the hog used that room and ran out again. Returns
    the episode of the kill."""
    *before, last = result["events"]
    assert ("resolved", "kill") == (last["outcome"], last["resolved_by"]), result["events"]
    assert [hog] == [v["pid"] for v in last["victims"]]
    assert len(before) <= 1, result["events"]
    for event in before:
        assert ("resolved", "hooks", []) == (event["outcome"], event["resolved_by"], event["victims"])
        assert event["hooks"][-1]["usage_after"] < event["limit"]
    assert len(result["events"]) == len(_hooks(result))  # once per episode
    return last


class TestAHookThatFreesNothing:
    @pytest.mark.parametrize(("seconds", "returns"), [(0.5, False), (4.0, False), (0.5, True)],
                             ids=["0.5s-False", "4s-False", "0.5s-True-but-frees-nothing"])
    def test_the_policy_kills_the_hog_after_the_hook(self, group: Group, spawn_hog, seconds: float,
                                                     returns: bool) -> None:
        """The hook returns with the group still at its limit; the plan does not put the limit
        back there but kills the hog (KillLargest), and the episode ends resolved by the kill,
        within a few seconds of the hook's return: no episode after it."""
        svc = SlowHookService(group, seconds, returns)
        try:
            hog = spawn_hog(100, group=group)
            time.sleep(0.3)  # a refresh puts the hog in the table
            hog.start()
            started = time.monotonic()
            assert -9 == hog.wait(seconds + 10)
            took = time.monotonic() - started
            assert wait_until(lambda: not group.oom_control().under_oom, 5)
            assert wait_until(lambda: group.limit() == 64 * MIB, 5)
            result = svc.finish()
        finally:
            svc.close()
        event = _assert_killed_after_the_hooks(result, hog.pid)
        hook = event["hooks"][-1]
        assert returns is hook["freed"] and 0 == hook["released"]
        assert hook["usage_after"] >= event["limit"]  # at the limit: no room for the hog's fault
        assert took < 2 * seconds + 3, took
        assert [] == result["errors"]

    def test_with_several_processes_only_the_hog_dies(self, group: Group, spawn_hog) -> None:
        """Three small processes beside the hog are stopped while the hook runs and continued
        after; the hog alone is killed, and they run on."""
        svc = SlowHookService(group, 0.5, False)
        try:
            small = [spawn_hog(2, group=group) for _ in range(3)]
            for s in small:
                s.start()
                assert s.wait_touched(10)
            hog = spawn_hog(100, group=group)
            time.sleep(0.3)
            hog.start()
            assert -9 == hog.wait(10)
            assert wait_until(lambda: not group.oom_control().under_oom, 5)
            result = svc.finish()
        finally:
            svc.close()
        _assert_killed_after_the_hooks(result, hog.pid)
        assert [None] * 3 == [s.returncode for s in small]
        assert all(_state(s.pid) in "SR" for s in small)  # continued, not left stopped
        assert 64 * MIB == group.limit()


class TestAHookThatFreesEnough:
    def test_the_service_and_the_hog_are_spared(self, group: Group, spawn_hog) -> None:
        """The service in the group sheds a 40 MiB cache after 0.5 s: the hook thread puts the
        limit back with room under it, nobody is killed, and the hog gets all it asked for."""
        svc = SlowHookService(group, 0.5, True, 40, join=True)
        try:
            hog = spawn_hog(30, group=group)
            time.sleep(0.3)
            hog.start()
            assert hog.wait_touched(10)
            result = svc.finish()
        finally:
            svc.close()
        [event] = result["events"]
        assert ("resolved", "hooks") == (event["outcome"], event["resolved_by"])
        assert [] == event["victims"]
        [hook] = _hooks(result)
        assert hook["released"] > 0 and hook["usage_after"] < event["limit"]
        assert None is hog.returncode
        assert 64 * MIB == group.limit()
