"""The declared handler and its watchdog, with faults injected, on real v1 OOMs.

Each fault must end with the group no longer under OOM within the delay
plus 100 ms (at once when the declared handler is stopped, dead or caught
in the OOM wait), the kernel OOM killer setting put back, no task asleep,
no group left (the fixtures check the last two).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from helpers import MIB, ServiceProcess, oom_trap, run_hook_service, wait_until
from useroom import FreezeAndDecide, Group, Handler, KillLargest, Takeover, WatcherError
from useroom._declare import KERNEL_FILES, probe
from useroom.handler.link import WatchdogLink
from useroom.watchdog.guards import CAUGHT_NS, DeclaredHandler, Guard, ProcessFd, thread_state
from useroom.watchdog.protocol import GuardSpec

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]

HERE = Path(__file__).parent
#: "At once": the watchdog looks every 5 ms; allow for a loaded machine.
AT_ONCE_NS = 100_000_000
SLACK_NS = 100_000_000


class _Nobody(KillLargest):
    """A policy with no victims: only the watchdog can end an episode."""

    def order(self, victims):  # type: ignore[no-untyped-def]
        return []


def _takeovers(handler: Handler, count: int, timeout: float = 10.0) -> list[Takeover]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e.takeover for e in handler.events if e.takeover is not None]
        left = deadline - time.monotonic()
        if len(found) >= count or left <= 0:
            return found
        handler.wait_for_events(len(handler.events) + 1, min(left, 0.2))


def _log(path: Path, event: str) -> list[dict]:
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("event") == event]


def _kill_if_ours(pid: int | None) -> None:
    """SIGKILL a watchdog this test started (checked by its command line)."""
    if pid is None:
        return
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"watchdog" not in f.read():
                return
        os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass


class Service(ServiceProcess):
    """tests/_fault_service.py in a child process; killed at the end."""

    def __init__(self, mode: str, group: Group, log: Path, delay: float, *, join: bool) -> None:
        self.watchdog_pid: int | None = None
        self.manager_tid = 0
        super().__init__([sys.executable, str(HERE / "_fault_service.py"), mode, group.path, str(log), str(delay),
                          *(["--join"] if join else [])])

    def ready(self, words: list[str]) -> None:
        super().ready(words)
        self.watchdog_pid = int(words[1])
        self.manager_tid = int(words[2])

    def close(self) -> None:
        super().close()
        _kill_if_ours(self.watchdog_pid)


@pytest.fixture
def group(scratch_group: Group) -> Group:
    scratch_group.set_limit("64M")
    return scratch_group


@pytest.fixture
def service(group: Group, tmp_path: Path):
    started: list[Service] = []

    def start(mode: str, delay: float = 5.0, *, join: bool = False) -> Service:
        svc = Service(mode, group, tmp_path / "watchdog.jsonl", delay, join=join)
        started.append(svc)
        return svc

    yield start
    for svc in started:
        svc.close()


def _tasks(group: Group) -> list[int]:
    with open(os.path.join(group.path, "tasks")) as f:
        return [int(line) for line in f]


def _settled(group: Group, kill_disabled: bool) -> bool:
    control = group.oom_control()
    return not control.under_oom and control.kill_disabled == kill_disabled


class TestDeclaration:
    def test_no_kernel_interface_here_so_all_shim(self, group: Group) -> None:
        """None of the proposed files exists on this kernel: every feature is the shim's."""
        declaration = probe(group)
        assert ("shim", "shim", "shim") == (declaration.delay, declaration.handler, declaration.reserve)
        assert not any(os.path.exists(os.path.join(group.path, f)) for f in KERNEL_FILES.values())
        assert declaration.needs_watchdog
        with Handler(group, thresholds=()) as handler:
            assert declaration == handler.declaration
            assert handler.watchdog is not None and handler.watchdog.pid is not None

    def test_watchdog_runs_outside_the_handled_group(self, group: Group, service) -> None:
        """A handler inside the group puts its watchdog in the parent group."""
        svc = service("plain", join=True)
        with open(f"/proc/{svc.watchdog_pid}/cgroup") as f:
            where = next(line.split(":", 2)[2].strip() for line in f if ":memory:" in line)
        assert group.parent is not None and where == group.parent.relpath
        assert svc.pid in group.procs()
        svc.finish()
        assert wait_until(lambda: not _is_watchdog(svc.watchdog_pid), 5)

    def test_handler_threads_charge_kernel_memory_outside(self, group: Group, service) -> None:
        """Inside the group, the watcher and manager threads sit in the watchdog's group (their
        kernel allocations are charged there) while the process stays in the handled group;
        on stop every thread is back in the handled group."""
        svc = service("plain", join=True)
        assert group.parent is not None
        assert group.parent.relpath == Group.of_thread(svc.manager_tid, svc.pid).relpath
        assert group.relpath == Group.of_pid(svc.pid).relpath
        assert svc.pid in group.procs()
        assert {svc.manager_tid} <= set(_tasks(group.parent))
        done = svc.finish()
        assert [] == done["errors"]
        assert {group.relpath} == set(done["threads"].values())

    def test_no_watchdog(self, group: Group) -> None:
        with Handler(group, thresholds=(), watchdog=False) as handler:
            assert handler.watchdog is None


