"""The handler's side of the watchdog: :class:`WatchdogLink` starts the
watchdog process of a handler process, tells it of the groups to guard,
feeds it heartbeats, reads its takeovers, and explains a start that
failed. The process itself, and why it exists, is :mod:`useroom.watchdog`;
what the two say to each other, :mod:`useroom.watchdog.protocol`.
"""

from __future__ import annotations

import enum
import errno
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import attrs

from useroom._limits import spawning
from useroom.cgroup import Group
from useroom.exceptions import CgroupPermissionError, UseroomError, WatcherError
from useroom.handler.history import ERRORS_KEPT, Recent
from useroom.handler.stops import StopSentry
from useroom.watchdog.guards import ProcessFd
from useroom.watchdog.protocol import (
    MESSAGE_MAX,
    READY,
    Add,
    Beat,
    GuardSpec,
    LastResort,
    Message,
    Remove,
    SetLimit,
    Stop,
    Takeover,
    decode_record,
    guard_argv,
)

__all__ = [
    "START_GRACE",
    "START_STALL",
    "START_STDERR_TAIL",
    "START_TIMEOUT",
    "STOPPED_STATES",
    "StartFailure",
    "WatchdogLink",
]

#: How long a starting watchdog may go without progress (no CPU time used, no
#: page faulted) before the handler gives up on it, in seconds: it is stuck,
#: not slow.
START_STALL: Final = 20.0
#: The longest a handler waits for its watchdog to report ready, in seconds,
#: however steadily it progresses. Ready takes about 0.3 s on the host, 3-4 s
#: in the emulated (TCG) v2 guest and 8 s or more there while another process
#: competes for its CPU: a fixed deadline near that fails on a loaded machine,
#: the progress check above does not.
START_TIMEOUT: Final = 120.0
#: How long a watchdog that gave up before ready (closed its socket, sent an
#: error) is given to write its error and exit before it is killed, in seconds.
START_GRACE: Final = 10.0
#: How much of a failed watchdog's standard error a start error quotes, in characters.
START_STDERR_TAIL: Final = 2000
#: The state letters (proc(5)) of a process that cannot run until someone
#: continues it: stopped by a signal (SIGSTOP, SIGTSTP), or by a debugger.
STOPPED_STATES: Final = frozenset({"T", "t"})


class KillCause(enum.Enum):
    """Why the handler killed its watchdog (``cause`` of a
    ``watchdog-killed`` record in :attr:`WatchdogLink.history`)."""

    STOPPED = "stopped"
    """It was stopped (SIGSTOP, a debugger): it could act on nothing."""
    SOCKET_FULL = "socket-full"
    """Its control socket was full: it had stopped reading."""
    STOP_TIMEOUT = "stop-timeout"
    """It did not exit in time after it was told to stop."""


