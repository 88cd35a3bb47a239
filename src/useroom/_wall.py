"""The handler's model on cgroup v2: ``memory.high`` is the wall, ``memory.max`` the backstop.

v2 cannot make the kernel wait for user space. So the handler sets
``memory.high`` to the wall, where the group's tasks are throttled (never
killed), and ``memory.max`` to the wall plus the reserve, where the kernel
OOM-kills. The native watcher waits on ``memory.events`` (a change
notification, ``EPOLLPRI``) and, when the group is throttled at the wall,
runs the plan the policy compiled: kill victims from the table kept fresh
ahead of time, each followed by a check that ``memory.current`` is back under
the wall. The delay shim is the plan's tail: if the victims did not bring the
usage under the wall, it lifts the wall (``memory.high`` = ``max``) so that
``memory.max`` and the kernel OOM killer act, waits *delay* seconds, and puts
the wall back once the usage fits again.

:class:`WallHandler` is the v2 counterpart of :class:`useroom.Handler`'s
core (victim table, policy, native plan, event records); it has no hooks and
no headroom grants yet.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from useroom import _native
from useroom._cgroup_v2 import FileNotifier, V2Group
from useroom._native import NativeWatcher, Outcome, SourceKind, Wake
from useroom._policy import CompiledPlan, KillLargest, PlanContext, Policy
from useroom._units import UNLIMITED, parse_size
from useroom._victims import VictimTable
from useroom.exceptions import GroupGone, RootGroupError, WatcherError

__all__ = ["WallHandler"]


class WallHandler:
    """Hold *wall* (``memory.high``) for a v2 group, with ``memory.max`` = wall + *reserve* as the backstop.

    *policy* orders the victims (:class:`~useroom.KillLargest` by default);
    *delay* is how long the lifted wall lets the kernel act before the wall
    is put back (if the usage fits). The wall is *wall*, or the group's
    ``memory.max`` if it has one. ``protect`` lists pids never to kill (this
    process always). The previous ``memory.high``/``memory.max`` are restored
    by :meth:`stop`. Use it as a context manager.
    """

    def __init__(
        self,
        group: V2Group,
        policy: Policy | None = None,
        *,
        wall: int | str | None = None,
        reserve: int | str = "16M",
        delay: float = 2.0,
        check_timeout: float = 0.25,
        refresh_interval: float = 0.5,
        protect: tuple[int, ...] = (),
    ) -> None:
        if group.is_root:
            raise RootGroupError("the root group has no memory.high")
        if not isinstance(group, V2Group):
            raise TypeError(f"WallHandler needs a cgroup v2 group, not {group!r}")
        self.group = group
        self.policy = policy if policy is not None else KillLargest()
        self.reserve = parse_size(reserve)
        self.delay = delay
        self.check_timeout = check_timeout
        self.refresh_interval = refresh_interval
        self.protect = protect
        self._wall_arg = None if wall is None else parse_size(wall)
        self.wall = UNLIMITED
        #: Event records of the native watcher (one per episode), oldest first.
        self.records: list[_native.EventRecord] = []
        #: The compiled plan armed last (its explanations name each action).
        self.compiled: CompiledPlan | None = None
        self._cond = threading.Condition()
        self._fds: list[int] = []
        self._notifier: FileNotifier | None = None
        self._watcher: NativeWatcher | None = None
        self._table: VictimTable | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._saved: tuple[int, int] | None = None

    def start(self) -> WallHandler:
        """Set the wall and the backstop, prepare every fd, arm the plan, start the watcher."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        group = self.group
        high, limit = group.high(), group.limit()
        self.wall = self._wall_arg if self._wall_arg is not None else limit
        if self.wall == UNLIMITED:
            raise ValueError(f"{group.relpath} has no memory.max: give the wall")
        self._saved = (high, limit)
        # Backstop first, then the wall: memory.high stays below memory.max.
        group.set_limit(self.wall + self.reserve)
        group.set_high(self.wall)
        self._check_fd = self._open(group.usage_file, os.O_RDONLY)
        os.pread(self._check_fd, 64, 0)  # allocates the seq_file buffer ahead
        self._high_fd = self._open(group.high_file, os.O_WRONLY)
        self._notifier = group.events_notifier()
        self._table = VictimTable(group, self.protect)
        self._watcher = NativeWatcher()
        self._watcher.add_source(self._notifier.fileno(), SourceKind.OOM, Wake.FILE)
        self._arm()
        self._watcher.start()
        self._thread = threading.Thread(target=self._manage, name=f"useroom-wall {group.relpath}", daemon=True)
        self._thread.start()

    def _open(self, name: str, flags: int) -> int:
        fd = self.group.open_file(name, flags)
        self._fds.append(fd)
        return fd

    def _arm(self) -> None:
        assert self._table is not None and self._watcher is not None
        victims = self._table.refresh()
        # The policy compiles the actions; the check is v2's (a number below
        # the wall, not v1's needle), so it is added to the plan here.
        ctx = PlanContext(
            victims=victims, limit=self.wall, limit_fd=self._high_fd, check_fd=-1,
            resolved_needle=b"", kill_switch_fd=self._high_fd, kill_switch_on=b"max",
            kill_switch_off=str(self.wall).encode(), check_timeout=self.check_timeout,
            kernel_timeout=self.delay,
        )
        compiled = self.policy.compile(ctx)
        plan = _native.Plan(compiled.plan.actions, check_fd=self._check_fd, resolved_below=self.wall,
                            poll_interval=compiled.plan.poll_interval)
        self._watcher.arm(plan)
        self.compiled = compiled
        self._table.release(compiled.pidfds)

    def _manage(self) -> None:
        watcher = self._watcher
        assert watcher is not None
        while not self._stop.is_set():
            records = watcher.wait(self.refresh_interval)
            if records:
                with self._cond:
                    self.records.extend(records)
                    self._cond.notify_all()
            if self._stop.is_set():
                return
            try:
                self._arm()
            except GroupGone:
                return
            except (OSError, WatcherError):
                continue  # the next round tries again

    def wait_for_records(self, count: int, timeout: float | None = None) -> list[_native.EventRecord]:
        """Block until at least *count* episodes were recorded or *timeout* passes; return them."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.records) >= count, timeout)
            return list(self.records)

    @property
    def resolved(self) -> int:
        """Episodes the plan resolved (the usage back under the wall)."""
        return sum(record.outcome == Outcome.RESOLVED for record in self.records)

    def stop(self) -> None:
        """Stop the watcher, restore ``memory.high`` and ``memory.max``, close every fd. Idempotent."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.close()
        for owner in (self._notifier, self._table):
            if owner is not None:
                owner.close()
        self._notifier = self._table = None
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)
        saved, self._saved = self._saved, None
        if saved is not None:
            try:
                self.group.set_high(saved[0])
                self.group.set_limit(saved[1])
            except GroupGone:
                pass

    def __enter__(self) -> WallHandler:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
