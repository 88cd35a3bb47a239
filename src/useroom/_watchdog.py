"""The watchdog: a process outside the handled groups that never lets one sleep forever.

It stands in for kernel interfaces that were proposed and never merged (see
:mod:`useroom._declare` and docs/design.md):

- **delay** (Rientjes' ``memory.oom_delay_millisecs``): when a group stays
  under OOM longer than ``delay``, the watchdog enables the kernel OOM
  killer for it until ``under_oom`` reads 0, then puts the setting back.
  Like the proposal, the delay re-arms on each episode.
- **declared handler** (Weiner): when the groups' declared handler has
  exited, is stopped, has its native watcher asleep in the memcg OOM wait
  (``mem_cgroup_oom_synchronize`` in its wait channel), has its manager
  thread asleep there while the headroom grant it was given is open (the
  grant is used up: the plan waits for a thread that waits for memory), or
  has sent no heartbeat for ``heartbeat_timeout`` since the later of its
  last one and the start of the episode, the watchdog hands the episode to
  the kernel at once instead of waiting out the delay. The manager asleep
  in the OOM wait with no grant open is the in-group design at work (the
  native watcher acts for it), not a fault.
- **reserve** (Rientjes' ``memory.oom_reserve_in_bytes``): the handler's
  headroom grant raises the limit; if the handler dies with a grant open,
  the watchdog restores the limit as soon as usage fits under it.

It gets each group's OOM notification through an eventfd of its own, like
the handler, and runs in a group of the user's own tree outside the handled
ones, so the OOM it watches never makes it wait. One process guards every
group of one handler process (a :class:`~useroom.Handler`, or a supervisor
serving many groups): the handler's side, :class:`WatchdogLink`, starts it,
adds and removes groups while it runs, and restarts it if it dies, with
every group it guarded. It can also run on its own to guard several groups::

    useroom watchdog /sys/fs/cgroup/memory/.../app --delay 2s
    python -m useroom.watchdog GROUP [GROUP ...] --delay 500ms --log takeovers.jsonl

With nothing happening it sleeps in the kernel: it waits on the groups'
eventfds, the handler's pidfd (its death) and the control socket, with a
timer only while an episode is under way or a limit restore is pending.
That is also why the heartbeat is judged from the episode's start: an idle
handler sends none, and owes one only ``heartbeat_timeout`` into an episode.

Each takeover is one JSON line in the log (and, for a handler's watchdog,
an :class:`~useroom.OomEvent` with ``takeover`` set in ``handler.events``).
See docs/watchdog.md for the control protocol.
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

from useroom import native
from useroom.cgroup import EventRegistration, Group, OomControl
from useroom._fd import OwnedFd
from useroom._units import UNLIMITED, parse_duration
from useroom.exceptions import CgroupPermissionError, GroupGone, UseroomError, WatcherError

__all__ = ["DEFAULT_DELAY", "GuardSpec", "Takeover", "Watchdog", "WatchdogLink", "main"]

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
#: The largest control message or record, in bytes (SOCK_SEQPACKET: one recv
#: takes one message, cut at the buffer's size).
MESSAGE_MAX: Final = 65536
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
    (None if the group went away first). ``group`` is the group's path in
    the hierarchy (its ``relpath``), ``reason`` one of :data:`REASONS`;
    ``restored`` is the ``oom_kill_disable`` value written back afterwards.
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


def _pair(value: Sequence[int] | None) -> tuple[int, int] | None:
    """Two integers (JSON has them as a list), or None."""
    if value is None:
        return None
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"not two integers: {value!r}")
    return value[0], value[1]


@attrs.frozen
class GuardSpec:
    """What the watchdog needs to guard one group: one ``--guard`` on its
    command line, or the body of an ``add`` message (both JSON)."""

    #: The group's directory.
    path: str = attrs.field(validator=attrs.validators.instance_of(str))
    #: The link's number for this addition of the group: the watchdog's
    #: records about the guard (``added``, ``add-failed``, ``done``,
    #: ``removed``) carry it back.
    key: int = attrs.field(validator=attrs.validators.instance_of(int))
    #: The limit the handler set (restored if it dies with a grant open); None with no handler.
    limit: int | None = attrs.field(default=None,
                                    validator=attrs.validators.optional(attrs.validators.instance_of(int)))
    #: The kernel OOM killer setting before the handler (put back if it dies); None with no handler.
    kill_enabled: bool | None = attrs.field(default=None,
                                            validator=attrs.validators.optional(attrs.validators.instance_of(bool)))
    #: cgroup v2: the group's ``memory.high`` and ``memory.max`` before the handler.
    saved: tuple[int, int] | None = attrs.field(default=None, converter=_pair)

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> GuardSpec:
        """Parse :meth:`to_json`'s output; raises ValueError if it is not that."""
        try:
            data = json.loads(text)
            return cls(**data)
        except (TypeError, ValueError) as err:  # bad JSON, a missing or stray field, a wrong type
            raise ValueError(f"not a guard: {text!r}: {err}") from None


