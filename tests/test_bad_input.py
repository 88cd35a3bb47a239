"""Bad input fails at once, with a typed error that names the parameter and
what to give instead, and leaves nothing behind: no group, no process, no
fd, no thread, the group's settings as they were.

- sizes: a reserve or a RaiseLimit/DryRun step larger than the group's
  limit (or, without one, than the machine's memory), ``"max"`` as a
  reserve, a ceiling above the machine's memory, a step above its ceiling;
  checked when the handler is made, and again at start;
- types: ``policy=`` and ``watchdog_group=`` when the handler is made;
- output paths: refused when the object that writes them is made, and a
  write that fails later loses nothing (the lines and the report go to
  standard error);
- the same through ``useroom handle``, a real command on a real group;
- the parsers (hypothesis): any text or object gives a value in range or
  the typed error, never another exception.
"""

from __future__ import annotations

import decimal
import errno
import json
import math
import os
import signal
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from helpers import MIB, run_as, until_resolved
from useroom import (
    DryRun,
    EventLog,
    Group,
    Handler,
    InvalidDuration,
    InvalidSize,
    KillLargest,
    MetricsFile,
    OutputError,
    RaiseLimit,
    SizeOutOfBounds,
    Supervisor,
    UseroomError,
)
from useroom._units import UNLIMITED, format_size, parse_duration, parse_size
from useroom.handler import validate

pytestmark = pytest.mark.timeout(120)

RAM = validate.physical_memory()


def _snapshot(group: Group) -> tuple[object, ...]:
    """What a refused argument must leave as it was: this process's fds,
    threads and children, the group's children, tasks and settings."""
    children = sorted(p.pid for p in psutil.Process().children(recursive=True))
    below = sorted(entry.name for entry in os.scandir(group.path) if entry.is_dir())
    procs = Path(group.path, "cgroup.procs").read_text().split()
    return (sorted(os.listdir("/proc/self/fd")), sorted(os.listdir("/proc/self/task")), children, below, procs,
            group.limit(), group.oom_control().kill_disabled)


@pytest.fixture
def group(scratch_group: Group) -> Iterator[Group]:
    scratch_group.set_limit("64M")
    yield scratch_group


@pytest.fixture
def unchanged(group: Group) -> Iterator[Callable[[], None]]:
    """Call it after the refused call: asserts nothing changed since the test began."""
    before = _snapshot(group)
    yield lambda: _check_unchanged(before, group)


def _check_unchanged(before: tuple[object, ...], group: Group) -> None:
    assert before == _snapshot(group)


