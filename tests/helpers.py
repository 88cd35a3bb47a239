"""Real processes and real groups for tests.

- :class:`Hog`: a child Python process that allocates and touches memory on
  command, after a readiness hand-shake over its stdin/stdout pipes and after
  it has been attached to a group (so every page it touches is charged there).
- :func:`destroy_group`: the safety net behind the fixtures. It uses raw file
  operations, not the library under test, so that a bug in the library
  cannot also break the cleanup.
- :func:`run_as`: run a function in a forked child with another uid, for the
  permission rules.
- :func:`oom_trap`: a small limit with the kernel OOM killer off.
- :func:`wait_until`: poll kernel state that has no notification.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import select
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, Final

import psutil

from useroom.native import NativeWatcher, Plan, SourceKind, Wake

from useroom.cgroup import Group

MIB: Final = 1 << 20
#: Names of the groups the fixtures create start with this, plus the pid of
#: the test session.
GROUP_PREFIX: Final = "useroom-test-"
#: On v2, the leaf a delegated test group's own processes move to (plus the pid).
LEAF_PREFIX: Final = "useroom-leaf-"
#: Where a task sleeps while its memcg is under OOM with the kernel killer off.
OOM_WAIT_CHANNEL: Final = "mem_cgroup_oom_synchronize"

# The child: report readiness, wait for "go", map and touch N MiB (one write
# per page), report, then hold the memory until stdin closes (or exit at once).
_HOG_CODE: Final = """\
import mmap, sys
mib, hold = int(sys.argv[1]), sys.argv[2] == "hold"
out, commands = sys.stdout.buffer, sys.stdin.buffer
out.write(b"ready\\n"); out.flush()
if commands.readline() != b"go\\n":
    sys.exit(3)
size = mib << 20
if size:
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for offset in range(0, size, mmap.PAGESIZE):
        memory[offset] = 1
out.write(b"touched\\n"); out.flush()
if hold:
    commands.read()
"""


class HogError(AssertionError):
    """A hog did not say what it was expected to say in time."""


class Hog:
    """A child process that will allocate and touch *mib* MiB when told to.

    On creation it is started and waits, ready, for :meth:`start`; if *group*
    is given it is attached to it first. After touching its memory it prints
    ``touched`` and, with *hold*, keeps the memory until :meth:`release` (or
    exits at once without it). Use as a context manager, or through the
    ``spawn_hog`` fixture, which kills and reaps it.
    """

    def __init__(self, mib: int, *, group: Group | None = None, hold: bool = True, timeout: float = 30.0) -> None:
        self.mib = mib
        self.popen = subprocess.Popen(
            [sys.executable, "-c", _HOG_CODE, str(mib), "hold" if hold else "exit"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        self._buffer = b""
        try:
            self.expect("ready", timeout)
            if group is not None:
                group.attach(self.pid)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def process(self) -> psutil.Process:
        """A psutil handle (valid while the hog is not reaped)."""
        return psutil.Process(self.pid)

    @property
    def returncode(self) -> int | None:
        """The exit status once reaped (negative: killed by that signal), else None."""
        return self.popen.poll()

    def start(self) -> None:
        """Tell the hog to allocate and touch its memory."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(b"go\n")
        self.popen.stdin.flush()

    def wait_touched(self, timeout: float) -> bool:
        """Wait until the hog has touched all its memory; False if it did not within *timeout*."""
        try:
            self.expect("touched", timeout)
        except HogError:
            return False
        return True

    def release(self) -> None:
        """Let a holding hog exit (closes its stdin)."""
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            self.popen.stdin.close()

    def in_oom_wait(self) -> bool:
        """True while the hog sleeps in the kernel's memcg OOM wait."""
        try:
            with open(f"/proc/{self.pid}/wchan") as wchan:
                return wchan.read() == OOM_WAIT_CHANNEL
        except (FileNotFoundError, ProcessLookupError):
            return False

    def kill(self) -> None:
        """SIGKILL the hog unless it has been reaped (so the pid is still ours)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)

    def wait(self, timeout: float) -> int:
        """Reap the hog and return its exit status; raises subprocess.TimeoutExpired."""
        return self.popen.wait(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Kill and reap the hog, and close the pipes."""
        self.kill()
        try:
            self.popen.wait(timeout)
        finally:
            for pipe in (self.popen.stdin, self.popen.stdout):
                if pipe is not None:
                    pipe.close()

    def expect(self, word: str, timeout: float) -> None:
        """Read the hog's next line and check it is *word*; raise HogError on anything else."""
        line = self._readline(timeout)
        if line != word:
            status = self.popen.poll()
            raise HogError(f"hog {self.pid} said {line!r} instead of {word!r} (exit status {status})")

    def _readline(self, timeout: float) -> str | None:
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def __enter__(self) -> Hog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Hog pid={self.pid} mib={self.mib} status={self.popen.poll()}>"


