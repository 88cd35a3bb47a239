"""The manager thread of a supervisor.

One Python thread for every group served: it waits on the watcher's
records and on every group's own fds (grants, hook changes, usage
thresholds), and steps only the groups that something happened to. It has
no timer of its own: it sleeps until an fd wakes it, or until the earliest
time a group asked to be looked at again (a refresh deferred by
``REFRESH_GAP``, a limit to restore), or the watchdog did (after an
episode, until the watchdog's delay has passed: one that is stopped then
is replaced, see :meth:`Guardian.look`).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from useroom import native
from useroom._hooks import THREAD_STACK_PREFAULT
from useroom._limits import spawning
from useroom.handler.group import GroupHandler
from useroom.handler.guardian import Guardian
from useroom.handler.link import WatchdogLink
from useroom.handler.pressure import ServicePressure
from useroom.watchdog.protocol import Takeover

__all__ = ["Manager"]

logger = logging.getLogger(__name__)

#: Epoll data of the manager's own fds; a group's fds use its key << 8 | kind.
_WAKE = 1
_STOP = 2
_CONTROL = 3
_LINK_SOCKET = 4
_LINK_PIDFD = 5
_PRESSURE = 6
_GROUP_SHIFT = 8
_NEVER = float("inf")


class Manager:
    """The manager thread: one epoll set for the watcher's records, the
    watchdog's socket and pidfd, and every group's fds; it steps the groups
    that something happened to, and sleeps otherwise.

    ``guardian`` returns the supervisor's watchdog guardian of the moment
    (or None), ``note`` takes an error the thread survived, ``route`` a
    takeover the watchdog reported (to its group's events).
    """

    def __init__(
        self,
        watcher: native.NativeWatcher,
        *,
        guardian: Callable[[], Guardian | None],
        note: Callable[[BaseException], None],
        route: Callable[[Takeover], None],
    ) -> None:
        self._watcher = watcher
        self._guardian = guardian
        self._note = note
        self._route = route
        with contextlib.ExitStack() as opened:  # out of fds: none is left open
            self._ep: native.Epoll = opened.enter_context(native.Epoll())
            self._stop: native.EventFd = opened.enter_context(native.EventFd())
            self._control: native.EventFd = opened.enter_context(native.EventFd())
            opened.pop_all()
        self._ring_lock = threading.Lock()
        self._by_index: dict[int, GroupHandler] = {}  # watcher group index -> its handler
        self._enlisted: dict[int, GroupHandler] = {}  # key -> its handler
        self._timed: dict[int, GroupHandler] = {}  # key -> a handler with a time to be stepped at
        self._inboxed: set[int] = set()  # keys of the handlers records were routed to
        self._linked: tuple[int, ...] = ()
        self._link: WatchdogLink | None = None
        self._pressure: ServicePressure | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.tid = 0
        self._ep.add(watcher.wake_fd, _WAKE)
        self._ep.add(self._stop.fileno(), _STOP)
        self._ep.add(self._control.fileno(), _CONTROL)

    def start(self, handlers: Iterable[GroupHandler]) -> None:
        """Enlists those of ``handlers`` that have a slot in the watcher, and starts the thread."""
        for handler in handlers:
            if handler.slot is not None:
                self.enlist(handler)
        thread = threading.Thread(target=self._run, name="useroom-manager", daemon=True)
        with spawning("the manager thread"):
            thread.start()
        self._thread = thread  # only once started: stop() joins it
        self._ready.wait(10)

    def enlist(self, handler: GroupHandler) -> None:
        """Routes the group's records to it and steps it from now on."""
        with handler.step_lock:
            self._by_index[handler.watched.index] = handler
            handler.register(self._ep, handler.key << _GROUP_SHIFT)
            self._enlisted[handler.key] = handler
            self._retime(handler)
        self.wake()

    def discharge(self, handler: GroupHandler) -> None:
        """Steps the group no more (its step in progress ends first); its
        fds leave the epoll set."""
        with handler.step_lock:
            self._enlisted.pop(handler.key, None)
            self._timed.pop(handler.key, None)
            handler.unregister(self._ep)

    def watch_pressure(self, source: ServicePressure) -> None:
        """Runs the ``on_pressure`` hooks of the groups ``source`` covers at
        each of its signals (before :meth:`start`; the supervisor owns it)."""
        self._pressure = source
        self._ep.add(source.fileno(), _PRESSURE, source.events)

    def wake(self) -> None:
        self._control.write(1)

    def link_changed(self) -> None:
        self.wake()

    def collect(self) -> None:
        self.collect_from(self._watcher)

    def collect_from(self, watcher: native.NativeWatcher) -> None:
        """Reads the watcher's new records and gives each to its group."""
        routed = False
        with self._ring_lock:
            for record in watcher.wait(0):
                handler = self._by_index.get(record.group)
                if handler is not None:
                    handler.deliver(record)
                    self._inboxed.add(handler.key)
                    routed = True
        thread = self._thread
        if routed and thread is not None and threading.current_thread() is not thread:
            # The wake eventfd was read here, not by the manager: wake it.
            self.wake()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.write(1)
            thread.join()
        for handler in list(self._enlisted.values()):
            self.discharge(handler)
        self._ep.close()
        self._stop.close()
        self._control.close()

    def _run(self) -> None:
        native.stack_prefault(THREAD_STACK_PREFAULT)
        self.tid = threading.get_native_id()
        self._ready.set()
        while True:
            try:
                if not self._round():
                    return
            except Exception as err:  # noqa: BLE001 - survive, record, retry on the next round
                self._note(err)
                time.sleep(0.05)

    def _round(self) -> bool:
        """One wait of the manager and the steps it calls for. Only the
        groups with a timer are looked at for their time, and only those
        that something happened to are stepped: a round costs the same with
        one group or a thousand."""
        self._relink()
        timed = list(self._timed.values())  # one call: other threads enlist meanwhile
        due = min((h.due() for h in timed), default=_NEVER)
        guardian = self._guardian()
        if guardian is not None:
            due = min(due, guardian.due())
        timeout = None if due == _NEVER else max(0.0, due - time.monotonic())
        if self._inboxed:
            timeout = 0.0  # records routed meanwhile (a step's collect, another thread's)
        ready = self._ep.wait(timeout, max_events=64)
        woken: dict[int, list[int]] = collections.defaultdict(list)
        records = False
        for data, events in ready:
            if data == _STOP:
                return False
            if data == _WAKE:
                records = True
            elif data == _CONTROL:
                self._control.read()
            elif data == _LINK_SOCKET:
                self._takeovers()
            elif data == _LINK_PIDFD:
                self._watchdog_exited()
            elif data == _PRESSURE:
                self._service_pressure(events)
            else:
                woken[data >> _GROUP_SHIFT].append(data & ((1 << _GROUP_SHIFT) - 1))
        if records:
            self.collect()
        now = time.monotonic()
        with self._ring_lock:  # collect() runs on other threads too (a group's start)
            inboxed, self._inboxed = self._inboxed, set()
        keys = set(woken) | inboxed | {h.key for h in timed if h.due() <= now}
        for key in sorted(keys):
            handler = self._enlisted.get(key)
            if handler is None:
                continue
            with handler.step_lock:
                if handler.key not in self._enlisted:
                    continue
                try:
                    handler.step(woken.get(key, []))
                except Exception as err:  # noqa: BLE001 - one group's failed step: recorded, the other groups are served
                    handler.note(err)
                if not handler.running:  # its group is gone: its fds would wake us for nothing
                    self._enlisted.pop(key, None)
                    self._timed.pop(key, None)
                    handler.unregister(self._ep)
                    continue
                handler.register(self._ep, key << _GROUP_SHIFT)  # its thresholds may have changed
                self._retime(handler)
        guardian = self._guardian()
        if guardian is not None:
            if ready or records:
                guardian.beat()
            if ready or records or now >= guardian.due():
                guardian.look(time.monotonic(), episode=records)
        return True

    def _retime(self, handler: GroupHandler) -> None:
        if handler.due() < _NEVER:
            self._timed[handler.key] = handler
        else:
            self._timed.pop(handler.key, None)

    def _relink(self) -> None:
        """Registers the current watchdog's socket and pidfd."""
        guardian = self._guardian()
        link = guardian.link if guardian is not None else None
        if link is self._link and (link is None or link.sock is None or self._linked):
            return  # registered already, or not ready yet (a round after its start registers it)
        self._unlink()
        self._link = link
        if link is None or link.sock is None:
            return
        self._ep.add(link.sock.fileno(), _LINK_SOCKET)
        self._ep.add(_fileno(link.pidfd), _LINK_PIDFD)
        self._linked = (link.sock.fileno(), _fileno(link.pidfd))

    def _takeovers(self) -> None:
        guardian = self._guardian()
        if guardian is not None:
            for takeover in guardian.receive():
                self._route(takeover)

    def _unlink(self) -> None:
        for fd in self._linked:
            try:
                self._ep.remove(fd)
            except OSError:
                pass  # closed already: the kernel dropped it
        self._linked = ()

    def _watchdog_exited(self) -> None:
        guardian = self._guardian()
        self._unlink()
        self._link = None
        if guardian is not None:
            self._takeovers()
            guardian.restart()

    def _service_pressure(self, events: int) -> None:
        """The service manager's source signalled: the ``on_pressure`` hooks
        of every group it covers run, each group under its step lock."""
        source = self._pressure
        if source is None:
            return
        if not source.consume(events):
            self._pressure = None
            with contextlib.suppress(OSError):
                self._ep.remove(source.fileno())
            logger.warning("the service manager's memory pressure source %s is gone: on_pressure hooks "
                           "run from usage only", source.watch.path,
                           extra={"cause": "pressure_watch_gone", "path": source.watch.path})
            return
        for handler in list(self._enlisted.values()):
            if not source.covers(handler.group):
                continue
            with handler.step_lock:
                if handler.key in self._enlisted:
                    handler.service_pressure()


def _fileno(fd: Any) -> int:
    return fd if isinstance(fd, int) else fd.fileno()