def _progress(pid: int) -> tuple[str, str, int] | None:
    """(state letter, wait channel, CPU ticks plus page faults) of a process, or None if it is gone.

    A starting Python either runs (CPU time) or faults its imports in (page
    faults, also while it waits for a slow disk or the guest's 9p): when
    neither count grows, it is stuck, not slow. A zombie still has its stat.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        with open(f"/proc/{pid}/wchan", "rb") as f:
            wchan = f.read().decode("ascii", "replace")
    except OSError:
        wchan = "?"
    # proc(5): after the name (which may contain ")") come state (3), minflt
    # (10), majflt (12), utime (14) and stime (15): field n is fields[n - 3].
    fields = stat[stat.rfind(b")") + 2:].split()
    work = sum(int(fields[n - 3]) for n in (10, 12, 14, 15))
    return fields[0].decode("ascii", "replace"), wchan, work


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


#: Why a SIGKILL ended a watchdog before it was ready, by what the kernel's
#: OOM kill count of the group its memory is charged to ({charged}) says.
_KERNEL_KILLED_ADVICE: Final = ("the kernel's OOM killer killed {kills} task(s) in {charged}, to which the watchdog's "
                                "memory is charged, while it started: give the watchdog room: watchdog_group= a group "
                                "of your own with memory to spare")
_PLAN_KILLED_ADVICE: Final = ("the kernel's OOM killer killed nobody in {charged} meanwhile; the watchdog started in "
                              "the handled group itself (this process is inside it), where the handler's plan may "
                              "take it for a victim at the wall until it is ready: leave it room below the wall "
                              "(about 30 MiB), or run the handler outside the group")
_SENT_KILL_ADVICE: Final = ("the kernel's OOM killer killed nobody in {charged} meanwhile: another process sent the "
                            "SIGKILL")
_UNKNOWN_KILL_ADVICE: Final = ("a SIGKILL with no word is the kernel's OOM killer (the watchdog's memory is charged "
                               "to {charged}: see oom_kill in its memory.events or memory.oom_control) or another "
                               "process; give the watchdog room: watchdog_group= a group of your own with memory to "
                               "spare")
#: Why another signal ended it, and what to do.
_SIGNAL_ADVICE: Final[dict[int, str]] = {
    signal.SIGTERM: "another process stopped it: nothing of useroom sends SIGTERM to a watchdog that is starting",
    signal.SIGINT: "another process interrupted it: nothing of useroom sends SIGINT to a watchdog",
    signal.SIGHUP: "another process hung it up: nothing of useroom sends SIGHUP to a watchdog",
}
#: Signals of a crash: the Python traceback faulthandler wrote (in the standard error) says where.
_CRASH_SIGNALS: Final = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT})
_CRASH_ADVICE: Final = ("it crashed: the traceback faulthandler wrote on its standard error says where; a SIGBUS "
                        "can also mean a file it had mapped (the native core) was rewritten under it, as a rebuild "
                        "does; otherwise report it with that traceback")
_OTHER_SIGNAL_ADVICE: Final = "another process sent it that signal; nothing of useroom does"
#: The watchdog said why (its error, its standard error).
_OWN_ERROR_ADVICE: Final = ("the watchdog's own error says why: fix what it names, or start the handler with "
                            "watchdog=False (then nothing restores the group's settings if this process dies)")
#: It ended with a status and said nothing.
_SILENT_ADVICE: Final = ("it said nothing: run it by hand (python -X faulthandler -m useroom watchdog GROUP "
                         "--delay 2s) to see it fail, and report that")
#: Stuck, by what it was doing when the handler gave up.
_STOPPED_ADVICE: Final = ("it was stopped (SIGSTOP or a debugger): something stops processes it did not start; "
                          "let the watchdog run")
_MEMORY_WAIT_ADVICE: Final = ("it was waiting for memory: {charged}, to which its memory is charged, is at its limit "
                              "or memory.high; give the watchdog room: watchdog_group= a group of your own with "
                              "memory to spare")
_STUCK_ADVICE: Final = ("it made no progress in the kernel wait above: if the machine is not overloaded, report "
                        "this message")
_TIMEOUT_ADVICE: Final = ("it kept working without reaching ready: the machine is too slow or overloaded for a "
                          "handler to start; retry when it is less busy")
#: Wait channels of a task waiting for memory: the memcg throttle and reclaim (v1 and v2).
_MEMORY_WAITS: Final = ("mem_cgroup", "memory_high", "throttle", "reclaim", "oom")


@attrs.frozen
class StartFailure:
    """How a watchdog that never reported ready ended: what its start error explains."""

    #: What the handler saw first: ``exited`` (the process ended), ``closed``
    #: (its control socket closed), ``sent`` (a message other than ready,
    #: its error record), ``stalled`` (no progress for :data:`START_STALL`)
    #: or ``timeout`` (:data:`START_TIMEOUT` passed).
    seen: str
    #: As :mod:`subprocess` has it: the exit status, or minus the signal that ended it.
    returncode: int
    #: The end of its standard error.
    stderr: str
    #: What it sent instead of ready (its error, when it reported one).
    message: str
    #: Seconds from the spawn until the handler saw the failure.
    waited: float
    #: The handler killed it (after a stall, the timeout, or the grace to exit).
    killed: bool
    #: When the handler gave up on a stuck one: its state letter and wait channel.
    state: tuple[str, str] | None = None

    def describe(self) -> str:
        """What happened."""
        if self.killed and self.seen == "stalled":
            assert self.state is not None
            return (f"no ready and no progress for {START_STALL:g} s (state {self.state[0]}, waiting in "
                    f"{self.state[1] or 'no kernel wait'}) after {self.waited:.1f} s; the handler killed it")
        if self.killed and self.seen == "timeout":
            return f"no ready after {self.waited:.1f} s although it kept working; the handler killed it"
        if self.seen == "sent":
            what = f"it reported {self.message!r} instead of ready"
        elif self.seen == "closed" and self.killed:
            what = "it closed its control socket before ready"
        else:
            what = "it ended before ready"
        if self.killed:
            return what + f" and did not exit within {START_GRACE:g} s; the handler killed it"
        if self.returncode < 0:
            return what + f": killed by {_signal_name(-self.returncode)} after {self.waited:.1f} s"
        return what + f": exit status {self.returncode} after {self.waited:.1f} s"

    def said(self) -> str:
        """Its standard error, or that it wrote nothing there."""
        if self.stderr:
            return f"Its standard error:\n{self.stderr}"
        return "It wrote nothing on its standard error."

    def advice(self, charge: _Charge) -> str:
        """What to do about it, given where its memory was charged."""
        charged = charge.name
        if self.killed and self.seen == "stalled":
            assert self.state is not None
            letter, wchan = self.state
            if letter in ("T", "t"):
                return _STOPPED_ADVICE
            if any(word in wchan for word in _MEMORY_WAITS):
                return _MEMORY_WAIT_ADVICE.format(charged=charged)
            return _STUCK_ADVICE
        if self.killed and self.seen == "timeout":
            return _TIMEOUT_ADVICE
        if not self.killed and self.returncode == -signal.SIGKILL:
            kills = charge.kernel_kills()
            if kills is None:
                return _UNKNOWN_KILL_ADVICE.format(charged=charged)
            if kills:
                return _KERNEL_KILLED_ADVICE.format(kills=kills, charged=charged)
            return (_PLAN_KILLED_ADVICE if charge.inside else _SENT_KILL_ADVICE).format(charged=charged)
        if not self.killed and self.returncode < 0:
            number = -self.returncode
            if number in _CRASH_SIGNALS:
                return _CRASH_ADVICE
            return _SIGNAL_ADVICE.get(number, _OTHER_SIGNAL_ADVICE)
        return _OWN_ERROR_ADVICE if self.stderr or self.message else _SILENT_ADVICE


@attrs.frozen
class _Charge:
    """The group a starting watchdog's memory is charged to, and the kernel's
    OOM kill count there before it started: a SIGKILL with that count
    unchanged was not the kernel's OOM killer."""

    #: For people: its path, or what it is.
    name: str
    group: Group | None
    #: A handled group itself or below: the handler's own plan sees the watchdog there.
    inside: bool
    kills_before: int | None

    @classmethod
    def of(cls, place: Group | None, handled: Sequence[Group]) -> _Charge:
        """Where a watchdog spawned into *place* (None: this process's group) is charged."""
        group = place
        try:
            if group is None:
                group = Group.current()
            kills: int | None = group.oom_control().oom_kill
        except (OSError, UseroomError):
            kills = None
        if group is None:
            return cls("this process's group", None, False, None)
        here = group.relpath.rstrip("/") + "/"
        inside = any(here.startswith(h.relpath.rstrip("/") + "/") for h in handled)
        return cls(group.relpath if place is not None else f"this process's group {group.relpath}", group,
                   inside, kills)

    def kernel_kills(self) -> int | None:
        """Tasks the kernel's OOM killer killed there since; None if unknown."""
        if self.group is None or self.kills_before is None:
            return None
        try:
            return self.group.oom_control().oom_kill - self.kills_before
        except (OSError, UseroomError):
            return None


