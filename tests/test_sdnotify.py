"""systemd's notification protocol: the sender, and ``useroom handle`` under a NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from useroom import Group
from useroom._sdnotify import SystemdNotifier, watchdog_interval


@pytest.fixture
def listener(tmp_path):
    """A datagram socket standing in for systemd's: (its path, the socket)."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)
    yield path, sock
    sock.close()


def _fields(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().split("\n"))


class TestSender:
    def test_sends_key_value_lines(self, listener) -> None:
        path, sock = listener
        notifier = SystemdNotifier({"NOTIFY_SOCKET": path})
        assert notifier.enabled
        assert notifier.send(READY=1, STATUS="handling 1 group(s)")
        assert {"READY": "1", "STATUS": "handling 1 group(s)"} == _fields(sock.recv(4096))
        notifier.close()

    def test_an_abstract_socket(self) -> None:
        name = f"@useroom-test-{os.getpid()}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind("\0" + name[1:])
        sock.settimeout(10)
        try:
            notifier = SystemdNotifier({"NOTIFY_SOCKET": name})
            assert notifier.send(WATCHDOG=1)
            assert b"WATCHDOG=1" == sock.recv(4096)
            notifier.close()
        finally:
            sock.close()

    def test_without_a_socket_nothing_is_sent(self, tmp_path) -> None:
        assert not SystemdNotifier({}).enabled
        assert False is SystemdNotifier({}).send(READY=1)
        # A socket that is gone is not an error: the handler serves its groups anyway.
        gone = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
        assert False is gone.send(READY=1)
        gone.close()

    def test_watchdog_interval(self) -> None:
        assert 1.5 == watchdog_interval({"WATCHDOG_USEC": "3000000"})
        assert 1.5 == watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
        assert None is watchdog_interval({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"})
        assert None is watchdog_interval({})
        assert None is watchdog_interval({"WATCHDOG_USEC": "soon"})


@pytest.mark.kernel
@pytest.mark.timeout(60)
def test_handle_notifies_ready_watchdog_and_stopping(scratch_group: Group, listener) -> None:
    """``useroom handle`` under systemd: READY=1 with a STATUS once it serves,
    WATCHDOG=1 within half of WATCHDOG_USEC, STOPPING=1 on SIGTERM."""
    path, sock = listener
    scratch_group.set_limit("64M")
    env = {**os.environ, "NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen([sys.executable, "-m", "useroom", "handle", scratch_group.path, "-q"],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert "ready" == proc.stdout.readline().strip()
        first = _fields(sock.recv(4096))
        assert "1" == first["READY"] and first["STATUS"].startswith("handling 1 group(s)")
        start = time.monotonic()
        beats = 0
        while beats < 3:
            if _fields(sock.recv(4096)).get("WATCHDOG") == "1":
                beats += 1
        assert time.monotonic() - start < 3 * 0.4  # at least every half of WATCHDOG_USEC, with slack
        proc.send_signal(signal.SIGTERM)
        while "STOPPING" not in (fields := _fields(sock.recv(4096))):
            assert fields.get("WATCHDOG") == "1"
        assert 0 == proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
