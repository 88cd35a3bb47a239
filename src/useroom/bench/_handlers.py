"""Handler processes: started inside the group, ready on a ``ready`` line, stopped by SIGTERM.

All three handler variants share this protocol: the process joins the group
itself, prints a line ``ready`` on stdout once it is armed, and on SIGTERM
stops and reports. The naive handler reports one JSON line on stdout; the
useroom handlers write their event list to a JSON file.

A handler's stderr is a pipe, copied to a file by a thread of this process
(:class:`StderrCopy`), as a terminal or the journal would take it. A file
the handler wrote itself would have its pages charged to the group it
handles (cgroup v1 charges page cache to the group of the writer's mm), and
at the limit the workers' reclaim would meet those pages dirty and wait for
their writeback: with one log record per episode, that made the standalone
handler's episodes five times as long (docs/benchmarks.md, "The handler's
log").
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Any, Final

import attrs

from useroom.bench._sandbox import BenchError, Child, Lab, ScratchGroup, die_with_parent

__all__ = ["HandlerProcess", "HandlerReport", "StderrCopy", "naive_argv", "service_argv", "standalone_argv"]

NAIVE_SCRIPT: Final = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_naive.py")
_TAIL_BYTES: Final = 4000
#: Lines of a handler's stderr quoted in a problem (the end of a traceback).
_TAIL_LINES: Final = 6
#: How long closing waits for the copy of a handler's stderr to reach its end.
_COPY_JOIN_S: Final = 5.0


def naive_argv(group: ScratchGroup, pick: str) -> list[str]:
    # -I: no user site, no environment, no script directory on sys.path: the
    # naive handler is plain Python with the standard library only.
    return [sys.executable, "-I", NAIVE_SCRIPT, group.path, pick]


def standalone_argv(group: ScratchGroup, events_path: str, reserve: int) -> list[str]:
    return [sys.executable, "-m", "useroom", "handle", group.path, "--join", "--policy", "kill-largest",
            "--reserve", str(reserve), "--events-out", events_path]


def service_argv(group: ScratchGroup, events_path: str, reserve: int) -> list[str]:
    return [sys.executable, "-m", "useroom.bench", "_service", group.path, events_path, str(reserve)]


@attrs.frozen
class HandlerReport:
    """What a handler process said about itself when it stopped."""

    #: Bytes the handler says it locked (useroom handlers; None if not reported).
    locked_bytes: int | None = None
    #: Its event records, as decoded from JSON (useroom handlers).
    events: tuple[dict[str, Any], ...] = ()
    #: The naive handler's counters (wakeups, kills, failures, errors).
    summary: dict[str, Any] | None = None
    #: Why no report could be read, if so.
    problem: str | None = None
    #: The errors the handler noted (``handler.errors``, as repr strings).
    errors: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, data: Any) -> HandlerReport:
        """Accept ``{"locked_bytes": int, "events": [...]}`` or a bare list of events."""
        if isinstance(data, list):
            return cls(events=tuple(data))
        if isinstance(data, dict) and isinstance(data.get("events"), list):
            locked = data.get("locked_bytes")
            errors = data.get("errors")
            return cls(locked_bytes=locked if isinstance(locked, int) else None, events=tuple(data["events"]),
                       errors=tuple(str(e) for e in errors) if isinstance(errors, list) else ())
        return cls(problem=f"unexpected JSON shape: {type(data).__name__} {str(data)[:200]}")


class StderrCopy:
    """Copies what a child writes to a pipe into a file, from a thread of
    this process, until the pipe's end; the thread owns the pipe and the file
    and closes both there. The file stays current (unbuffered) while the
    child runs."""

    def __init__(self, pipe: IO[bytes], path: str) -> None:
        self._file = open(path, "wb", buffering=0)  # the thread owns it, and closes it at the end
        self._thread = threading.Thread(target=self._copy, args=(pipe, self._file),
                                        name="useroom-bench-stderr", daemon=True)
        self._thread.start()

    @staticmethod
    def _copy(pipe: IO[bytes], file: IO[bytes]) -> None:
        with pipe, file:
            fd = pipe.fileno()
            while chunk := os.read(fd, 65536):
                file.write(chunk)

    def join(self, timeout: float) -> bool:
        """Wait for the pipe's end (every writer gone); whether it came within *timeout* s."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


