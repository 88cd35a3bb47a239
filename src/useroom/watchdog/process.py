"""The watchdog process: its loop over the guards, and its command line.

:class:`Watchdog` sleeps in the kernel on the guards' OOM eventfds, the
declared handler's pidfd and the control socket, and ticks the guards
while something is under way; :func:`main` is ``useroom watchdog`` and
``python -m useroom.watchdog``, and what a :class:`~useroom.watchdog.WatchdogLink`
runs for a handler. See :mod:`useroom.watchdog`.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from typing import IO, Any, Final

from useroom import native
from useroom._units import parse_duration
from useroom.exceptions import UseroomError
from useroom.watchdog.guards import DeclaredHandler, Guard, ProcessFd, WallGuard, open_guard
from useroom.watchdog.protocol import (
    GUARD_OPTION,
    MESSAGE_MAX,
    READY,
    Add,
    Beat,
    GuardSpec,
    LastResort,
    Remove,
    SetLimit,
    Stop,
    Takeover,
    decode,
    encode_record,
)

__all__ = ["DEFAULT_DELAY", "POLL_INTERVAL", "Watchdog", "main"]

#: How long an OOM may last before the watchdog hands it to the kernel, in seconds.
DEFAULT_DELAY: Final = 2.0
#: How often the watchdog looks at a group while it is under OOM, in seconds.
POLL_INTERVAL: Final = 0.005

#: Epoll data of the stop eventfd, the control socket and the handler's
#: pidfd; a guard's OOM eventfd has its own number as its data.
_STOP: Final = 1 << 40
_CONTROL: Final = (1 << 40) + 1
_HANDLER: Final = (1 << 40) + 2


class Watchdog:
    """The watchdog's loop over its guards; see :mod:`useroom.watchdog`.

    ``handler`` (owned) is the declared handler of every guard, None when run
    on its own. ``control`` (owned) is the socket to that handler: it sends
    ``beat``, ``add``/``remove``/``limit`` (JSON), ``last-resort`` and
    ``stop``; the watchdog sends ``ready`` and a JSON record for each thing
    it did (see :mod:`useroom.watchdog.protocol`). With a control socket it
    runs until ``stop``, or until the socket closes and every guard is done;
    without one, until every guard is done.
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
        self._by_fd: dict[int, Guard | WallGuard] = {}  # the guards with a notifier, by its fd
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
        added: list[int] = []
        try:
            for notifier in guard.notifiers:
                fd = notifier.fileno()
                self._ep.add(fd, fd, guard.notify_events)
                added.append(fd)
        except BaseException:
            for fd in added:
                self._ep.remove(fd)
            guard.close()
            raise
        for fd in added:
            self._by_fd[fd] = guard
        if added:
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
        for notifier in guard.notifiers:
            fd = notifier.fileno()
            self._ep.remove(fd)
            del self._by_fd[fd]
        guard.close()
        return {"group": guard.group.relpath, "path": path, "key": self._keys.pop(path)}

    def record(self, record: dict[str, Any]) -> None:
        """Write *record* to the log and send it to the handler (dropped if its socket is full)."""
        line = encode_record(record)
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
        try:
            message = decode(data)
            if isinstance(message, Beat):
                if self.handler is not None:
                    self.handler.beat_ns = now
            elif isinstance(message, Add):
                self._add(message.spec)
            elif isinstance(message, Remove):
                identity = self.remove(message.path)
                if identity is not None:
                    self.record({"event": "removed", "at_ns": now, **identity})
            elif isinstance(message, SetLimit):
                guard = self.guards.get(message.path)
                if guard is not None:
                    guard.limit = message.limit
            elif isinstance(message, LastResort):
                # The handler found nothing left to kill: the kernel acts next and
                # may take the handler's own process. Its record survives here.
                self.record({"event": "last-resort", "at_ns": now, **message.note})
            else:
                assert isinstance(message, Stop)
                return False
        except (KeyError, TypeError, ValueError) as err:
            self.record({"event": "bad-message", "message": data[:200].decode(errors="replace"),
                         "error": repr(err), "at_ns": now})
        return True

    def _add(self, spec: GuardSpec) -> None:
        try:
            guard = self.add(spec)
        except (UseroomError, OSError) as err:
            self.record({"event": "add-failed", "path": spec.path, "key": spec.key, "error": str(err),
                          "at_ns": time.monotonic_ns()})
            return
        self.record({"event": "added", "group": guard.group.relpath, "path": spec.path, "key": spec.key,
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
            self.control.send(READY)
        while self.control is not None or self.guards:
            # Idle, it sleeps in the kernel until an eventfd, the pidfd or
            # the socket wakes it: a timer only while something is under way.
            busy = any(g.in_episode or g.pending_limit or g.watching_grant for g in self.guards.values())
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
                    self.record(guard.handler_exited())
                takeover = guard.tick(now)
                for note in guard.notes:
                    self.record(note)
                guard.notes.clear()
                if takeover is not None:
                    self.takeovers.append(takeover)
                    self.record(takeover.to_dict())
                if guard.done:
                    identity = self.remove(path)
                    self.record({"event": "done", "gone": guard.gone, "at_ns": now, **(identity or {})})

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
    parser.add_argument(GUARD_OPTION, dest="guard", action="append", default=[],
                        help=argparse.SUPPRESS)  # a GuardSpec's JSON
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
            watchdog.record({"event": "error", "error": repr(err), "traceback": traceback.format_exc()})
            raise
    finally:
        watchdog.close()
        if log is not None and log is not sys.stdout:
            log.close()
    return 0
