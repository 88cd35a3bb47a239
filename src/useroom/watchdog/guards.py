"""The watchdog's guards: what it keeps, per group, from sleeping forever.

A :class:`Guard` watches one cgroup v1 group's OOM episodes and hands one
to the kernel when it outlasts the delay or the :class:`DeclaredHandler`
cannot act; a :class:`WallGuard` puts a cgroup v2 group's settings back
when its handler dies. :func:`open_guard` picks the one the group's
backend needs: each guard class accepts the backend it knows, or refuses.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import time
from typing import Any, Final

import attrs

from useroom.cgroup import EventRegistration, Group, OomControl
from useroom.cgroup.v1 import V1Group
from useroom.cgroup.v2 import FileNotifier, V2Group
from useroom.cgroup.values import parse_key_values
from useroom._fd import OwnedFd
from useroom._units import UNLIMITED
from useroom.exceptions import GroupGone, UseroomError
from useroom.watchdog.protocol import GuardSpec, Takeover

__all__ = [
    "CAUGHT_NS",
    "GUARDS",
    "OOM_WAIT_CHANNEL",
    "SETTLE_NS",
    "ControlFile",
    "DeclaredHandler",
    "Guard",
    "ProcessFd",
    "WallGuard",
    "open_guard",
    "thread_state",
]

#: After a takeover, ``under_oom`` at 0 this long (with no kill) ends the episode, in ns.
SETTLE_NS: Final = 100_000_000
#: How long the manager thread must be seen asleep in the OOM wait with a grant
#: open before it counts as caught there (the grant's raise wakes it; it may
#: not have run yet when the watchdog looks).
CAUGHT_NS: Final = 20_000_000
#: The wait channel of a task asleep in a v1 memcg OOM wait.
OOM_WAIT_CHANNEL: Final = "mem_cgroup_oom_synchronize"


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


def thread_state(pid: int, tid: int) -> tuple[str, str] | None:
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
            state = thread_state(self.pid, tid)
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

    #: The epoll events its notifier (an eventfd) wakes the watchdog with.
    notify_events: Final = select.POLLIN

    @classmethod
    def accept(cls, group: Group, spec: GuardSpec, delay: float, handler: DeclaredHandler | None) -> Guard | None:
        """The guard of *group* as *spec* asks, if it is a v1 group (which has
        ``memory.oom_control``); None for another backend."""
        if not isinstance(group, V1Group):
            return None
        return cls(group, delay, handler=handler, limit=spec.limit, kill_enabled=spec.kill_enabled)

    def __init__(self, group: V1Group, delay: float, *, handler: DeclaredHandler | None = None,
                 limit: int | None = None, kill_enabled: bool | None = None) -> None:
        oom_file = group.oom_control_file
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
        #: Since when a grant the handler opened is open, the episode over for the kernel (see _watch_grant).
        self._grant_since: int | None = None
        #: Records for the log that a tick made (drained by the watchdog's loop).
        self.notes: list[dict[str, Any]] = []
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

    @property
    def watching_grant(self) -> bool:
        """A grant is open with the OOM over for the kernel: the watchdog looks at the handler
        each tick until it closes (see :meth:`_watch_grant`)."""
        return self._grant_since is not None

    @property
    def notifiers(self) -> tuple[EventRegistration, ...]:
        """What wakes the watchdog for this guard (:meth:`notified`): the OOM eventfd."""
        return () if self.notifier is None else (self.notifier,)

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
            elif control is not None and self._grant_since is None and self.handler is not None \
                    and not self.handler.exited and self._grant_open():
                # The plan opened its grant before this woke up: the OOM is
                # over for the kernel already, the grant's watch begins.
                self._grant_since = now

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
            if self._grant_since is not None:
                self._watch_grant()
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
        if self.handler is not None and not self.handler.check_exited() and self._grant_open():
            # The handler's grant ended the OOM for the kernel; its hooks or
            # its callback act within the grant now, the group's other
            # processes stopped meanwhile. So too after a takeover: under
            # v1, under_oom drops only when each sleeper has run again,
            # which on a busy CPU can come after the grant opened and
            # after the handler was stopped; the takeover then ends with
            # no kill, and the grant is still the handler's to close.
            self._grant_since = time.monotonic_ns()
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

    def _watch_grant(self) -> None:
        """A grant is open and no OOM under way. If the handler is stopped
        (SIGSTOP, a debugger), nobody will close the grant, and the
        processes it stopped for its hooks (or its FreezeAndDecide callback)
        stay stopped: continue them, and put the limit back once usage fits.
        They then run into the limit again, an OOM the watchdog hands to the
        kernel at once (the handler is stopped). A handler that exits is
        :meth:`handler_exited`'s; one that is only slow, the grant's own
        timeouts'."""
        assert self.handler is not None
        if self.handler.exited or not self._grant_open():
            self._grant_since = None
            return
        reason, _ = self.handler.look()
        if reason != "handler-stopped":
            return
        self._grant_since = None
        record: dict[str, Any] = {"event": "grant-reclaimed", "group": self.group.relpath, "reason": reason,
                                  "handler_pid": self.handler.pid, "at_ns": time.monotonic_ns()}
        _continue_group(self.group, record)
        self.pending_limit = True
        self._restore_limit()
        record["limit_restored"] = not self.pending_limit
        self.notes.append(record)

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
        the kernel killer (the user's setting) guards it again. Its exit
        must have been dealt with (:meth:`handler_exited`), not only seen: a
        tick's look at the handler can see it first."""
        if self.gone:
            return True
        return (self.handler is not None and self.mourned and not self.pending_limit
                and not self.in_episode and bool(self.kill_enabled))

    def close(self) -> None:
        """Close the guard's fds (the handler's pidfd is not the guard's); safe to call again."""
        if self.notifier is not None:
            self.notifier.close()
        self._read.close()
        self._switch.close()


class WallGuard:
    """A cgroup v2 group's handler, guarded for its death and for a freeze it
    cannot end.

    Nobody waits in an OOM on v2: the kernel kills at ``memory.max``. What a
    dead handler leaves behind is its wall, ``memory.high``, throttling the
    group. When the handler exits without stopping, this puts back the
    ``memory.high`` and ``memory.max`` the group had before it, and thaws
    the group.

    FreezeAndDecide's plan raises the wall (its grant) and freezes the group
    (``cgroup.freeze``) while the handler decides; the native watcher thaws
    it when the decision comes or the grant times out. A handler stopped
    (SIGSTOP, a debugger) meanwhile takes its watcher with it, and the
    kernel never thaws a group by itself. So this watches ``cgroup.events``
    (its fd polls ``POLLPRI`` when ``frozen`` changes): while the group is
    frozen with the grant open, it looks at the handler each tick, and thaws
    the group and lifts the wall (``memory.max``, the kernel, acts on the
    OOM) at once if the handler is stopped, or once the freeze outlasts the
    delay. The handler, continued, puts its wall back itself.

    A handler inside the group cannot freeze it (it would freeze itself):
    its plan stops the group's other processes by signal instead (SIGSTOP,
    for FreezeAndDecide's decision or for its hooks), with the wall raised.
    Stopped itself meanwhile, it would leave them stopped for good, and no
    ``frozen`` says so. So this also watches ``memory.events``, which
    changes when the group meets the wall: from then, for the delay, it
    looks for the wall raised above the handler's (its grant), and while
    the grant is open it looks at the handler each tick. Stopped, the
    handler's grant is reclaimed: every task of the group is continued and
    the wall lifted (a ``grant-reclaimed`` note), once per stop.
    """

    #: The epoll events its notifier wakes the watchdog with.
    notify_events: Final = select.POLLPRI

    @classmethod
    def accept(cls, group: Group, spec: GuardSpec, delay: float,
               handler: DeclaredHandler | None) -> WallGuard | None:
        """The guard of *group* if it is a v2 group (None for another
        backend); raises UseroomError if *spec* is not a handler's wall
        (no handler, no saved settings): that is all there is to guard on v2."""
        if not isinstance(group, V2Group):
            return None
        if handler is None or spec.saved is None:
            raise UseroomError(f"{group.relpath} is on cgroup v2, where nobody waits in an OOM (the kernel "
                               "kills at memory.max): there the watchdog only guards a handler's wall")
        return cls(group, handler, *spec.saved, delay=delay, limit=spec.limit)

    def __init__(self, group: V2Group, handler: DeclaredHandler, saved_high: int, saved_max: int, *,
                 delay: float = 2.0, limit: int | None = None) -> None:
        self.group = group
        self.handler: DeclaredHandler | None = handler
        self.saved = (saved_high, saved_max)
        self.delay = delay
        #: The handler's wall (its memory.high); above it, a grant of its plan is open.
        self.limit = limit
        self.mourned = False
        self.gone = False
        self.pending_limit = False
        self.notes: list[dict[str, Any]] = []
        #: Since when the group is frozen with the handler's grant open.
        self._frozen_ns: int | None = None
        #: Since when the group met the wall with no grant open yet (the
        #: plan raises it right after): the grant is looked for until the delay.
        self._wall_ns: int | None = None
        #: Since when the handler's grant is open (its wall raised) and watched.
        self._grant_since: int | None = None
        #: The grant was reclaimed from the stopped handler: not again before it runs again.
        self._reclaimed = False
        # Before Linux 5.2 there is no freezer, and nothing to watch.
        self.notifier: FileNotifier | None = None
        self.wall_notifier: FileNotifier | None = None
        try:
            if os.path.exists(os.path.join(group.path, group.freeze_file)):
                self.notifier = FileNotifier(group.open_file(group.cgroup_events_file, os.O_RDONLY),
                                             os.path.join(group.path, group.cgroup_events_file),
                                             f"{group.cgroup_events_file} of {group.relpath}")
            self.wall_notifier = FileNotifier(group.open_file(group.events_file, os.O_RDONLY),
                                              os.path.join(group.path, group.events_file),
                                              f"{group.events_file} of {group.relpath}")
        except BaseException:
            self.close()
            raise

    @property
    def notifiers(self) -> tuple[FileNotifier, ...]:
        """What wakes the watchdog for this guard (:meth:`notified`): ``cgroup.events`` and ``memory.events``."""
        return tuple(n for n in (self.notifier, self.wall_notifier) if n is not None)

    @property
    def watching_grant(self) -> bool:
        """The group met the wall, or the handler's grant is open: the watchdog ticks."""
        return self._wall_ns is not None or self._grant_since is not None

    @property
    def in_episode(self) -> bool:
        """Frozen by the handler's plan: the watchdog ticks until it is thawed."""
        return self._frozen_ns is not None

    def notified(self, now: int) -> None:
        """``cgroup.events`` (frozen or thawed) or ``memory.events`` (the
        wall met) changed, or the guard just started. Both are read again,
        which re-arms their notifications."""
        met = False
        try:
            events = self.notifier.reread() if self.notifier is not None else None
            if self.wall_notifier is not None:
                before = self.wall_notifier.text
                met = self.wall_notifier.reread() != before  # not at the guard's start, nor for cgroup.events
        except (OSError, UseroomError):
            self.gone = True
            self._frozen_ns = self._wall_ns = self._grant_since = None
            return
        if events is not None:
            frozen = parse_key_values(events, self.group.cgroup_events_file).get("frozen", 0) == 1
            if not frozen:
                self._frozen_ns = None
            elif self._frozen_ns is None and self._grant_open():
                self._frozen_ns = now  # a freeze of the plan's, not of the user's
        if self._grant_since is None and self.handler is not None and not self.handler.exited:
            if self._grant_open():
                self._grant_since = now
            elif met and self._wall_ns is None:
                self._wall_ns = now

    def _grant_open(self) -> bool:
        if self.limit is None:
            return False
        try:
            return self.group.high() > self.limit
        except (OSError, UseroomError):
            return False

    def tick(self, now: int) -> Takeover | None:
        """While frozen by the plan: thaw if the handler cannot (stopped) or
        has not (the delay). While its grant is open: reclaim it if the
        handler is stopped (:meth:`_watch_grant`)."""
        takeover = self._tick_frozen(now)
        if self._grant_since is None and self._wall_ns is not None:
            if self._grant_open():
                self._grant_since, self._wall_ns = now, None
            elif now - self._wall_ns >= self.delay * 1e9:
                self._wall_ns = None  # met, and no grant of the plan's came
        if self._grant_since is not None:
            self._watch_grant()
        return takeover

    def _tick_frozen(self, now: int) -> Takeover | None:
        if self._frozen_ns is None or self.handler is None or self.handler.exited:
            return None
        reason, _ = self.handler.look()
        if reason != "handler-stopped" and now - self._frozen_ns >= self.delay * 1e9:
            reason = "delay"
        if reason not in ("handler-stopped", "delay"):
            return None
        frozen_ns, self._frozen_ns = self._frozen_ns, None
        acted_ns = time.monotonic_ns()
        self._reclaimed = reason == "handler-stopped"  # the grant's watch need not act again
        try:
            self._thaw()
            # The wall lifted: memory.max (the kernel's OOM killer) ends the
            # OOM the plan was deciding about.
            self.group.set_high(UNLIMITED)
        except GroupGone:
            self.gone = True
            return None
        except (OSError, UseroomError) as err:
            self.notes.append({"event": "error", "group": self.group.relpath, "error": str(err),
                               "at_ns": time.monotonic_ns()})
            return None
        return Takeover(self.group.relpath, reason, frozen_ns, acted_ns, time.monotonic_ns(), self.delay,
                        self.handler.pid, None)

    def _watch_grant(self) -> None:
        """The handler's grant is open: if the handler is stopped (SIGSTOP,
        a debugger), nobody closes it, and the processes its plan stopped
        by signal stay stopped. Continue every task of the group and lift
        the wall (``memory.max``, the kernel, acts on what overruns it); the
        handler, continued, puts its wall back. A handler that exits is
        :meth:`handler_exited`'s; a freeze, :meth:`tick`'s."""
        assert self.handler is not None
        if self.handler.exited or not self._grant_open():
            self._grant_since = None
            return
        if self._frozen_ns is not None:
            return
        reason, _ = self.handler.look()
        if reason != "handler-stopped":
            self._reclaimed = False  # it runs: a later stop is a new one
            return
        self._grant_since = None
        if self._reclaimed:
            return  # this stop's grant was reclaimed already: the wall is lifted
        self._reclaimed = True
        record: dict[str, Any] = {"event": "grant-reclaimed", "group": self.group.relpath, "reason": reason,
                                  "handler_pid": self.handler.pid, "at_ns": time.monotonic_ns()}
        _continue_group(self.group, record)
        try:
            self.group.set_high(UNLIMITED)
            record["wall_lifted"] = True
        except GroupGone:
            self.gone = True
            record["wall_lifted"] = False
        except (OSError, UseroomError) as err:
            record["wall_lifted"] = False
            record["error"] = str(err)
        self.notes.append(record)

    def _thaw(self) -> None:
        """Write 0 to ``cgroup.freeze``: the kernel thaws the group (the tasks run on)."""
        self.group.write_file(self.group.freeze_file, "0")

    def handler_exited(self) -> dict[str, Any]:
        """Restore the group's memory.high and memory.max from before the handler."""
        assert self.handler is not None
        self.handler.exited = True
        self.mourned = True
        high, limit = self.saved
        record: dict[str, Any] = {"event": "handler-exited", "group": self.group.relpath,
                                  "handler_pid": self.handler.pid, "at_ns": time.monotonic_ns()}
        _continue_group(self.group, record)
        self._frozen_ns = self._wall_ns = self._grant_since = None
        try:
            if self.notifier is not None:
                self._thaw()  # the plan froze it and died before its thaw
            # memory.high first to max, so it never sits above memory.max.
            self.group.set_high(UNLIMITED)
            self.group.set_limit(limit)
            self.group.set_high(high)
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
        """Close the guard's fds (cgroup.events, memory.events); safe to call again."""
        for notifier in (self.notifier, self.wall_notifier):
            if notifier is not None:
                notifier.close()


#: The guard classes, each asked in turn whether it guards a group.
GUARDS: Final = (Guard, WallGuard)


def open_guard(spec: GuardSpec, delay: float, handler: DeclaredHandler | None) -> Guard | WallGuard:
    """The guard *spec* asks for; raises UseroomError or OSError if the group cannot be guarded."""
    group = Group.open(spec.path)
    for kind in GUARDS:
        guard = kind.accept(group, spec, delay, handler)
        if guard is not None:
            return guard
    raise UseroomError(f"the watchdog has no guard for {group.relpath}, a group of {type(group).__name__}")

