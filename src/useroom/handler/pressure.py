"""The ``on_pressure`` hooks, and the two sources that run them.

- **Usage.** A hook is registered at a size (or a fraction of the limit);
  it runs when the group's usage crosses that size upward (the arming
  watches the sizes: eventfd thresholds on cgroup v1, ``memory.events``
  changes on v2).
- **The service manager.** systemd tells a service where to watch for
  memory pressure in two environment variables (its "memory pressure
  protocol", ``MemoryPressureWatch=`` in a unit):

  - ``$MEMORY_PRESSURE_WATCH``, an absolute path: usually the ``memory.pressure``
    PSI file of the service's cgroup (or ``/proc/pressure/memory``), but it
    may name a FIFO or an ``AF_UNIX`` stream socket; the literal
    ``/dev/null`` turns the watch off;
  - ``$MEMORY_PRESSURE_WRITE`` (optional), base64 data to write into it
    right after opening it: for a PSI file, the trigger
    (``"some 200000 2000000"`` and a NUL by default in systemd: 200 ms of
    stall in any 2 s window).

  A PSI file signals with ``EPOLLPRI`` and is never read; a FIFO or a
  socket signals with ``EPOLLIN`` and what arrives is read and dropped.
  Each signal runs every ``on_pressure`` hook of the groups it covers, once
  (:class:`ServicePressure`, :meth:`ServicePressure.covers`).

Both run on the supervisor's manager thread, free to allocate.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import errno
import logging
import os
import posixpath
import select
import socket
import stat
from collections.abc import Callable, Iterable, Mapping

import attrs

from useroom._fd import Fd
from useroom._hooks import Hook, PressureContext, PressureSource
from useroom._mounts import read_mounts
from useroom.cgroup import Group
from useroom.exceptions import PressureWatchError

__all__ = [
    "DEFAULT_PSI_TRIGGER",
    "PressureWatch",
    "ServicePressure",
    "WatchKind",
    "run_service_pressure",
    "run_usage_pressure",
]

logger = logging.getLogger(__name__)

WATCH_VARIABLE = "MEMORY_PRESSURE_WATCH"
WRITE_VARIABLE = "MEMORY_PRESSURE_WRITE"

#: Written to a PSI file named without ``$MEMORY_PRESSURE_WRITE``: systemd's
#: default threshold. A PSI file with no trigger written polls ready at
#: once and for ever, so one is always written. The kernel replaces the
#: last byte written with a NUL (``psi_write``), hence the NUL here.
DEFAULT_PSI_TRIGGER = b"some 200000 2000000\0"



# -- running the hooks ---------------------------------------------------------


def run_usage_pressure(group: Group, size: int, hooks: Iterable[Hook], limit: int,
                       note: Callable[[BaseException], None]) -> None:
    """The usage crossed ``size``: runs ``hooks`` if it is still above (not
    if it crossed downward)."""
    usage = group.usage()
    if usage >= size:
        _run(hooks, PressureContext(group, size, usage, limit), note)


def run_service_pressure(group: Group, registered: Iterable[tuple[Hook, object]], limit: int,
                         note: Callable[[BaseException], None]) -> None:
    """The service manager reported memory pressure: each hook registered
    (``(hook, threshold)`` pairs) runs once, whatever its threshold; the
    context's ``threshold`` is 0 and its ``source`` ``SERVICE``."""
    hooks = list(dict.fromkeys(fn for fn, _ in registered))
    if hooks:
        _run(hooks, PressureContext(group, 0, group.usage(), limit, PressureSource.SERVICE), note)


def _run(hooks: Iterable[Hook], ctx: PressureContext, note: Callable[[BaseException], None]) -> None:
    for fn in hooks:
        try:
            fn(ctx)
        except Exception as err:  # noqa: BLE001 - a user's on_pressure hook: recorded, never fatal
            note(err)


# -- the service manager's source ---------------------------------------------


class WatchKind(enum.Enum):
    """What ``$MEMORY_PRESSURE_WATCH`` names, which says how it signals."""

    PSI = "psi"  # a regular file: a kernel PSI file, EPOLLPRI, never read
    FIFO = "fifo"  # EPOLLIN, read and dropped
    SOCKET = "socket"  # an AF_UNIX stream socket, connected; EPOLLIN, read and dropped


@attrs.frozen
class PressureWatch:
    """The service manager's two variables, checked: the path to watch and
    the bytes to write into it once opened."""

    path: str
    write: bytes = b""

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> PressureWatch | None:
        """The watch the environment asks for, or None (unset, empty, or
        ``/dev/null``: no watch wanted). Raises :class:`PressureWatchError`
        for a relative path or data that is not base64."""
        env = os.environ if environ is None else environ
        path = env.get(WATCH_VARIABLE, "")
        if not path or path == os.devnull:
            return None
        if not posixpath.isabs(path):
            raise PressureWatchError(f"${WATCH_VARIABLE} must be an absolute path, not {path!r}",
                                     variable=WATCH_VARIABLE)
        encoded = env.get(WRITE_VARIABLE, "")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as err:
            raise PressureWatchError(f"${WRITE_VARIABLE} is not base64 ({err}): {encoded[:40]!r}",
                                     variable=WRITE_VARIABLE) from err
        return cls(path, data)

    def cgroup(self) -> str | None:
        """The cgroup path (``/a/b``) whose PSI file this is, when it is
        ``memory.pressure`` in a cgroup mount; None for anything else
        (``/proc/pressure/memory``, a FIFO, a socket)."""
        if posixpath.basename(self.path) != "memory.pressure":
            return None
        directory = posixpath.dirname(self.path)
        for mount in read_mounts():
            if mount.cgroup_version == 2:
                relpath = mount.cgroup_path(directory)
                if relpath is not None:
                    return relpath
        return None


