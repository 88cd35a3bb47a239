"""A handler's stop reaps the watchdog processes it started: none is left a zombie.

Each handler handles ``app`` and runs its watchdog in ``dog``, both below a
scratch group, so that the fixture kills whatever a failed test leaves
(a watchdog stopped with SIGSTOP included). After each stop, and before
anything else starts a process (a later ``subprocess.Popen`` would reap
what a dropped Popen left), no child of this process may be a zombie, and
no watchdog of the handler may be left at all.
"""

from __future__ import annotations

import os
import pathlib
import signal
import time

import pytest

from helpers import wait_until
from useroom import Group, Handler
from useroom.watchdog.guards import thread_state

pytestmark = [pytest.mark.kernel]


def _children() -> dict[int, str]:
    """This process's child processes, zombies included: pid -> state letter."""
    me = str(os.getpid())
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdecimal():
            continue
        try:
            status = pathlib.Path(f"/proc/{entry}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("PPid", "").strip() == me:
            out[int(entry)] = fields["State"].split()[0]
    return out


@pytest.fixture
def groups(scratch_group: Group) -> tuple[Group, Group]:
    """(app, dog): the handled group, with a limit, and the watchdog's, its sibling."""
    app = scratch_group.create_child("app", memory_max="64M")
    dog = scratch_group.create_child("dog")
    return app, dog


def _start(groups: tuple[Group, Group]) -> Handler:
    app, dog = groups
    return Handler(app, thresholds=(), watchdog_group=dog).start()


class TestStopReaps:
    def test_stop_reaps_each_watchdog(self, groups: tuple[Group, Group]) -> None:
        """Three start/stop cycles: after each stop the watchdog is gone, not a zombie, and no
        child of this process is one, before the next start spawns anything."""
        before = _children()
        for cycle in range(3):
            handler = _start(groups)
            link = handler.watchdog
            assert link is not None and link.pid is not None
            pid = link.pid
            assert _children().get(pid) in ("S", "R")
            handler.stop()
            children = _children()
            assert pid not in children, f"cycle {cycle}: watchdog {pid} is {children[pid]} after stop"
            assert {} == {p: s for p, s in children.items() if s == "Z"}, f"cycle {cycle}"
            assert set(before) >= set(children), f"cycle {cycle}"

    def test_stop_reaps_a_restarted_watchdog(self, groups: tuple[Group, Group]) -> None:
        """The watchdog killed while the handler runs is reaped and replaced; the stop then
        reaps the new one: neither is left, as a zombie or otherwise."""
        handler = _start(groups)
        try:
            link = handler.watchdog
            assert link is not None and link.pid is not None
            first = link.pid
            os.kill(first, signal.SIGKILL)
            assert wait_until(lambda: link.restarts == 1 and link.sock is not None, 30), link.history
            second = link.pid
            assert second is not None and second != first
            assert first not in _children()  # reaped by the restart
        finally:
            handler.stop()
        children = _children()
        assert second not in children
        assert {} == {p: s for p, s in children.items() if s == "Z"}

    @pytest.mark.timeout(60)
    def test_a_watchdog_that_does_not_stop_is_killed_and_reaped(self, groups: tuple[Group, Group]) -> None:
        """A watchdog that cannot answer the stop (stopped by SIGSTOP) is killed at once, not
        after the stop's 5 s, and reaped before the stop returns; its history says so."""
        handler = _start(groups)
        link = handler.watchdog
        assert link is not None and link.pid is not None
        pid = link.pid
        os.kill(pid, signal.SIGSTOP)
        # The signal takes effect once the watchdog runs (on a busy CPU,
        # later); the manager's look may find it stopped and kill it first
        # (a zombie, then gone).
        assert wait_until(lambda: (thread_state(pid, pid) or ("X", ""))[0] in ("T", "t", "Z", "X"), 10)
        started = time.monotonic()
        handler.stop()
        assert time.monotonic() - started < 2
        children = _children()
        assert pid not in children
        assert {} == {p: s for p, s in children.items() if s == "Z"}
        # Found stopped by the stop, or by the manager's look just before it.
        assert ["stopped"] == [r["cause"] for r in link.history if r["event"] == "watchdog-killed"]
