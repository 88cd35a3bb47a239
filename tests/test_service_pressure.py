"""systemd's memory pressure protocol: ``$MEMORY_PRESSURE_WATCH`` and
``$MEMORY_PRESSURE_WRITE`` as a source of ``on_pressure`` hooks.

The variables and the three kinds of source (a PSI file, a FIFO, a socket)
are checked here on their own; then a handler started with the variables
set runs its hooks at each signal, on the real kernel (a FIFO the test
writes to, and a real PSI trigger under a real page-cache thrash).
"""

from __future__ import annotations

import base64
import contextlib
import os
import select
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator

import pytest

from helpers import GROUP_PREFIX, destroy_group, wait_until
from useroom._fd import Fd
from useroom import Group, Handler, PressureSource, PressureWatchError, Supervisor
from useroom.handler.pressure import DEFAULT_PSI_TRIGGER, PressureWatch, ServicePressure, WatchKind

EVENT_TIMEOUT = 20 if os.environ.get("USEROOM_SLOW_GUEST") else 10


def _env(path: str, write: bytes | None = None) -> dict[str, str]:
    env = {"MEMORY_PRESSURE_WATCH": path}
    if write is not None:
        env["MEMORY_PRESSURE_WRITE"] = base64.b64encode(write).decode()
    return env


@pytest.fixture
def fifo(tmp_path) -> str:
    path = str(tmp_path / "pressure.fifo")
    os.mkfifo(path)
    return path


