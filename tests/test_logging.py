"""Logging: the JSON formatter, ``useroom handle``'s flags, the episode record and the degraded-mode warnings."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from helpers import until_resolved
from useroom import Group, Handler, KillLargest
from useroom._cli import build_parser, warn_files_in_group, written_each_episode
from useroom._log import JsonFormatter, configure, level_for

EPISODE_FIELDS = {"group", "episode", "outcome", "resolved_by", "victims", "kills", "notify_to_kill_ns",
                  "duration_ns", "fallback"}


def _record(msg: str = "group %s: episode %d", args: tuple[object, ...] = ("a/b", 3), **extra: object
            ) -> logging.LogRecord:
    return logging.getLogger("useroom.handler.group").makeRecord(
        "useroom.handler.group", logging.INFO, __file__, 1, msg, args, None, extra=extra)


class TestJsonFormatter:
    def test_one_object_per_line(self) -> None:
        """A record is one line: time, level, logger, message, and every extra field by its name."""
        line = JsonFormatter().format(_record(group="a/b", episode=3, victims=[12, 13], duration_ns=None))
        assert "\n" not in line
        out = json.loads(line)
        assert {"time", "level", "logger", "message", "group", "episode", "victims", "duration_ns"} == set(out)
        assert ("INFO", "useroom.handler.group", "group a/b: episode 3") == (out["level"], out["logger"],
                                                                            out["message"])
        assert ("a/b", 3, [12, 13], None) == (out["group"], out["episode"], out["victims"], out["duration_ns"])

    def test_time_is_iso_utc(self) -> None:
        """``time`` is the record's creation time, ISO 8601 in UTC."""
        record = _record()
        record.created = 0.25
        assert "1970-01-01T00:00:00.250000+00:00" == json.loads(JsonFormatter().format(record))["time"]

    def test_traceback(self) -> None:
        """A record with an exception carries its traceback in ``exc``."""
        try:
            raise OSError(12, "Cannot allocate memory")
        except OSError:
            record = logging.getLogger("useroom").makeRecord("useroom", logging.WARNING, __file__, 1, "failed",
                                                             (), sys.exc_info())
        out = json.loads(JsonFormatter().format(record))
        assert "failed" == out["message"] and "OSError: [Errno 12] Cannot allocate memory" in out["exc"]

    def test_value_json_cannot_write(self) -> None:
        """A value JSON cannot write is written as its str()."""
        assert "{1}" == json.loads(JsonFormatter().format(_record(odd={1})))["odd"]


class TestConfigure:
    def test_handler_on_the_useroom_logger_only(self) -> None:
        """configure() adds a handler to the ``useroom`` logger at the level given, and none to the root."""
        logger = logging.getLogger("useroom")
        root_handlers = list(logging.getLogger().handlers)
        stream = io.StringIO()
        handler = configure(logging.WARNING, "json", stream)
        try:
            assert logging.WARNING == logger.level
            logging.getLogger("useroom.handler.supervisor").info("not shown")
            logging.getLogger("useroom.handler.supervisor").warning("no pidfds", extra={"cause": "no_pidfd"})
        finally:
            logger.removeHandler(handler)
            logger.setLevel(logging.NOTSET)
        [line] = stream.getvalue().splitlines()
        assert ("no pidfds", "no_pidfd") == (json.loads(line)["message"], json.loads(line)["cause"])
        assert root_handlers == logging.getLogger().handlers

    def test_unknown_format(self) -> None:
        """A format other than text or json is refused."""
        with pytest.raises(ValueError, match="text, json"):
            configure(logging.INFO, "xml")

    def test_library_adds_a_null_handler(self) -> None:
        """Importing useroom adds a NullHandler to its logger: a program that configures nothing sees nothing."""
        assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger("useroom").handlers)


class TestHandleFlags:
    def parse(self, *flags: str) -> tuple[int, str]:
        args = build_parser().parse_args(["handle", "/g", *flags])
        return level_for(args.verbose, args.quiet), args.log_format

    def test_default(self) -> None:
        """Without flags: INFO, as text."""
        assert (logging.INFO, "text") == self.parse()

    def test_verbose_quiet_json(self) -> None:
        """-v is DEBUG, -q WARNING; --log-format json."""
        assert (logging.DEBUG, "text") == self.parse("-v")
        assert (logging.WARNING, "json") == self.parse("-q", "--log-format", "json")
        assert (logging.DEBUG, "json") == self.parse("--verbose", "--log-format=json")

    def test_refused(self, capsys: pytest.CaptureFixture[str]) -> None:
        """-v with -q, or an unknown format, is a usage error."""
        for flags in (("-v", "-q"), ("--log-format", "xml")):
            with pytest.raises(SystemExit) as info:
                self.parse(*flags)
            assert 2 == info.value.code
        capsys.readouterr()