class ProcessFd(OwnedFd):
    """A pidfd of one process (close-on-exec): readable once it has exited."""

    __slots__ = ("pid",)

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = os.pidfd_open(pid)

    @property
    def exited(self) -> bool:
        """True once the process has exited."""
        # poll(), not select(): the number may be above FD_SETSIZE.
        poller = select.poll()
        poller.register(self.fileno(), select.POLLIN)
        return bool(poller.poll(0))


class ControlFile(OwnedFd):
    """One control file of a group, opened ahead (close-on-exec)."""

    __slots__ = ()

    def __init__(self, group: Group, name: str, flags: int) -> None:
        self._fd = group.open_file(name, flags)


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


@attrs.define(eq=False)
class DeclaredHandler:
    """The handler the guarded groups declared: its process, the threads it
    declared, its pidfd (owned), and its last heartbeat. One serves every
    guard of a watchdog."""

    pid: int
    #: Threads that must never wait for memory (the native watcher).
    tids: tuple[int, ...]
    pidfd: ProcessFd
    heartbeat_timeout: float
    #: Threads that may wait for memory, but not while a grant made for them is open (the manager).
    helper_tids: tuple[int, ...] = ()
    beat_ns: int = attrs.field(factory=time.monotonic_ns)
    exited: bool = False

    def check_exited(self) -> bool:
        if not self.exited:
            self.exited = self.pidfd.exited
        return self.exited

    def look(self) -> tuple[str | None, bool]:
        """One look at the process and its declared threads: why it cannot
        act now (it exited, is stopped, or its watcher sleeps in the OOM
        wait) or None; and whether a helper thread sleeps in the OOM wait
        (a fault only while a grant made for it is open: the guard decides)."""
        if self.check_exited():
            return "handler-exited", False
        helper_waiting = False
        for tid, helper in [(t, False) for t in self.tids] + [(t, True) for t in self.helper_tids]:
            state = _thread_state(self.pid, tid)
            if state is None:
                continue  # a declared thread that ended: the process check above decides
            letter, wchan = state
            if letter in ("T", "t"):
                return "handler-stopped", False
            if wchan == OOM_WAIT_CHANNEL:
                if not helper:
                    return "handler-in-oom-wait", False
                helper_waiting = True
        return None, helper_waiting

    def silent(self, now: int, episode_ns: int) -> bool:
        """No heartbeat for ``heartbeat_timeout`` since the later of the last
        one and the episode's start: an idle handler sends none, so only
        silence during the episode counts."""
        return now - max(self.beat_ns, episode_ns) > self.heartbeat_timeout * 1e9

    def close(self) -> None:
        self.pidfd.close()