class ServicePressure:
    """The open source of ``$MEMORY_PRESSURE_WATCH``: it owns the fd the
    manager waits on (:attr:`events` says for what) and knows which groups
    it speaks for."""

    def __init__(self, watch: PressureWatch, kind: WatchKind, fd: Fd, cgroup: str | None) -> None:
        self.watch = watch
        self.kind = kind
        self._fd = fd
        #: The cgroup the watched PSI file belongs to, or None (every group).
        self.cgroup = cgroup

    @classmethod
    def open(cls, watch: PressureWatch) -> ServicePressure:
        """Opens (or connects to) the path and writes the data, as the
        protocol asks. Raises :class:`PressureWatchError` naming the path."""
        try:
            mode = os.stat(watch.path).st_mode
        except OSError as err:
            raise PressureWatchError(f"cannot watch {watch.path} (${WATCH_VARIABLE}): {err.strerror}",
                                     variable=WATCH_VARIABLE) from err
        try:
            if stat.S_ISSOCK(mode):
                return cls(watch, WatchKind.SOCKET, _connect(watch), None)
            if stat.S_ISFIFO(mode):
                return cls(watch, WatchKind.FIFO, _open_fifo(watch), None)
            if stat.S_ISREG(mode):
                return cls(watch, WatchKind.PSI, _open_psi(watch), watch.cgroup())
        except OSError as err:
            raise PressureWatchError(f"cannot watch {watch.path} (${WATCH_VARIABLE}): {err.strerror or err}",
                                     variable=WATCH_VARIABLE) from err
        raise PressureWatchError(f"${WATCH_VARIABLE} names {watch.path}, which is not a regular file, "
                                 "a FIFO or a socket", variable=WATCH_VARIABLE)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> ServicePressure | None:
        """The source the environment names, open; None if it names none."""
        watch = PressureWatch.from_environment(environ)
        return None if watch is None else cls.open(watch)

    @property
    def events(self) -> int:
        """The epoll events that mean "pressure"."""
        return select.EPOLLPRI if self.kind is WatchKind.PSI else select.EPOLLIN

    def fileno(self) -> int:
        return self._fd.fileno()

    @property
    def closed(self) -> bool:
        return self._fd.closed

    def covers(self, group: Group) -> bool:
        """Whether a signal speaks for ``group``: a cgroup's PSI file speaks
        for that cgroup and every group below it (its stalls include
        theirs); any other source for every group. On cgroup v1 the PSI
        file is in the cgroup2 mount and the group in the memory
        hierarchy: their paths are compared (systemd names both alike)."""
        if self.cgroup is None:
            return True
        mine = self.cgroup.rstrip("/") + "/"
        return (group.relpath.rstrip("/") + "/").startswith(mine)

    def consume(self, events: int) -> bool:
        """After the manager saw ``events`` on the fd: drops what a FIFO or a
        socket queued. False if the source is gone (a closed socket, a PSI
        file whose cgroup was removed): it signals no more."""
        if self.kind is WatchKind.PSI:
            # The poll consumed the trigger's event. EPOLLERR: the cgroup
            # was removed and the trigger with it.
            return not events & (select.EPOLLERR | select.EPOLLHUP)
        while True:
            try:
                chunk = os.read(self._fd.fileno(), 4096)
            except BlockingIOError:
                return True
            except OSError as err:
                if err.errno == errno.EINTR:
                    continue
                return False
            if not chunk:
                return self.kind is WatchKind.FIFO  # a socket's EOF: its peer is gone

    def close(self) -> None:
        self._fd.close()

    def __repr__(self) -> str:
        return f"ServicePressure({self.watch.path!r}, {self.kind.value})"


def _open_psi(watch: PressureWatch) -> Fd:
    fd = Fd(os.open(watch.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    try:
        os.write(fd.fileno(), watch.write or DEFAULT_PSI_TRIGGER)
    except BaseException:
        fd.close()
        raise
    return fd


def _open_fifo(watch: PressureWatch) -> Fd:
    # Read-write: the open does not wait for a writer, and the fd never
    # reads end-of-file when writers come and go. The data is written for
    # whoever reads the FIFO first; what this fd would read of it is
    # dropped at once, before the manager watches it.
    fd = Fd(os.open(watch.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC))
    try:
        if watch.write:
            os.write(fd.fileno(), watch.write)
            with contextlib.suppress(BlockingIOError):
                os.read(fd.fileno(), len(watch.write))
    except BaseException:
        fd.close()
        raise
    return fd


def _connect(watch: PressureWatch) -> Fd:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(watch.path)
        if watch.write:
            sock.sendall(watch.write)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return Fd(sock.detach())