@pytest.mark.kernel
class TestSizes:
    def test_reserve_max_is_no_size(self, group: Group, unchanged) -> None:
        """reserve='max' says what a reserve is and the largest it may be, not a number of 19 digits."""
        with pytest.raises(SizeOutOfBounds) as info:
            Handler(group, reserve="max")
        message = str(info.value)
        assert "reserve='max' is no size" in message
        assert f"the limit of {group.relpath} (64MiB)" in message
        assert str(UNLIMITED) not in message and "9223372036" not in message
        assert ("reserve", UNLIMITED, 64 * MIB) == (info.value.name, info.value.value, info.value.bound)
        unchanged()

    @pytest.mark.parametrize("reserve", ["1P", "99999T", "65M", (64 * MIB) + 1])
    def test_reserve_above_the_limit(self, group: Group, unchanged, reserve: str | int) -> None:
        """A reserve above the group's limit is refused, naming the value, the bound and the remedy."""
        with pytest.raises(SizeOutOfBounds) as info:
            Handler(group, reserve=reserve)
        message = str(info.value)
        assert message.startswith(f"reserve={reserve!r} ({format_size(parse_size(reserve))}) is larger than "
                                  f"the limit of {group.relpath} (64MiB)")
        assert "Give a reserve of at most 64MiB" in message
        assert isinstance(info.value, InvalidSize) and isinstance(info.value, ValueError)
        unchanged()

    def test_reserve_up_to_the_limit_is_taken(self, group: Group, unchanged) -> None:
        """The bound itself is allowed."""
        assert 64 * MIB == Handler(group, reserve="64M").reserve
        unchanged()

    def test_without_a_limit_the_bound_is_the_machine(self, scratch_group: Group) -> None:
        """A group without a limit: a reserve above MemTotal is refused, naming it."""
        with pytest.raises(SizeOutOfBounds, match=r"reserve='1P' \(1PiB\) is larger than this machine's memory "
                                                  r"\(.*, MemTotal\), the bound for a group without a limit"):
            Handler(scratch_group, reserve="1P")
        assert 16 * MIB == Handler(scratch_group, reserve="16M").reserve

    def test_garbage_names_the_parameter(self, group: Group, unchanged) -> None:
        """A reserve that does not parse is an InvalidSize that says it is the reserve."""
        with pytest.raises(InvalidSize, match=r"^reserve: invalid size 'lots'"):
            Handler(group, reserve="lots")
        unchanged()

    def test_supervisor_add_refuses_and_keeps_nothing(self, group: Group, unchanged) -> None:
        """Supervisor.add with a reserve out of bounds serves nothing."""
        sup = Supervisor()
        with pytest.raises(SizeOutOfBounds, match="reserve='99999T'"):
            sup.add(group, reserve="99999T")
        assert () == sup.handlers
        unchanged()

    def test_raise_limit_step_above_its_ceiling(self) -> None:
        """RaiseLimit('16M', '1M') is refused when it is made: it could never raise."""
        with pytest.raises(SizeOutOfBounds, match=r"RaiseLimit step 16MiB is above its ceiling 1MiB") as info:
            RaiseLimit("16M", "1M")
        assert ("step", 16 * MIB, MIB) == (info.value.name, info.value.value, info.value.bound)
        with pytest.raises(SizeOutOfBounds, match="DryRun step 2MiB is above its ceiling 1MiB"):
            DryRun(step="2M", ceiling="1M")
        with pytest.raises(ValueError, match="both step and ceiling"):
            DryRun(step="2M")

    def test_raise_limit_step_above_the_limit(self, group: Group, unchanged) -> None:
        """A step larger than the group's limit is refused when the handler is made."""
        with pytest.raises(SizeOutOfBounds, match=rf"RaiseLimit step 128MiB is larger than the limit of "
                                                  rf"{group.relpath} \(64MiB\).*at most 64MiB") as info:
            Handler(group, RaiseLimit("128M", "1G"))
        assert "step" == info.value.name
        unchanged()

    def test_raise_limit_ceiling_above_the_machine(self, group: Group, unchanged) -> None:
        """A ceiling above MemTotal is no ceiling: refused, naming the machine's memory."""
        with pytest.raises(SizeOutOfBounds, match=r"RaiseLimit ceiling 1PiB is larger than this machine's memory"):
            Handler(group, RaiseLimit("16M", "1P"))
        with pytest.raises(SizeOutOfBounds, match="DryRun ceiling max is larger"):
            Handler(group, DryRun(step="16M", ceiling="max"))
        unchanged()

    def test_a_limit_lowered_before_start(self, group: Group) -> None:
        """The limit lowered between Handler() and start(): start refuses, and touches nothing."""
        handler = Handler(group, reserve="32M")
        group.set_limit("16M")
        before = _snapshot(group)
        with pytest.raises(SizeOutOfBounds, match=rf"larger than the limit of {group.relpath} \(16MiB\)"):
            handler.start()
        assert not handler.running
        assert before == _snapshot(group)