def _reported(message: bytes) -> str:
    """The error a watchdog sent instead of ready (an ``error`` record), or the message itself."""
    record = decode_record(message)
    if record is not None and "error" in record:
        return str(record["error"])
    return message.decode(errors="replace")[:START_STDERR_TAIL]


class _Launch:
    """A watchdog between its spawn and its ready: its control socket, its
    pidfd and its standard error, read together.

    Whatever it says before it fails is kept (its stderr is read as it comes,
    so a chatty one never blocks on a full pipe); its exit is seen on the
    pidfd even if its socket's EOF never comes; a failure is seen only once
    it is certain, and the process is given time to finish saying why.
    """

    def __init__(self, popen: subprocess.Popen[bytes], sock: socket.socket, pidfd: ProcessFd) -> None:
        assert popen.stderr is not None
        self.popen = popen
        self.sock = sock
        self._pidfd = pidfd.fileno()
        self.started = time.monotonic()
        self.message = b""
        self.answered = False  # a message or EOF on the socket
        self.exited = False
        self._stderr = bytearray()
        self._err_fd = popen.stderr.fileno()
        # poll(), not select(): a handler in a process with many fds may get numbers above FD_SETSIZE.
        self._poll = select.poll()
        for fd in (sock.fileno(), self._pidfd, self._err_fd):
            self._poll.register(fd, select.POLLIN)

    @property
    def stderr(self) -> str:
        return self._stderr.decode(errors="replace").strip()[-START_STDERR_TAIL:]

    def _pump(self, timeout: float) -> None:
        """Wait up to *timeout* seconds for any of the three; take what is there."""
        for fd, _ in self._poll.poll(max(0, int(timeout * 1000)) + 1):
            if fd == self._err_fd:
                chunk = os.read(fd, 65536)
                if chunk:
                    self._stderr += chunk
                    del self._stderr[:-65536]
                else:  # EOF: its last writer (the watchdog) has exited
                    self._poll.unregister(fd)
                    self._err_fd = -1
            elif fd == self._pidfd:
                self._poll.unregister(fd)  # level-triggered: stays readable
                self.exited = True
            elif not self.answered:
                # SOCK_SEQPACKET: one message per recv; b"" at EOF.
                try:
                    self.message = self.sock.recv(4096)
                except OSError:
                    self.message = b""
                self.answered = True
                self._poll.unregister(fd)

    def wait_ready(self) -> str | None:
        """None once it reported ready; else what the handler saw instead (see :attr:`StartFailure.seen`)."""
        mark, progressed = None, self.started
        while True:
            now = time.monotonic()
            if now - self.started >= START_TIMEOUT:
                return "timeout"
            self._pump(min(1.0, START_TIMEOUT - (now - self.started)))
            if self.answered:
                if self.message == READY:
                    return None
                return "sent" if self.message else "closed"
            if self.exited:
                return "exited"
            now = time.monotonic()
            seen = _progress(self.popen.pid)
            work = seen[2] if seen is not None else None
            if work != mark:
                mark, progressed = work, now
            elif now - progressed >= START_STALL:
                return "stalled"

    def end(self, seen: str) -> StartFailure:
        """After a failure: let it finish saying why and exit (a stuck one is
        killed at once), read the rest of its standard error, reap it."""
        waited = time.monotonic() - self.started
        state = None
        if seen in ("stalled", "timeout"):
            progress = _progress(self.popen.pid)
            state = (progress[0], progress[1]) if progress is not None else ("?", "?")
        else:
            # It closed its socket or sent its error on its way out: a
            # traceback may still be on its way to the pipe.
            deadline = time.monotonic() + START_GRACE
            while not self.exited and time.monotonic() < deadline:
                self._pump(deadline - time.monotonic())
        killed = False
        if not self.exited:
            self.popen.kill()
            killed = True
        # Its standard error ends when it exits; nothing else holds the pipe.
        deadline = time.monotonic() + START_GRACE
        while self._err_fd >= 0 and time.monotonic() < deadline:
            self._pump(deadline - time.monotonic())
        returncode = self.popen.wait()
        killed = killed and returncode == -signal.SIGKILL
        return StartFailure(seen, returncode, self.stderr, _reported(self.message) if self.message else "",
                            waited, killed, state)


