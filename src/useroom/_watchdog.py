"""The watchdog: a process outside the handled group that never lets it sleep forever.

It stands in for kernel interfaces that were proposed and never merged (see
:mod:`useroom._declare` and docs/design.md):

- **delay** (Rientjes' ``memory.oom_delay_millisecs``): when a group stays
  under OOM longer than ``delay``, the watchdog enables the kernel OOM
  killer for it until ``under_oom`` reads 0, then puts the setting back.
  Like the proposal, the delay re-arms on each episode.
- **declared handler** (Weiner): when the group's declared handler has
  exited, is stopped, has its native watcher asleep in the memcg OOM wait
  (``mem_cgroup_oom_synchronize`` in its wait channel), has its manager
  thread asleep there while the headroom grant it was given is open (the
  grant is used up: the plan waits for a thread that waits for memory), or
  has sent no heartbeat for ``heartbeat_timeout``, the watchdog hands the
  episode to the kernel at once instead of waiting out the delay. The
  manager asleep in the OOM wait with no grant open is the in-group design
  at work (the native watcher acts for it), not a fault.
- **reserve** (Rientjes' ``memory.oom_reserve_in_bytes``): the handler's
  headroom grant raises the limit; if the handler dies with a grant open,
  the watchdog restores the limit as soon as usage fits under it.

It gets the OOM notification through its own eventfd, like the handler, and
runs in a group of the user's own tree outside the handled one, so the OOM
it watches never makes it wait. A :class:`~useroom.Handler` starts one when
it arms (``watchdog=True``, the default) and restarts it if it dies; it can
also run on its own to guard several groups::

    useroom watchdog /sys/fs/cgroup/memory/.../app --delay 2s
    python -m useroom.watchdog GROUP [GROUP ...] --delay 500ms --log takeovers.jsonl

Each takeover is one JSON line in the log (and, for a handler's watchdog,
an :class:`~useroom.OomEvent` with ``takeover`` set in ``handler.events``).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import IO, Any, Final

import attrs

from useroom import _native
from useroom._cgroup import EventRegistration, Group, OomControl
from useroom._units import UNLIMITED, parse_duration
from useroom.exceptions import CgroupPermissionError, GroupGone, UseroomError, WatcherError

__all__ = ["DEFAULT_DELAY", "Takeover", "Watchdog", "WatchdogLink", "main"]

#: How long an OOM may last before the watchdog hands it to the kernel, in seconds.
DEFAULT_DELAY: Final = 2.0
#: How often the watchdog looks at a group while it is under OOM, in seconds.
POLL_INTERVAL: Final = 0.005
#: After a takeover, ``under_oom`` at 0 this long (with no kill) ends the episode, in ns.
SETTLE_NS: Final = 100_000_000
#: How long the manager thread must be seen asleep in the OOM wait with a grant
#: open before it counts as caught there (the grant's raise wakes it; it may
#: not have run yet when the watchdog looks).
CAUGHT_NS: Final = 20_000_000
#: The wait channel of a task asleep in a v1 memcg OOM wait.
OOM_WAIT_CHANNEL: Final = "mem_cgroup_oom_synchronize"
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

#: Why the watchdog took an episode over.
REASONS: Final = ("delay", "handler-exited", "handler-stopped", "handler-in-oom-wait", "heartbeat")


@attrs.frozen
class Takeover:
    """One episode the watchdog handed to the kernel.

    Times are CLOCK_MONOTONIC nanoseconds, comparable with the handler's:
    ``notified_ns`` when the watchdog saw the OOM, ``acted_ns`` when it
    enabled the kernel OOM killer, ``resolved_ns`` when ``under_oom`` read 0
    (None if the group went away first). ``reason`` is one of
    :data:`REASONS`; ``restored`` is the ``oom_kill_disable`` value written
    back afterwards.
    """

    group: str
    reason: str
    notified_ns: int
    acted_ns: int
    resolved_ns: int | None
    delay: float
    handler_pid: int | None
    restored: int | None

    @property
    def takeover_ns(self) -> int:
        """From the notification to the kernel killer enabled."""
        return self.acted_ns - self.notified_ns

    def to_dict(self) -> dict[str, Any]:
        return {"event": "takeover", **attrs.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Takeover:
        fields = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def _continue_group(group: Group, record: dict[str, Any]) -> None:
    """A handler that died while its hooks ran left the group's other
    processes stopped (SIGSTOP): continue every task of the group."""
    try:
        pids = group.procs()
    except (OSError, UseroomError):
        return
    continued = 0
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
            continued += 1
        except OSError:
            pass
    record["continued"] = continued


def _thread_state(pid: int, tid: int) -> tuple[str, str] | None:
    """(state letter, wait channel) of a thread, or None if it is gone."""
    base = f"/proc/{pid}/task/{tid}"
    try:
        with open(f"{base}/stat", "rb") as f:
            stat = f.read()
        with open(f"{base}/wchan", "rb") as f:
            wchan = f.read().decode("ascii", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The state follows the last ")" (the name may contain one).
    return stat[stat.rfind(b")") + 2:][:1].decode("ascii", "replace"), wchan


@attrs.define
class DeclaredHandler:
    """The handler a group declared: its process, the threads it declared,
    its pidfd, and its last heartbeat."""

    pid: int
    #: Threads that must never wait for memory (the native watcher).
    tids: tuple[int, ...]
    pidfd: int
    heartbeat_timeout: float
    #: Threads that may wait for memory, but not while a grant made for them is open (the manager).
    helper_tids: tuple[int, ...] = ()
    beat_ns: int = attrs.field(factory=time.monotonic_ns)
    exited: bool = False
    #: Since when a helper thread has been seen in the OOM wait with a grant open.
    _caught_ns: int | None = None

    def check_exited(self) -> bool:
        if not self.exited:
            ready, _, _ = select.select([self.pidfd], [], [], 0)
            self.exited = bool(ready)
        return self.exited

    def unfit(self, now: int, grant_open: Callable[[], bool] = lambda: False) -> str | None:
        """Why this handler cannot be trusted with the episode under way, or None.

        ``grant_open`` tells whether the group's limit is raised above the one
        the handler set (read only when a helper thread is in the OOM wait).
        """
        if self.check_exited():
            return "handler-exited"
        caught = False
        for tid, helper in [(t, False) for t in self.tids] + [(t, True) for t in self.helper_tids]:
            state = _thread_state(self.pid, tid)
            if state is None:
                continue  # a declared thread that ended: the process check above decides
            letter, wchan = state
            if letter in ("T", "t"):
                return "handler-stopped"
            if wchan == OOM_WAIT_CHANNEL:
                if not helper:
                    return "handler-in-oom-wait"
                caught = caught or grant_open()
        if not caught:
            self._caught_ns = None
        elif self._caught_ns is None:
            self._caught_ns = now
        elif now - self._caught_ns >= CAUGHT_NS:
            return "handler-in-oom-wait"
        if now - self.beat_ns > self.heartbeat_timeout * 1e9:
            return "heartbeat"
        return None


class Guard:
    """One group the watchdog keeps from sleeping forever."""

    def __init__(self, group: Group, delay: float, *, handler: DeclaredHandler | None = None,
                 limit: int | None = None, kill_enabled: bool | None = None) -> None:
        oom_file = getattr(group, "oom_control_file", None)
        if oom_file is None:
            raise UseroomError(f"the watchdog needs cgroup v1's memory.oom_control; {group.relpath} "
                               f"is on cgroup v{group.version}")
        self.group = group
        self.delay = delay
        self.handler = handler
        #: The limit the handler set; restored if the handler dies with a grant open.
        self.limit = limit
        #: The user's kernel OOM killer setting before the handler (restored if it dies).
        self.kill_enabled = kill_enabled
        self.pending_limit = False
        self.gone = False
        #: The handler's exit has been dealt with (limit, setting).
        self.mourned = False
        self._episode_ns: int | None = None
        self._taken: tuple[str, int, int] | None = None  # reason, acted_ns, the setting before
        self._kills_at_takeover = 0
        self._clear_ns: int | None = None  # when under_oom first read 0 after a takeover
        self._fds: list[int] = []
        self._fds.append(group.open_file(oom_file, os.O_RDONLY))
        os.pread(self._fds[0], 256, 0)  # allocate the seq_file buffer now
        self._switch = group.open_file(oom_file, os.O_WRONLY)
        self._fds.append(self._switch)
        self.notifier: EventRegistration = group.oom_notifier()
        os.set_blocking(self.notifier.fileno(), False)

    def fileno(self) -> int:
        return self.notifier.fileno()

    @property
    def in_episode(self) -> bool:
        return self._episode_ns is not None

    def control(self) -> OomControl | None:
        try:
            return OomControl.from_text(os.pread(self._fds[0], 256, 0).decode("ascii"))
        except OSError as err:
            if err.errno in (errno.ENODEV, errno.ENOENT):
                self.gone = True
                return None
            raise

    def notified(self, now: int) -> None:
        """The OOM eventfd fired (or the guard just started)."""
        try:
            os.read(self.notifier.fileno(), 8)
        except BlockingIOError:
            pass
        if self._episode_ns is None:
            control = self.control()
            if control is not None and control.under_oom:
                self._episode_ns = now

    def _grant_open(self) -> bool:
        """Whether the handled group's limit is above the one the handler set."""
        if self.limit is None:
            return False
        try:
            return self.group.limit() > self.limit
        except OSError:
            return False

    def _switch_to(self, disabled: bool) -> None:
        os.pwrite(self._switch, b"1" if disabled else b"0", 0)

    def tick(self, now: int) -> Takeover | None:
        """Look at the group: act if the episode needs it; return a finished takeover."""
        if self.pending_limit:
            self._restore_limit()
        if self._episode_ns is None:
            return None
        control = self.control()
        if control is None:
            return self._finish(None)
        if not control.under_oom:
            if self._taken is None:
                return self._finish(now)
            # Enabling the killer wakes the sleepers, which clears under_oom
            # before the kernel has killed anyone: the episode is over once the
            # kernel has killed, or once it stays clear for SETTLE_NS.
            if self._clear_ns is None:
                self._clear_ns = now
            if control.oom_kill > self._kills_at_takeover or now - self._clear_ns >= SETTLE_NS:
                return self._finish(self._clear_ns)
            return None
        self._clear_ns = None
        if self._taken is not None and control.kill_disabled:
            # Taken over, yet the killer is off again: the handler's manager
            # turns it off when it sees it on with nobody waiting, which the
            # takeover's own wakeup can look like. The episode is still ours.
            self._switch_to(False)
        if self._taken is None:
            reason = None
            if self.handler is not None:
                reason = self.handler.unfit(now, self._grant_open)
            if reason is None and now - self._episode_ns >= self.delay * 1e9:
                reason = "delay"
            if reason is not None:
                self._kills_at_takeover = control.oom_kill
                self._switch_to(False)
                self._taken = (reason, time.monotonic_ns(), int(control.kill_disabled))
        return None

    def _finish(self, resolved_ns: int | None) -> Takeover | None:
        self._clear_ns = None
        episode_ns, self._episode_ns = self._episode_ns, None
        taken, self._taken = self._taken, None
        if taken is None or episode_ns is None:
            return None
        reason, acted_ns, before = taken
        restored: int | None = None
        if not self.gone:
            handler_alive = self.handler is not None and not self.handler.check_exited()
            if handler_alive or self.kill_enabled is None:
                restored = before
            else:
                restored = 0 if self.kill_enabled else 1
            try:
                self._switch_to(bool(restored))
            except OSError:
                restored = None
        return Takeover(self.group.relpath, reason, episode_ns, acted_ns, resolved_ns, self.delay,
                        self.handler.pid if self.handler else None, restored)

    def handler_exited(self) -> dict[str, Any]:
        """The declared handler is gone: put back what it would have put back on stop."""
        assert self.handler is not None
        self.handler.exited = True
        self.mourned = True
        record: dict[str, Any] = {"event": "handler-exited", "group": self.group.relpath,
                                  "handler_pid": self.handler.pid, "at_ns": time.monotonic_ns()}
        if not self.gone:
            _continue_group(self.group, record)
        if self.limit is not None and not self.gone:
            try:
                self.pending_limit = self.group.limit() != self.limit
            except (OSError, UseroomError):
                self.pending_limit = False
            record["limit_raised"] = self.pending_limit
            self._restore_limit()
        if self._episode_ns is not None and self._taken is None and not self.gone:
            # It died during an episode: hand that to the kernel now (the
            # user's setting goes back once the episode ends).
            control = self.control()
            if control is not None and control.under_oom:
                self._kills_at_takeover = control.oom_kill
                self._switch_to(False)
                self._taken = ("handler-exited", time.monotonic_ns(), int(control.kill_disabled))
        if self.kill_enabled is not None and self._taken is None and not self.gone:
            try:
                self._switch_to(not self.kill_enabled)
                record["restored"] = 0 if self.kill_enabled else 1
            except OSError as err:
                record["error"] = str(err)
        return record

    def _restore_limit(self) -> None:
        assert self.limit is not None
        try:
            if self.group.usage() <= self.limit:
                self.group.set_limit(self.limit)
                self.pending_limit = False
        except GroupGone:
            self.pending_limit = False
            self.gone = True
        except (OSError, UseroomError):
            pass  # usage does not fit yet: retried on the next tick

    @property
    def done(self) -> bool:
        """Nothing left to guard: the group is gone, or its handler exited and
        the kernel killer (the user's setting) guards it again."""
        if self.gone:
            return True
        return (self.handler is not None and self.handler.exited and not self.pending_limit
                and not self.in_episode and bool(self.kill_enabled))

    def close(self) -> None:
        self.notifier.close()
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if self.handler is not None:
            os.close(self.handler.pidfd)
            self.handler = None