@pytest.mark.kernel
class TestTypes:
    @pytest.mark.parametrize("policy", ["kill-largest", 3, KillLargest])
    def test_policy(self, group: Group, unchanged, policy: object) -> None:
        """A policy that is not a Policy object fails Handler(), naming policy= and what it takes."""
        with pytest.raises(TypeError, match=r"^policy= (must be a useroom\.Policy|takes a policy object)"):
            Handler(group, policy)  # type: ignore[arg-type]
        unchanged()

    def test_policy_class_says_to_call_it(self, group: Group) -> None:
        with pytest.raises(TypeError, match=r"not the class KillLargest: pass KillLargest\(\.\.\.\)"):
            Handler(group, KillLargest)  # type: ignore[arg-type]

    @pytest.mark.parametrize("where", ["/sys/fs/cgroup/memory", 7])
    def test_watchdog_group(self, group: Group, unchanged, where: object) -> None:
        """watchdog_group= that is not a Group fails Handler() and Supervisor(), not start()."""
        with pytest.raises(TypeError, match=r"^watchdog_group= must be a useroom\.Group or None"):
            Handler(group, watchdog_group=where)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match=r"^watchdog_group= must be a useroom\.Group or None"):
            Supervisor(watchdog_group=where)  # type: ignore[arg-type]
        unchanged()

    def test_a_path_for_watchdog_group_says_how_to_open_it(self, group: Group) -> None:
        with pytest.raises(TypeError, match=r"open it first, Group\.open\('/x'\)"):
            Handler(group, watchdog_group="/x")  # type: ignore[arg-type]

    def test_event_log(self, group: Group, unchanged) -> None:
        with pytest.raises(TypeError, match=r"event_log=\) is a path, '-', an open text file or an EventLog"):
            Handler(group, event_log=3)  # type: ignore[arg-type]
        unchanged()


@pytest.mark.kernel
class TestOutputPaths:
    @pytest.mark.parametrize(("where", "code", "reason"), [
        ("missing/x.json", errno.ENOENT, "its directory .*/missing: No such file or directory"),
        ("file/x.json", errno.ENOTDIR, ".*/file is not a directory"),
        ("dir", errno.EISDIR, "it is a directory"),
    ])
    def test_refused_when_made(self, group: Group, unchanged, tmp_path: Path, where: str, code: int,
                               reason: str) -> None:
        """event_log=, watchdog_log= and MetricsFile: an OutputError (an OSError) naming the path and why."""
        (tmp_path / "file").write_text("")
        (tmp_path / "dir").mkdir()
        path = tmp_path / where
        for make, what in ((lambda: Handler(group, event_log=path), "the event log"),
                           (lambda: Handler(group, watchdog_log=str(path)), "the watchdog's log"),
                           (lambda: Supervisor(watchdog_log=str(path)), "the watchdog's log"),
                           (lambda: MetricsFile(path), "the metrics file")):
            with pytest.raises(OutputError, match=f"^cannot write {what} to {path}: {reason}") as info:
                make()
            assert (code, str(path)) == (info.value.errno, info.value.filename)
            assert isinstance(info.value, UseroomError) and isinstance(info.value, OSError)
        assert ["dir", "file"] == sorted(os.listdir(tmp_path))
        unchanged()

    def test_not_writable_by_this_user(self) -> None:
        """As an ordinary user, a file in / is refused: its directory is not writable by that uid."""
        with pytest.raises(OutputError, match=r"^cannot write the event log to /useroom-x\.jsonl: its directory / "
                                              r"is not writable by this user \(uid 65534\)") as info:
            run_as(65534, lambda: EventLog("/useroom-x.jsonl"))
        assert errno.EACCES == info.value.errno
        assert not os.path.exists("/useroom-x.jsonl")

    def test_a_log_that_fails_later_loses_no_episode(self, group: Group, spawn_hog, capfd) -> None:
        """The event log cannot take a line (/dev/full): the episode is in handler.events, its line
        on standard error, and the error in handler.errors; the handler carries on."""
        spawn_hog(20, group=group)
        with Handler(group, event_log="/dev/full", thresholds=(), refresh_interval=0.2) as handler:
            hog = spawn_hog(80, group=group)
            hog.start()
            assert -signal.SIGKILL == hog.wait(20)
            assert "resolved" == until_resolved(handler)[-1].outcome
            assert handler.running
        errors = [e for e in handler.errors if isinstance(e, OutputError)]
        assert errors and errno.ENOSPC == errors[0].errno
        logged = [json.loads(line) for line in capfd.readouterr().err.splitlines() if line.startswith("{")]
        assert [e.seq for e in handler.events] == [e["seq"] for e in logged]
        assert hog.pid in {v["pid"] for e in logged for v in e["victims"]}


def _handle(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "useroom", "handle", *args], capture_output=True, text=True,
                          timeout=timeout)


