"""Arming, per backend: what a group's handler holds open and sets on the
group so that the watcher can act for it, and puts back when it stops.

A handler never asks which cgroup version its group is on: it holds one
:class:`Arming`, chosen by :func:`arming_for` from the table of backends
(as psutil's ``Process`` delegates to ``_psplatform``), and each arming
serves one backend class:

- :class:`V1Arming` (:class:`~useroom.cgroup.v1.V1Group`): the OOM eventfd
  wakes the watcher, the check reads ``memory.oom_control``, the grants
  raise ``memory.limit_in_bytes``, and the kernel OOM killer is switched
  off while the handler runs (the plan's kernel step switches it on for
  one episode);
- :class:`V2Arming` (:class:`~useroom.cgroup.v2.V2Group`): ``memory.high``
  is the wall below ``memory.max``, the kernel's backstop; a change of
  ``memory.events`` wakes the watcher, the check reads ``memory.current``,
  and the kernel step lifts the wall for ``delay``.

Each arming owns the fds the plans name (the check fd, the limit fd, the
kill switch, the OOM notifier; on v2 ``cgroup.freeze`` and ``cgroup.kill``),
the group's settings from before the handler, the limit it holds and a
limit still to put back, and the usage thresholds (v1) or polled sizes (v2)
of the refreshes and ``on_pressure`` hooks. An arming opens and closes with
its handler, and serves it again if the handler starts again.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from useroom import native
from useroom._fd import Fd
from useroom._hooks import Hook, HookRegistry
from useroom._units import PAGE_SIZE, UNLIMITED, format_size, parse_size
from useroom.cgroup import EventRegistration, FileNotifier, Group, V1Group, V2Group
from useroom.exceptions import UnsupportedKernel
from useroom.native import SourceKind, WatchedGroup

if TYPE_CHECKING:
    from useroom.handler.history import Recent

__all__ = ["V2_GAP", "Arming", "V1Arming", "V2Arming", "arming_for"]

#: cgroup v2: the least gap between the wall (memory.high) and the backstop (memory.max).
V2_GAP = 16 << 20

G = TypeVar("G", bound=Group)


def _put(fd: Fd, value: int) -> None:
    """Writes a size (``max`` for UNLIMITED) through *fd*: the restores go
    through files opened at the start, which stay the group's even if its
    directory is renamed meanwhile."""
    os.pwrite(fd.fileno(), b"max" if value == UNLIMITED else str(value).encode(), 0)


class Arming(abc.ABC, Generic[G]):
    """The backend's part of a group's handler (see the module's docstring).

    ``fractions`` are the usage thresholds' fractions of the limit,
    ``hooks`` the handler's registry (its ``on_pressure`` hooks), ``errors``
    the handler's list of errors survived; ``collect`` turns the watcher's
    records of the group into events (an episode that just ended may have
    raised the limit), ``tell_limit`` tells the watchdog a limit adopted.
    """

    #: The backend class this arming serves (its subclasses too).
    backend: ClassVar[type[Group]]
    #: What guards the group once its watchdog is lost for good (for the error).
    fallback: ClassVar[str]
    #: A file of the group the watcher reads at each check (opened by :meth:`open`).
    _check_fd: Fd

    def __init__(
        self,
        group: G,
        *,
        fractions: tuple[float, ...],
        hooks: HookRegistry,
        errors: Recent[BaseException],
        collect: Callable[[], None],
        tell_limit: Callable[[int], None],
    ) -> None:
        self.group: G = group
        self._fractions = fractions
        self._hooks = hooks
        self._errors = errors
        self._collect = collect
        self._tell_limit = tell_limit
        #: The limit (v1) or wall (v2) the handler holds, in bytes.
        self.limit = UNLIMITED
        #: A limit (or wall) to put back once the usage fits, or None.
        self.pending_restore: int | None = None
        #: The usage thresholds' eventfds (none on v2), for the manager's epoll set.
        self.thresholds: list[EventRegistration] = []
        self._owned: list[Any] = []
        self._slot: WatchedGroup | None = None

    def _own(self, obj: Any) -> Any:
        self._owned.append(obj)
        return obj

    @property
    def _watched(self) -> WatchedGroup:
        assert self._slot is not None, "opened"
        return self._slot

    # -- a start -------------------------------------------------------------

    @abc.abstractmethod
    def open(self, slot: WatchedGroup, *, inside: bool, reserve: int, kernel_fallback: bool) -> None:
        """Opens every fd the plans will name, sets what the group needs
        before the watcher acts, and adds the group's OOM source to the
        watcher's ``slot``. ``inside``: this process is in the group or below
        it; ``reserve``: the handler's reserve as given; ``kernel_fallback``:
        whether the plan's last step is the kernel OOM killer."""

    def activate(self) -> None:
        """The watcher runs: from now on it acts for the group."""

    # -- a refresh -----------------------------------------------------------

    def before_refresh(self) -> None:
        """A refresh outside a grant, before the table is refreshed."""

    @abc.abstractmethod
    def after_refresh(self, reserve: int) -> None:
        """A refresh outside a grant, once the table is refreshed: put back
        a limit to restore (once the usage fits), adopt one the user
        changed. ``reserve`` is the reserve in use (what a grant adds)."""

    def restore_later(self) -> None:
        """An episode left a grant open: the limit goes back once the usage allows."""
        self.pending_restore = self.limit

    @abc.abstractmethod
    def register_thresholds(self) -> None:
        """After the limit or the hooks changed: the usage thresholds and
        ``on_pressure`` sizes, as fractions of the limit or sizes."""

    @abc.abstractmethod
    def pressure_due(self, crossed: list[EventRegistration]) -> Iterator[tuple[int, list[Hook]]]:
        """The ``on_pressure`` sizes whose hooks run now (``crossed``: the
        thresholds whose eventfds woke the manager), with their hooks."""

    def drop_thresholds(self) -> None:
        for reg in self.thresholds:
            reg.close()
        self.thresholds = []

    # -- the plan ------------------------------------------------------------

    @abc.abstractmethod
    def plan_fields(self, reserve: int, delay: float) -> dict[str, Any]:
        """The backend's fields of a :class:`~useroom.policy.PlanContext`:
        the limit, the fds, how the check reads the group, the kill switch
        and the reserve a grant may add (``reserve`` in use, ``delay`` the
        watchdog's)."""

    @abc.abstractmethod
    def limit_fits(self) -> bool:
        """True if the limit can be restored now (it is, as a side effect
        where restoring is how the kernel tells). Through the fds opened at
        start: this runs under the OOM, where opening a file may fail for
        want of memory."""

    # -- the watchdog --------------------------------------------------------

    @property
    def kill_enabled(self) -> bool:
        """The kernel OOM killer setting before the handler (put back if it dies)."""
        return False

    @property
    def saved(self) -> tuple[int, int] | None:
        """v2: the group's (``memory.high``, ``memory.max``) before the handler."""
        return None

    def moved_to(self) -> str | None:
        """Where the group's directory is now if it was renamed (its path
        names nothing, while the files the arming opened are still the
        group's), else None. The kernel keeps an open cgroup file with its
        group across a rename; /proc/self/fd names its current path."""
        try:
            where = os.readlink(f"/proc/self/fd/{self._check_fd.fileno()}")
        except (OSError, ValueError):
            return None
        if where.endswith(" (deleted)"):
            return None
        directory = os.path.dirname(where)
        return directory if directory != self.group.path and os.path.isdir(directory) else None

    def safe_mode(self, on: bool) -> None:
        """The victim table cannot be refreshed (``on``), or can again: see
        :mod:`useroom.handler.stale`. On v2 the plan's kernel step (lifting the
        wall) is all it takes."""

    @abc.abstractmethod
    def watchdog_lost(self) -> None:
        """The watchdog died and could not be restarted: guard the group
        without it (see :attr:`fallback`). Raises OSError if it cannot."""

    # -- a stop --------------------------------------------------------------

    @abc.abstractmethod
    def restore(self) -> None:
        """Puts the group's settings back (the watcher acts for it no more)."""

    def close(self) -> None:
        """Closes the fds the plans named (the watcher reads them no more)."""
        owned, self._owned = self._owned, []
        for obj in reversed(owned):
            obj.close()


class V1Arming(Arming[V1Group]):
    """cgroup v1: the OOM eventfd wakes the watcher; the kernel killer is switched off."""

    backend = V1Group
    fallback = "the kernel OOM killer is enabled for it instead"

    _limit_fd: Fd
    #: ``memory.usage_in_bytes``: whether the group has room under its
    #: limit (the plan's ``room_fd``).
    _usage_fd: Fd
    _switch_fd: Fd
    _fallback: bool
    _oom: EventRegistration

    def __init__(self, group: V1Group, **options: Any) -> None:
        super().__init__(group, **options)
        self._restore_kill_setting: bool | None = None
        #: The watchdog was lost: the kernel killer stays on.
        self._degraded = False
        self._stale = False
        self._pressure: list[tuple[EventRegistration, int, list[Hook]]] = []

    def open(self, slot: WatchedGroup, *, inside: bool, reserve: int, kernel_fallback: bool) -> None:
        group = self.group
        self._slot = slot
        oom_file = group.oom_control_file
        self._check_fd = self._own(Fd(group.open_file(oom_file, os.O_RDONLY)))
        # The first read allocates the seq_file buffer; later preads from
        # the watcher reuse it, so it can read the file even during the OOM.
        os.pread(self._check_fd.fileno(), 256, 0)
        self._usage_fd = self._own(Fd(group.open_file(group.usage_file, os.O_RDONLY)))
        os.pread(self._usage_fd.fileno(), 64, 0)  # the same: its buffer now
        self._limit_fd = self._own(Fd(group.open_file(group.limit_file, os.O_WRONLY)))
        # Opened even without the kernel fallback: the restore writes
        # through it, so that it needs no new fd (a start that failed for
        # want of fds still puts the kernel killer back).
        self._switch_fd = self._own(Fd(group.open_file(oom_file, os.O_WRONLY)))
        self._fallback = kernel_fallback
        self._oom = self._own(group.oom_notifier())
        slot.add_source(self._oom.fileno(), SourceKind.OOM)
        # The kernel killer goes off only once the watcher runs (see
        # activate): a group at its limit meanwhile would leave this process
        # asleep in the OOM wait with nobody to act.
        self._restore_kill_setting = not group.oom_control().kill_disabled
        self.limit = group.limit()

    def activate(self) -> None:
        if self._restore_kill_setting is not None:
            self.group.set_oom_kill(False)  # the watcher acts from now on

    def before_refresh(self) -> None:
        if self.pending_restore is not None and self.group.usage() <= self.pending_restore:
            try:
                self.group.set_limit(self.pending_restore)
                self.pending_restore = None
            except OSError as err:
                self._errors.append(err)

    def after_refresh(self, reserve: int) -> None:
        if self._restore_kill_setting is not None and not self._degraded and not self._stale:
            # The plan's last resort left the kernel killer on (tasks still
            # waited when it ended): turn it off again once no task waits.
            control = self.group.oom_control()
            if not control.kill_disabled and not control.under_oom:
                self.group.set_oom_kill(False)
        if self.pending_restore is None:
            limit = self.group.limit()
            if not self._watched.in_episode and limit != self.limit:
                self._collect()  # an episode that just ended may have raised it
            if self.pending_restore is None and not self._watched.in_episode \
                    and limit != self.limit:
                if self.limit != UNLIMITED and limit == self.limit + reserve:
                    # A grant of ours is still open: restore, never adopt it.
                    self.pending_restore = self.limit
                else:
                    self.limit = limit  # the user (or a raising policy) changed it
                    self.register_thresholds()
                    self._tell_limit(limit)

    def register_thresholds(self) -> None:
        self.drop_thresholds()
        if self.limit == UNLIMITED:
            return
        for fraction in self._fractions:
            self.thresholds.append(self.group.usage_threshold(int(self.limit * fraction)))
        by_size: dict[int, list[Hook]] = {}
        for fn, threshold in self._hooks.get("pressure"):
            size = int(self.limit * threshold) if isinstance(threshold, float) else parse_size(threshold)
            by_size.setdefault(size, []).append(fn)
        for size, hooks in sorted(by_size.items()):
            reg = self.group.usage_threshold(size)
            self.thresholds.append(reg)
            self._pressure.append((reg, size, hooks))

    def pressure_due(self, crossed: list[EventRegistration]) -> Iterator[tuple[int, list[Hook]]]:
        for reg, size, hooks in self._pressure:
            if reg in crossed:
                yield size, hooks

    def drop_thresholds(self) -> None:
        super().drop_thresholds()
        self._pressure = []

    def plan_fields(self, reserve: int, delay: float) -> dict[str, Any]:
        return dict(
            limit=-1 if self.limit == UNLIMITED else self.limit,
            limit_fd=self._limit_fd.fileno(),
            check_fd=self._check_fd.fileno(),
            kill_switch_fd=self._switch_fd.fileno() if self._fallback else -1,
            resolved_needle=b"under_oom 0",
            reserve=reserve,
            room_fd=self._usage_fd.fileno(),
            # Room for one page: the usage at most the limit less a page.
            room_below=0 if self.limit == UNLIMITED else self.limit - PAGE_SIZE + 1,
        )

    def limit_fits(self) -> bool:
        if self.limit == UNLIMITED:
            return True
        try:
            os.pwrite(self._limit_fd.fileno(), str(self.limit).encode(), 0)
        except OSError:
            return False
        return True

    @property
    def kill_enabled(self) -> bool:
        return bool(self._restore_kill_setting)

    def watchdog_lost(self) -> None:
        self._degraded = True
        self.group.set_oom_kill(True)

    def safe_mode(self, on: bool) -> None:
        # On: the kernel killer picks at the OOM (through the fd opened at
        # start: fds may be what ran out); off: after_refresh turns it off
        # again once no task waits.
        self._stale = on
        if on and self._restore_kill_setting is not None:
            self._enable_kill()

    def _enable_kill(self) -> None:
        """Turns the kernel OOM killer on through the fd opened at start;
        through a new one (errors explained) if that write fails."""
        try:
            os.pwrite(self._switch_fd.fileno(), b"0", 0)
        except (OSError, ValueError):
            self.group.set_oom_kill(True)

    def restore(self) -> None:
        # The kernel OOM killer first, never leaving a window with neither.
        if self._restore_kill_setting is not None:
            try:
                if self._restore_kill_setting:
                    self._enable_kill()
            except OSError as err:
                if err.errno not in (errno.ENODEV, errno.ENOENT):  # the group is gone
                    self._errors.append(err)
            self._restore_kill_setting = None
        if self.pending_restore is not None:
            with contextlib.suppress(OSError):
                _put(self._limit_fd, self.pending_restore)
        self.pending_restore = None
        self._degraded = False
        self._stale = False


class V2Arming(Arming[V2Group]):
    """cgroup v2: ``memory.high`` is the wall, ``memory.max`` the kernel's backstop.

    The wall is the group's ``memory.high`` if it is below ``memory.max``,
    else ``memory.max`` minus the gap (the reserve, at least :data:`V2_GAP`),
    so the user's hard limit stays what it was; with no ``memory.max`` the
    backstop becomes the wall plus the gap. ``memory.events`` changes wake
    the watcher; the check reads ``memory.current``; the kernel step lifts
    the wall for ``delay``. No usage thresholds on v2: the manager compares
    ``memory.current`` with the pressure hooks' sizes at each step.
    """

    backend = V2Group
    fallback = "nothing will restore its memory.high and memory.max if this process dies"

    _limit_fd: Fd
    _switch_fd: Fd | None
    _max_fd: Fd
    _oom: FileNotifier

    def __init__(self, group: V2Group, **options: Any) -> None:
        super().__init__(group, **options)
        self._saved: tuple[int, int] | None = None
        self._freeze_fd: Fd | None = None
        self._kill_fd: Fd | None = None
        self._backstop = UNLIMITED
        #: The pressure hooks: [size, hooks, above at the last look].
        self._polled: list[list[Any]] = []

    def open(self, slot: WatchedGroup, *, inside: bool, reserve: int, kernel_fallback: bool) -> None:
        group = self.group
        self._slot = slot
        high, backstop = group.high(), group.limit()
        gap = max(reserve, V2_GAP)
        if high != UNLIMITED and (backstop == UNLIMITED or high < backstop):
            wall = high
        elif backstop != UNLIMITED:
            wall = backstop - gap
        else:
            raise ValueError(f"{group.relpath} has neither memory.max nor memory.high: set one (the handler "
                             "holds memory.high as its wall below memory.max)")
        if wall <= 0:
            raise ValueError(f"memory.max of {group.relpath} ({format_size(backstop)}) leaves no room for a wall "
                             f"{format_size(gap)} below it")
        self._saved = (high, backstop)
        if backstop == UNLIMITED:
            backstop = wall + gap
            group.set_limit(backstop)
        group.set_high(wall)
        self._backstop = backstop
        self._check_fd = self._own(Fd(group.open_file(group.usage_file, os.O_RDONLY)))
        os.pread(self._check_fd.fileno(), 64, 0)
        high_file = group.high_file
        self._limit_fd = self._own(Fd(group.open_file(high_file, os.O_WRONLY)))
        self._switch_fd = self._own(Fd(group.open_file(high_file, os.O_WRONLY))) if kernel_fallback else None
        self._max_fd = self._own(Fd(group.open_file(group.limit_file, os.O_WRONLY)))  # for the restore
        self._oom = self._own(group.events_notifier())
        slot.add_source(self._oom.fileno(), SourceKind.OOM, native.Wake.FILE)
        self._freeze_fd = self._kill_fd = None
        if not inside:
            # Outside the group only: cgroup.freeze and cgroup.kill would reach this process too.
            if os.path.exists(os.path.join(group.path, group.freeze_file)):
                self._freeze_fd = self._own(Fd(group.open_file(group.freeze_file, os.O_WRONLY)))
            if os.path.exists(os.path.join(group.path, group.kill_file)):
                self._kill_fd = self._own(Fd(group.open_file(group.kill_file, os.O_WRONLY)))
        self.limit = wall

    def after_refresh(self, reserve: int) -> None:
        """Put back a wall the kernel step lifted (once the usage fits),
        adopt a wall the user moved."""
        high = self.group.high()
        if high != self.limit:
            self._collect()  # an episode that just ended may have lifted or raised it
            high = self.group.high()
        if high == UNLIMITED or self.pending_restore is not None:
            # Lifted by the kernel step, or raised by the plan (a move)
            # and not put back: the wall returns once the usage fits.
            if high != self.limit and self.group.usage() < self.limit:
                self.group.set_high(self.limit)
                self.pending_restore = None
            elif high == self.limit:
                self.pending_restore = None
        elif high != self.limit:
            self.limit = high  # the user moved the wall
            self.register_thresholds()

    def register_thresholds(self) -> None:
        self.drop_thresholds()
        self._polled = []
        if self.limit == UNLIMITED:
            return
        for fn, threshold in self._hooks.get("pressure"):
            size = int(self.limit * threshold) if isinstance(threshold, float) else parse_size(threshold)
            self._polled.append([size, [fn], self.group.usage() >= size])

    def pressure_due(self, crossed: list[EventRegistration]) -> Iterator[tuple[int, list[Hook]]]:
        if self._polled:
            usage = self.group.usage()
            for entry in self._polled:
                size, hooks, above = entry
                entry[2] = usage >= size
                if entry[2] and not above:
                    yield size, hooks

    def plan_fields(self, reserve: int, delay: float) -> dict[str, Any]:
        wall = self.limit
        return dict(
            limit=wall, limit_fd=self._limit_fd.fileno(), check_fd=self._check_fd.fileno(),
            kill_switch_fd=self._switch_fd.fileno() if self._switch_fd else -1,
            resolved_needle=b"", resolved_below=wall, restore_resolves=False,
            lift=b"max",
            kill_switch_on=b"max", kill_switch_off=str(wall).encode(), kernel_timeout=delay,
            # Half the gap at most: the tasks a grant wakes must not reach
            # memory.max (the kernel) while the manager refreshes.
            reserve=min(reserve, max(0, (self._backstop - wall) // 2)),
            freeze_fd=self._freeze_fd.fileno() if self._freeze_fd is not None else -1,
            kill_fd=self._kill_fd.fileno() if self._kill_fd is not None else -1,
        )

    def limit_fits(self) -> bool:
        if self.limit == UNLIMITED:
            return True
        # memory.high takes any value: the usage tells, and the plan
        # puts the wall back itself.
        try:
            return int(os.pread(self._check_fd.fileno(), 64, 0)) < self.limit
        except (OSError, ValueError):
            return False

    @property
    def saved(self) -> tuple[int, int] | None:
        return self._saved

    def watchdog_lost(self) -> None:
        pass  # no kernel killer to switch on: v2's cannot be switched off

    def restore(self) -> None:
        self.pending_restore = None
        freeze, self._freeze_fd = self._freeze_fd, None
        if freeze is not None and not freeze.closed:
            with contextlib.suppress(OSError):
                os.pwrite(freeze.fileno(), b"0", 0)  # never leave the group frozen
        saved, self._saved = self._saved, None
        if saved is not None:
            # memory.high first to max, so it never sits above memory.max.
            try:
                _put(self._limit_fd, UNLIMITED)
                _put(self._max_fd, saved[1])
                _put(self._limit_fd, saved[0])
            except OSError as err:
                if err.errno not in (errno.ENODEV, errno.ENOENT):  # the group is gone
                    self._errors.append(err)


#: The arming of each backend class.
ARMINGS: tuple[type[Arming[Any]], ...] = (V1Arming, V2Arming)


def arming_for(group: Group, **options: Any) -> Arming[Any]:
    """The arming of ``group``'s backend (``options`` as :class:`Arming`
    takes them); raises :class:`UnsupportedKernel` for a backend no arming
    serves."""
    for kind in type(group).__mro__:
        for arming in ARMINGS:
            if arming.backend is kind:
                return arming(group, **options)
    raise UnsupportedKernel(errno.ENOTSUP, f"no handler backend for cgroup v{group.version}")