class WallGuard:
    """A cgroup v2 group's handler, guarded for its death only.

    Nobody waits in an OOM on v2: the kernel kills at ``memory.max``. What a
    dead handler leaves behind is its wall, ``memory.high``, throttling the
    group. When the handler exits without stopping, this puts back the
    ``memory.high`` and ``memory.max`` the group had before it.
    """

    def __init__(self, group: Group, handler: DeclaredHandler, saved_high: int, saved_max: int) -> None:
        self.group = group
        self.handler: DeclaredHandler | None = handler
        self.saved = (saved_high, saved_max)
        self.limit: int | None = None  # a handler's "limit" message: not used on v2
        self.mourned = False
        self.gone = False
        self.pending_limit = False
        self.in_episode = False
        self._idle = _native.EventFd()  # never signalled: the handler's pidfd is what wakes this guard

    def fileno(self) -> int:
        return self._idle.fileno()

    def notified(self, now: int) -> None:
        pass

    def tick(self, now: int) -> Takeover | None:
        return None

    def handler_exited(self) -> dict[str, Any]:
        """Restore the group's memory.high and memory.max from before the handler."""
        assert self.handler is not None
        self.handler.exited = True
        self.mourned = True
        high, limit = self.saved
        record: dict[str, Any] = {"event": "handler-exited", "group": self.group.relpath,
                                  "handler_pid": self.handler.pid, "at_ns": time.monotonic_ns()}
        _continue_group(self.group, record)
        try:
            # memory.high first to max, so it never sits above memory.max.
            self.group.set_high(UNLIMITED)  # type: ignore[attr-defined]
            self.group.set_limit(limit)
            self.group.set_high(high)  # type: ignore[attr-defined]
            record["restored"] = {"memory.high": high, "memory.max": limit}
        except GroupGone:
            self.gone = True
        except (OSError, UseroomError) as err:
            record["error"] = str(err)
        return record

    @property
    def done(self) -> bool:
        return self.gone or self.mourned

    def close(self) -> None:
        self._idle.close()
        if self.handler is not None:
            os.close(self.handler.pidfd)
            self.handler = None


