"""The supervisor: one process, any number of handled groups.

Whatever a handler needs once per process lives here, shared by every
group it serves:

- one native watcher thread (:class:`~useroom.native.NativeWatcher`)
  waits on every group's notifications in one epoll set and runs their
  plans; an episode that waits (for the OOM to end, a victim to exit, the
  hooks' reply) does not hold it, so one group's episode never delays
  another's first action;
- one manager thread (Python) waits on the watcher's records and on every
  group's own fds (grants, hook changes, usage thresholds), and steps only
  the groups that something happened to. It has no timer of its own: it
  sleeps until an fd wakes it, or until the earliest time a group asked
  to be looked at again (a refresh deferred by ``REFRESH_GAP``, a limit to
  restore);
- one watchdog process guards all the groups (:class:`_Guardian`);
- the hardening of the process, and (cgroup v1, inside a handled group)
  the placement of the two threads' kernel allocations outside it.

A :class:`~useroom.Handler` made on its own is a supervisor of one group:
its ``start()`` makes a private supervisor.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from typing import Any

import attrs

from useroom import native
from useroom.cgroup import Group
from useroom._handler import GroupHandler, ProcessOptions
from useroom.policy import Policy
from useroom._hardening import HardeningReport, vm_locked, lock_memory
from useroom._hooks import THREAD_STACK_PREFAULT
from useroom.handler.link import WatchdogLink
from useroom.watchdog import DEFAULT_DELAY, Takeover
from useroom.exceptions import UseroomError, WatcherError

__all__ = ["Handler", "Supervisor"]

#: Epoll data of the manager's own fds; a group's fds use its key << 8 | kind.
_WAKE = 1
_STOP = 2
_CONTROL = 3
_LINK_SOCKET = 4
_LINK_PIDFD = 5
_GROUP_SHIFT = 8
_NEVER = float("inf")


class Supervisor:
    """Handles the OOMs of many memory cgroups from this process.

    ``delay`` is how long an episode may last before the watchdog hands it
    to the kernel (seconds or ``"2s"``); ``harden``, ``mlockall``,
    ``watchdog``, ``watchdog_group``, ``watchdog_log`` and
    ``heartbeat_timeout`` mean what they mean for a :class:`~useroom.Handler`,
    for the whole process. :meth:`add` returns the group's handler, whose
    hooks, events and victims are its own; groups are added and removed
    before :meth:`start` or while it runs.
    """

    def __init__(
        self,
        *,
        delay: float | str = DEFAULT_DELAY,
        harden: bool = True,
        mlockall: bool = False,
        watchdog: bool = True,
        watchdog_group: Group | None = None,
        watchdog_log: str | None = None,
        heartbeat_timeout: float = 5.0,
    ) -> None:
        self.options = ProcessOptions(delay, harden, mlockall, watchdog, watchdog_group, watchdog_log,
                                      heartbeat_timeout)
        #: What :func:`lock_memory` did; None before start or with harden=False.
        self.hardening: HardeningReport | None = None
        #: This process's locked bytes (VmLck) once started.
        self.locked_bytes = 0
        #: Errors the manager thread met and survived, and the watchdog's.
        self.errors: list[BaseException] = []
        self._handlers: dict[int, GroupHandler] = {}  # key -> its handler
        self._next_key = 1
        self._admin = threading.RLock()  # add, remove, start, stop: one at a time
        self._watcher: native.NativeWatcher | None = None
        self._manager: _Manager | None = None
        self._guardian: _Guardian | None = None
        self._placement = _Placement()
        self._running = False

    # -- public ------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    @property
    def handlers(self) -> tuple[GroupHandler, ...]:
        """The handlers of the groups served, in the order they were added."""
        return tuple(self._handlers.values())

    @property
    def watchdog(self) -> WatchdogLink | None:
        """The watchdog process while it runs (None without one)."""
        return self._guardian.link if self._guardian is not None else None

    @property
    def watcher_tid(self) -> int:
        """The native watcher thread's id while it runs, else 0."""
        return self._watcher.tid if self._watcher is not None and not self._watcher.closed else 0

    @property
    def manager_tid(self) -> int:
        """The manager thread's id while it runs, else 0."""
        return self._manager.tid if self._manager is not None else 0

    @property
    def kernel_memory_group(self) -> Group | None:
        """Where the threads' kernel allocations are charged while this
        process runs inside a handled group (cgroup v1), or None."""
        return self._placement.place

    @property
    def lost(self) -> int:
        """Watcher records overwritten before they were read (0 normally)."""
        return self._watcher.lost if self._watcher is not None else 0

    def add(self, group: Group, policy: Policy | None = None, **options: Any) -> Handler:
        """Serves ``group`` with ``policy`` (KillLargest by default); returns
        its :class:`~useroom.Handler`. ``options`` are the handler's
        per-group options (``reserve``, ``thresholds``, hooks' timeouts,
        ``protect`` ...); the process-wide ones are the supervisor's."""
        for name in _PROCESS_OPTIONS:
            if name in options:
                raise TypeError(f"{name} is the supervisor's, for every group: pass it to Supervisor()")
        with self._admin:
            if any(h.group.path == group.path for h in self._handlers.values()):
                raise ValueError(f"{group.relpath} is served already")
            handler = Handler(group, policy, **attrs.asdict(self.options, recurse=False), **options)
            self._adopt(handler)
            return handler

    def _adopt(self, handler: GroupHandler) -> None:
        with self._admin:
            key = self._next_key
            self._next_key += 1
            handler._supervisor = self
            handler._key = key
            self._handlers[key] = handler
            if self._running:
                try:
                    self._begin(handler)
                except BaseException:
                    del self._handlers[key]
                    handler._supervisor = None
                    raise

    def remove(self, group: Group | GroupHandler) -> None:
        """Stops serving a group (or a handler): its settings are put back,
        its fds closed. An episode in progress ends first (or is ended)."""
        with self._admin:
            handler = self._find(group)
            if handler is None:
                raise ValueError(f"{getattr(group, 'relpath', group)!r} is not served by this supervisor")
            try:
                if self._running:
                    self._end(handler)
            finally:
                self._handlers.pop(handler._key, None)
                handler._supervisor = None

    def _find(self, group: Group | GroupHandler) -> GroupHandler | None:
        for handler in self._handlers.values():
            if handler is group or handler.group.path == getattr(group, "path", None):
                return handler
        return None

    def start(self) -> Supervisor:
        """Hardens the process, starts the watcher, the manager and the
        watchdog, and every group added so far."""
        with self._admin:
            if self._running:
                raise WatcherError("the supervisor is already running")
            try:
                self._start()
            except BaseException:
                self._stop()
                raise
        return self

    def stop(self) -> None:
        """Stops every group (each group's settings are put back), then the
        threads and the watchdog. Idempotent."""
        with self._admin:
            self._stop()

    def __enter__(self) -> Supervisor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- running -------------------------------------------------------------

    def _start(self) -> None:
        if self.options.harden:
            self.hardening = lock_memory(mlockall=self.options.mlockall)
        self._watcher = native.NativeWatcher()
        self._manager = _Manager(self, self._watcher)
        started = []
        for handler in list(self._handlers.values()):
            handler._open(self._watcher.add_group())
            started.append(handler)
        self._watcher.start()
        for handler in started:
            handler._activate()
        self._running = True
        self._manager.start()
        self._placement.place_for(self, [self.watcher_tid, self.manager_tid])
        needing = [h for h in started if h._declare_and_needs_watchdog()]
        if self.options.watchdog and needing:
            self._guardian = _Guardian(self, self._watchdog_place(needing))
            for handler in needing:
                self._guardian.add(handler)
            self._guardian.start()
        self.locked_bytes = vm_locked()

    def _begin(self, handler: GroupHandler) -> None:
        """A group added while running: open, arm, activate, guard."""
        assert self._watcher is not None and self._manager is not None
        handler._open(self._watcher.add_group())
        try:
            handler._activate()
            self._placement.place_handler(handler)
            self._manager.enlist(handler)
            if handler._declare_and_needs_watchdog() and self.options.watchdog:
                if self._guardian is None:
                    self._guardian = _Guardian(self, self._watchdog_place([handler]))
                    self._guardian.add(handler)
                    self._guardian.start()
                else:
                    self._guardian.add(handler)
        except BaseException:
            self._end(handler)
            raise

    def _end(self, handler: GroupHandler) -> None:
        """Stops one group: out of the manager, settings back, out of the watchdog."""
        if self._manager is not None:
            self._manager.discharge(handler)
        try:
            handler._close()
        finally:
            if self._guardian is not None:
                self._guardian.remove(handler)
            handler._drop_slot()
            if self._manager is not None:
                self._manager.collect()  # its last records, before its index is reused
            handler._closed()

    def _stop(self) -> None:
        self._running = False
        manager, self._manager = self._manager, None
        if manager is not None:
            manager.stop()
        for handler in list(self._handlers.values()):
            try:
                handler._close()
            except Exception as err:
                self.errors.append(err)
        guardian, self._guardian = self._guardian, None
        if guardian is not None:
            for takeover in guardian.stop():
                self._route_takeover(takeover)
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            try:
                watcher.stop()
                if manager is not None:
                    manager.collect_from(watcher)
            finally:
                for handler in list(self._handlers.values()):
                    handler._drop_slot()
                watcher.close()
        self._placement.unplace()
        for handler in list(self._handlers.values()):
            handler._closed()

    def _route_takeover(self, takeover: Takeover) -> None:
        for handler in list(self._handlers.values()):  # the manager's thread: add() may run meanwhile
            if handler.group.relpath == takeover.group:
                handler._takeover(takeover)
                return

    def _protect(self, pid: int) -> None:
        """A watchdog just spawned is never a victim, in any group, from now on."""
        for handler in list(self._handlers.values()):
            handler._protect_pid(pid)

    def _watchdog_place(self, handlers: list[GroupHandler]) -> Group | None:
        if any(h.group.version == 2 for h in handlers):
            # A v2 parent with memory enabled for its children cannot hold
            # processes: inside the group, the watchdog stays with us.
            return self.options.watchdog_group or (None if any(h._inside() for h in handlers) else Group.current())
        return self._placement_for(handlers)

    def _placement_for(self, handlers: list[GroupHandler]) -> Group:
        if self.options.watchdog_group is not None:
            return self.options.watchdog_group
        for handler in handlers:
            if handler._inside():
                parent = handler.group.parent
                if parent is None:
                    raise UseroomError(f"this process is inside {handler.group.relpath}, which has no parent "
                                       "group for the watchdog: pass watchdog_group=")
                return parent
        return Group.current()

    def _note(self, err: BaseException) -> None:
        self.errors.append(err)
        del self.errors[:-100]