def oom_trap(group: Group, limit: str | int = "32M") -> Group:
    """Give *group* a small limit and turn its kernel OOM killer off, and return it.

    A task that then needs more than *limit* sleeps in the kernel until the
    OOM is resolved (limit raised, a task killed, the killer re-enabled).
    Only for groups the fixtures destroy, which release such tasks.
    """
    group.set_limit(limit)
    group.set_oom_kill(False)
    return group


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.005) -> bool:
    """Poll *predicate* until it is true; False if *timeout* seconds pass first.

    Only for kernel state that has no notification (a task's wait channel,
    ``under_oom`` after a wakeup); use a hand-shake wherever one exists.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


def destroy_group(path: str, *, below: str, timeout: float = 10.0) -> None:
    """Remove the group directory *path* and everything below it, whatever state it is in.

    For every group of the subtree: re-enable the kernel OOM killer and lift
    the limit (waking tasks asleep in an OOM; on v2: lift memory.high and
    memory.max, thaw, write cgroup.kill), SIGKILL its tasks, then remove
    the directories depth-first; repeat until gone or *timeout*. *path* must
    be strictly below the group directory *below* (the test session's own
    group), so a wrong path can never touch a group outside it.
    """
    if os.path.commonpath([path, below]) != below or os.path.normpath(path) == os.path.normpath(below):
        raise ValueError(f"refusing to destroy {path}: it is not below {below}")
    deadline = time.monotonic() + timeout
    while os.path.isdir(path):
        directories = [directory for directory, _, _ in os.walk(path, topdown=False)]  # children first
        for directory in reversed(directories):
            # v1 files, then v2 files; a version's files are absent on the other.
            _write_quietly(os.path.join(directory, "memory.oom_control"), "0")
            _write_quietly(os.path.join(directory, "memory.limit_in_bytes"), "-1")
            _write_quietly(os.path.join(directory, "memory.high"), "max")
            _write_quietly(os.path.join(directory, "memory.max"), "max")
            _write_quietly(os.path.join(directory, "cgroup.freeze"), "0")
            _write_quietly(os.path.join(directory, "cgroup.kill"), "1")
        for directory in directories:
            for pid in _read_pids(os.path.join(directory, "cgroup.procs")):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for directory in directories:
            try:
                os.rmdir(directory)
            except OSError as err:
                if err.errno not in (errno.ENOENT, errno.EBUSY):
                    raise
        if not os.path.isdir(path):
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"could not remove {path} within {timeout} s")
        time.sleep(0.01)


def _write_quietly(path: str, value: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, value.encode())
    except OSError:
        pass  # best effort: a group being removed refuses writes (ENODEV)
    finally:
        os.close(fd)


def _read_pids(path: str) -> list[int]:
    try:
        with open(path) as procs:
            return [int(line) for line in procs.read().split()]
    except OSError:
        return []


def run_as(
    uid: int,
    function: Callable[[], Any],
    *,
    gid: int | None = None,
    timeout: float = 30.0,
    setup: Callable[[], None] | None = None,
) -> Any:
    """Run *function* in a forked child with real, effective and saved uid *uid*; return its result.

    *setup*, if given, runs in the child before the uids change (as root:
    say, to move the child into a group).

    An exception raised by *function* is re-raised here (pickled across the
    pipe), so ``pytest.raises`` works as if the call were local.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 0
        try:
            os.close(read_end)
            if setup is not None:
                setup()
            os.setgroups([])
            os.setresgid(gid if gid is not None else uid, gid if gid is not None else uid, gid if gid is not None else uid)
            os.setresuid(uid, uid, uid)
            try:
                outcome: tuple[str, Any] = ("result", function())
            except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
                outcome = ("error", err)
            try:
                data = pickle.dumps(outcome)
            except Exception:
                data = pickle.dumps(("error", AssertionError(traceback.format_exc())))
            with os.fdopen(write_end, "wb") as pipe:
                pipe.write(data)
        except BaseException:
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            if not select.select([pipe], [], [], timeout)[0]:
                raise AssertionError(f"run_as child {pid} did not answer within {timeout} s")
            data = pipe.read()
    finally:
        _reap(pid, timeout)
    if not data:
        raise AssertionError(f"run_as child {pid} died without an answer")
    kind, value = pickle.loads(data)
    if kind == "error":
        raise value
    return value