def _names(groups: Sequence[Group]) -> str:
    """The groups, for an error message: the first three and how many more."""
    if not groups:
        return "(no group yet)"
    names = ", ".join(g.relpath for g in groups[:3])
    return names if len(groups) <= 3 else f"{names} and {len(groups) - 3} more"


class WatchdogLink:
    """A handler process's watchdog process: started, told of the groups to
    guard and their limits, fed heartbeats, read for takeovers, restarted
    if it dies, stopped with the handler.

    One process guards every group added and not removed. :meth:`add`,
    :meth:`remove` and :meth:`set_limit` work before :meth:`start` (the
    groups go on its command line) and while it runs (as messages); a
    process (re)started by :meth:`start` guards every group the link holds
    before it reports ready. It may be started with no group: it waits for
    ``add`` messages. One pidfd of this process, and the declared threads,
    serve all its guards. The methods may be called from several threads.

    The process is started through ``/bin/sh``, which moves itself into
    ``place`` (a group outside the handled ones) before it becomes Python,
    so none of the watchdog's memory is charged to a handled group. With
    ``place`` None (cgroup v2, where the parent of a group cannot hold
    processes) it stays in this process's group.

    ``pidfd`` (a :class:`ProcessFd`, None when no process runs) and ``sock``
    are for the caller's epoll set: the pidfd is readable once the process
    has exited (then :meth:`reap`, and :meth:`start` again), the socket
    when it reported something (then :meth:`receive`).
    """

    def __init__(self, place: Group | None, *, delay: float, handler_tids: Sequence[int], heartbeat_timeout: float,
                 helper_tids: Sequence[int] = (), log: str | None = None,
                 spawned: Callable[[int], None] | None = None,
                 stopped: Callable[[], None] | None = None) -> None:
        self.place = place
        self.delay = delay
        self.handler_tids = tuple(handler_tids)
        self.helper_tids = tuple(helper_tids)
        self.heartbeat_timeout = heartbeat_timeout
        self.log = log
        #: Called with each watchdog's pid as soon as it exists, before it is
        #: ready: a handler inside a handled group must spare it from then on
        #: (on v2 it starts in the handled group, where a plan armed
        #: meanwhile would take it, a python3 of 20 MiB or more, for a victim).
        self.spawned = spawned
        #: Called (from a thread of its own) each time the running process
        #: stops (SIGSTOP): the caller looks (:meth:`stopped`) and
        #: kills it (see :mod:`useroom.handler.stops`).
        self.on_stop = stopped
        self.restarts = 0
        #: What happened to the watchdog itself (exits, restarts, a kill for
        #: not reading) and the groups it gave up (``add-failed``, ``done``
        #: with ``gone``), one dict each.
        #: The newest ERRORS_KEPT (``history.dropped``: how many older ones made room).
        self.history: Recent[dict[str, Any]] = Recent(ERRORS_KEPT)
        self.popen: subprocess.Popen[bytes] | None = None
        self.pidfd: ProcessFd | None = None
        self.sock: socket.socket | None = None
        self._sentry: StopSentry | None = None
        # Held while the groups, or what the running process was told of
        # them, change: a start, add, remove, set_limit, receive or close.
        self._lock = threading.Lock()
        self._specs: dict[str, GuardSpec] = {}  # by group directory
        self._groups: dict[str, Group] = {}  # the same keys
        self._next_key = 0
        self._beat_ns = 0  # time.monotonic_ns() of the last heartbeat sent

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def groups(self) -> tuple[Group, ...]:
        """The groups the watchdog guards (or will, once started), in the order they were added."""
        with self._lock:
            return tuple(self._groups.values())

    def add(self, group: Group, *, limit: int, kill_enabled: bool, saved: tuple[int, int] | None = None) -> None:
        """Guard *group* from now on: the limit the handler set (restored if
        it dies with a grant open), the kernel OOM killer setting before the
        handler (put back if it dies), and on cgroup v2 ``saved``, the
        group's (``memory.high``, ``memory.max``) before the handler.

        Raises ValueError if the group is guarded already. A group the
        running process cannot guard is reported (an ``add-failed`` record
        in :attr:`history` and the log) and dropped.
        """
        with self._lock:
            if group.path in self._specs:
                raise ValueError(f"the watchdog guards {group.relpath} already")
            spec = GuardSpec(group.path, self._next_key, limit, kill_enabled, saved)
            self._next_key += 1
            self._specs[group.path] = spec
            self._groups[group.path] = group
            self._tell(Add(spec))

    def remove(self, group: Group) -> None:
        """Stop guarding *group*: the watchdog closes its fds for it and
        leaves its settings alone (the caller restored them). A group not
        guarded (never added, or dropped) is ignored."""
        with self._lock:
            if self._specs.pop(group.path, None) is None:
                return
            del self._groups[group.path]
            self._tell(Remove(group.path))

    def set_limit(self, group: Group, limit: int) -> None:
        """The limit the handler set for *group* now (restored if the handler
        dies with a grant open). A group not guarded is ignored."""
        with self._lock:
            spec = self._specs.get(group.path)
            if spec is None:
                return
            self._specs[group.path] = attrs.evolve(spec, limit=limit)
            self._tell(SetLimit(group.path, limit))

    def _tell(self, message: Message) -> None:
        """Send a change of the groups to the running process (the lock held)."""
        sock = self.sock
        if sock is None:
            return  # not running: the next start passes it on the command line
        try:
            sock.send(message.encode(), socket.MSG_DONTWAIT)
        except BlockingIOError:
            # Its socket is full: it has stopped reading, and its groups
            # would fall behind the link's. Killed, it is restarted by the
            # caller (the pidfd) with the link's groups on its command line.
            assert self.popen is not None
            self._note_kill(self.popen.pid, KillCause.SOCKET_FULL, "its control socket is full")
            self.popen.kill()
        except OSError:
            pass  # gone: the pidfd tells the caller, who restarts it with every group

    def command(self, control_fd: int) -> list[str]:
        """The watchdog's command line, given the number of its end of the
        control socket; the groups are the link's now.

        ``-X faulthandler``: a crash before ready writes its Python traceback
        on the standard error the start error quotes.
        """
        argv = [
            sys.executable, "-X", "faulthandler", "-m", "useroom", "watchdog",
            "--delay", repr(self.delay), "--control-fd", str(control_fd),
            "--handler-pid", str(os.getpid()), "--heartbeat-timeout", repr(self.heartbeat_timeout),
        ]
        for tid in self.handler_tids:
            argv += ["--tid", str(tid)]
        for tid in self.helper_tids:
            argv += ["--helper-tid", str(tid)]
        argv += guard_argv(self._specs.values())
        if self.log is not None:
            argv += ["--log", self.log]
        return argv

    def start(self) -> None:
        """Start the process and wait until it guards the link's groups.

        It has :data:`START_TIMEOUT` seconds, and may go :data:`START_STALL`
        seconds without progress. Otherwise raises
        :class:`~useroom.WatcherError` saying how it ended (exit status or
        signal, its error and standard error) and what to do about it, once
        the process is reaped; :class:`~useroom.CgroupPermissionError` if it
        could not move into ``place``. Groups added, removed or given a new
        limit meanwhile are sent to it once it is ready.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            with self._lock:
                told = dict(self._specs)  # what its command line says
                groups = list(self._groups.values())
                argv = self.command(theirs.fileno())
            charge = _Charge.of(self.place, groups)
            # /bin/sh moves itself into the place before it becomes Python;
            # with no place (v2, the handler inside the group) it stays here.
            enter = [] if self.place is None else [
                "/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', os.path.join(self.place.path, self.place.procs_file)]
            with spawning("the watchdog process"):
                popen = subprocess.Popen([*enter, *argv], pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, start_new_session=True)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        theirs.close()  # the watchdog's copy is the only one: its exit is EOF here
        assert popen.stderr is not None
        pidfd: ProcessFd | None = None
        try:
            pidfd = ProcessFd(popen.pid)
            if self.spawned is not None:
                self.spawned(popen.pid)
            launch = _Launch(popen, ours, pidfd)
            seen = launch.wait_ready()
            if seen is not None:
                raise self._start_error(launch.end(seen), charge, groups)
            sentry = StopSentry(popen.pid, pidfd.fileno(), self.on_stop) if self.on_stop is not None else None
        except BaseException:
            if popen.poll() is None:
                popen.kill()
            popen.wait()
            if pidfd is not None:
                pidfd.close()
            popen.stderr.close()
            ours.close()
            raise
        popen.stderr.close()  # from now on it logs to its own log
        ours.setblocking(False)
        with self._lock:
            self.popen, self.pidfd, self.sock = popen, pidfd, ours
            self._sentry = sentry
            self._catch_up(told)

    def _catch_up(self, told: dict[str, GuardSpec]) -> None:
        """Send what changed since the command line was made (the lock held)."""
        for path, spec in told.items():
            now = self._specs.get(path)
            if now is None or now.key != spec.key:
                self._tell(Remove(path))
        for path, spec in self._specs.items():
            before = told.get(path)
            if before is None or before.key != spec.key:
                self._tell(Add(spec))
            elif before.limit != spec.limit:
                assert spec.limit is not None  # the link gives every group one
                self._tell(SetLimit(path, spec.limit))

    def _start_error(self, failure: StartFailure, charge: _Charge, groups: Sequence[Group]) -> UseroomError:
        if "Permission denied" in failure.stderr and self.place is not None:
            return CgroupPermissionError(
                errno.EACCES, f"cannot start the watchdog in {self.place.relpath}: {failure.stderr}",
                rule="the watchdog moves itself into a group outside the handled ones, which needs "
                     "write access to that group's cgroup.procs",
                advice="pass watchdog_group= a group of your own outside the handled groups, "
                       "or have the administrator delegate the handled group's parent")
        return WatcherError(f"the watchdog of {_names(groups)} did not start: {failure.describe()}. "
                            f"What to do: {failure.advice(charge)}. {failure.said()}")

    def send(self, message: bytes) -> None:
        """Send *message* (an encoded :mod:`~useroom.watchdog.protocol`
        message) if the process runs; dropped if its socket is full (a
        heartbeat, a last-resort note: nothing it must act on later)."""
        sock = self.sock
        if sock is None:
            return
        try:
            sock.send(message, socket.MSG_DONTWAIT)
        except OSError:
            pass  # gone or full: the pidfd tells the handler

    def beat(self) -> None:
        """Sends a heartbeat, unless one went less than a sixth of
        ``heartbeat_timeout`` ago: each one wakes the watchdog process, and
        the manager calls this after every wake-up of its own, which in an
        OOM storm means hundreds a second. An idle handler need not beat:
        the watchdog counts silence from the start of an episode."""
        now = time.monotonic_ns()
        if now - self._beat_ns < self.heartbeat_timeout * 1e9 / 6:
            return
        self._beat_ns = now
        self.send(Beat().encode())

    def last_resort(self, note: Mapping[str, Any]) -> None:
        """The handler found nothing left to kill: the watchdog logs *note*
        (``last-resort``), which outlives the handler's process."""
        self.send(LastResort(note).encode())

    def receive(self) -> list[Takeover]:
        """Takeovers the watchdog reported since the last call. A group it
        could not guard (``add-failed``) or that was removed from the
        hierarchy (``done``, ``gone``) is dropped from :attr:`groups` (a
        restart would fail on it) and its record kept in :attr:`history`."""
        out = []
        while True:
            sock = self.sock
            if sock is None:
                break
            try:
                data = sock.recv(MESSAGE_MAX)
            except OSError:  # nothing more (BlockingIOError), or gone
                break
            if not data:
                break
            record = decode_record(data)
            if record is None:
                continue  # cut at MESSAGE_MAX: an error record with a long traceback
            event = record.get("event")
            if event == "takeover":
                out.append(Takeover.from_dict(record))
            elif event == "add-failed" or (event == "done" and record.get("gone")):
                self._drop(record)
        return out

    def _drop(self, record: dict[str, Any]) -> None:
        with self._lock:
            path = record.get("path")
            spec = self._specs.get(path) if isinstance(path, str) else None
            if spec is not None and spec.key == record.get("key"):  # not a later add of the same group
                del self._specs[spec.path]
                del self._groups[spec.path]
            self.history.append(record)

    def exited(self) -> bool:
        pidfd = self.pidfd
        return pidfd is None or pidfd.exited

    def stopped(self) -> bool:
        """Whether the running process is stopped (SIGSTOP, a debugger): it
        cannot hand an episode to the kernel, nor read its socket, until
        someone continues it. False if none runs or it has exited."""
        popen = self.popen
        if popen is None:
            return False
        progress = _progress(popen.pid)
        return progress is not None and progress[0] in STOPPED_STATES

    def kill(self, cause: KillCause, why: str) -> None:
        """Kill the running process (a ``watchdog-killed`` record in
        :attr:`history` gives the *cause* and says *why*). Its pidfd then
        wakes the caller, who reaps it and starts another with every group
        (:meth:`reap`, :meth:`start`). SIGKILL ends a stopped process too."""
        with self._lock:
            popen = self.popen
            if popen is None or popen.poll() is not None:
                return
            self._note_kill(popen.pid, cause, why)
            popen.kill()

    def _note_kill(self, pid: int, cause: KillCause, why: str) -> None:
        """The ``watchdog-killed`` record of :attr:`history`."""
        self.history.append({"event": "watchdog-killed", "pid": pid, "cause": cause.value, "why": why,
                             "at_ns": time.monotonic_ns()})

    def reap(self) -> dict[str, Any]:
        """After the process exited: close its fds and say how it ended."""
        assert self.popen is not None
        code = self.popen.wait()
        record = {"event": "watchdog-exited", "pid": self.popen.pid, "returncode": code,
                  "at_ns": time.monotonic_ns()}
        self.history.append(record)
        self._close()
        return record

    def _close(self) -> None:
        """After the process exited: its sentry ends, its fds close."""
        with self._lock:
            pidfd, self.pidfd = self.pidfd, None
            sock, self.sock = self.sock, None
            sentry, self._sentry = self._sentry, None
            self.popen = None
        if sentry is not None:
            sentry.close()
        if pidfd is not None:
            pidfd.close()
        if sock is not None:
            sock.close()

    def stop(self, timeout: float = 5.0) -> None:
        """Tells the process to stop and reaps it: it has ``timeout``
        seconds to exit, then it is killed; one that is stopped (SIGSTOP, a
        debugger) is killed at once. Whatever happens meanwhile (an error,
        an interrupt), the process is waited for before this returns: no
        zombie is left behind."""
        popen = self.popen
        if popen is None:
            return
        try:
            if self.stopped():
                # It would not read the stop before someone continued it:
                # no point in waiting for it.
                self.kill(KillCause.STOPPED, "it was stopped (SIGSTOP or a debugger) when the handler stopped")
            self.send(Stop().encode())
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._note_kill(popen.pid, KillCause.STOP_TIMEOUT, f"it did not stop within {timeout:g} s")
        finally:
            if popen.poll() is None:
                popen.kill()
            popen.wait()
            self._close()

