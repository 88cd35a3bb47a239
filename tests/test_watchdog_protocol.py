"""The watchdog's control protocol and its package, with no group involved."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys

import pytest

import useroom.watchdog
from useroom.handler.link import WatchdogLink
from useroom.watchdog.process import Watchdog
from useroom.watchdog.protocol import (
    GUARD_OPTION,
    READY,
    Add,
    Beat,
    GuardSpec,
    LastResort,
    Message,
    Remove,
    SetLimit,
    Stop,
    decode,
    decode_record,
    encode_record,
    guard_argv,
)

SPEC = GuardSpec("/sys/fs/cgroup/memory/x", 3, 64 << 20, True, (1, 2))


class TestMessages:
    @pytest.mark.parametrize("message", [
        Beat(), Add(SPEC), Add(GuardSpec("/y", 0)), Remove("/x"), SetLimit("/x", 80 << 20),
        LastResort({"seq": 4, "kernel_next": True}), Stop(),
    ])
    def test_round_trip(self, message: Message) -> None:
        """Each message reads back as itself."""
        assert message == decode(message.encode())

    def test_wire_form(self) -> None:
        """The packets are a word and one JSON value, as docs/watchdog.md has them."""
        assert [
            b"beat",
            b"add " + SPEC.to_json().encode(),
            b'remove {"path": "/x"}',
            b'limit {"path": "/x", "limit": 5}',
            b'last-resort {"seq": 4}',
            b"stop",
        ] == [m.encode() for m in (Beat(), Add(SPEC), Remove("/x"), SetLimit("/x", 5), LastResort({"seq": 4}),
                                   Stop())]

    @pytest.mark.parametrize("data", [
        b"", b"hello", b"add not json", b'add {"path": "/x"}', b"remove {}", b"remove [1]",
        b'limit {"path": "/x"}', b'limit {"path": "/x", "limit": "64M"}', b"last-resort [1]",
        b"last-resort not json",
    ])
    def test_not_a_message(self, data: bytes) -> None:
        """Anything else is refused with the errors the watchdog records as a bad message."""
        with pytest.raises((KeyError, TypeError, ValueError)):
            decode(data)

    def test_guard_argv(self) -> None:
        """The command line carries one option and JSON per guard, read back as the same spec."""
        argv = guard_argv([SPEC, GuardSpec("/y", 0)])
        assert [GUARD_OPTION, GUARD_OPTION] == argv[::2]
        assert [SPEC, GuardSpec("/y", 0)] == [GuardSpec.from_json(text) for text in argv[1::2]]


class TestRecords:
    def test_round_trip(self) -> None:
        """A record reads back as itself; its line has sorted keys."""
        record = {"event": "added", "path": "/x", "key": 3, "at_ns": 12}
        line = encode_record(record)
        assert record == decode_record(line.encode())
        assert list(json.loads(line)) == sorted(record)

    @pytest.mark.parametrize("data", [b"[1]", b'"error"', b'{"event": "error", "traceback": "Trace', b""])
    def test_not_a_record(self, data: bytes) -> None:
        """A packet that is not a JSON object (or was cut at MESSAGE_MAX) is no record."""
        assert None is decode_record(data)


class TestWatchdogMessages:
    def test_messages_with_no_group(self) -> None:
        """A watchdog with no group answers ready, records a bad message and a last-resort
        note, ignores a limit and a removal for a group it does not guard, and stops on stop."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        log = io.StringIO()
        watchdog = Watchdog(delay=1.0, control=theirs, log=log)
        try:
            for message in (b"hello", Beat().encode(), SetLimit("/x", 5).encode(), Remove("/x").encode(),
                            LastResort({"seq": 4}).encode(), Stop().encode()):
                ours.send(message)
            watchdog.run()
        finally:
            watchdog.close()
        assert READY == ours.recv(4096)
        records = [json.loads(line) for line in log.getvalue().splitlines()]
        assert ["bad-message", "last-resort"] == [r["event"] for r in records]
        assert ("hello", "ValueError('unknown message')") == (records[0]["message"], records[0]["error"])
        assert 4 == records[1]["seq"]
        ours.close()


class TestPackage:
    def test_exports(self) -> None:
        """``useroom.watchdog`` exports what it always did, the link being the handler's."""
        namespace: dict[str, object] = {}
        exec("from useroom.watchdog import *", namespace)
        assert {"DEFAULT_DELAY", "Takeover", "Watchdog", "WatchdogLink", "main"} == set(namespace) - {"__builtins__"}
        assert WatchdogLink is useroom.watchdog.WatchdogLink

    @pytest.mark.parametrize("module", ["useroom.handler.link", "useroom.watchdog", "useroom.watchdog.protocol"])
    def test_imported_first(self, module: str) -> None:
        """Whichever module a fresh interpreter imports first, the link and the package both load."""
        code = f"import {module}\nfrom useroom.watchdog import WatchdogLink\nimport useroom.handler.link\n"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert (0, "") == (result.returncode, result.stderr)

    def test_run_as_module(self) -> None:
        """``python -m useroom.watchdog --help`` prints the watchdog's usage."""
        result = subprocess.run([sys.executable, "-m", "useroom.watchdog", "--help"], capture_output=True,
                                text=True, timeout=60)
        assert (0, "") == (result.returncode, result.stderr)
        assert result.stdout.startswith("usage: useroom watchdog")