def _reap(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() >= deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.005)


def run_hook_service(group: Group, mode: str, spawn_hog: Callable[..., Hog], *args: str,
                     hog_mib: int = 30) -> tuple[Any, Hog, int]:
    """Runs tests/_hook_service.py (MODE GROUP HOG_PID ARGS...) in ``group`` with a hog
    beside it; returns (its JSON result or None, the hog, its exit status)."""
    hog = spawn_hog(hog_mib, group=group)
    hog.start()
    assert hog.wait_touched(20)
    service = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_hook_service.py")
    with subprocess.Popen([sys.executable, service, mode, group.path, str(hog.pid), *args],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None and proc.stdin is not None
            assert "ready" == proc.stdout.readline().strip()
            proc.stdin.write("go\n")
            proc.stdin.flush()
            out = proc.stdout.read()
            code = proc.wait(60)
        finally:
            if proc.poll() is None:
                proc.kill()
    return (json.loads(out) if out.strip() else None), hog, code


def until_resolved(handler: Any, timeout: float = 60.0) -> list[Any]:
    """A handler's episodes that needed action, up to the first resolved one (waits for it).

    An episode may end ``superseded`` when another task's fault notifies
    again during the check; the one after it finishes the work.
    """
    deadline = time.monotonic() + timeout
    while True:
        acted = [e for e in handler.events if e.outcome != "not_needed"]
        done = [i for i, e in enumerate(acted) if e.outcome == "resolved"]
        left = deadline - time.monotonic()
        if done or left <= 0:
            return acted[: done[0] + 1] if done else acted
        handler.wait_for_events(len(handler.events) + 1, left)


class SoloWatcher(NativeWatcher):
    """A native watcher of one group, for the tests of one group's plans:
    the group's calls are made on the watcher."""

    def __init__(self, *, lock: bool = True) -> None:
        super().__init__(lock=lock)
        self.group = self.add_group()

    def add_source(self, fd: int, kind: SourceKind, wake: Wake = Wake.EVENTFD) -> int:
        return self.group.add_source(fd, kind, wake)

    def arm(self, plan: Plan, *, timeout: float = 5.0) -> int:
        return self.group.arm(plan, timeout=timeout)

    @property
    def armed_id(self) -> int:
        return self.group.armed_id

    def current_episode(self) -> tuple[int, int] | None:
        return self.group.current_episode()

    def run_episode(self, source: int, count: int = 1) -> None:
        self.group.run_episode(source, count)


class ServiceProcess:
    """A test service script in a child process, which prints one line when
    its handler is ready, stops it at a line on its standard input and
    prints its record as JSON; killed at :meth:`close` if still running."""

    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert self.proc.stdout is not None
            self.ready(self.proc.stdout.readline().split())
        except BaseException:
            self.close()
            raise

    def ready(self, words: list[str]) -> None:
        """Check the service's first line (split in words)."""
        assert words and words[0] == "ready", words

    @property
    def pid(self) -> int:
        return self.proc.pid

    def finish(self, timeout: float = 30) -> dict[str, Any]:
        """Stop the handler cleanly; its record (events, errors...)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        out = self.proc.stdout.read()
        assert 0 == self.proc.wait(timeout)
        result: dict[str, Any] = json.loads(out)
        return result

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