@pytest.fixture
def server(tmp_path) -> Iterator[tuple[str, socket.socket]]:
    path = str(tmp_path / "pressure.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(4)
    sock.settimeout(10)
    yield path, sock
    sock.close()


class TestVariables:
    def test_unset_or_dev_null_is_no_watch(self) -> None:
        assert PressureWatch.from_environment({}) is None
        assert PressureWatch.from_environment({"MEMORY_PRESSURE_WATCH": ""}) is None
        assert PressureWatch.from_environment(_env("/dev/null", b"some 1 2\0")) is None

    def test_the_data_is_decoded(self) -> None:
        watch = PressureWatch.from_environment(_env("/sys/fs/cgroup/a.service/memory.pressure",
                                                    b"some 200000 2000000\0"))
        assert watch == PressureWatch("/sys/fs/cgroup/a.service/memory.pressure", b"some 200000 2000000\0")
        assert b"" == PressureWatch.from_environment(_env("/x")).write

    def test_a_relative_path_is_refused(self) -> None:
        with pytest.raises(PressureWatchError, match="absolute") as info:
            PressureWatch.from_environment(_env("memory.pressure"))
        assert "MEMORY_PRESSURE_WATCH" == info.value.variable

    def test_data_that_is_not_base64_is_refused(self) -> None:
        with pytest.raises(PressureWatchError, match="base64") as info:
            PressureWatch.from_environment({"MEMORY_PRESSURE_WATCH": "/x", "MEMORY_PRESSURE_WRITE": "not base64!"})
        assert "MEMORY_PRESSURE_WRITE" == info.value.variable


class TestSources:
    def test_a_missing_path(self, tmp_path) -> None:
        with pytest.raises(PressureWatchError, match="No such file"):
            ServicePressure.open(PressureWatch(str(tmp_path / "gone")))

    def test_a_directory(self, tmp_path) -> None:
        with pytest.raises(PressureWatchError, match="not a regular file, a FIFO or a socket"):
            ServicePressure.open(PressureWatch(str(tmp_path)))

    def test_a_fifo_signals_with_epollin_and_is_drained(self, fifo: str) -> None:
        source = ServicePressure.open(PressureWatch(fifo, b"hello\0"))
        try:
            assert WatchKind.FIFO is source.kind and select.EPOLLIN == source.events
            assert source.covers(types.SimpleNamespace(relpath="/any"))  # type: ignore[arg-type]
            poll = select.poll()
            poll.register(source.fileno(), select.POLLIN)
            assert [] == poll.poll(0), "its own data was dropped before it is watched"
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.write(writer, b"x" * 10000)
            assert poll.poll(1000)
            assert source.consume(select.EPOLLIN)
            assert [] == poll.poll(0)
            os.close(writer)  # a writer that leaves is no end: the FIFO is the source's own
            assert source.consume(select.EPOLLIN)
        finally:
            source.close()
        assert source.closed

    def test_a_socket_is_connected_and_told_the_data(self, server) -> None:
        path, listening = server
        source = ServicePressure.open(PressureWatch(path, b"some 1 2\0"))
        peer, _ = listening.accept()
        try:
            assert WatchKind.SOCKET is source.kind and select.EPOLLIN == source.events
            assert b"some 1 2\0" == peer.recv(100)
            peer.sendall(b"pressure")
            poll = select.poll()
            poll.register(source.fileno(), select.POLLIN)
            assert poll.poll(1000)
            assert source.consume(select.EPOLLIN)
            assert [] == poll.poll(0)
            peer.close()
            assert poll.poll(1000)
            assert not source.consume(select.EPOLLIN), "a socket whose peer left signals no more"
        finally:
            source.close()

    def test_a_psi_file_gets_a_trigger(self) -> None:
        """The kernel's PSI file: a trigger is written (the default when none
        is given: without one the file polls ready for ever)."""
        path, cgroup = _psi_file()
        source = ServicePressure.open(PressureWatch(path))
        try:
            assert WatchKind.PSI is source.kind and select.EPOLLPRI == source.events
            assert cgroup == source.cgroup
            poll = select.poll()
            poll.register(source.fileno(), select.POLLPRI)
            # A trigger of 200 ms of stall in 2 s does not fire on an idle
            # machine; without a trigger the poll would return at once.
            assert all(not revents & select.POLLERR for _, revents in poll.poll(0))
            assert DEFAULT_PSI_TRIGGER.endswith(b"\0")
        finally:
            source.close()

    def test_a_trigger_the_kernel_refuses(self) -> None:
        path, _ = _psi_file()
        with pytest.raises(PressureWatchError, match=path):
            ServicePressure.open(PressureWatch(path, b"most 1 2\0"))

    def test_a_cgroup_psi_file_covers_its_subtree(self, tmp_path) -> None:
        """A cgroup's ``memory.pressure`` speaks for that cgroup and those below it only."""
        path, cgroup = _psi_file()
        assert cgroup is not None
        watch = PressureWatch(path)
        assert cgroup == watch.cgroup()
        source = ServicePressure(watch, WatchKind.PSI, _devnull(), watch.cgroup())
        base = cgroup.rstrip("/")
        assert source.covers(types.SimpleNamespace(relpath=base or "/"))  # type: ignore[arg-type]
        assert source.covers(types.SimpleNamespace(relpath=f"{base}/app/work"))  # type: ignore[arg-type]
        if base:
            assert not source.covers(types.SimpleNamespace(relpath=base + "x"))  # type: ignore[arg-type]
            assert not source.covers(types.SimpleNamespace(relpath="/"))  # type: ignore[arg-type]
        source.close()
        assert PressureWatch("/proc/pressure/memory").cgroup() is None
        assert PressureWatch(str(tmp_path / "memory.pressure")).cgroup() is None


def _join(group: Group) -> None:
    """In the child before exec: into ``group`` (written by hand, as a fixture would)."""
    with open(os.path.join(group.path, "cgroup.procs"), "w") as procs:
        procs.write("0")


def _psi_file() -> tuple[str, str | None]:
    """A PSI memory file this process may put a trigger on, and its cgroup:
    its own cgroup's ``memory.pressure`` in the cgroup2 mount. (On a host
    whose memory controller is on v1 the cgroup2 mount still has the PSI
    files, and ``/proc/pressure/memory`` refuses triggers.)"""
    with open("/proc/self/cgroup") as cgroups, open("/proc/self/mountinfo") as mountinfo:
        unified = [line.split(":", 2)[2].strip() for line in cgroups if line.startswith("0::")]
        mounts = [line.split()[4] for line in mountinfo if " - cgroup2 " in line]
    if unified and mounts:
        path = os.path.join(mounts[0], unified[0].lstrip("/"), "memory.pressure")
        if os.path.exists(path):
            return path, unified[0]
    pytest.skip("no cgroup2 memory.pressure file for this process (CONFIG_PSI off?)")


def _devnull() -> Fd:
    return Fd(os.open(os.devnull, os.O_RDONLY))


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("MEMORY_PRESSURE_WATCH", "MEMORY_PRESSURE_WRITE")}
    os.environ.pop("MEMORY_PRESSURE_WRITE", None)
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.mark.backends
@pytest.mark.timeout(90)
class TestHandlerUnderTheProtocol:
    def test_each_signal_runs_every_pressure_hook_once(self, scratch_group: Group, fifo: str) -> None:
        """A FIFO named by the variables: each write runs each ``on_pressure``
        hook once, with ``source`` SERVICE, whatever its threshold (none is
        crossed here); a hook registered at two sizes runs once."""
        scratch_group.set_limit("64M")
        seen: list[tuple[str, PressureSource, int]] = []

        def shed(ctx) -> None:
            seen.append(("shed", ctx.source, ctx.threshold))

        def trim(ctx) -> None:
            seen.append(("trim", ctx.source, ctx.threshold))

        with _environment(_env(fifo, b"some 100000 1000000\0")):
            handler = Handler(scratch_group, thresholds=(), watchdog=False)
            handler.on_pressure(0.9)(shed)
            handler.on_pressure("60M")(shed)
            handler.on_pressure("50M")(trim)
            with handler:
                source = handler.supervisor.service_pressure
                assert source is not None and WatchKind.FIFO is source.kind
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                try:
                    os.write(writer, b"1")
                    assert wait_until(lambda: 2 == len(seen), EVENT_TIMEOUT)
                    os.write(writer, b"2")
                    assert wait_until(lambda: 4 == len(seen), EVENT_TIMEOUT)
                    time.sleep(0.2)
                finally:
                    os.close(writer)
            assert handler.supervisor.service_pressure is None, "closed at stop"
        assert sorted(seen) == sorted([("shed", PressureSource.SERVICE, 0), ("trim", PressureSource.SERVICE, 0)] * 2)
        assert not [e for e in handler.errors if not isinstance(e, OSError)]

    def test_a_hook_that_raises_is_recorded(self, scratch_group: Group, fifo: str) -> None:
        scratch_group.set_limit("64M")
        ran = threading.Event()

        def broken(ctx) -> None:
            ran.set()
            raise RuntimeError("cache gone")

        with _environment(_env(fifo)):
            with Handler(scratch_group, thresholds=(), watchdog=False) as handler:
                handler.on_pressure(0.9)(broken)
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                try:
                    os.write(writer, b"1")
                    assert ran.wait(EVENT_TIMEOUT)
                    assert wait_until(lambda: any("cache gone" in str(e) for e in handler.errors), EVENT_TIMEOUT)
                finally:
                    os.close(writer)

    def test_one_signal_serves_every_group_of_a_supervisor(self, own_group: Group, fifo: str) -> None:
        """A source that names no cgroup speaks for every group served."""
        paths = [os.path.join(own_group.path, f"{GROUP_PREFIX}{os.getpid()}-sp{i}") for i in range(2)]
        try:
            for path in paths:
                os.mkdir(path)
            self._serve_both([Group.open(p) for p in paths], fifo)
        finally:
            for path in paths:
                if os.path.isdir(path):
                    destroy_group(path, below=own_group.path)

    def _serve_both(self, groups: list[Group], fifo: str) -> None:
        with _environment(_env(fifo)):
            seen: list[str] = []
            sup = Supervisor(watchdog=False)
            for group in groups:
                group.set_limit("64M")
                sup.add(group, thresholds=()).on_pressure(0.9)(lambda ctx: seen.append(ctx.group.relpath))
            with sup:
                writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                try:
                    os.write(writer, b"1")
                    assert wait_until(lambda: 2 == len(seen), EVENT_TIMEOUT)
                finally:
                    os.close(writer)
        assert sorted(seen) == sorted(g.relpath for g in groups)

    def test_switched_off(self, scratch_group: Group, fifo: str) -> None:
        scratch_group.set_limit("64M")  # cgroup v2: the handler needs a memory.max for its wall
        with _environment(_env(fifo)):
            with Handler(scratch_group, thresholds=(), watchdog=False, service_pressure=False) as handler:
                assert handler.supervisor.service_pressure is None

    def test_a_bad_watch_is_logged_and_the_handler_runs(self, scratch_group: Group, tmp_path, caplog) -> None:
        scratch_group.set_limit("64M")
        with _environment(_env(str(tmp_path / "gone"))):
            with caplog.at_level("WARNING", logger="useroom"):
                with Handler(scratch_group, thresholds=(), watchdog=False) as handler:
                    assert handler.running and handler.supervisor.service_pressure is None
                    assert any(isinstance(e, PressureWatchError) for e in handler.supervisor.errors)
        [record] = [r for r in caplog.records if getattr(r, "cause", None) == "pressure_watch"]
        assert "MEMORY_PRESSURE_WATCH" == record.variable

    def test_the_socket_peer_leaving_is_logged(self, scratch_group: Group, server, caplog) -> None:
        path, listening = server
        scratch_group.set_limit("64M")
        with _environment(_env(path)):
            with caplog.at_level("WARNING", logger="useroom"):
                with Handler(scratch_group, thresholds=(), watchdog=False):
                    peer, _ = listening.accept()
                    peer.close()
                    assert wait_until(lambda: any(getattr(r, "cause", None) == "pressure_watch_gone"
                                                  for r in caplog.records), EVENT_TIMEOUT)


