"""The handler's watchdog starts every time, and a start that fails says why.

- ``backends`` (the host's v1 and, through .ci/run, the v2 guest): 50
  handler start/stop cycles on a group with a limit; every watchdog reports
  ready, none is restarted, every stop puts the group's settings back and
  reaps its watchdog.
- ``backends`` too: a watchdog killed by SIGKILL before ready, in a scratch
  group whose kernel OOM kill count tells who killed it (the kernel's OOM
  killer, another process, or, inside the handled group, the handler's plan).
- Anywhere: a watchdog that fails before ready (refuses its group, exits
  without a word, crashes, reports an error and then writes its traceback,
  closes its socket and lingers, gets stuck) raises a WatcherError naming
  its exit status or signal, quoting its standard error, and saying what to
  do; the process is reaped. A slow start that keeps progressing is waited
  for; ``spawned`` learns the pid before ready.
"""

from __future__ import annotations

import os
import sys
import time
import types
from typing import Any

import psutil
import pytest

from useroom import Handler
from useroom.cgroup import Group
from useroom.handler import V2_GAP
from useroom._units import UNLIMITED
from useroom.handler.link import WatchdogLink
from useroom.exceptions import WatcherError

CYCLES = 50
#: A marker in each fake watchdog's command line, to find one left running.
FAKE = "useroom-test-fake-watchdog"


def _settings(group: Group) -> tuple[object, ...]:
    """What the handler changes while it runs and must restore."""
    if group.version == 2:
        return group.high(), group.limit()  # type: ignore[attr-defined]
    return group.limit(), group.oom_control().kill_disabled