#: Epoll data: guards are 0.., their handlers' pidfds 1000.., then these.
_STOP: Final = 1 << 30
_CONTROL: Final = (1 << 30) + 1


class Watchdog:
    """The watchdog's loop over its guards; see the module's documentation.

    ``control`` is the socket to a handler (None when run on its own):
    the handler sends ``beat``, ``limit N`` and ``stop``; the watchdog
    sends ``ready`` and each takeover as JSON.
    """

    def __init__(self, guards: Sequence[Guard | WallGuard], *, control: socket.socket | None = None,
                 log: IO[str] | None = None) -> None:
        self.guards = list(guards)
        self.control = control
        self.log = log
        self.takeovers: list[Takeover] = []
        self._stop = _native.EventFd()

    def stop(self) -> None:
        """Ask :meth:`run` to return (from another thread or a signal handler)."""
        self._stop.write(1)

    def _record(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, sort_keys=True)
        if self.log is not None:
            try:
                self.log.write(line + "\n")
                self.log.flush()
            except OSError:
                pass
        if self.control is not None:
            try:
                self.control.send(line.encode(), socket.MSG_DONTWAIT)
            except OSError:
                pass

    def _message(self, data: bytes) -> bool:
        """A message from the handler; False on ``stop``."""
        word, _, rest = data.partition(b" ")
        if word == b"beat":
            for guard in self.guards:
                if guard.handler is not None:
                    guard.handler.beat_ns = time.monotonic_ns()
        elif word == b"limit":
            for guard in self.guards:
                guard.limit = UNLIMITED if rest == b"max" else int(rest)
        elif word == b"last-resort":
            # The handler found nothing left to kill: the kernel acts next and
            # may take the handler's own process. Its record survives here.
            try:
                note = json.loads(rest)
            except ValueError:
                note = {"raw": rest.decode(errors="replace")}
            self._record({"event": "last-resort", "at_ns": time.monotonic_ns(), **note})
        elif word == b"stop":
            return False
        return True

    def run(self) -> None:
        ep = _native.Epoll()
        try:
            ep.add(self._stop.fileno(), _STOP)
            if self.control is not None:
                ep.add(self.control.fileno(), _CONTROL)
            for i, guard in enumerate(self.guards):
                ep.add(guard.fileno(), i)
                if guard.handler is not None:
                    ep.add(guard.handler.pidfd, 1000 + i)
                guard.notified(time.monotonic_ns())  # an OOM that began before we looked
            if self.control is not None:
                self.control.send(b"ready")
            self._loop(ep)
        finally:
            ep.close()

    def _loop(self, ep: _native.Epoll) -> None:
        while self.guards:
            busy = any(g.in_episode or g.pending_limit for g in self.guards)
            ready = ep.wait(POLL_INTERVAL if busy else 1.0)
            now = time.monotonic_ns()
            for data, _ in ready:
                if data == _STOP:
                    return
                if data == _CONTROL:
                    assert self.control is not None
                    try:
                        message = self.control.recv(256, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        continue
                    except OSError:
                        message = b""  # reset: the handler is gone
                    if not message:  # the handler closed its end: it is exiting
                        ep.remove(self.control.fileno())
                        self.control = None
                    elif not self._message(message):
                        return
                elif data >= 1000:
                    handler = self.guards[data - 1000].handler
                    assert handler is not None
                    ep.remove(handler.pidfd)  # level-triggered: once is enough
                    handler.exited = True
                else:
                    self.guards[data].notified(now)
            for guard in self.guards:
                if guard.handler is not None and not guard.mourned and guard.handler.check_exited():
                    self._record(guard.handler_exited())
                takeover = guard.tick(now)
                if takeover is not None:
                    self.takeovers.append(takeover)
                    self._record(takeover.to_dict())
            for guard in [g for g in self.guards if g.done]:
                ep.remove(guard.fileno())
                self._record({"event": "done", "group": guard.group.relpath, "gone": guard.gone})
                guard.close()
                # Epoll data are indexes: re-register what is left.
                self.guards.remove(guard)
                self._reindex(ep)

    def _reindex(self, ep: _native.Epoll) -> None:
        for i, guard in enumerate(self.guards):
            ep.remove(guard.fileno())
            ep.add(guard.fileno(), i)
            if guard.handler is not None and not guard.handler.exited:
                ep.remove(guard.handler.pidfd)  # exited: removed already
                ep.add(guard.handler.pidfd, 1000 + i)

    def close(self) -> None:
        for guard in self.guards:
            guard.close()
        self.guards = []
        self._stop.close()


# -- the handler's side ----------------------------------------------------


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
    #: The handled group itself or below: the handler's own plan sees the watchdog there.
    inside: bool
    kills_before: int | None

    @classmethod
    def of(cls, place: Group | None, handled: Group) -> _Charge:
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
        inside = (group.relpath.rstrip("/") + "/").startswith(handled.relpath.rstrip("/") + "/")
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
    try:
        record = json.loads(message)
    except ValueError:
        record = None
    if isinstance(record, dict) and "error" in record:
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

    def __init__(self, popen: subprocess.Popen[bytes], sock: socket.socket, pidfd: int) -> None:
        assert popen.stderr is not None
        self.popen = popen
        self.sock = sock
        self.pidfd = pidfd
        self.started = time.monotonic()
        self.message = b""
        self.answered = False  # a message or EOF on the socket
        self.exited = False
        self._stderr = bytearray()
        self._err_fd = popen.stderr.fileno()
        # poll(), not select(): a handler in a process with many fds may get numbers above FD_SETSIZE.
        self._poll = select.poll()
        for fd in (sock.fileno(), pidfd, self._err_fd):
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
            elif fd == self.pidfd:
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
                if self.message == b"ready":
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


class WatchdogLink:
    """A handler's watchdog process: started, fed heartbeats and limits,
    read for takeovers, restarted if it dies, stopped with the handler.

    The process is started through ``/bin/sh``, which moves itself into
    ``place`` (a group outside the handled one) before it becomes Python,
    so none of the watchdog's memory is charged to the handled group. With
    ``place`` None (cgroup v2, where the parent of a group cannot hold
    processes) it stays in this process's group.
    """

    def __init__(self, group: Group, place: Group | None, *, delay: float, handler_tids: Sequence[int],
                 limit: int, kill_enabled: bool, heartbeat_timeout: float, log: str | None = None,
                 helper_tids: Sequence[int] = (), saved: tuple[int, int] | None = None,
                 spawned: Callable[[int], None] | None = None) -> None:
        self.group = group
        self.place = place
        self.delay = delay
        self.handler_tids = tuple(handler_tids)
        self.helper_tids = tuple(helper_tids)
        #: cgroup v2: the group's memory.high and memory.max before the handler.
        self.saved = saved
        self.limit = limit
        self.kill_enabled = kill_enabled
        self.heartbeat_timeout = heartbeat_timeout
        self.log = log
        #: Called with each watchdog's pid as soon as it exists, before it is
        #: ready: a handler inside the group must spare it from then on (on
        #: v2 it starts in the handled group, where a plan armed meanwhile
        #: would take it, a python3 of 20 MiB or more, for a victim).
        self.spawned = spawned
        self.restarts = 0
        #: What happened to the watchdog itself (exits, restarts), one dict each.
        self.history: list[dict[str, Any]] = []
        self.popen: subprocess.Popen[bytes] | None = None
        self.pidfd = -1
        self.sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._beat_ns = 0  # time.monotonic_ns() of the last heartbeat sent

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def command(self, control_fd: int) -> list[str]:
        """The watchdog's command line, given the number of its end of the control socket.

        ``-X faulthandler``: a crash before ready writes its Python traceback
        on the standard error the start error quotes.
        """
        argv = [
            sys.executable, "-X", "faulthandler", "-m", "useroom", "watchdog", self.group.path,
            "--delay", repr(self.delay), "--control-fd", str(control_fd),
            "--handler-pid", str(os.getpid()), "--limit", "max" if self.limit == UNLIMITED else str(self.limit),
            "--kill-enabled", "1" if self.kill_enabled else "0",
            "--heartbeat-timeout", repr(self.heartbeat_timeout),
        ]
        for tid in self.handler_tids:
            argv += ["--tid", str(tid)]
        for tid in self.helper_tids:
            argv += ["--helper-tid", str(tid)]
        if self.saved is not None:
            argv += ["--saved-high", str(self.saved[0]), "--saved-max", str(self.saved[1])]
        if self.log is not None:
            argv += ["--log", self.log]
        return argv

    def start(self) -> None:
        """Start the process and wait until it watches the group.

        It has :data:`START_TIMEOUT` seconds, and may go :data:`START_STALL`
        seconds without progress. Otherwise raises
        :class:`~useroom.WatcherError` saying how it ended (exit status or
        signal, its error and standard error) and what to do about it, once
        the process is reaped; :class:`~useroom.CgroupPermissionError` if it
        could not move into ``place``.
        """
        charge = _Charge.of(self.place, self.group)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            # /bin/sh moves itself into the place before it becomes Python;
            # with no place (v2, the handler inside the group) it stays here.
            enter = [] if self.place is None else [
                "/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', os.path.join(self.place.path, self.place.procs_file)]
            popen = subprocess.Popen([*enter, *self.command(theirs.fileno())], pass_fds=(theirs.fileno(),),
                                     stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        except BaseException:
            ours.close()
            theirs.close()
            raise
        theirs.close()  # the watchdog's copy is the only one: its exit is EOF here
        assert popen.stderr is not None
        pidfd = -1
        try:
            pidfd = os.pidfd_open(popen.pid)
            if self.spawned is not None:
                self.spawned(popen.pid)
            launch = _Launch(popen, ours, pidfd)
            seen = launch.wait_ready()
            if seen is not None:
                raise self._start_error(launch.end(seen), charge)
        except BaseException:
            if popen.poll() is None:
                popen.kill()
            popen.wait()
            if pidfd >= 0:
                os.close(pidfd)
            popen.stderr.close()
            ours.close()
            raise
        popen.stderr.close()  # from now on it logs to its own log
        ours.setblocking(False)
        self.popen, self.pidfd, self.sock = popen, pidfd, ours

    def _start_error(self, failure: StartFailure, charge: _Charge) -> UseroomError:
        if "Permission denied" in failure.stderr and self.place is not None:
            return CgroupPermissionError(
                errno.EACCES, f"cannot start the watchdog in {self.place.relpath}: {failure.stderr}",
                rule="the watchdog moves itself into a group outside the handled one, which needs "
                     "write access to that group's cgroup.procs",
                advice="pass watchdog_group= a group of your own outside the handled group, "
                       "or have the administrator delegate the handled group's parent")
        return WatcherError(f"the watchdog of {self.group.relpath} did not start: {failure.describe()}. "
                            f"What to do: {failure.advice(charge)}. {failure.said()}")

    def send(self, message: bytes) -> None:
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
        OOM storm means hundreds a second."""
        now = time.monotonic_ns()
        if now - self._beat_ns < self.heartbeat_timeout * 1e9 / 6:
            return
        self._beat_ns = now
        self.send(b"beat")

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self.send(b"limit " + (b"max" if limit == UNLIMITED else str(limit).encode()))

    def receive(self) -> list[Takeover]:
        """Takeovers the watchdog reported since the last call."""
        out = []
        sock = self.sock
        while sock is not None:
            try:
                data = sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            if not data:
                break
            record = json.loads(data)
            if record.get("event") == "takeover":
                out.append(Takeover.from_dict(record))
        return out

    def exited(self) -> bool:
        if self.pidfd < 0:
            return True
        ready, _, _ = select.select([self.pidfd], [], [], 0)
        return bool(ready)

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
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.popen = None

    def stop(self, timeout: float = 5.0) -> None:
        popen = self.popen
        if popen is None:
            return
        self.send(b"stop")
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()
        self._close()


# -- the command -----------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="useroom watchdog",
        description="Guard memory cgroups from sleeping forever in an OOM: when an OOM outlasts the "
                    "delay (or the declared handler cannot act), enable the kernel OOM killer until it "
                    "ends, then restore the setting. One JSON line per takeover.")
    parser.add_argument("groups", nargs="+", metavar="GROUP", help="a memory cgroup directory (v1)")
    parser.add_argument("--delay", default=f"{DEFAULT_DELAY}s", help="how long an OOM may last (default %(default)s)")
    parser.add_argument("--log", help="append the JSON lines to this file (default: standard output)")
    # Set by a Handler for its own watchdog.
    parser.add_argument("--control-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--handler-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tid", type=int, action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--helper-tid", type=int, action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--saved-high", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--saved-max", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--limit", help=argparse.SUPPRESS)
    parser.add_argument("--kill-enabled", type=int, choices=(0, 1), help=argparse.SUPPRESS)
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        delay = parse_duration(args.delay)
    except ValueError as err:
        print(f"useroom watchdog: {err}", file=sys.stderr)
        return 2
    from useroom._hardening import lock_memory

    lock_memory(heap="2M", stack="128K", pool="1M")
    # On its own it logs to standard output; a handler's watchdog reports
    # to the handler, and to a file only if given one.
    log: IO[str] | None = open(args.log, "a", encoding="utf-8") if args.log else (  # noqa: SIM115
        sys.stdout if args.control_fd is None else None)
    guards: list[Guard | WallGuard] = []
    control = socket.socket(fileno=args.control_fd) if args.control_fd is not None else None
    try:
        for path in args.groups:
            handler = None
            if args.handler_pid is not None:
                handler = DeclaredHandler(args.handler_pid, tuple(args.tid), os.pidfd_open(args.handler_pid),
                                          args.heartbeat_timeout, tuple(args.helper_tid))
            limit = None
            if args.limit is not None:
                limit = UNLIMITED if args.limit == "max" else int(args.limit)
            kill_enabled = None if args.kill_enabled is None else bool(args.kill_enabled)
            group = Group.open(path)
            if group.version == 2:
                if handler is None or args.saved_high is None or args.saved_max is None:
                    raise UseroomError(f"{group.relpath} is on cgroup v2, where nobody waits in an OOM (the kernel "
                                       "kills at memory.max): there the watchdog only guards a handler's wall")
                guards.append(WallGuard(group, handler, args.saved_high, args.saved_max))
            else:
                guards.append(Guard(group, delay, handler=handler, limit=limit, kill_enabled=kill_enabled))
    except (UseroomError, OSError) as err:
        print(f"useroom watchdog: {err}", file=sys.stderr)
        for guard in guards:
            guard.close()
        return 1
    watchdog = Watchdog(guards, control=control, log=log)
    signal.signal(signal.SIGTERM, lambda *_: watchdog.stop())
    signal.signal(signal.SIGINT, lambda *_: watchdog.stop())
    if control is None and log is not None:
        print(json.dumps({"event": "ready", "groups": [g.group.relpath for g in guards], "delay": delay}),
              file=log, flush=True)
    try:
        watchdog.run()
    except Exception as err:
        watchdog._record({"event": "error", "error": repr(err), "traceback": traceback.format_exc()})
        raise
    finally:
        watchdog.close()
        if log is not None and log is not sys.stdout:
            log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