class TestDelay:
    def test_a_stuck_episode_goes_to_the_kernel_after_the_delay_each_time(self, group: Group, spawn_hog) -> None:
        """The plan does nothing; the watchdog enables the kernel killer once the delay
        has passed, on each episode, and puts the handler's setting back."""
        delay = 0.5
        with Handler(group, _Nobody(), kernel_fallback=False, thresholds=(), delay=delay) as handler:
            for n in (1, 2):
                hog = spawn_hog(100, group=group)
                hog.start()
                assert -signal.SIGKILL == hog.wait(10)
                takeovers = _takeovers(handler, n)
                assert n == len(takeovers)
                t = takeovers[-1]
                assert "delay" == t.reason
                assert delay * 1e9 <= t.takeover_ns <= delay * 1e9 + SLACK_NS
                assert t.resolved_ns is not None and t.resolved_ns - t.notified_ns <= delay * 1e9 + SLACK_NS
                assert 1 == t.restored
                assert wait_until(lambda: _settled(group, kill_disabled=True), 2)
            [event] = [e for e in handler.events if e.takeover is takeovers[0]]
            assert ("resolved", "watchdog", True) == (event.outcome, event.resolved_by, event.fallback)
        assert _settled(group, kill_disabled=False)  # the user's setting, back on stop

    def test_heartbeat_missed(self, group: Group, spawn_hog, monkeypatch, tmp_path: Path) -> None:
        """A handler that stopped beating before the OOM (idle, it owes none) is given
        heartbeat_timeout from the episode's start, then not waited for."""
        log = tmp_path / "watchdog.jsonl"
        with Handler(group, _Nobody(), kernel_fallback=False, thresholds=(), delay=30,
                     heartbeat_timeout=0.3, refresh_interval=0.05, watchdog_log=str(log)) as handler:
            assert handler.watchdog is not None
            monkeypatch.setattr(handler.watchdog, "beat", lambda: None)
            time.sleep(0.6)  # silent for twice the timeout before the OOM
            hog = spawn_hog(100, group=group)
            hog.start()
            assert -signal.SIGKILL == hog.wait(10), log.read_text() if log.exists() else "no log"
            [t] = _takeovers(handler, 1)
        assert "heartbeat" == t.reason
        assert 0.3e9 <= t.takeover_ns <= 0.3e9 + SLACK_NS