@attrs.define(eq=False)
class HandlerProcess:
    """One handler process of a block: started, made ready, stopped, read."""

    argv: list[str]
    child: Child
    popen: subprocess.Popen[bytes]
    stderr_path: str
    events_path: str | None
    stderr_copy: StderrCopy
    output: bytearray = attrs.field(factory=bytearray)
    ready_ns: int | None = None

    @classmethod
    def start(cls, lab: Lab, argv: list[str], *, stderr_path: str, events_path: str | None) -> HandlerProcess:
        popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, close_fds=True,
            preexec_fn=die_with_parent,
        )
        assert popen.stderr is not None
        copy = StderrCopy(popen.stderr, stderr_path)
        try:
            child = lab.adopt(popen.pid, popen)
        except BaseException:
            popen.kill()
            popen.wait()
            _close(popen.stdout)
            copy.join(_COPY_JOIN_S)
            raise
        return cls(argv, child, popen, stderr_path, events_path, copy)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_ready(self, group: ScratchGroup, timeout: float) -> None:
        """Wait for the ``ready`` line, then check the handler really is in *group*."""
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while not _has_ready_line(self.output):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise BenchError(f"handler {self.argv[1:4]} printed no 'ready' within {timeout:g} s"
                                 f"{self.tail_text()}")
            chunk = os.read(fd, 65536)
            if not chunk:
                self.child.wait(5.0)
                raise BenchError(f"handler {self.argv[1:4]} exited before 'ready' "
                                 f"(status {self.child.status}){self.tail_text()}")
            self.output += chunk
        self.ready_ns = time.monotonic_ns()
        os.set_blocking(fd, False)
        if self.pid not in group.procs():
            raise BenchError(f"handler {self.pid} said ready but is not in {group.path}")

    def drain(self) -> None:
        """Read whatever the handler wrote to stdout so far (it must never block on a full pipe)."""
        if self.popen.stdout is None or self.popen.stdout.closed:
            return
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.popen.stdout.fileno(), 65536):
                self.output += chunk

    def alive(self) -> bool:
        return not self.child.exited()

    def stop(self, timeout: float) -> bool:
        """SIGTERM the handler and wait up to *timeout* s; True if it exited by itself."""
        if not self.child.reaped:
            self.child.kill(signal.SIGTERM)
        stopped = self.child.wait(timeout)
        if stopped:
            self._finish_output()
        return stopped

    def _finish_output(self) -> None:
        self.drain()
        _close(self.popen.stdout)
        # The handler's last lines (a traceback) are in the file before anyone reads it.
        self.stderr_copy.join(_COPY_JOIN_S)

    def close(self) -> None:
        """Kill (if still running) and reap; idempotent."""
        if not self.child.reaped:
            self.child.kill()
            self.child.wait(10.0)
        self._finish_output()

    def report_from_stdout(self) -> HandlerReport:
        """The naive handler's JSON line after ``ready``."""
        lines = [line for line in bytes(self.output).split(b"\n") if line.strip()]
        for line in reversed(lines):
            if line.startswith(b"{"):
                try:
                    return HandlerReport(summary=json.loads(line))
                except ValueError:
                    break
        return HandlerReport(problem=f"no summary line on stdout{self.tail_text()}")

    def report_from_file(self) -> HandlerReport:
        """The useroom handlers' JSON events file."""
        assert self.events_path is not None
        try:
            with open(self.events_path, "rb") as file:
                data = json.load(file)
        except (OSError, ValueError) as err:
            return HandlerReport(problem=f"could not read {self.events_path}: {err}{self.tail_text()}")
        return HandlerReport.from_json(data)

    def stderr_tail(self) -> str:
        try:
            with open(self.stderr_path, "rb") as file:
                file.seek(0, os.SEEK_END)
                file.seek(max(file.tell() - _TAIL_BYTES, 0))
                return file.read().decode(errors="replace")
        except OSError:
            return ""

    def tail_text(self) -> str:
        """The end of the handler's stderr, to quote in a problem ("" if it wrote none)."""
        lines = self.stderr_tail().strip().splitlines()[-_TAIL_LINES:]
        return "; its stderr ends:\n" + "\n".join(f"    {line}" for line in lines) if lines else ""


def _has_ready_line(output: bytearray) -> bool:
    return any(line.strip() == b"ready" for line in bytes(output).split(b"\n")[:-1])


def _close(stream: IO[bytes] | None) -> None:
    if stream is not None:
        stream.close()