def _watchdogs_left() -> list[psutil.Process]:
    """Child processes of this one that are a watchdog (a real one or a fake)."""
    return [p for p in psutil.Process().children(recursive=True)
            if any("watchdog" in part or FAKE in part for part in _cmdline(p))]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return list(process.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []


@pytest.fixture
def group(scratch_group: Group) -> Group:
    """A group with an effective limit of 64 MiB on either backend (v2: the wall below memory.max)."""
    scratch_group.set_limit((64 << 20) + (V2_GAP if scratch_group.version == 2 else 0))
    return scratch_group


@pytest.mark.backends
@pytest.mark.timeout(750)  # the emulated guest: about 4 s a cycle, twice that when its CPU is contended
class TestCycles:
    def test_fifty_starts_and_stops(self, group: Group) -> None:
        """50 start/stop cycles: every watchdog reports ready and stays up until the stop (no
        failure, no restart, no error), each stop reaps it and puts the group's settings back."""
        before = _settings(group)
        failures: list[str] = []
        durations: list[float] = []
        for cycle in range(CYCLES):
            started = time.monotonic()
            try:
                handler = Handler(group, thresholds=()).start()
            except WatcherError as err:
                failures.append(f"cycle {cycle}: {err}")
                assert before == _settings(group), f"cycle {cycle}: the failed start left the settings changed"
                continue
            durations.append(time.monotonic() - started)
            try:
                link = handler.watchdog
                assert link is not None and link.pid is not None
                pid = link.pid
                assert not link.exited()
            finally:
                handler.stop()
            assert (0, []) == (link.restarts, handler.errors), f"cycle {cycle}"
            assert before == _settings(group), f"cycle {cycle}"
            assert [] == _watchdogs_left(), f"cycle {cycle}: watchdog {pid} outlived the stop"
        assert [] == failures
        assert [] == _watchdogs_left()
        print(f"{CYCLES} cycles; start {min(durations):.2f} s to {max(durations):.2f} s")


def _link(handled: Any = None, place: Group | None = None) -> WatchdogLink:
    """A link for *handled* (default: a group that does not exist, which the fakes never look at); with
    no *place* the watchdog stays in this process's group."""
    if handled is None:
        handled = types.SimpleNamespace(path="/sys/fs/cgroup/memory/useroom-test-no-such-group",
                                        relpath="/useroom-test-no-such-group")
    link = WatchdogLink(place, delay=2.0, handler_tids=(), heartbeat_timeout=5.0)
    link.add(handled, limit=UNLIMITED, kill_enabled=False)
    return link


def _fake(link: WatchdogLink, monkeypatch: pytest.MonkeyPatch, code: str) -> None:
    """Make *link* start ``python -c code FD`` instead of the watchdog (FD: its end of the control socket)."""
    monkeypatch.setattr(link, "command", lambda fd: [sys.executable, "-X", "faulthandler", "-c", code, str(fd), FAKE])


def _start_error(link: WatchdogLink) -> str:
    with pytest.raises(WatcherError) as caught:
        link.start()
    assert (None, None, None) == (link.popen, link.pidfd, link.sock)
    assert [] == _watchdogs_left()  # killed if need be, and reaped
    message = str(caught.value)
    assert "What to do: " in message
    return message


@pytest.mark.backends
class TestKilledBeforeReady:
    """The watchdog moves into a scratch group (its place), whose kernel OOM kill count tells
    whether the kernel's OOM killer sent a SIGKILL."""

    def test_killed_by_another_process(self, scratch_group: Group, monkeypatch: pytest.MonkeyPatch) -> None:
        """Killed by SIGKILL before ready, with no kernel OOM kill where it is charged: the signal, and
        that another process sent it."""
        link = _link(place=scratch_group)
        _fake(link, monkeypatch, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
        message = _start_error(link)
        assert "killed by SIGKILL" in message
        assert f"the kernel's OOM killer killed nobody in {scratch_group.relpath} meanwhile: another process" in message

    def test_killed_inside_the_handled_group(self, scratch_group: Group, monkeypatch: pytest.MonkeyPatch) -> None:
        """Killed while it starts in the handled group itself (v2, the handler inside it) with no kernel
        OOM kill there: the error names the handler's plan, which sees it until it is ready."""
        link = _link(scratch_group, place=scratch_group)
        _fake(link, monkeypatch, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
        message = _start_error(link)
        assert "killed by SIGKILL" in message
        assert "the handler's plan may take it for a victim at the wall" in message

    def test_killed_by_the_kernel_oom_killer(self, scratch_group: Group, monkeypatch: pytest.MonkeyPatch) -> None:
        """Killed by the kernel's OOM killer where it is charged (it touches 64 MiB under an 8 MiB limit):
        the error says so, with the count, and what to do."""
        scratch_group.set_limit("8M")  # v1: the kernel killer is on in a fresh group
        link = _link(place=scratch_group)
        _fake(link, monkeypatch, "hog = b'x' * (64 << 20)")
        message = _start_error(link)
        assert "killed by SIGKILL" in message
        assert f"the kernel's OOM killer killed 1 task(s) in {scratch_group.relpath}" in message
        assert "watchdog_group=" in message


class TestStartErrors:
    def test_the_watchdog_refuses_its_group(self) -> None:
        """The real watchdog, given a group that does not exist, exits with status 1: the error
        quotes its own words and gives its exit status and what to do."""
        message = _start_error(_link())
        assert "exit status 1" in message
        assert "useroom watchdog: " in message and "useroom-test-no-such-group" in message
        assert "fix what it names" in message

    def test_a_silent_exit(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A watchdog that exits at once without a word: its exit status, that it said nothing,
        and how to see it fail."""
        link = _link()
        _fake(link, monkeypatch, "raise SystemExit(3)")
        message = _start_error(link)
        assert "exit status 3" in message
        assert "It wrote nothing on its standard error." in message
        assert "run it by hand" in message

    def test_a_crash(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A watchdog that crashes: the signal and the traceback faulthandler wrote."""
        link = _link()
        _fake(link, monkeypatch, "import ctypes; ctypes.string_at(0)")
        message = _start_error(link)
        assert "killed by SIGSEGV" in message
        assert "Fatal Python error" in message
        assert "it crashed" in message

    def test_an_error_reported_before_the_traceback(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A watchdog that fails after taking its socket sends its error record first and writes its
        traceback after: both are in the error (the traceback was lost when it was killed at once)."""
        link = _link()
        _fake(link, monkeypatch, (
            "import socket, sys, time\n"
            "control = socket.socket(fileno=int(sys.argv[1]))\n"
            "control.send(b'{\"event\": \"error\", \"error\": \"OSError(24, \\'Too many open files\\')\"}')\n"
            "time.sleep(0.5)\n"
            "sys.stderr.write('Traceback (most recent call last):\\nOSError: [Errno 24] Too many open files\\n')\n"
            "sys.exit(1)\n"))
        message = _start_error(link)
        assert "reported \"OSError(24, 'Too many open files')\" instead of ready" in message
        assert "exit status 1" in message
        assert "OSError: [Errno 24] Too many open files" in message

    def test_closed_its_socket_and_lingers(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A watchdog that closes its socket but does not exit is given START_GRACE, then killed."""
        monkeypatch.setattr("useroom.handler.link.START_GRACE", 0.5)
        link = _link()
        _fake(link, monkeypatch, "import os, sys, time; os.close(int(sys.argv[1])); time.sleep(600)")
        message = _start_error(link)
        assert "closed its control socket before ready and did not exit within 0.5 s" in message
        assert "the handler killed it" in message

    def test_stuck_without_progress(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A watchdog asleep without progress for START_STALL is killed; the error gives its state
        and wait channel."""
        monkeypatch.setattr("useroom.handler.link.START_STALL", 1.0)
        link = _link()
        _fake(link, monkeypatch, "import time; time.sleep(600)")
        started = time.monotonic()
        message = _start_error(link)
        assert time.monotonic() - started < 60
        assert "no progress for 1 s (state S, waiting in " in message
        assert "the handler killed it" in message

    def test_a_slow_start_that_progresses_is_waited_for(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A watchdog that works for several times START_STALL before ready (as in the emulated guest)
        starts; stop then ends it."""
        monkeypatch.setattr("useroom.handler.link.START_STALL", 0.5)
        link = _link()
        _fake(link, monkeypatch, (
            "import socket, sys, time\n"
            "control = socket.socket(fileno=int(sys.argv[1]))\n"
            "end = time.monotonic() + 2.0\n"
            "while time.monotonic() < end:\n"
            "    pass\n"
            "control.send(b'ready')\n"
            "control.recv(16)\n"))
        link.start()
        try:
            assert link.pid is not None and not link.exited()
        finally:
            link.stop()
        assert (None, None) == (link.popen, link.pidfd)
        assert [] == _watchdogs_left()

    def test_spawned_is_told_the_pid_before_ready(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
        """``spawned`` gets the watchdog's pid before it is ready (a handler spares it from then on): the
        fake says ready only after it has read, from a FIFO, the pid the callback wrote there."""
        fifo = tmp_path / "spawned"
        os.mkfifo(fifo)
        pids: list[int] = []

        def spawned(pid: int) -> None:
            pids.append(pid)
            with open(fifo, "w") as file:  # blocks until the fake opens it to read
                file.write(str(pid))

        link = _link()
        link.spawned = spawned
        _fake(link, monkeypatch, (
            "import os, socket, sys\n"
            "control = socket.socket(fileno=int(sys.argv[1]))\n"
            f"with open({str(fifo)!r}) as file:\n"
            "    assert file.read() == str(os.getpid())\n"
            "control.send(b'ready')\n"
            "control.recv(16)\n"))
        link.start()
        try:
            assert [link.pid] == pids
        finally:
            link.stop()

    def test_the_command_enables_faulthandler(self) -> None:
        """The real command line runs Python with faulthandler, so that a crash before ready leaves
        its traceback on the standard error the error quotes."""
        argv = _link().command(7)
        assert ["-X", "faulthandler", "-m", "useroom", "watchdog"] == argv[1:6]
        assert "7" == argv[argv.index("--control-fd") + 1]