class TestHandlerFaults:
    def test_a_takeover_keeps_the_killer_on(self, group: Group, spawn_hog) -> None:
        """Taken over, the guard finds the killer off again while a task waits (as the handler's
        manager turns it off when the takeover's wakeup clears under_oom): it turns the killer
        back on, and the kernel kills the waiter. Once nobody waits, the episode ends and the
        setting from before the takeover is back. All on the real kernel: only the guard acts."""
        oom_trap(group, "32M")
        first, second = spawn_hog(48, group=group), spawn_hog(48, group=group)
        guard = Guard(group, 0.0)
        try:
            first.start()
            assert wait_until(lambda: group.oom_control().under_oom, 10)
            guard.notified(time.monotonic_ns())
            assert None is guard.tick(time.monotonic_ns())  # the delay (0) has passed: taken over
            assert -signal.SIGKILL == first.wait(10)  # by the kernel's killer, which the guard turned on
            group.set_oom_kill(False)  # the manager's move, in the race
            second.start()
            assert wait_until(lambda: group.oom_control().under_oom, 10)
            assert None is guard.tick(time.monotonic_ns())  # off again, a task waits: on again
            assert -signal.SIGKILL == second.wait(10)
            ended, deadline = None, time.monotonic() + 5
            while ended is None and time.monotonic() < deadline:  # nobody waits: the episode ends
                ended = guard.tick(time.monotonic_ns())
                time.sleep(0.005)
            assert ended is not None and ("delay", 1) == (ended.reason, ended.restored)
            assert not group.oom_control().under_oom
            assert group.oom_control().kill_disabled  # the setting before the takeover: off
        finally:
            guard.close()

    def test_which_thread_in_the_oom_wait_counts(self, group: Group, spawn_hog) -> None:
        """A declared watcher thread asleep in the OOM wait makes the handler unfit at once;
        a helper (manager) thread only while a grant is open (the limit above the handler's),
        and only after CAUGHT_NS."""
        oom_trap(group, "32M")
        hog = spawn_hog(64, group=group)
        hog.start()
        assert wait_until(hog.in_oom_wait, 10)
        watcher = DeclaredHandler(hog.pid, (hog.pid,), ProcessFd(hog.pid), 60.0)
        helper = DeclaredHandler(hog.pid, (), ProcessFd(hog.pid), 60.0, (hog.pid,))
        guard = Guard(group, 60.0, handler=helper, limit=32 * MIB)
        try:
            assert ("handler-in-oom-wait", False) == watcher.look()
            assert (None, True) == helper.look()
            now = time.monotonic_ns()
            guard.notified(now)  # the episode starts
            assert None is guard.unfit(now)
            assert None is guard.unfit(now + 10 * CAUGHT_NS)
            group.set_limit(48 * MIB)  # a grant: the hog wakes, charges up to it and sleeps again
            assert wait_until(lambda: group.usage() > 40 * MIB and hog.in_oom_wait(), 10)
            now = time.monotonic_ns()
            assert None is guard.unfit(now)  # caught from now on
            assert None is guard.unfit(now + CAUGHT_NS // 2)
            assert "handler-in-oom-wait" == guard.unfit(now + CAUGHT_NS)
            guard.limit = 48 * MIB  # the handler's limit now (a SetLimit): no grant open
            assert None is guard.unfit(now + 2 * CAUGHT_NS)
        finally:
            guard.close()
            watcher.close()
            helper.close()
            hog.kill()

    def test_an_exit_a_look_saw_first_is_still_dealt_with(self, group: Group) -> None:
        """The handler exits with its grant open and the guard's look at it (a tick) sees that
        before the watchdog's loop does: the guard is not done until the exit is dealt with (the
        limit and the user's setting put back), or the grant would stay open for good."""
        oom_trap(group, "32M")
        child = subprocess.Popen(["sleep", "60"])
        handler = DeclaredHandler(child.pid, (child.pid,), ProcessFd(child.pid), 60.0)
        guard = Guard(group, 60.0, handler=handler, limit=32 * MIB, kill_enabled=True)
        try:
            group.set_limit(48 * MIB)  # the handler's grant
            guard.notified(time.monotonic_ns())  # no OOM, the grant open: its watch begins
            assert guard.watching_grant
            child.kill()
            child.wait()
            assert None is guard.tick(time.monotonic_ns())  # its look sees the exit first
            assert handler.exited and not guard.done
            record = guard.handler_exited()
            assert (True, 0) == (record["limit_raised"], record["restored"])
            assert guard.done
            assert 32 * MIB == group.limit() and not group.oom_control().kill_disabled
        finally:
            guard.close()
            handler.close()
            if child.poll() is None:
                child.kill()
                child.wait()

    def test_a_takeover_that_ends_with_the_grant_open_leaves_it_watched(self, group: Group, spawn_hog) -> None:
        """Under v1, under_oom drops only once each sleeper has run again, and the kernel kills
        only when a sleeper retries its charge: on a busy CPU both can come after the grant opened
        and after the handler was stopped. The takeover then ends with no kill and the grant still
        open; the guard goes on watching it, and reclaims it from the stopped handler (continues
        the group, whose tasks the handler stopped).

        The sleeper is held back by a SIGSTOP sent while it sleeps in the OOM wait: the wait is
        killable only, so the stop waits too. The takeover's wake-up ends the wait (under_oom
        drops), and the sleeper stops on its way back to user space, before it retries its
        charge: no kill until it runs again, as on a busy CPU."""
        oom_trap(group, "32M")
        hog = spawn_hog(40, group=group)  # it fits in the grant
        hog.start()
        assert wait_until(hog.in_oom_wait, 10)
        child = subprocess.Popen(["sleep", "60"])
        handler = DeclaredHandler(child.pid, (child.pid,), ProcessFd(child.pid), 60.0)
        guard = Guard(group, 60.0, handler=handler, limit=32 * MIB, kill_enabled=True)
        try:
            os.kill(hog.pid, signal.SIGSTOP)
            assert hog.in_oom_wait()  # the stop is pending: the wait is killable only
            guard.notified(time.monotonic_ns())
            assert guard.in_episode
            os.kill(child.pid, signal.SIGSTOP)
            assert wait_until(lambda: handler.look()[0] == "handler-stopped", 5)
            assert None is guard.tick(time.monotonic_ns())  # the takeover: the kernel killer on
            assert not group.oom_control().kill_disabled
            group.set_limit(48 * MIB)  # the grant the handler opened before it was stopped
            assert wait_until(lambda: _state(hog.pid) == "T", 5)  # out of the wait, not retried
            ended = [None]
            assert wait_until(lambda: (ended.__setitem__(0, guard.tick(time.monotonic_ns())), ended[0])[1]
                              is not None, 5)
            assert ("handler-stopped", 0) == (ended[0].reason, group.oom_control().oom_kill)
            assert guard.watching_grant
            guard.tick(time.monotonic_ns())
            assert ["grant-reclaimed"] == [n["event"] for n in guard.notes]
            assert 1 == guard.notes[0]["continued"]
            # Continued, the hog retries its charge: within the grant if it charges before the
            # limit is put back (once usage fits), else into a new OOM, which the guard hands to
            # the kernel at once (the handler is stopped). Either way it does not sleep for good.
            touched, takeovers = False, []
            deadline = time.monotonic() + 10
            while not touched and hog.returncode is None and time.monotonic() < deadline:
                guard.notified(time.monotonic_ns())
                takeover = guard.tick(time.monotonic_ns())
                if takeover is not None:
                    takeovers.append(takeover.reason)
                touched = hog.wait_touched(0.05)
            if touched:
                assert 0 == group.oom_control().oom_kill
            else:
                assert -signal.SIGKILL == hog.wait(10)

                def ended() -> bool:
                    takeover = guard.tick(time.monotonic_ns())
                    if takeover is not None:
                        takeovers.append(takeover.reason)
                    return bool(takeovers)

                assert wait_until(ended, 5)
                assert (["handler-stopped"], 1) == (takeovers, group.oom_control().oom_kill)
        finally:
            guard.close()
            handler.close()
            child.kill()
            child.wait()
            hog.kill()

    def test_handler_stopped_before_the_oom(self, group: Group, service, spawn_hog, tmp_path: Path) -> None:
        """SIGSTOP the handler (in the group): the watchdog hands the OOM to the kernel at once."""
        svc = service("plain", delay=5.0, join=True)
        os.kill(svc.pid, signal.SIGSTOP)
        try:
            hog = spawn_hog(100, group=group)
            hog.start()
            assert -signal.SIGKILL == hog.wait(10)
            assert wait_until(lambda: _log(tmp_path / "watchdog.jsonl", "takeover"), 5)
        finally:
            os.kill(svc.pid, signal.SIGCONT)
        [t] = _log(tmp_path / "watchdog.jsonl", "takeover")
        assert "handler-stopped" == t["reason"]
        assert t["acted_ns"] - t["notified_ns"] <= AT_ONCE_NS
        assert t["resolved_ns"] is not None
        result = svc.finish()
        assert ["handler-stopped"] == [e["takeover"]["reason"] for e in result["events"] if e["takeover"]]
        assert _settled(group, kill_disabled=False)

    def test_handler_killed_during_an_episode(self, group: Group, service, spawn_hog, tmp_path: Path) -> None:
        """SIGKILL the handler while the group sleeps in the OOM: the watchdog acts at once
        and restores the user's setting."""
        svc = service("nothing", delay=30.0)
        hog = spawn_hog(100, group=group)
        hog.start()
        assert wait_until(hog.in_oom_wait, 10)
        killed_ns = time.monotonic_ns()
        os.kill(svc.pid, signal.SIGKILL)
        assert -signal.SIGKILL == hog.wait(10)
        assert wait_until(lambda: _log(tmp_path / "watchdog.jsonl", "takeover"), 5)
        [t] = _log(tmp_path / "watchdog.jsonl", "takeover")
        assert "handler-exited" == t["reason"]
        assert t["acted_ns"] - killed_ns <= AT_ONCE_NS
        assert 0 == t["restored"]
        assert wait_until(lambda: _settled(group, kill_disabled=False), 2)
        # Its work done (the user's setting guards the group), the watchdog exits.
        assert wait_until(lambda: _log(tmp_path / "watchdog.jsonl", "done"), 5)

    def test_handler_killed_mid_grant(self, group: Group, service, spawn_hog, tmp_path: Path) -> None:
        """SIGKILL the handler while its hook holds a headroom grant, with the group's
        other process stopped for the hooks: the watchdog continues it, takes the
        episode and restores the limit."""
        svc = service("hang", delay=30.0)
        hog = spawn_hog(100, group=group)
        hog.start()
        assert wait_until(lambda: group.limit() == 80 * MIB, 10)  # granted: 64M + 16M
        # Held while the hooks run (stopped), or, when it reached the limit
        # before the table's refresh saw it, it used up the grant.
        assert wait_until(lambda: _state(hog.pid) == "T" or hog.in_oom_wait(), 10)
        held = _state(hog.pid) == "T"
        os.kill(svc.pid, signal.SIGKILL)
        assert -signal.SIGKILL == hog.wait(10)
        assert wait_until(lambda: group.limit() == 64 * MIB, 5)
        assert wait_until(lambda: _settled(group, kill_disabled=False), 2)
        [exited] = _log(tmp_path / "watchdog.jsonl", "handler-exited")
        assert exited["limit_raised"] is True
        assert exited["continued"] >= int(held)
        # The hog, stopped when the handler died, met the kernel killer (the
        # user's setting, restored) once continued; or a takeover gave it.
        assert {t["reason"] for t in _log(tmp_path / "watchdog.jsonl", "takeover")} <= {"handler-exited"}

    def test_handler_thread_caught_in_the_oom_wait(self, group: Group, service, spawn_hog,
                                                   tmp_path: Path) -> None:
        """The handler's own manager thread faults past the reserve during the episode:
        the watchdog sees it asleep in the OOM wait and acts at once."""
        hog = spawn_hog(100, group=group)  # in the group before the handler's first refresh
        svc = service("self-oom", delay=30.0, join=True)
        hog.start()
        assert wait_until(lambda: _log(tmp_path / "watchdog.jsonl", "takeover"), 15)
        t = _log(tmp_path / "watchdog.jsonl", "takeover")[0]
        assert "handler-in-oom-wait" == t["reason"]
        assert t["acted_ns"] - t["notified_ns"] <= AT_ONCE_NS
        assert t["resolved_ns"] is not None
        # The kernel killed the largest task: the handler itself, 256 MiB into its callback.
        assert -signal.SIGKILL == svc.proc.wait(10)
        assert wait_until(lambda: group.limit() == 64 * MIB, 5)
        assert wait_until(lambda: _settled(group, kill_disabled=False), 2)
        hog.kill()  # it was stopped for the decision that never came


@pytest.mark.parametrize("mode", ["hang", "raise", "alloc"])
def test_faulty_hooks_end_within_the_delay(group: Group, spawn_hog, mode: str, tmp_path: Path) -> None:
    """A hook that hangs, raises or allocates without bound: every episode still ends
    within the delay, by the plan's fallback or by the watchdog (whose log outlives a
    service the kernel had to kill)."""
    group.set_limit("112M")
    delay = 1.0
    log = tmp_path / "watchdog.jsonl"
    result, hog, code = run_hook_service(group, mode, spawn_hog, str(delay), str(log))
    assert -signal.SIGKILL == hog.wait(10)
    # A hook that hangs or raises costs the service nothing: the hog is
    # enough. One that allocates without bound may leave the service alone in
    # the group, unable to free memory: it meets the kernel, the plan's last
    # resort; its own events die with it, the watchdog's log keeps that.
    assert code == 0 if mode != "alloc" else code in (0, -signal.SIGKILL)
    episodes = [(t["notified_ns"], t["resolved_ns"]) for t in _log(log, "takeover")]
    if code == 0:
        episodes += [(e["notified_ns"], e["resolved_ns"]) for e in result["events"]
                     if e["outcome"] in ("resolved", "superseded")]
    assert episodes or (code != 0 and _log(log, "last-resort")), "no episode ended"
    for notified, resolved in episodes:
        assert resolved is not None and resolved - notified <= delay * 1e9 + SLACK_NS
    assert wait_until(lambda: _settled(group, kill_disabled=False), 5)


def test_heartbeats_are_sent_a_sixth_of_the_timeout_apart(scratch_group: Group,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The manager beats after every wake-up (hundreds a second in a storm); each beat sent
    wakes the watchdog, so one goes out per sixth of heartbeat_timeout at most."""
    import socket

    from useroom._units import UNLIMITED

    link = WatchdogLink(None, delay=2.0, handler_tids=(), heartbeat_timeout=6.0)
    link.add(scratch_group, limit=UNLIMITED, kill_enabled=False)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    now = [10**12]
    monkeypatch.setattr(time, "monotonic_ns", lambda: now[0])
    try:
        link.sock = ours
        theirs.setblocking(False)

        def received() -> list[bytes]:
            got = []
            while True:
                try:
                    got.append(theirs.recv(4096))
                except BlockingIOError:
                    return got

        for _ in range(100):
            link.beat()
        assert [b"beat"] == received()
        now[0] += 999_000_000
        link.beat()
        assert [] == received()
        now[0] += 1_000_000
        link.beat()
        link.set_limit(scratch_group, 64 * MIB)  # not a beat: always sent
        limit = json.dumps({"path": scratch_group.path, "limit": 64 * MIB}).encode()
        assert [b"beat", b"limit " + limit] == received()
    finally:
        ours.close()
        theirs.close()


class TestWatchdogFaults:
    def test_killed_while_the_handler_is_healthy(self, group: Group) -> None:
        """The handler notices (pidfd) and starts a new one."""
        with Handler(group, thresholds=(), refresh_interval=0.05) as handler:
            link = handler.watchdog
            assert link is not None and link.pid is not None
            first = link.pid
            os.kill(first, signal.SIGKILL)
            assert wait_until(lambda: link.restarts == 1 and link.pid not in (None, first), 10)
            assert [-signal.SIGKILL] == [h["returncode"] for h in link.history if h["event"] == "watchdog-exited"]
            second = link.pid
            assert group.oom_control().kill_disabled  # still the handler's
        assert wait_until(lambda: not _is_watchdog(second), 5)  # stopped with the handler

    def test_stopped_while_the_handler_is_idle(self, group: Group) -> None:
        """Stopped while nothing happens (no refresh timer, no threshold, no OOM): the kernel
        reports the stop to the handler, its parent, which kills the watchdog at once and starts
        another, not at the next episode. Idle again after that, the manager does not wake.
        (SIGTSTP cannot stop it: it leads a session of its own, an orphaned process group.)"""
        with Handler(group, thresholds=()) as handler:
            link = handler.watchdog
            assert link is not None and link.pid is not None
            first = link.pid
            try:
                os.kill(first, signal.SIGSTOP)
                assert wait_until(lambda: link.restarts == 1 and link.pid not in (None, first), 10), link.history
            finally:
                if _is_watchdog(first):
                    os.kill(first, signal.SIGCONT)
            killed = [r for r in link.history if r["event"] == "watchdog-killed"]
            assert [("stopped", first)] == [(r["cause"], r["pid"]) for r in killed]
            assert [-signal.SIGKILL] == [r["returncode"] for r in link.history if r["event"] == "watchdog-exited"]
            assert any(isinstance(e, WatcherError) and "stopped" in str(e) for e in handler.errors)
            # The second one is guarded the same way: stopped too, it is replaced too.
            second = link.pid
            assert second is not None
            os.kill(second, signal.SIGSTOP)
            assert wait_until(lambda: link.restarts == 2 and link.pid not in (None, second), 10), link.history
            assert group.oom_control().kill_disabled  # the handler's still
            # The third idles: the manager thread sleeps (its context switches do not move).
            manager = handler.supervisor.manager_tid
            time.sleep(0.3)
            before = _thread_switches(manager)
            time.sleep(1.0)
            assert before == _thread_switches(manager)
        assert _settled(group, kill_disabled=False)

    def test_killed_during_an_episode(self, group: Group, spawn_hog) -> None:
        """Killed while the handler decides: the episode ends, a new watchdog starts."""
        killed = []

        def decide(ctx) -> list[int]:
            link = handler.watchdog
            assert link is not None and link.pid is not None
            killed.append(link.pid)
            os.kill(link.pid, signal.SIGKILL)
            return [v.pid for v in ctx.victims]

        handler = Handler(group, FreezeAndDecide(decide), reserve="16M", thresholds=(), refresh_interval=0.05)
        with handler:
            hog = spawn_hog(100, group=group)
            assert wait_until(lambda: hog.pid in {v.pid for v in handler.victims}, 5)
            hog.start()
            assert -signal.SIGKILL == hog.wait(10)
            link = handler.watchdog
            assert link is not None
            assert wait_until(lambda: link.restarts == 1 and link.pid != killed[0], 10)
            resolved = [e for e in handler.events if e.outcome == "resolved"]
            assert resolved and resolved[0].resolved_by == "freeze"
        assert _settled(group, kill_disabled=False)

    def test_restart_failure_gives_the_group_its_kernel_killer(self, group: Group, monkeypatch) -> None:
        with Handler(group, thresholds=(), refresh_interval=0.05) as handler:
            link = handler.watchdog
            assert link is not None and link.pid is not None

            def refuse() -> None:
                raise OSError("no more processes")

            monkeypatch.setattr(link, "start", refuse)
            os.kill(link.pid, signal.SIGKILL)
            assert wait_until(lambda: handler.watchdog is None, 10)
            assert not group.oom_control().kill_disabled
            time.sleep(0.2)  # refreshes do not turn it off again
            assert not group.oom_control().kill_disabled
            assert any("could not be restarted" in str(e) for e in handler.errors)


def _is_watchdog(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"watchdog" in f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False


class TestStandalone:
    def test_guards_a_group_with_no_handler(self, group: Group, spawn_hog, tmp_path: Path) -> None:
        """``useroom watchdog GROUP --delay``: the kernel killer is off and nobody handles the
        group; the watchdog ends each OOM after the delay and puts the setting back."""
        group.set_oom_kill(False)
        log = tmp_path / "log.jsonl"
        proc = subprocess.Popen([sys.executable, "-m", "useroom", "watchdog", group.path, "--delay", "300ms",
                                 "--log", str(log)])
        try:
            assert wait_until(lambda: _log(log, "ready"), 20)
            for n in (1, 2):
                hog = spawn_hog(100, group=group)
                hog.start()
                assert -signal.SIGKILL == hog.wait(10)
                assert wait_until(lambda: len(_log(log, "takeover")) == n, 5)
                t = _log(log, "takeover")[-1]
                assert ("delay", 1) == (t["reason"], t["restored"])
                assert 0.3e9 <= t["acted_ns"] - t["notified_ns"] <= 0.3e9 + SLACK_NS
                assert group.oom_control().kill_disabled
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise
            finally:
                group.set_oom_kill(True)
        assert 0 == code

    def test_bad_arguments(self, group: Group) -> None:
        run = subprocess.run([sys.executable, "-m", "useroom", "watchdog", group.path, "--delay", "soon"],
                             capture_output=True, text=True)
        assert 2 == run.returncode and "not a duration" in run.stderr
        run = subprocess.run([sys.executable, "-m", "useroom", "watchdog", group.path + "-missing"],
                             capture_output=True, text=True)
        assert 1 == run.returncode and "useroom watchdog:" in run.stderr


def _state(pid: int) -> str:
    """The process's state letter in /proc (T: stopped); "" once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


# -- one watchdog process for many groups -------------------------------------


@pytest.fixture
def groups(scratch_group: Group):
    """``groups(*names)``: children of the scratch group, each with a 64 MiB limit and the kernel
    OOM killer off (the scratch group's teardown destroys them with whatever is left in them)."""

    def make(*names: str) -> list[Group]:
        made = []
        for name in names:
            path = os.path.join(scratch_group.path, name)
            os.mkdir(path)
            made.append(oom_trap(Group.open(path), "64M"))
        return made

    return make


@pytest.fixture
def links():
    """``links(**options)``: a WatchdogLink with this test process as its handler (no declared
    threads, a heartbeat timeout of 60 s unless given) staying in this process's group;
    every one is stopped after the test."""
    made: list[WatchdogLink] = []

    def make(*, delay: float = 0.3, heartbeat_timeout: float = 60.0, **options) -> WatchdogLink:
        link = WatchdogLink(None, delay=delay, handler_tids=(), heartbeat_timeout=heartbeat_timeout, **options)
        made.append(link)
        return link

    yield make
    for link in made:
        link.stop()


def _link_takeovers(link: WatchdogLink, count: int, timeout: float = 10.0) -> list[Takeover]:
    """Takeovers the link receives until *count* or *timeout*."""
    found: list[Takeover] = []
    deadline = time.monotonic() + timeout
    while len(found) < count:
        left = deadline - time.monotonic()
        if left <= 0 or link.sock is None:
            break
        select.select([link.sock], [], [], left)
        found += link.receive()
    return found


def _open_under(pid: int, group: Group) -> list[str]:
    """The files of *group*'s directory that process *pid* holds open."""
    held = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if os.path.dirname(target) == group.path:
            held.append(os.path.basename(target))
    return held


def _eventfds(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:[eventfd]"
        except FileNotFoundError:
            pass
    return count


def _switches(pid: int) -> int:
    """Context switches, voluntary and not, of every thread of *pid* so far."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
                    total += int(line.split()[1])
    return total


def _thread_switches(tid: int) -> int:
    """Context switches, voluntary and not, of one thread of this process so far."""
    with open(f"/proc/self/task/{tid}/status") as f:
        return sum(int(line.split()[1]) for line in f
                   if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")))


def _asleep_in_epoll(pid: int) -> bool:
    """Every thread of *pid* asleep in epoll_wait."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        state = thread_state(pid, int(tid))
        if state is None or state[0] != "S" or "epoll" not in state[1]:
            return False
    return True


class TestManyGroups:
    def test_one_process_guards_several_groups(self, groups, links, spawn_hog) -> None:
        """One watchdog, three groups: two OOMs at once are each taken over after the delay,
        each takeover naming its group; the third group is left alone."""
        a, b, c = groups("a", "b", "c")
        link = links(delay=0.3)
        for group in (a, b, c):
            link.add(group, limit=64 * MIB, kill_enabled=True)
        assert (a, b, c) == link.groups
        link.start()
        hogs = {group.relpath: spawn_hog(100, group=group) for group in (a, c)}
        for hog in hogs.values():
            hog.start()
        for hog in hogs.values():
            assert -signal.SIGKILL == hog.wait(10)
        takeovers = _link_takeovers(link, 2)
        assert {a.relpath, c.relpath} == {t.group for t in takeovers}
        for t in takeovers:
            assert ("delay", 1) == (t.reason, t.restored)
            assert 0.3e9 <= t.takeover_ns <= 0.3e9 + SLACK_NS
        assert all(_settled(group, kill_disabled=True) for group in (a, b, c))
        assert 0 == b.oom_control().oom_kill

    def test_a_group_added_while_it_runs_is_guarded(self, groups, links, spawn_hog, tmp_path: Path) -> None:
        """Started with no group, the watchdog waits; a group added then is guarded: its OOM is
        taken over after the delay."""
        [group] = groups("late")
        log = tmp_path / "watchdog.jsonl"
        link = links(delay=0.3, log=str(log))
        link.start()
        assert not link.exited()
        link.add(group, limit=64 * MIB, kill_enabled=True)
        assert wait_until(lambda: _log(log, "added"), 5)
        assert [group.relpath] == [r["group"] for r in _log(log, "added")]
        hog = spawn_hog(100, group=group)
        hog.start()
        assert -signal.SIGKILL == hog.wait(10)
        [t] = _link_takeovers(link, 1)
        assert (group.relpath, "delay") == (t.group, t.reason)
        assert 0.3e9 <= t.takeover_ns <= 0.3e9 + SLACK_NS

    def test_a_removed_group_is_left_alone(self, groups, links, spawn_hog, tmp_path: Path) -> None:
        """A removed group's fds are closed and its settings left as they are: its OOM, begun
        before another group's, is still there when that one is taken over after the delay."""
        kept, dropped = groups("kept", "dropped")
        log = tmp_path / "watchdog.jsonl"
        link = links(delay=0.3, log=str(log))
        link.add(kept, limit=64 * MIB, kill_enabled=True)
        link.add(dropped, limit=64 * MIB, kill_enabled=True)
        link.start()
        assert link.pid is not None
        assert _open_under(link.pid, dropped)  # memory.oom_control, twice
        eventfds = _eventfds(link.pid)
        link.remove(dropped)
        assert (kept,) == link.groups
        assert wait_until(lambda: _log(log, "removed"), 5)
        assert [] == _open_under(link.pid, dropped)
        assert eventfds - 1 == _eventfds(link.pid)
        assert (64 * MIB, True) == (dropped.limit(), dropped.oom_control().kill_disabled)
        stuck = spawn_hog(100, group=dropped)
        stuck.start()
        assert wait_until(stuck.in_oom_wait, 10)
        hog = spawn_hog(100, group=kept)
        hog.start()
        assert -signal.SIGKILL == hog.wait(10)
        assert [kept.relpath] == [t.group for t in _link_takeovers(link, 1)]
        control = dropped.oom_control()
        assert (True, True, 0) == (control.under_oom, control.kill_disabled, control.oom_kill)
        assert stuck.returncode is None
        link.remove(dropped)  # again: ignored

    def test_a_restarted_watchdog_guards_the_groups_of_the_link(self, groups, links) -> None:
        """Killed and started again, the watchdog guards every group added and not removed,
        whether added before the first start or while it ran."""
        first, second, third = groups("first", "second", "third")
        link = links()
        link.add(first, limit=64 * MIB, kill_enabled=True)
        link.add(second, limit=64 * MIB, kill_enabled=True)
        link.start()
        link.add(third, limit=64 * MIB, kill_enabled=True)
        link.remove(first)
        assert link.pid is not None
        os.kill(link.pid, signal.SIGKILL)
        assert wait_until(link.exited, 10)
        assert -signal.SIGKILL == link.reap()["returncode"]
        link.start()
        assert link.pid is not None
        assert [] == _open_under(link.pid, first)
        assert _open_under(link.pid, second) and _open_under(link.pid, third)

    def test_set_limit_is_per_group(self, groups, tmp_path: Path) -> None:
        """Each group's limit, set while the watchdog runs, is the one it restores when the
        handler dies with that group's grant open."""
        one, two = groups("one", "two")
        log = tmp_path / "watchdog.jsonl"
        code = (
            "import sys\n"
            "from useroom.cgroup import Group\n"
            "from useroom.handler.link import WatchdogLink\n"
            "one, two, log = Group.open(sys.argv[1]), Group.open(sys.argv[2]), sys.argv[3]\n"
            "link = WatchdogLink(None, delay=30.0, handler_tids=(), heartbeat_timeout=60.0, log=log)\n"
            "link.add(one, limit=64 << 20, kill_enabled=True)\n"
            "link.add(two, limit=64 << 20, kill_enabled=True)\n"
            "link.start()\n"
            "link.set_limit(one, 80 << 20)\n"
            "link.set_limit(two, 96 << 20)\n"
            "print(link.pid, flush=True)\n"
            "sys.stdin.read()\n")
        handler = subprocess.Popen([sys.executable, "-c", code, one.path, two.path, str(log)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        watchdog = None
        try:
            assert handler.stdout is not None
            watchdog = int(handler.stdout.readline())
            one.set_limit(112 * MIB)  # grants open when the handler dies
            two.set_limit(112 * MIB)
            handler.kill()
            handler.wait(10)
            assert wait_until(lambda: len(_log(log, "done")) == 2, 10)
            assert (80 * MIB, 96 * MIB) == (one.limit(), two.limit())
            assert {True} == {r["limit_raised"] for r in _log(log, "handler-exited")}
            assert _settled(one, kill_disabled=False) and _settled(two, kill_disabled=False)
            assert wait_until(lambda: not _is_watchdog(watchdog), 5)  # its work done, it exits
        finally:
            if handler.poll() is None:
                handler.kill()
            handler.wait(10)
            for pipe in (handler.stdin, handler.stdout):
                if pipe is not None:
                    pipe.close()
            _kill_if_ours(watchdog)


class TestIdle:
    def test_no_wake_up_while_nothing_happens(self, groups, links, tmp_path: Path) -> None:
        """Guarding groups with no OOM, and no heartbeat coming, the watchdog sleeps in the
        kernel: its threads are not switched in once over 3 s."""
        a, b, c = groups("a", "b", "c")
        log = tmp_path / "watchdog.jsonl"
        link = links(log=str(log))
        link.add(a, limit=64 * MIB, kill_enabled=True)
        link.add(b, limit=64 * MIB, kill_enabled=True)
        link.start()
        link.add(c, limit=64 * MIB, kill_enabled=True)
        assert wait_until(lambda: _log(log, "added"), 5)
        pid = link.pid
        assert pid is not None
        assert wait_until(lambda: _asleep_in_epoll(pid), 5)
        before = _switches(pid)
        time.sleep(3.0)  # the behaviour under test is that nothing happens meanwhile
        assert before == _switches(pid)
        assert _asleep_in_epoll(pid)

    def test_started_with_no_group_it_runs_until_stop_or_eof(self, links) -> None:
        """In control mode with no group the watchdog keeps running, asleep, until ``stop``, or
        until the handler's end of the socket closes; either way it exits with status 0."""
        for end in ("stop", "eof"):
            link = links()
            link.start()
            assert link.popen is not None and link.pid is not None
            pid = link.pid
            assert wait_until(lambda: _asleep_in_epoll(pid), 5)
            assert not link.exited()
            popen = link.popen
            if end == "stop":
                link.stop()
            else:
                assert link.sock is not None
                link.sock.close()
                link.sock = None
            assert 0 == popen.wait(10)


class TestHeartbeatFromTheEpisode:
    def test_silence_counts_from_the_episode_start(self, groups, links, spawn_hog) -> None:
        """A handler idle (no beat) for twice heartbeat_timeout before the OOM is not taken
        over at once: only heartbeat_timeout of silence into the episode makes it unfit."""
        [group] = groups("g")
        link = links(delay=30.0, heartbeat_timeout=0.5)
        link.add(group, limit=64 * MIB, kill_enabled=True)
        link.start()
        time.sleep(1.0)  # idle and silent for twice the timeout
        hog = spawn_hog(100, group=group)
        hog.start()
        assert -signal.SIGKILL == hog.wait(10)
        [t] = _link_takeovers(link, 1)
        assert "heartbeat" == t.reason
        assert 0.5e9 <= t.takeover_ns <= 0.5e9 + SLACK_NS

    def test_beats_during_the_episode_keep_it_fit(self, groups, links, spawn_hog) -> None:
        """A handler that beats during the episode is waited for until the delay."""
        [group] = groups("g")
        link = links(delay=1.5, heartbeat_timeout=0.5)
        link.add(group, limit=64 * MIB, kill_enabled=True)
        link.start()
        hog = spawn_hog(100, group=group)
        hog.start()
        takeovers: list[Takeover] = []
        deadline = time.monotonic() + 10
        while not takeovers and time.monotonic() < deadline:
            link.beat()  # one per sixth of the timeout at most
            assert link.sock is not None
            if select.select([link.sock], [], [], 0.02)[0]:
                takeovers += link.receive()
        assert -signal.SIGKILL == hog.wait(10)
        [t] = takeovers
        assert "delay" == t.reason
        assert 1.5e9 <= t.takeover_ns <= 1.5e9 + SLACK_NS


class TestLinkProtocol:
    def test_guard_spec_round_trip(self) -> None:
        """A guard's JSON reads back as the same spec; anything else is a ValueError."""
        spec = GuardSpec("/sys/fs/cgroup/memory/x", 3, 64 * MIB, True, (1, 2))
        assert spec == GuardSpec.from_json(spec.to_json())
        bare = GuardSpec("/sys/fs/cgroup/memory/y", 0)
        assert bare == GuardSpec.from_json(bare.to_json())
        for text in ("not json", "[1]", '{"path": "/x"}', '{"path": "/x", "key": 0, "limit": "64M"}',
                     '{"path": "/x", "key": 0, "saved": [1]}', '{"path": "/x", "key": 0, "extra": 1}'):
            with pytest.raises(ValueError):
                GuardSpec.from_json(text)

    def test_groups_before_the_start_go_on_the_command_line(self, scratch_group: Group) -> None:
        """A group added before the start is on the command line with its limit, a group
        removed is not; a group added twice is refused."""
        link = WatchdogLink(None, delay=2.0, handler_tids=(), heartbeat_timeout=5.0)
        link.add(scratch_group, limit=64 * MIB, kill_enabled=True)
        with pytest.raises(ValueError):
            link.add(scratch_group, limit=64 * MIB, kill_enabled=True)
        link.set_limit(scratch_group, 80 * MIB)
        argv = link.command(7)
        [spec] = [GuardSpec.from_json(argv[i + 1]) for i, word in enumerate(argv) if word == "--guard"]
        assert (scratch_group.path, 80 * MIB, True, None) == (spec.path, spec.limit, spec.kill_enabled, spec.saved)
        link.remove(scratch_group)
        assert "--guard" not in link.command(7)
        assert () == link.groups

    def test_a_watchdog_that_stops_reading_is_killed(self, monkeypatch) -> None:
        """A watchdog whose control socket fills up (it stopped reading) would fall behind the
        link's groups: the link kills it, for the caller to restart with every group."""
        link = WatchdogLink(None, delay=2.0, handler_tids=(), heartbeat_timeout=5.0)
        monkeypatch.setattr(link, "command", lambda fd: [
            sys.executable, "-c", "import socket, sys, time\n"
            "control = socket.socket(fileno=int(sys.argv[1]))\n"
            "control.send(b'ready')\n"
            "time.sleep(600)\n", str(fd), "watchdog-that-does-not-read"])
        link.start()
        try:
            for n in range(100_000):
                group = types.SimpleNamespace(path=f"/nowhere/{n}", relpath=f"/nowhere/{n}")
                link.add(group, limit=64 * MIB, kill_enabled=True)
                if link.history:
                    break
            assert ["watchdog-killed"] == [h["event"] for h in link.history]
            assert wait_until(link.exited, 10)
            assert -signal.SIGKILL == link.reap()["returncode"]
        finally:
            link.stop()