@pytest.mark.kernel
@pytest.mark.timeout(120)
def test_a_real_psi_trigger_runs_the_hooks(scratch_group: Group, tmp_path) -> None:
    """A PSI file of this process's cgroup and a trigger, as systemd would
    name them: a writer in the handled group fills the page cache far past
    the group's limit, so its allocations stall in reclaim, waiting for
    writeback (a v1 memory cgroup throttles its dirtiers that way); the
    trigger fires and the hooks run with ``source`` SERVICE."""
    psi, _ = _psi_file()
    scratch_group.set_limit("32M")
    seen: list[PressureSource] = []
    script = ("import os, sys\n"
              "block = bytes(1 << 20)\n"
              "while True:\n"
              "    with open(sys.argv[1], 'wb') as out:\n"
              "        for _ in range(256): out.write(block)\n")
    with _environment(_env(psi, b"some 20000 2000000\0")):
        with Handler(scratch_group, thresholds=(), watchdog=False) as handler:
            # Above the limit: the usage never crosses it, only the service's signal runs it.
            handler.on_pressure("64M")(lambda ctx: seen.append(ctx.source))
            assert handler.supervisor.service_pressure is not None
            writer = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "dirty.bin")],
                                      preexec_fn=lambda: _join(scratch_group))
            try:
                assert wait_until(lambda: bool(seen), 60), "no PSI signal while dirtying 8x the limit"
            finally:
                writer.kill()
                writer.wait()
    assert {PressureSource.SERVICE} == set(seen)