def _processes_naming(path: str) -> list[int]:
    """Processes whose command line names ``path`` (a handler or its watchdog left running)."""
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if any(path in part for part in process.info["cmdline"] or ()):
            found.append(process.info["pid"])
    return found


@pytest.mark.kernel
class TestCommand:
    @pytest.mark.parametrize("flag", ["--events-out", "--events", "--metrics-textfile", "--watchdog-log"])
    @pytest.mark.parametrize("where", ["missing/out", "dir"])
    def test_a_bad_output_path_fails_before_start(self, group: Group, unchanged, tmp_path: Path, flag: str,
                                                  where: str) -> None:
        """Exit status 2 with argparse's message naming the flag, the path and why; never ready."""
        (tmp_path / "dir").mkdir()
        path = tmp_path / where
        done = _handle(group.path, flag, str(path))
        assert (2, "") == (done.returncode, done.stdout)
        assert f"useroom handle: error: argument {flag}: cannot write " in done.stderr
        assert str(path) in done.stderr and "Traceback" not in done.stderr
        assert [] == _processes_naming(group.path)
        assert ["dir"] == os.listdir(tmp_path)
        unchanged()

    @pytest.mark.parametrize(("args", "expected"), [
        (["--reserve", "99999T"], "useroom: reserve='99999T' (99999TiB) is larger than the limit of {} (64MiB)"),
        (["--reserve", "max"], "useroom: reserve='max' is no size"),
        (["--reserve", "lots"], "argument --reserve: invalid size 'lots'"),
        (["--policy", "raise-limit", "--step", "16M", "--ceiling", "1M"],
         "useroom: RaiseLimit step 16MiB is above its ceiling 1MiB"),
        (["--policy", "raise-limit", "--step", "128M", "--ceiling", "1G"],
         "useroom: RaiseLimit step 128MiB is larger than the limit of {} (64MiB)"),
        (["--delay", "soon"], "useroom: not a duration: 'soon'"),
    ])
    def test_a_bad_size_fails_before_start(self, group: Group, unchanged, args: list[str], expected: str) -> None:
        """Exit status 2 and one line naming the value, the bound and the remedy; never ready, even with --join."""
        done = _handle(group.path, "--join", *args)
        assert (2, "") == (done.returncode, done.stdout)
        assert expected.format(group.relpath) in done.stderr
        assert "Traceback" not in done.stderr
        assert [] == _processes_naming(group.path)
        unchanged()

    def test_outputs_gone_at_exit_go_to_stderr(self, group: Group, spawn_hog, tmp_path: Path) -> None:
        """The report's and the metrics' directories removed while it runs: at exit the report
        goes to standard error as one JSON line, after the errors; exit status 1."""
        (tmp_path / "report").mkdir()
        (tmp_path / "metrics").mkdir()
        out, prom = tmp_path / "report" / "events.json", tmp_path / "metrics" / "useroom.prom"
        with subprocess.Popen([sys.executable, "-m", "useroom", "handle", group.path, "-q", "--events-out", str(out),
                               "--metrics-textfile", str(prom)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as proc:
            try:
                assert proc.stdout is not None
                assert "ready\n" == proc.stdout.readline()
                (tmp_path / "report").rmdir()
                os.unlink(prom)  # written at start
                (tmp_path / "metrics").rmdir()
                hog = spawn_hog(80, group=group)
                hog.start()
                assert -signal.SIGKILL == hog.wait(20)
                proc.send_signal(signal.SIGTERM)
                _, err = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert 1 == proc.returncode, err
        assert f"cannot write the metrics file {prom}: No such file or directory" in err
        assert f"useroom: cannot write the report to {out}: No such file or directory" in err
        [report] = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        killed = {v["pid"] for e in report["events"] for v in e["victims"] if v["result"] == 0}
        assert hog.pid in killed
        assert [] == os.listdir(tmp_path)

    def test_event_lines_that_fail_go_to_stderr(self, group: Group, spawn_hog, tmp_path: Path) -> None:
        """--events /dev/full: each episode's line goes to standard error with an error; the report
        has the events and the errors; exit status 1."""
        out = tmp_path / "events.json"
        with subprocess.Popen([sys.executable, "-m", "useroom", "handle", group.path, "-q", "--events", "/dev/full",
                               "--events-out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as proc:
            try:
                assert proc.stdout is not None
                assert "ready\n" == proc.stdout.readline()
                hog = spawn_hog(80, group=group)
                hog.start()
                assert -signal.SIGKILL == hog.wait(20)
                proc.send_signal(signal.SIGTERM)
                _, err = proc.communicate(timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        assert 1 == proc.returncode, err
        assert "cannot write to the event log /dev/full: No space left on device" in err
        lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        report = json.loads(out.read_text())
        assert [e["seq"] for e in report["events"]] == [e["seq"] for e in lines]
        assert hog.pid in {v["pid"] for e in lines for v in e["victims"]}
        assert any("OutputError" in e for e in report["errors"])


_bound = types.SimpleNamespace(limit=lambda: 64 * MIB, relpath="/fuzz")


class TestParsers:
    @given(st.text())
    @example("max")
    @example("1P")
    @example("-0")
    def test_a_reserve_is_in_bounds_or_refused(self, text: str) -> None:
        """Any text as a reserve gives 0..limit or InvalidSize, never another error."""
        try:
            size = validate.reserve(text, _bound)  # type: ignore[arg-type]
        except InvalidSize:
            return
        assert 0 <= size <= 64 * MIB

    @given(st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True), st.binary(), st.lists(st.integers()),
                     st.integers(min_value=-(2**200), max_value=2**200)))
    def test_any_object_as_a_size(self, value: object) -> None:
        """Any object is a valid size or raises InvalidSize."""
        try:
            size = parse_size(value)  # type: ignore[arg-type]
        except InvalidSize:
            return
        assert isinstance(value, int) and size == value and 0 <= size <= UNLIMITED

    @given(st.integers(min_value=0, max_value=UNLIMITED >> 50), st.sampled_from(["K", "Ki", "KB", "KiB", "k", "kib"]),
           st.sampled_from(["", " "]))
    def test_size_spellings_round_trip(self, number: int, unit: str, space: str) -> None:
        """Every spelling of a unit is the same binary multiple."""
        assert number * 1024 == parse_size(f"{number}{space}{unit}")

    @given(st.text())
    @example("1" * 400)
    @example("1e3")
    @example("-1s")
    @example("nan")
    @example(" 5 ms ")
    def test_any_text_as_a_duration(self, text: str) -> None:
        """Any text is a finite duration >= 0 or raises InvalidDuration, never another error."""
        try:
            seconds = parse_duration(text)
        except InvalidDuration:
            return
        assert 0 <= seconds < math.inf

    @given(st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), st.binary(),
                     st.lists(st.integers()), st.integers(min_value=-(2**2000), max_value=2**2000)))
    @example(10**400)
    def test_any_object_as_a_duration(self, value: object) -> None:
        """Any object is a finite duration >= 0 or raises InvalidDuration (a ValueError and a UseroomError)."""
        try:
            seconds = parse_duration(value)  # type: ignore[arg-type]
        except InvalidDuration as err:
            assert isinstance(err, ValueError) and isinstance(err, UseroomError)
            return
        assert isinstance(value, (int, float)) and seconds == float(value) and 0 <= seconds < math.inf

    @given(st.integers(min_value=0, max_value=10**15))
    def test_duration_units_round_trip(self, n: int) -> None:
        """n, "n", "ns" and "nms" are n seconds, n seconds and n/1000 seconds."""
        assert float(n) == parse_duration(n) == parse_duration(str(n)) == parse_duration(f"{n}s")
        assert n / 1000 == parse_duration(f"{n}ms") == parse_duration(f" {n} ms ")

    @given(st.floats(min_value=0, allow_infinity=False, allow_nan=False))
    def test_duration_decimal_text_round_trip(self, seconds: float) -> None:
        """The exact decimal text of any finite float >= 0 parses back to it."""
        text = format(decimal.Decimal(seconds), "f")
        assert seconds == parse_duration(text) == parse_duration(seconds)