class Guard:
    """One v1 group the watchdog keeps from sleeping forever. It owns its
    fds (two of ``memory.oom_control``, the OOM eventfd), not the handler."""

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
        self._caught_ns: int | None = None  # since when a helper thread is in the OOM wait with a grant open
        self._read = ControlFile(group, oom_file, os.O_RDONLY)
        try:
            os.pread(self._read.fileno(), 256, 0)  # allocate the seq_file buffer now
            self._switch = ControlFile(group, oom_file, os.O_WRONLY)
            try:
                self.notifier: EventRegistration | None = group.oom_notifier()
                os.set_blocking(self.notifier.fileno(), False)
            except BaseException:
                self._switch.close()
                raise
        except BaseException:
            self._read.close()
            raise

    @property
    def in_episode(self) -> bool:
        return self._episode_ns is not None

    def control(self) -> OomControl | None:
        try:
            return OomControl.from_text(os.pread(self._read.fileno(), 256, 0).decode("ascii"))
        except OSError as err:
            if err.errno in (errno.ENODEV, errno.ENOENT):
                self.gone = True
                return None
            raise

    def notified(self, now: int) -> None:
        """The OOM eventfd fired (or the guard just started)."""
        assert self.notifier is not None
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
        os.pwrite(self._switch.fileno(), b"1" if disabled else b"0", 0)

    def unfit(self, now: int) -> str | None:
        """Why the declared handler cannot be trusted with the episode under way, or None."""
        assert self.handler is not None and self._episode_ns is not None
        reason, helper_waiting = self.handler.look()
        if reason is not None:
            return reason
        # The group's limit is read only when a helper thread is in the OOM wait.
        if not (helper_waiting and self._grant_open()):
            self._caught_ns = None
        elif self._caught_ns is None:
            self._caught_ns = now
        elif now - self._caught_ns >= CAUGHT_NS:
            return "handler-in-oom-wait"
        if self.handler.silent(now, self._episode_ns):
            return "heartbeat"
        return None

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
            reason = self.unfit(now) if self.handler is not None else None
            if reason is None and now - self._episode_ns >= self.delay * 1e9:
                reason = "delay"
            if reason is not None:
                self._kills_at_takeover = control.oom_kill
                self._switch_to(False)
                self._taken = (reason, time.monotonic_ns(), int(control.kill_disabled))
        return None

    def _finish(self, resolved_ns: int | None) -> Takeover | None:
        self._clear_ns = None
        self._caught_ns = None
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
        """Close the guard's fds (the handler's pidfd is not the guard's); safe to call again."""
        if self.notifier is not None:
            self.notifier.close()
        self._read.close()
        self._switch.close()


class WallGuard:
    """A cgroup v2 group's handler, guarded for its death only.

    Nobody waits in an OOM on v2: the kernel kills at ``memory.max``. What a
    dead handler leaves behind is its wall, ``memory.high``, throttling the
    group. When the handler exits without stopping, this puts back the
    ``memory.high`` and ``memory.max`` the group had before it. It has no
    fd of its own: the handler's pidfd is what wakes it.
    """

    #: Nothing to watch in the group itself.
    notifier: None = None

    def __init__(self, group: Group, handler: DeclaredHandler, saved_high: int, saved_max: int) -> None:
        self.group = group
        self.handler: DeclaredHandler | None = handler
        self.saved = (saved_high, saved_max)
        self.limit: int | None = None  # a handler's "limit" message: not used on v2
        self.mourned = False
        self.gone = False
        self.pending_limit = False
        self.in_episode = False

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
        pass


def open_guard(spec: GuardSpec, delay: float, handler: DeclaredHandler | None) -> Guard | WallGuard:
    """The guard *spec* asks for; raises UseroomError or OSError if the group cannot be guarded."""
    group = Group.open(spec.path)
    if group.version == 2:
        if handler is None or spec.saved is None:
            raise UseroomError(f"{group.relpath} is on cgroup v2, where nobody waits in an OOM (the kernel "
                               "kills at memory.max): there the watchdog only guards a handler's wall")
        return WallGuard(group, handler, *spec.saved)
    return Guard(group, delay, handler=handler, limit=spec.limit, kill_enabled=spec.kill_enabled)


#: Epoll data of the stop eventfd, the control socket and the handler's
#: pidfd; a guard's OOM eventfd has its own number as its data.
_STOP: Final = 1 << 40
_CONTROL: Final = (1 << 40) + 1
_HANDLER: Final = (1 << 40) + 2