class TestFilesInGroup:
    """useroom handle inside a group it handles warns of the files it writes after each episode:
    their pages are charged to the group, whose reclaim at the limit waits for their writeback."""

    def files(self, *flags: str, log: Any = None, out: Any = None) -> list[str]:
        args = build_parser().parse_args(["handle", "/g", *flags])
        return written_each_episode(args, level_for(args.verbose, args.quiet), log, out)

    def test_a_log_in_a_file_counts_at_info(self, tmp_path: os.PathLike[str]) -> None:
        """The log counts when stderr is a regular file and INFO records are written (not with -q)."""
        with open(os.path.join(tmp_path, "log"), "w") as file:
            assert (["the log (stderr)"], ["the log (stderr)"], []) == \
                (self.files(log=file), self.files("-v", log=file), self.files("-q", log=file))

    def test_a_log_to_a_pipe_or_no_file_does_not_count(self) -> None:
        """A pipe (the journal's stream, a terminal) or a stream with no fd is not a file."""
        read, write = os.pipe()
        with open(read, "rb") as _, open(write, "w") as pipe:
            assert ([], []) == (self.files(log=pipe), self.files(log=io.StringIO()))

    def test_the_episode_log_and_the_metrics(self, tmp_path: os.PathLike[str]) -> None:
        """--events PATH and --metrics-textfile count; --events - only if standard output is a file."""
        read, write = os.pipe()
        with open(read, "rb") as _, open(write, "w") as pipe, open(os.path.join(tmp_path, "out"), "w") as file:
            assert ["--events /e.jsonl", "--metrics-textfile /m.prom"] == \
                self.files("--events", "/e.jsonl", "--metrics-textfile", "/m.prom")
            assert ([], ["--events -"]) == (self.files("--events", "-", out=pipe),
                                            self.files("--events", "-", out=file))

    def test_warns_only_inside_a_handled_group(self, caplog: pytest.LogCaptureFixture) -> None:
        """One WARNING naming the group and the files when the process is inside a handled group and
        writes a file; nothing when it is outside, or writes none."""
        caplog.set_level(logging.WARNING, logger="useroom")

        def handler(inside: bool) -> Any:
            return SimpleNamespace(inside=lambda: inside, group=SimpleNamespace(relpath=f"/in-{inside}"))

        warn_files_in_group([handler(False)], ["the log (stderr)"])
        warn_files_in_group([handler(True)], [])
        assert [] == _records(caplog, logging.WARNING)
        warn_files_in_group([handler(False), handler(True)], ["the log (stderr)", "--events /e"])
        [record] = _records(caplog, logging.WARNING, "files_in_group")
        assert ("/in-True", ["the log (stderr)", "--events /e"]) == (getattr(record, "group"),
                                                                     getattr(record, "files"))
        assert "writes the log (stderr), --events /e after each episode" in record.getMessage()


def _records(caplog: pytest.LogCaptureFixture, level: int, cause: str | None = None) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("useroom") and r.levelno == level
            and (cause is None or getattr(r, "cause", None) == cause)]


@pytest.mark.kernel
@pytest.mark.timeout(90)
class TestHandlerLogs:
    def test_one_info_record_per_episode(self, scratch_group: Group, spawn_hog, caplog: pytest.LogCaptureFixture
                                         ) -> None:
        """Each episode has exactly one INFO record, made by the manager thread from its event, whose
        fields say what happened: the group, the episode, the outcome, the victims, the times."""
        caplog.set_level(logging.INFO, logger="useroom")
        scratch_group.set_limit("64M")
        hog = spawn_hog(100, group=scratch_group)
        with Handler(scratch_group, KillLargest(), thresholds=()) as handler:
            hog.start()
            assert -signal.SIGKILL == hog.wait(20)
            until_resolved(handler)
        events = handler.events
        records = [r for r in _records(caplog, logging.INFO) if r.name == "useroom.handler.group"]
        assert [e.seq for e in events] == [getattr(r, "episode") for r in records]
        [killed] = [r for r in records if getattr(r, "kills")]
        assert "MainThread" != killed.threadName  # the manager's, not the caller's
        fields = {name: getattr(killed, name) for name in EPISODE_FIELDS}
        assert {"group": scratch_group.relpath, "outcome": "resolved", "resolved_by": "kill",
                "victims": [hog.pid], "kills": 1, "fallback": False} == \
            {k: v for k, v in fields.items() if k not in ("episode", "notify_to_kill_ns", "duration_ns")}
        assert 0 < fields["notify_to_kill_ns"] < fields["duration_ns"]
        assert f"episode {fields['episode']} resolved by kill, killed {hog.pid}" in killed.getMessage()
        assert [] == _records(caplog, logging.WARNING)

    def test_no_pidfd_warns_once(self, scratch_group: Group, monkeypatch: pytest.MonkeyPatch,
                                 caplog: pytest.LogCaptureFixture) -> None:
        """Without pidfds the handler runs, and says so in one WARNING record per start."""
        monkeypatch.setattr("useroom._fd.can_use_pidfd", False)
        caplog.set_level(logging.INFO, logger="useroom")
        scratch_group.set_limit("64M")
        for _ in range(2):
            with Handler(scratch_group, thresholds=()):
                pass
        records = _records(caplog, logging.WARNING, "no_pidfd")
        assert 2 == len(records) and "victims are signalled by pid" in records[0].getMessage()
        assert [] == [r for r in _records(caplog, logging.WARNING) if r not in records]

    def test_no_watchdog_warns(self, scratch_group: Group, caplog: pytest.LogCaptureFixture) -> None:
        """A handler started without the watchdog it needs says so, naming its group."""
        caplog.set_level(logging.WARNING, logger="useroom")
        scratch_group.set_limit("64M")
        with Handler(scratch_group, thresholds=(), watchdog=False):
            pass
        [record] = _records(caplog, logging.WARNING, "no_watchdog")
        assert [scratch_group.relpath] == getattr(record, "groups")