#: Options of a Handler that are the process's, set on the Supervisor.
_PROCESS_OPTIONS = ("delay", "harden", "mlockall", "watchdog", "watchdog_group", "watchdog_log",
                    "heartbeat_timeout")


class _Manager:
    """The manager thread: one epoll set for the watcher's records, the
    watchdog's socket and pidfd, and every group's fds; it steps the groups
    that something happened to, and sleeps otherwise."""

    def __init__(self, supervisor: Supervisor, watcher: native.NativeWatcher) -> None:
        self._sup = supervisor
        self._watcher = watcher
        self._ep = native.Epoll()
        self._stop = native.EventFd()
        self._control = native.EventFd()
        self._ring_lock = threading.Lock()
        self._by_index: dict[int, GroupHandler] = {}  # watcher group index -> its handler
        self._enlisted: dict[int, GroupHandler] = {}  # key -> its handler
        self._timed: dict[int, GroupHandler] = {}  # key -> a handler with a time to be stepped at
        self._inboxed: set[int] = set()  # keys of the handlers records were routed to
        self._linked: tuple[int, ...] = ()
        self._link: WatchdogLink | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self.tid = 0
        self._ep.add(watcher.wake_fd, _WAKE)
        self._ep.add(self._stop.fileno(), _STOP)
        self._ep.add(self._control.fileno(), _CONTROL)

    def start(self) -> None:
        for handler in list(self._sup._handlers.values()):
            if handler._slot is not None:
                self.enlist(handler)
        self._thread = threading.Thread(target=self._run, name="useroom-manager", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def enlist(self, handler: GroupHandler) -> None:
        """Routes the group's records to it and steps it from now on."""
        with handler._step_lock:
            self._by_index[handler._watched.index] = handler
            handler._register(self._ep, handler._key << _GROUP_SHIFT)
            self._enlisted[handler._key] = handler
            self._retime(handler)
        self.wake()

    def discharge(self, handler: GroupHandler) -> None:
        """Steps the group no more (its step in progress ends first); its
        fds leave the epoll set."""
        with handler._step_lock:
            self._enlisted.pop(handler._key, None)
            self._timed.pop(handler._key, None)
            handler._unregister(self._ep)

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
                    handler._inbox.append(record)
                    self._inboxed.add(handler._key)
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
            except Exception as err:  # survive, record, retry on the next round
                self._sup._note(err)
                time.sleep(0.05)

    def _round(self) -> bool:
        """One wait of the manager and the steps it calls for. Only the
        groups with a timer are looked at for their time, and only those
        that something happened to are stepped: a round costs the same with
        one group or a thousand."""
        self._relink()
        timed = list(self._timed.values())  # one call: other threads enlist meanwhile
        due = min((h._due() for h in timed), default=_NEVER)
        timeout = None if due == _NEVER else max(0.0, due - time.monotonic())
        if self._inboxed:
            timeout = 0.0  # records routed meanwhile (a step's collect, another thread's)
        ready = self._ep.wait(timeout, max_events=64)
        woken: dict[int, list[int]] = collections.defaultdict(list)
        records = False
        for data, _ in ready:
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
            else:
                woken[data >> _GROUP_SHIFT].append(data & ((1 << _GROUP_SHIFT) - 1))
        if records:
            self.collect()
        now = time.monotonic()
        with self._ring_lock:  # collect() runs on other threads too (a group's start)
            inboxed, self._inboxed = self._inboxed, set()
        keys = set(woken) | inboxed | {h._key for h in timed if h._due() <= now}
        for key in sorted(keys):
            handler = self._enlisted.get(key)
            if handler is None:
                continue
            with handler._step_lock:
                if handler._key not in self._enlisted:
                    continue
                kinds = woken.get(key, [])
                try:
                    handler._step(kinds, bool(kinds) or bool(handler._inbox))
                except Exception as err:
                    handler._note(err)
                if not handler._running:  # its group is gone: its fds would wake us for nothing
                    self._enlisted.pop(key, None)
                    self._timed.pop(key, None)
                    handler._unregister(self._ep)
                    continue
                handler._register(self._ep, key << _GROUP_SHIFT)  # its thresholds may have changed
                self._retime(handler)
        guardian = self._sup._guardian
        if guardian is not None and (ready or records):
            guardian.beat()
        return True

    def _retime(self, handler: GroupHandler) -> None:
        if handler._due() < _NEVER:
            self._timed[handler._key] = handler
        else:
            self._timed.pop(handler._key, None)

    def _relink(self) -> None:
        """Registers the current watchdog's socket and pidfd."""
        guardian = self._sup._guardian
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
        guardian = self._sup._guardian
        if guardian is not None:
            for takeover in guardian.receive():
                self._sup._route_takeover(takeover)

    def _unlink(self) -> None:
        for fd in self._linked:
            try:
                self._ep.remove(fd)
            except OSError:
                pass  # closed already: the kernel dropped it
        self._linked = ()

    def _watchdog_exited(self) -> None:
        guardian = self._sup._guardian
        self._unlink()
        self._link = None
        if guardian is not None:
            self._takeovers()
            guardian.restart()


def _fileno(fd: Any) -> int:
    return fd if isinstance(fd, int) else fd.fileno()


class _Guardian:
    """The one watchdog process of a supervisor: started with the groups
    that need it, told of groups added and removed, restarted if it dies;
    if it cannot be, each group gets its kernel OOM killer back."""

    def __init__(self, supervisor: Supervisor, place: Group | None) -> None:
        self._sup = supervisor
        self.link: WatchdogLink | None = WatchdogLink(
            place, delay=supervisor.options.delay,
            handler_tids=[t for t in (supervisor.watcher_tid,) if t],
            helper_tids=[t for t in (supervisor.manager_tid,) if t],
            heartbeat_timeout=supervisor.options.heartbeat_timeout, log=supervisor.options.watchdog_log,
            spawned=supervisor._protect,
        )

    def add(self, handler: GroupHandler) -> None:
        if self.link is not None:
            self.link.add(handler.group, limit=handler._limit, kill_enabled=bool(handler._restore_kill_setting),
                          saved=handler._saved_v2)
            handler._guarded = True

    def remove(self, handler: GroupHandler) -> None:
        if self.link is not None and handler._guarded:
            self.link.remove(handler.group)
            handler._guarded = False

    def set_limit(self, handler: GroupHandler, limit: int) -> None:
        if self.link is not None and handler._guarded:
            self.link.set_limit(handler.group, limit)

    def start(self) -> None:
        assert self.link is not None
        self.link.start()
        self._protect()
        if self._sup._manager is not None:
            self._sup._manager.link_changed()

    def _protect(self) -> None:
        link = self.link
        if link is not None and link.pid is not None:
            self._sup._protect(link.pid)

    def beat(self) -> None:
        if self.link is not None:
            self.link.beat()

    def send(self, message: bytes) -> None:
        if self.link is not None:
            self.link.send(message)

    def receive(self) -> list[Takeover]:
        return self.link.receive() if self.link is not None else []

    def restart(self) -> None:
        """The watchdog died: start it again, or give each group its kernel
        killer back."""
        link = self.link
        if link is None:
            return
        link.reap()
        try:
            link.start()
            link.restarts += 1
            link.history.append({"event": "watchdog-restarted", "pid": link.pid, "at_ns": time.monotonic_ns()})
            self._protect()
        except Exception as err:
            self._sup._note(err)
            self.link = None
            for handler in list(self._sup._handlers.values()):
                if handler._guarded:
                    handler._watchdog_lost(err)

    def stop(self) -> list[Takeover]:
        link, self.link = self.link, None
        if link is None:
            return []
        takeovers = link.receive()
        link.stop()
        return takeovers


class _Placement:
    """cgroup v1, with this process inside a handled group: the watcher's
    and the manager's kernel allocations are charged to the watchdog's group
    instead, so that the files they open during an episode (``/proc``,
    ``cgroup.procs``, pidfds) do not fail with ENOMEM at the group's limit.
    Their pages stay charged to the process's group. Threads started later
    inherit the placement; :meth:`unplace` moves them all back. Skipped, with
    the reason in the supervisor's ``errors``, if the ``tasks`` file refuses it."""

    def __init__(self) -> None:
        self.place: Group | None = None
        self._home: Group | None = None

    def place_for(self, supervisor: Supervisor, tids: list[int]) -> None:
        inside = [h for h in supervisor._handlers.values() if h.group.moves_threads and h._inside()]
        if not inside:
            return
        home = Group.current()
        try:
            place = supervisor._placement_for(inside)
            self.place, self._home = place, home
            # The hook threads of hooks registered before start were started
            # by the handler, not the manager: they are moved too.
            for tid in [*tids, *(h._runner.tid for h in supervisor._handlers.values() if h._runner)]:
                if tid:
                    place.attach_thread(tid)
        except (OSError, UseroomError) as err:
            supervisor.errors.append(err)
            self.unplace()
            return
        for handler in supervisor._handlers.values():
            handler.kernel_memory_group = place

    def place_handler(self, handler: GroupHandler) -> None:
        handler.kernel_memory_group = self.place

    def unplace(self) -> None:
        place, home = self.place, self._home
        self.place = self._home = None
        if place is None or home is None:
            return
        for name in os.listdir("/proc/self/task"):
            try:
                if Group.of_thread(int(name)).relpath == place.relpath:
                    home.attach_thread(int(name))
            except (OSError, UseroomError):
                pass  # the thread ended


class Handler(GroupHandler):
    """The OOM handler of one memory cgroup; it may live inside that group.

    ``policy`` decides victims (KillLargest by default). ``reserve`` (bytes
    or a size like ``"16M"``) enables the headroom grant: when the planned
    victims are not enough, the watcher raises the limit by the reserve,
    wakes this handler to refresh and act, then restores the limit. The
    parent group must allow the raised limit. ``thresholds`` are fractions
    of the limit at which the victim table is refreshed. The kernel OOM
    killer is disabled for the group while the handler runs (its previous
    setting is restored on stop) and re-enabled for one episode as the last
    resort when ``kernel_fallback`` is true. ``protect`` lists pids never to
    kill; this process is always protected.

    Hooks: :meth:`on_oom` (free memory before anything is killed; needs a
    reserve, ``DEFAULT_HOOK_RESERVE`` if none is given, and runs within
    ``hook_timeout``), :meth:`on_pressure`, :meth:`on_resolved`,
    :meth:`on_kill`. They may be registered and removed while it runs.

    Declared handler: on start the handler calls :meth:`declare`. Where
    the kernel lacks the proposed interfaces (every kernel today), a
    watchdog process outside the group (``watchdog=True``) hands an episode
    to the kernel OOM killer when it outlasts ``delay`` (seconds, or
    ``"2s"``/``"500ms"``), at once when this handler is stopped, exited,
    has a declared thread asleep in the OOM wait or sent no heartbeat for
    ``heartbeat_timeout``, and restores the limit if
    this process dies with a grant open. ``watchdog_group`` is where it
    runs (default: the handled group's parent when this process is inside
    the handled group, else this process's group); ``watchdog_log`` a file
    for its JSON log. If the watchdog dies it is restarted; if it cannot be,
    the kernel OOM killer is re-enabled for the group.

    Inside the group (cgroup v1), the handler's own threads are moved to
    the watchdog's group (``kernel_memory_group``) so that the files they
    open during an episode are not charged to the group at its limit; the
    process and its pages stay in the group, and :meth:`stop` moves the
    threads back.

    While the ``on_oom`` hooks run, the process's other Python threads are
    held at their next call or return (``hold_threads``, where the
    interpreter allows it): they would take the headroom back. The hold
    works through each thread's profile function (``sys.setprofile``): it is
    installed ahead of an episode once the usage reaches ``hold_arm_at`` of
    the limit (0: always), so that it stops the threads the moment the hooks
    are woken, and removed below half of that. While it is installed, Python
    code runs slower (about 1.2-4x, most for call-heavy code, on CPython
    3.11); a profiler the process runs on its threads is replaced and then
    cleared. Pass ``hold_threads=False`` to do without. The group's other
    processes are stopped (SIGSTOP) before the hooks' grant and continued
    (SIGCONT) after the hooks (``hold_processes``, at most six, the table's
    first); a hook that needs them to act calls ``ctx.resume_others()``.

    Use it as a context manager or with :meth:`start` / :meth:`stop`; or
    get it from :meth:`Supervisor.add`, which serves many groups from one
    watcher thread, one manager thread and one watchdog (the process-wide
    options ``delay``, ``harden``, ``mlockall``, ``watchdog*`` and
    ``heartbeat_timeout`` are then the supervisor's).

    ``refresh_interval`` (seconds) adds a timed refresh of the victim
    table; by default (None) it is refreshed from events only: usage
    thresholds (cgroup v1), each episode's end, grants, hook changes. With
    nothing happening, the handler's threads sleep.
    """

    def start(self) -> Handler:
        """Hardens the process, prepares every fd, arms the plan, starts the
        threads: a private supervisor of this one group. (A handler got from
        :meth:`Supervisor.add` starts with its supervisor.)"""
        if self._running:
            raise WatcherError("the handler is already running")
        if self._supervisor is not None and self._private is None:
            raise WatcherError("this handler belongs to a supervisor: start the supervisor")
        if self._private is None:
            self._private = Supervisor(**attrs.asdict(self.options, recurse=False))
            self._private._adopt(self)
        self._private.start()
        return self

    def stop(self) -> None:
        """Stops the threads, restores the group's kernel OOM killer setting,
        closes every fd. Idempotent. (A handler got from
        :meth:`Supervisor.add` is stopped by :meth:`Supervisor.remove`.)"""
        if self._private is not None:
            self._private.stop()
        elif self._supervisor is not None:
            self._supervisor.remove(self)

    def __enter__(self) -> Handler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