class Watchdog:
    """The watchdog's loop over its guards; see the module's documentation.

    ``handler`` (owned) is the declared handler of every guard, None when run
    on its own. ``control`` (owned) is the socket to that handler: it sends
    ``beat``, ``add``/``remove``/``limit`` (JSON), ``last-resort`` and
    ``stop``; the watchdog sends ``ready`` and a JSON record for each thing
    it did. With a control socket it runs until ``stop``, or until the
    socket closes and every guard is done; without one, until every guard
    is done.
    """

    def __init__(self, *, delay: float, handler: DeclaredHandler | None = None,
                 control: socket.socket | None = None, log: IO[str] | None = None) -> None:
        self.delay = delay
        self.handler = handler
        self.control = control
        self.log = log
        #: By group directory.
        self.guards: dict[str, Guard | WallGuard] = {}
        self.takeovers: list[Takeover] = []
        self._keys: dict[str, int] = {}  # the link's key of each guard, by group directory
        self._by_fd: dict[int, Guard] = {}  # the guards with an OOM eventfd, by its number
        self._stop = native.EventFd()
        try:
            self._ep = native.Epoll()
        except BaseException:
            self._stop.close()
            raise
        self._ep.add(self._stop.fileno(), _STOP)
        if control is not None:
            self._ep.add(control.fileno(), _CONTROL)
        if handler is not None:
            self._ep.add(handler.pidfd.fileno(), _HANDLER)

    def stop(self) -> None:
        """Ask :meth:`run` to return (from another thread or a signal handler)."""
        self._stop.write(1)

    def add(self, spec: GuardSpec) -> Guard | WallGuard:
        """Guard one more group from now on; raises UseroomError or OSError if it cannot."""
        if spec.path in self.guards:
            raise UseroomError(f"{spec.path} is guarded already")
        guard = open_guard(spec, self.delay, self.handler)
        if guard.notifier is not None:
            assert isinstance(guard, Guard)
            fd = guard.notifier.fileno()
            try:
                self._ep.add(fd, fd)
            except BaseException:
                guard.close()
                raise
            self._by_fd[fd] = guard
            guard.notified(time.monotonic_ns())  # an OOM that began before we looked
        self.guards[spec.path] = guard
        self._keys[spec.path] = spec.key
        return guard

    def remove(self, path: str) -> dict[str, Any] | None:
        """Stop guarding the group at *path* and close its guard's fds; its
        settings are left as they are. Returns the guard's identity for a
        record (None if it was not guarded)."""
        guard = self.guards.pop(path, None)
        if guard is None:
            return None
        if guard.notifier is not None:
            fd = guard.notifier.fileno()
            self._ep.remove(fd)
            del self._by_fd[fd]
        guard.close()
        return {"group": guard.group.relpath, "path": path, "key": self._keys.pop(path)}

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

    def _message(self, data: bytes, now: int) -> bool:
        """A message from the handler; False on ``stop``."""
        word, _, rest = data.partition(b" ")
        try:
            if word == b"beat":
                if self.handler is not None:
                    self.handler.beat_ns = now
            elif word == b"add":
                self._add(GuardSpec.from_json(rest))
            elif word == b"remove":
                identity = self.remove(str(json.loads(rest)["path"]))
                if identity is not None:
                    self._record({"event": "removed", "at_ns": now, **identity})
            elif word == b"limit":
                change = json.loads(rest)
                guard = self.guards.get(str(change["path"]))
                if guard is not None:
                    guard.limit = int(change["limit"])
            elif word == b"last-resort":
                # The handler found nothing left to kill: the kernel acts next and
                # may take the handler's own process. Its record survives here.
                self._record({"event": "last-resort", "at_ns": now, **json.loads(rest)})
            elif word == b"stop":
                return False
            else:
                raise ValueError("unknown message")
        except (KeyError, TypeError, ValueError) as err:
            self._record({"event": "bad-message", "message": data[:200].decode(errors="replace"),
                          "error": repr(err), "at_ns": now})
        return True

    def _add(self, spec: GuardSpec) -> None:
        try:
            guard = self.add(spec)
        except (UseroomError, OSError) as err:
            self._record({"event": "add-failed", "path": spec.path, "key": spec.key, "error": str(err),
                          "at_ns": time.monotonic_ns()})
            return
        self._record({"event": "added", "group": guard.group.relpath, "path": spec.path, "key": spec.key,
                      "at_ns": time.monotonic_ns()})

    def _receive(self, now: int) -> bool:
        """Every message waiting on the control socket; False on ``stop``."""
        assert self.control is not None
        while True:
            try:
                message = self.control.recv(MESSAGE_MAX, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return True
            except OSError:
                message = b""  # reset: the handler is gone
            if not message:  # the handler closed its end: it is exiting
                self._ep.remove(self.control.fileno())
                self.control.close()
                self.control = None
                return True
            if not self._message(message, now):
                return False

    def run(self) -> None:
        """Guard until :meth:`stop` or a ``stop`` message, or until every
        guard is done once no control socket is left."""
        if self.control is not None:
            self.control.send(b"ready")
        while self.control is not None or self.guards:
            # Idle, it sleeps in the kernel until an eventfd, the pidfd or
            # the socket wakes it: a timer only while something is under way.
            busy = any(g.in_episode or g.pending_limit for g in self.guards.values())
            ready = self._ep.wait(POLL_INTERVAL if busy else None)
            now = time.monotonic_ns()
            for data, _ in ready:
                if data == _STOP:
                    return
                if data == _CONTROL:
                    if self.control is not None and not self._receive(now):
                        return
                elif data == _HANDLER:
                    assert self.handler is not None
                    self._ep.remove(self.handler.pidfd.fileno())  # level-triggered: once is enough
                    self.handler.exited = True
                elif data in self._by_fd:  # not removed by a message just now
                    self._by_fd[data].notified(now)
            for path, guard in list(self.guards.items()):
                if guard.handler is not None and not guard.mourned and guard.handler.check_exited():
                    self._record(guard.handler_exited())
                takeover = guard.tick(now)
                if takeover is not None:
                    self.takeovers.append(takeover)
                    self._record(takeover.to_dict())
                if guard.done:
                    identity = self.remove(path)
                    self._record({"event": "done", "gone": guard.gone, "at_ns": now, **(identity or {})})

    def close(self) -> None:
        """Close every guard, the handler's pidfd, the control socket; safe to call again."""
        for path in list(self.guards):
            self.remove(path)
        if self.handler is not None:
            self.handler.close()
        if self.control is not None:
            self.control.close()
            self.control = None
        self._ep.close()
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
                 spawned: Callable[[int], None] | None = None) -> None:
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
        self.restarts = 0
        #: What happened to the watchdog itself (exits, restarts, a kill for
        #: not reading) and the groups it gave up (``add-failed``, ``done``
        #: with ``gone``), one dict each.
        self.history: list[dict[str, Any]] = []
        self.popen: subprocess.Popen[bytes] | None = None
        self.pidfd: ProcessFd | None = None
        self.sock: socket.socket | None = None
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
            self._tell(b"add " + spec.to_json().encode())

    def remove(self, group: Group) -> None:
        """Stop guarding *group*: the watchdog closes its fds for it and
        leaves its settings alone (the caller restored them). A group not
        guarded (never added, or dropped) is ignored."""
        with self._lock:
            if self._specs.pop(group.path, None) is None:
                return
            del self._groups[group.path]
            self._tell(b"remove " + json.dumps({"path": group.path}).encode())

    def set_limit(self, group: Group, limit: int) -> None:
        """The limit the handler set for *group* now (restored if the handler
        dies with a grant open). A group not guarded is ignored."""
        with self._lock:
            spec = self._specs.get(group.path)
            if spec is None:
                return
            self._specs[group.path] = attrs.evolve(spec, limit=limit)
            self._tell(b"limit " + json.dumps({"path": group.path, "limit": limit}).encode())

    def _tell(self, message: bytes) -> None:
        """Send a change of the groups to the running process (the lock held)."""
        sock = self.sock
        if sock is None:
            return  # not running: the next start passes it on the command line
        try:
            sock.send(message, socket.MSG_DONTWAIT)
        except BlockingIOError:
            # Its socket is full: it has stopped reading, and its groups
            # would fall behind the link's. Killed, it is restarted by the
            # caller (the pidfd) with the link's groups on its command line.
            assert self.popen is not None
            self.history.append({"event": "watchdog-killed", "pid": self.popen.pid,
                                 "why": "its control socket is full", "at_ns": time.monotonic_ns()})
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
        for spec in self._specs.values():
            argv += ["--guard", spec.to_json()]
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
            popen = subprocess.Popen([*enter, *argv], pass_fds=(theirs.fileno(),),
                                     stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
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
            self._catch_up(told)

    def _catch_up(self, told: dict[str, GuardSpec]) -> None:
        """Send what changed since the command line was made (the lock held)."""
        for path, spec in told.items():
            now = self._specs.get(path)
            if now is None or now.key != spec.key:
                self._tell(b"remove " + json.dumps({"path": path}).encode())
        for path, spec in self._specs.items():
            before = told.get(path)
            if before is None or before.key != spec.key:
                self._tell(b"add " + spec.to_json().encode())
            elif before.limit != spec.limit:
                self._tell(b"limit " + json.dumps({"path": path, "limit": spec.limit}).encode())

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
        """Send *message* if the process runs; dropped if its socket is full (a
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
        self.send(b"beat")

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
            try:
                record = json.loads(data)
            except ValueError:
                continue  # cut at MESSAGE_MAX: an error record with a long traceback
            event = record.get("event") if isinstance(record, dict) else None
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
        with self._lock:
            pidfd, self.pidfd = self.pidfd, None
            sock, self.sock = self.sock, None
            self.popen = None
        if pidfd is not None:
            pidfd.close()
        if sock is not None:
            sock.close()

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
    parser.add_argument("groups", nargs="*", metavar="GROUP", help="a memory cgroup directory (v1)")
    parser.add_argument("--delay", default=f"{DEFAULT_DELAY}s", help="how long an OOM may last (default %(default)s)")
    parser.add_argument("--log", help="append the JSON lines to this file (default: standard output)")
    # Set by a WatchdogLink for a handler's watchdog.
    parser.add_argument("--control-fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--handler-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tid", type=int, action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--helper-tid", type=int, action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0, help=argparse.SUPPRESS)
    parser.add_argument("--guard", action="append", default=[], help=argparse.SUPPRESS)  # a GuardSpec's JSON
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not args.groups and args.control_fd is None:
        parser.error("give at least one GROUP")
    try:
        delay = parse_duration(args.delay)
        specs = [GuardSpec(path, key) for key, path in enumerate(args.groups)]
        specs += [GuardSpec.from_json(text) for text in args.guard]
    except ValueError as err:
        print(f"useroom watchdog: {err}", file=sys.stderr)
        return 2
    from useroom._hardening import lock_memory

    lock_memory(heap="2M", stack="128K", pool="1M")
    control = socket.socket(fileno=args.control_fd) if args.control_fd is not None else None
    handler = None
    if args.handler_pid is not None:
        try:
            pidfd = ProcessFd(args.handler_pid)
        except OSError as err:
            print(f"useroom watchdog: the handler {args.handler_pid}: {err}", file=sys.stderr)
            if control is not None:
                control.close()
            return 1
        handler = DeclaredHandler(args.handler_pid, tuple(args.tid), pidfd, args.heartbeat_timeout,
                                  tuple(args.helper_tid))
    # On its own it logs to standard output; a handler's watchdog reports
    # to the handler, and to a file only if given one.
    log: IO[str] | None = open(args.log, "a", encoding="utf-8") if args.log else (  # noqa: SIM115
        sys.stdout if args.control_fd is None else None)
    watchdog = Watchdog(delay=delay, handler=handler, control=control, log=log)  # owns the handler and socket
    try:
        try:
            for spec in specs:
                watchdog.add(spec)
        except (UseroomError, OSError) as err:
            print(f"useroom watchdog: {err}", file=sys.stderr)
            return 1
        signal.signal(signal.SIGTERM, lambda *_: watchdog.stop())
        signal.signal(signal.SIGINT, lambda *_: watchdog.stop())
        if control is None and log is not None:
            print(json.dumps({"event": "ready", "groups": [g.group.relpath for g in watchdog.guards.values()],
                              "delay": delay}), file=log, flush=True)
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
