"""The cgroup layer on the real cgroup v1 memory controller, and its value objects.

Every group is made below the test process's own memcg by the
``scratch_group`` fixture, which always releases and removes it.
"""

from __future__ import annotations

import gc
import os
import pathlib
import select
import stat
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest

from helpers import MIB, Hog, oom_trap, run_as, wait_until
from useroom.cgroup import EventRegistration, Group, OomControl, Stats, backend_class
from useroom.cgroup.v1 import V1Group
from useroom._mounts import Mount, memory_hierarchy, read_memberships, read_mounts
from useroom._units import UNLIMITED
from useroom.exceptions import (
    CgroupError,
    CgroupPermissionError,
    GroupBusy,
    GroupExists,
    GroupGone,
    GroupNotFound,
    InvalidName,
    InvalidSize,
    KernelFormatError,
    LimitBelowUsage,
    NotAMemoryCgroup,
    ProcessGone,
    RootGroupError,
    UnsupportedKernel,
)

SpawnHog = Callable[..., Hog]
NOBODY = 65534
#: Long enough for a slow machine; the events themselves take milliseconds.
EVENT_TIMEOUT = 20.0

V1_OOM_CONTROL = "oom_kill_disable 1\nunder_oom 0\noom_kill 3\n"
V1_STAT = "cache 7806976\nrss 1675264\nshmem 0\nmapped_file 4096\nswap 0\ntotal_rss 1675264\n"


class TestOomControlValue:
    def test_from_text(self) -> None:
        """memory.oom_control's three lines become the three fields."""
        assert OomControl(kill_disabled=True, under_oom=False, oom_kill=3) == OomControl.from_text(V1_OOM_CONTROL)

    def test_old_kernel_without_oom_kill(self) -> None:
        """Kernels before 4.13 do not report oom_kill; it reads as 0."""
        assert OomControl(False, True, 0) == OomControl.from_text("oom_kill_disable 0\nunder_oom 1\n")

    @pytest.mark.parametrize("text", ["", "under_oom 1\n", "oom_kill_disable x\nunder_oom 0\n", "garbage"])
    def test_malformed(self, text: str) -> None:
        """Missing lines or non-numbers raise KernelFormatError."""
        with pytest.raises(KernelFormatError):
            OomControl.from_text(text)


class TestStatsValue:
    def test_mapping(self) -> None:
        """Stats is a read-only mapping of memory.stat's keys to ints, in the kernel's order."""
        stats = Stats.from_text(V1_STAT)
        assert ["cache", "rss", "shmem", "mapped_file", "swap", "total_rss"] == list(stats)
        assert (1675264, 6) == (stats["rss"], len(stats))

    def test_properties_v1(self) -> None:
        """The properties read the v1 keys."""
        stats = Stats.from_text(V1_STAT)
        assert (1675264, 7806976, 4096, 0) == (stats.rss, stats.cache, stats.mapped_file, stats.swap)

    def test_properties_v2(self) -> None:
        """The properties fall back to the v2 keys (anon, file, file_mapped)."""
        stats = Stats.from_text("anon 10\nfile 20\nfile_mapped 30\n")
        assert (10, 20, 30) == (stats.rss, stats.cache, stats.mapped_file)

    def test_missing_property_is_zero(self) -> None:
        """A property the kernel does not report reads as 0."""
        assert 0 == Stats.from_text("anon 10\n").unevictable

    def test_equality_and_hash(self) -> None:
        """Stats compare by content, are hashable, and equal a dict with the same items."""
        assert Stats.from_text(V1_STAT) == Stats.from_text(V1_STAT)
        assert hash(Stats.from_text(V1_STAT)) == hash(Stats.from_text(V1_STAT))
        assert {"a": 1} == dict(Stats.from_text("a 1\n"))
        assert Stats.from_text("a 1\n") != Stats.from_text("a 2\n")

    def test_immutable(self) -> None:
        """Stats cannot be modified."""
        stats = Stats.from_text(V1_STAT)
        with pytest.raises(TypeError):
            stats["rss"] = 0  # type: ignore[index]

    @pytest.mark.parametrize("text", ["rss", "rss 1 2", "rss x", "rss --1", "rss \u0661"])
    def test_malformed(self, text: str) -> None:
        """A line that is not 'key number' raises KernelFormatError."""
        with pytest.raises(KernelFormatError):
            Stats.from_text(text)


class TestEventRegistrationObject:
    """The fd-owning object, on a plain eventfd (no cgroup involved)."""

    def make(self) -> EventRegistration:
        return EventRegistration(os.eventfd(0, os.EFD_CLOEXEC), os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), "test")

    def test_close_is_idempotent(self) -> None:
        """close() closes both fds once; a second close() does nothing."""
        registration = self.make()
        eventfd = registration.fileno()
        registration.close()
        registration.close()
        assert registration.closed
        with pytest.raises(OSError):
            os.fstat(eventfd)

    def test_fileno_after_close(self) -> None:
        """fileno() of a closed registration raises ValueError, never returns a stale number."""
        registration = self.make()
        registration.close()
        with pytest.raises(ValueError):
            registration.fileno()

    def test_context_manager(self) -> None:
        """Leaving the with block closes it."""
        with self.make() as registration:
            assert not registration.closed
        assert registration.closed

    def test_read_counts(self) -> None:
        """read() returns the number of signals since the last read and resets it."""
        with self.make() as registration:
            os.eventfd_write(registration.fileno(), 1)
            os.eventfd_write(registration.fileno(), 1)
            assert 2 == registration.read(timeout=1)
            assert not registration.wait(0)

    def test_wait_does_not_consume(self) -> None:
        """wait() reports a pending event without consuming it."""
        with self.make() as registration:
            assert not registration.wait(0)
            os.eventfd_write(registration.fileno(), 1)
            assert registration.wait(0)
            assert 1 == registration.read()

    def test_read_timeout(self) -> None:
        """read(timeout=...) raises TimeoutError when nothing fires."""
        with self.make() as registration, pytest.raises(TimeoutError):
            registration.read(timeout=0.01)

    def test_resource_warning(self) -> None:
        """A registration dropped open warns with ResourceWarning and closes its fds."""
        registration = self.make()
        eventfd = registration.fileno()
        with pytest.warns(ResourceWarning, match="unclosed"):
            del registration
            gc.collect()
        with pytest.raises(OSError):
            os.fstat(eventfd)


@pytest.mark.kernel
class TestDiscovery:
    def test_current(self, own_group: Group) -> None:
        """current() is the group /proc/self/cgroup names for the memory controller, on v1."""
        membership = memory_hierarchy().membership(read_memberships())
        assert membership is not None
        assert (1, membership.path) == (own_group.version, own_group.relpath)
        assert isinstance(own_group, V1Group)
        assert os.path.isfile(os.path.join(own_group.path, "memory.oom_control"))

    def test_open_forms(self, scratch_group: Group) -> None:
        """A group opens from its filesystem path, its hierarchy path, or a PathLike, all equal."""
        assert scratch_group == Group.open(scratch_group.path)
        assert scratch_group == Group.open(scratch_group.relpath)
        assert scratch_group == Group.open(pathlib.Path(scratch_group.path))
        assert scratch_group == Group.open(scratch_group.path + "/")

    def test_identity(self, own_group: Group, scratch_group: Group) -> None:
        """name, relpath, path, parent and is_root describe where the group is."""
        assert own_group == scratch_group.parent
        assert scratch_group.relpath == own_group.relpath + "/" + scratch_group.name
        assert scratch_group.path == os.path.join(own_group.path, scratch_group.name)
        assert not scratch_group.is_root

    def test_root(self) -> None:
        """'/' opens the hierarchy's root group, which has no parent."""
        root = Group.open("/")
        assert (True, None, "/", "/") == (root.is_root, root.parent, root.relpath, root.name)
        assert memory_hierarchy().mount.mount_point == root.path

    def test_of_pid(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """of_pid() finds the group a process was attached to."""
        hog = spawn_hog(0, scratch_group)
        assert scratch_group == Group.of_pid(hog.pid)

    def test_of_pid_gone(self) -> None:
        """of_pid() of a process that no longer exists raises ProcessGone."""
        with pytest.raises(ProcessGone):
            Group.of_pid(gone_pid())

    def test_backend_class(self) -> None:
        """Version 1 has a backend; an unknown version raises UnsupportedKernel."""
        assert V1Group is backend_class(1)
        with pytest.raises(UnsupportedKernel):
            backend_class(3)

    def test_file_names(self, scratch_group: Group) -> None:
        """The v1 backend names the control files the handler preopens."""
        assert isinstance(scratch_group, V1Group)
        assert ("memory.limit_in_bytes", "memory.oom_control", "memory.usage_in_bytes", "cgroup.procs") == (
            scratch_group.limit_file,
            scratch_group.oom_control_file,
            scratch_group.usage_file,
            scratch_group.procs_file,
        )


@pytest.mark.kernel
class TestOpenErrors:
    def test_missing(self, own_group: Group) -> None:
        """A path that is no group raises GroupNotFound, a FileNotFoundError."""
        with pytest.raises(GroupNotFound):
            Group.open(own_group.path + "/no-such-group")
        with pytest.raises(FileNotFoundError):
            Group.open(own_group.relpath + "/no-such-group")

    def test_outside_cgroupfs(self, tmp_path: pathlib.Path) -> None:
        """An existing path outside every cgroup filesystem raises NotAMemoryCgroup."""
        with pytest.raises(NotAMemoryCgroup, match="not in a cgroup filesystem"):
            Group.open(tmp_path)

    def test_other_hierarchy(self) -> None:
        """A path in a cgroup hierarchy without the memory controller raises NotAMemoryCgroup."""
        other = next(mount for mount in _cgroup_mounts() if "memory" not in mount.controllers)
        with pytest.raises(NotAMemoryCgroup, match="not in the memory hierarchy"):
            Group.open(other.mount_point)

    def test_file(self, scratch_group: Group) -> None:
        """A control file is not a group: NotAMemoryCgroup."""
        with pytest.raises(NotAMemoryCgroup, match="is a file"):
            Group.open(os.path.join(scratch_group.path, "memory.stat"))

    def test_nul(self) -> None:
        """A path with NUL raises GroupNotFound, not a ValueError from deep inside."""
        with pytest.raises(GroupNotFound):
            Group.open("/a\0b")


@pytest.mark.kernel
class TestCreateChild:
    def test_create(self, scratch_group: Group) -> None:
        """create_child makes an empty unlimited group that children() lists."""
        child = scratch_group.create_child("app")
        assert ([child], [], UNLIMITED) == (scratch_group.children(), child.procs(), child.limit())
        assert os.path.isdir(child.path)

    def test_with_limit(self, scratch_group: Group) -> None:
        """memory_max sets the new group's limit."""
        assert 256 * MIB == scratch_group.create_child("app", memory_max="256M").limit()

    def test_exists(self, scratch_group: Group) -> None:
        """Creating a group that exists raises GroupExists, a FileExistsError."""
        scratch_group.create_child("app")
        with pytest.raises(GroupExists, match="already exists"):
            scratch_group.create_child("app")

    @pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/a", "../x", "a\0b", "a\nb", "x" * 256, None, b"app"])
    def test_invalid_name(self, scratch_group: Group, name: object) -> None:
        """A name that is not a single plain path component raises InvalidName; nothing is created."""
        with pytest.raises(InvalidName):
            scratch_group.create_child(name)  # type: ignore[arg-type]
        assert [] == scratch_group.children()

    def test_invalid_size(self, scratch_group: Group) -> None:
        """An invalid memory_max raises InvalidSize before the group is created."""
        with pytest.raises(InvalidSize):
            scratch_group.create_child("app", memory_max="lots")
        assert [] == scratch_group.children()

    def test_nested(self, scratch_group: Group) -> None:
        """Children can have children; relpath and parent follow."""
        grandchild = scratch_group.create_child("a").create_child("b")
        assert scratch_group.relpath + "/a/b" == grandchild.relpath
        assert grandchild.parent is not None and scratch_group == grandchild.parent.parent

    def test_parent_gone(self, scratch_group: Group) -> None:
        """Creating a child of a removed group raises GroupGone."""
        child = scratch_group.create_child("a")
        child.remove()
        with pytest.raises(GroupGone):
            child.create_child("b")


@pytest.mark.kernel
class TestLimit:
    def test_set_and_read(self, scratch_group: Group) -> None:
        """set_limit takes sizes in every accepted form; limit() reads bytes back."""
        scratch_group.set_limit("64M")
        assert 64 * MIB == scratch_group.limit()
        scratch_group.set_limit(3 * MIB)
        assert 3 * MIB == scratch_group.limit()
        scratch_group.set_limit("1.5G")
        assert 1536 * MIB == scratch_group.limit()

    def test_rounded_to_page(self, scratch_group: Group) -> None:
        """The kernel rounds a limit down to a whole page."""
        scratch_group.set_limit(4096 + 1)
        assert 4096 == scratch_group.limit()

    def test_unlimited(self, scratch_group: Group) -> None:
        """'max' lifts the limit; v1's 'no limit' value reads as UNLIMITED."""
        scratch_group.set_limit("64M")
        scratch_group.set_limit("max")
        assert UNLIMITED == scratch_group.limit()
        with open(os.path.join(scratch_group.path, "memory.limit_in_bytes")) as raw:
            assert 9223372036854771712 == int(raw.read())

    def test_invalid_size(self, scratch_group: Group) -> None:
        """A bad size raises InvalidSize and leaves the limit alone."""
        with pytest.raises(InvalidSize):
            scratch_group.set_limit("-1M")
        assert UNLIMITED == scratch_group.limit()

    def test_below_usage(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """A limit below memory the kernel cannot reclaim (anonymous, no swap) raises LimitBelowUsage."""
        hog = spawn_hog(16, scratch_group)
        hog.start()
        assert hog.wait_touched(EVENT_TIMEOUT)
        with pytest.raises(LimitBelowUsage, match="could not reclaim"):
            scratch_group.set_limit("4M")
        assert UNLIMITED == scratch_group.limit()

    def test_gone(self, scratch_group: Group) -> None:
        """Setting or reading the limit of a removed group raises GroupGone."""
        child = scratch_group.create_child("a")
        child.remove()
        with pytest.raises(GroupGone):
            child.set_limit("1G")
        with pytest.raises(GroupGone):
            child.limit()

    def test_gone_through_open_fd(self, scratch_group: Group) -> None:
        """An fd opened before the group was removed gets ENODEV, which is GroupGone's errno."""
        child = scratch_group.create_child("a")
        fd = child.open_file(child.limit_file, os.O_RDONLY)
        try:
            child.remove()
            with pytest.raises(OSError) as info:
                os.read(fd, 64)
            assert 19 == info.value.errno  # ENODEV
        finally:
            os.close(fd)


@pytest.mark.kernel
class TestRootGroup:
    """The root memcg has no limit and no OOM; every such call fails before writing anything."""

    @pytest.mark.parametrize(
        "call",
        [
            lambda root: root.set_limit("1G"),
            lambda root: root.set_oom_kill(False),
            lambda root: root.oom_notifier(),
            lambda root: root.usage_threshold("1G"),
            lambda root: root.remove(),
            lambda root: root.remove(force=True),
        ],
        ids=["set_limit", "set_oom_kill", "oom_notifier", "usage_threshold", "remove", "remove_force"],
    )
    def test_refused(self, call: Callable[[Group], object]) -> None:
        """RootGroupError, a ValueError."""
        with pytest.raises(RootGroupError):
            call(Group.open("/"))


@pytest.mark.kernel
class TestTasks:
    def test_attach_and_procs(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """attach() moves a process in; procs() lists it."""
        hog = spawn_hog(0)
        scratch_group.attach(hog.pid)
        assert [hog.pid] == scratch_group.procs()

    def test_usage_and_stats(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """Memory touched after attaching is charged to the group: usage() and stats().rss see it."""
        hog = spawn_hog(32, scratch_group)
        before = scratch_group.usage()
        hog.start()
        assert hog.wait_touched(EVENT_TIMEOUT)
        assert before < 2 * MIB <= 32 * MIB <= scratch_group.usage()
        stats = scratch_group.stats()
        assert 32 * MIB <= stats.rss
        assert stats["rss"] == stats.rss

    def test_attach_gone_process(self, scratch_group: Group) -> None:
        """Attaching a pid that names no process raises ProcessGone (a ProcessLookupError)."""
        with pytest.raises(ProcessLookupError):
            scratch_group.attach(gone_pid())

    @pytest.mark.parametrize(("pid", "error"), [(0, ValueError), (-1, ValueError), (True, TypeError), ("1", TypeError)])
    def test_attach_bad_pid(self, scratch_group: Group, pid: object, error: type[Exception]) -> None:
        """0 (which would mean 'the writer'), negative and non-int pids are refused before the kernel sees them."""
        with pytest.raises(error):
            scratch_group.attach(pid)  # type: ignore[arg-type]
        assert [] == scratch_group.procs()

    def test_attach_thread_moves_one_thread(self, scratch_group: Group) -> None:
        """attach_thread() moves one thread: the process stays where it was, the thread's
        memory group is the new one; a tid that names no thread raises ProcessGone."""
        home, away = scratch_group.create_child("home"), scratch_group.create_child("away")
        code = ("import sys, threading\n"
                "t = threading.Thread(target=sys.stdin.readline, daemon=True); t.start()\n"
                "print(t.native_id, flush=True); t.join()\n")
        proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            tid = int(proc.stdout.readline())
            home.attach(proc.pid)
            away.attach_thread(tid)
            assert [proc.pid] == home.procs()
            assert away.relpath == Group.of_thread(tid, proc.pid).relpath
            assert home.relpath == Group.of_pid(proc.pid).relpath
            with open(os.path.join(away.path, "tasks")) as f:
                assert [tid] == [int(line) for line in f]
            with pytest.raises(ProcessLookupError):
                away.attach_thread(gone_pid())
            assert Group.current().relpath == Group.of_thread(threading.get_native_id()).relpath
        finally:
            proc.kill()
            proc.communicate(timeout=10)

    def test_attach_to_gone_group(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """Attaching to a removed group raises GroupGone."""
        child = scratch_group.create_child("a")
        child.remove()
        with pytest.raises(GroupGone):
            child.attach(spawn_hog(0).pid)


@pytest.mark.kernel
class TestOomControl:
    def test_default(self, scratch_group: Group) -> None:
        """A new group has the kernel killer on and is not under OOM."""
        assert OomControl(kill_disabled=False, under_oom=False, oom_kill=0) == scratch_group.oom_control()

    def test_set_oom_kill(self, scratch_group: Group) -> None:
        """set_oom_kill(False) disables the kernel killer; set_oom_kill(True) enables it again."""
        scratch_group.set_oom_kill(False)
        assert scratch_group.oom_control().kill_disabled
        scratch_group.set_oom_kill(True)
        assert not scratch_group.oom_control().kill_disabled

    @pytest.mark.timeout(60)
    def test_kernel_killer_counts(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """With the kernel killer on, a hog over the limit is killed and oom_kill counts it."""
        scratch_group.set_limit("32M")
        hog = spawn_hog(200, scratch_group)
        hog.start()
        assert -9 == hog.wait(EVENT_TIMEOUT)
        assert 1 == scratch_group.oom_control().oom_kill


@pytest.mark.kernel
class TestOomNotifier:
    @pytest.mark.timeout(60)
    def test_fires_and_limit_resolves(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """A hog over the limit with the killer off fires the eventfd, sleeps under OOM, and
        finishes once the limit is raised."""
        oom_trap(scratch_group)
        with scratch_group.oom_notifier() as notifier:
            hog = spawn_hog(200, scratch_group)
            hog.start()
            assert 1 <= notifier.read(timeout=EVENT_TIMEOUT)
            assert scratch_group.oom_control().under_oom
            assert wait_until(hog.in_oom_wait, EVENT_TIMEOUT)
            scratch_group.set_limit("300M")
            assert hog.wait_touched(EVENT_TIMEOUT)
            assert OomControl(kill_disabled=True, under_oom=False, oom_kill=0) == scratch_group.oom_control()

    @pytest.mark.timeout(60)
    def test_kill_resolves(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """Killing the sleeping task from Python resolves the OOM: it dies of SIGKILL and the group is empty."""
        oom_trap(scratch_group)
        with scratch_group.oom_notifier() as notifier:
            hog = spawn_hog(200, scratch_group)
            hog.start()
            notifier.read(timeout=EVENT_TIMEOUT)
            hog.kill()
            assert -9 == hog.wait(EVENT_TIMEOUT)
            assert ([], False) == (scratch_group.procs(), scratch_group.oom_control().under_oom)

    @pytest.mark.timeout(60)
    def test_enabling_killer_resolves(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """Re-enabling the kernel killer during the OOM lets the kernel kill the sleeping task."""
        oom_trap(scratch_group)
        with scratch_group.oom_notifier() as notifier:
            hog = spawn_hog(200, scratch_group)
            hog.start()
            notifier.read(timeout=EVENT_TIMEOUT)
            scratch_group.set_oom_kill(True)
            assert -9 == hog.wait(EVENT_TIMEOUT)
            assert 1 == scratch_group.oom_control().oom_kill

    @pytest.mark.timeout(60)
    def test_registered_under_oom(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """Registering while the group is already under OOM fires at once."""
        oom_trap(scratch_group)
        hog = spawn_hog(200, scratch_group)
        hog.start()
        assert wait_until(hog.in_oom_wait, EVENT_TIMEOUT)
        with scratch_group.oom_notifier() as notifier:
            assert notifier.wait(EVENT_TIMEOUT)

    def test_quiet_without_oom(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """Memory use under the limit does not fire the eventfd."""
        oom_trap(scratch_group, "64M")
        with scratch_group.oom_notifier() as notifier:
            hog = spawn_hog(16, scratch_group)
            hog.start()
            assert hog.wait_touched(EVENT_TIMEOUT)
            assert not notifier.wait(0.05)

    def test_removal_signals_once(self, scratch_group: Group) -> None:
        """Removing the group signals its eventfd once (the kernel does it a little after rmdir);
        the group then reads as gone."""
        child = scratch_group.create_child("a")
        with child.oom_notifier() as notifier:
            child.remove()
            assert 1 == notifier.read(timeout=EVENT_TIMEOUT)
            assert not notifier.wait(0.05)
            with pytest.raises(GroupGone):
                child.oom_control()

    def test_fds_close_on_exec(self, scratch_group: Group) -> None:
        """Both fds the registration owns are close-on-exec."""
        with scratch_group.oom_notifier() as notifier:
            fds = [notifier.fileno(), notifier.control_fd]
            assert [False, False] == [os.get_inheritable(fd) for fd in fds]

    def test_close_unregisters(self, scratch_group: Group) -> None:
        """Closing the registration closes both of its fds."""
        notifier = scratch_group.oom_notifier()
        fds = [notifier.fileno(), notifier.control_fd]
        notifier.close()
        for fd in fds:
            with pytest.raises(OSError):
                os.fstat(fd)

    def test_gone(self, scratch_group: Group) -> None:
        """Registering on a removed group raises GroupGone."""
        child = scratch_group.create_child("a")
        child.remove()
        with pytest.raises(GroupGone):
            child.oom_notifier()

    @pytest.mark.timeout(60)
    def test_counter_adds_the_notifications(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """The OOM counter is the eventfd, polled for POLLIN: with the killer off, a hog asleep in
        the OOM counts, and the next update adds to the count."""
        oom_trap(scratch_group)
        with scratch_group.oom_counter() as counter:
            assert select.POLLIN == counter.poll_events
            hog = spawn_hog(200, scratch_group)
            hog.start()
            assert select.select([counter], [], [], EVENT_TIMEOUT)[0]
            first = counter.update()
            assert 1 <= first and scratch_group.oom_control().under_oom
            os.eventfd_write(counter.fileno(), 2)  # as if the kernel notified twice more
            assert first + 2 <= counter.update()


@pytest.mark.kernel
class TestUsageThreshold:
    @pytest.mark.timeout(60)
    def test_fires(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """Usage crossing the threshold upwards fires the eventfd."""
        with scratch_group.usage_threshold("16M") as threshold:
            assert not threshold.wait(0)
            hog = spawn_hog(32, scratch_group)
            hog.start()
            assert hog.wait_touched(EVENT_TIMEOUT)
            assert 1 <= threshold.read(timeout=EVENT_TIMEOUT)

    @pytest.mark.timeout(60)
    def test_fires_downwards(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """Usage falling back below the threshold fires it again."""
        with scratch_group.usage_threshold("16M") as threshold:
            hog = spawn_hog(32, scratch_group)
            hog.start()
            assert hog.wait_touched(EVENT_TIMEOUT)
            threshold.read(timeout=EVENT_TIMEOUT)
            hog.kill()
            hog.wait(EVENT_TIMEOUT)
            assert 1 <= threshold.read(timeout=EVENT_TIMEOUT)

    @pytest.mark.parametrize("size", ["max", "lots", -1])
    def test_invalid(self, scratch_group: Group, size: object) -> None:
        """A threshold must be a number of bytes: InvalidSize otherwise."""
        with pytest.raises(InvalidSize):
            scratch_group.usage_threshold(size)  # type: ignore[arg-type]


@pytest.mark.kernel
class TestOpenFile:
    def test_open(self, scratch_group: Group) -> None:
        """open_file returns a close-on-exec fd the caller owns, on the named control file."""
        scratch_group.set_limit("64M")
        fd = scratch_group.open_file("memory.limit_in_bytes", os.O_RDONLY)
        try:
            assert (False, b"67108864\n") == (os.get_inheritable(fd), os.read(fd, 64))
        finally:
            os.close(fd)

    def test_write_through_fd(self, scratch_group: Group) -> None:
        """A preopened limit fd changes the limit with one write, as the handler's plan does."""
        fd = scratch_group.open_file(scratch_group.limit_file, os.O_WRONLY)
        try:
            os.write(fd, b"134217728")
        finally:
            os.close(fd)
        assert 128 * MIB == scratch_group.limit()

    @pytest.mark.parametrize("name", ["", ".", "..", "../memory.limit_in_bytes", "a/b", "/etc/passwd", "x\0y"])
    def test_invalid_name(self, scratch_group: Group, name: str) -> None:
        """Only a plain file name is accepted: InvalidName otherwise."""
        with pytest.raises(InvalidName):
            scratch_group.open_file(name, os.O_RDONLY)

    def test_missing_file(self, scratch_group: Group) -> None:
        """A control file that does not exist raises CgroupError with ENOENT (the group is still there)."""
        with pytest.raises(CgroupError) as info:
            scratch_group.open_file("memory.no_such_file", os.O_RDONLY)
        assert (2, False) == (info.value.errno, isinstance(info.value, GroupGone))

    def test_gone(self, scratch_group: Group) -> None:
        """Opening a file of a removed group raises GroupGone."""
        child = scratch_group.create_child("a")
        child.remove()
        with pytest.raises(GroupGone):
            child.open_file(child.limit_file, os.O_RDONLY)

    def test_write_file(self, scratch_group: Group) -> None:
        """write_file writes one control file in one write(); a plain file name only, and a
        file the group lacks raises CgroupError with ENOENT."""
        scratch_group.write_file(scratch_group.limit_file, str(96 * MIB))
        assert 96 * MIB == scratch_group.limit()
        with pytest.raises(InvalidName):
            scratch_group.write_file("../memory.limit_in_bytes", "1")
        with pytest.raises(CgroupError) as info:
            scratch_group.write_file("memory.no_such_file", "1")
        assert 2 == info.value.errno


@pytest.mark.kernel
class TestRemove:
    def test_empty(self, scratch_group: Group) -> None:
        """An empty group is removed."""
        child = scratch_group.create_child("a")
        child.remove()
        assert not os.path.exists(child.path)

    def test_twice(self, scratch_group: Group) -> None:
        """Removing a removed group raises GroupGone, with or without force."""
        child = scratch_group.create_child("a")
        child.remove()
        with pytest.raises(GroupGone):
            child.remove()
        with pytest.raises(GroupGone):
            child.remove(force=True)

    def test_with_task(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """A group with a task raises GroupBusy naming the task; it is left alone."""
        hog = spawn_hog(0, scratch_group)
        with pytest.raises(GroupBusy, match=f"task.*{hog.pid}"):
            scratch_group.remove()
        assert [hog.pid] == scratch_group.procs()

    def test_with_child(self, scratch_group: Group) -> None:
        """A group with a child group raises GroupBusy naming the child."""
        scratch_group.create_child("a")
        with pytest.raises(GroupBusy, match="child group.*'a'"):
            scratch_group.remove()

    def test_force(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """force=True kills the tasks of the group and of its children, then removes all of it."""
        child = scratch_group.create_child("a")
        grandchild = child.create_child("b")
        hogs = [spawn_hog(4, child), spawn_hog(4, grandchild)]
        for hog in hogs:
            hog.start()
            assert hog.wait_touched(EVENT_TIMEOUT)
        child.remove(force=True)
        assert not os.path.exists(child.path)
        assert [-9, -9] == [hog.wait(EVENT_TIMEOUT) for hog in hogs]

    @pytest.mark.timeout(60)
    def test_force_during_oom(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """force=True removes a group whose task sleeps in the OOM wait with the kernel killer off."""
        child = oom_trap(scratch_group.create_child("a"))
        hog = spawn_hog(200, child)
        hog.start()
        assert wait_until(hog.in_oom_wait, EVENT_TIMEOUT)
        child.remove(force=True, timeout=EVENT_TIMEOUT)
        assert not os.path.exists(child.path)
        assert -9 == hog.wait(EVENT_TIMEOUT)

    def test_force_refuses_caller(self, scratch_group: Group) -> None:
        """force=True refuses, without killing anything, when the calling process is in the subtree."""
        child = scratch_group.create_child("a")

        def inside() -> str:
            child.attach(os.getpid())
            try:
                child.remove(force=True)
            except GroupBusy as err:
                return str(err)
            finally:
                scratch_group.attach(os.getpid())
            return "removed"

        assert "calling process" in run_as(0, inside)
        assert os.path.isdir(child.path)

    def test_force_without_pidfd(self, scratch_group: Group, spawn_hog: SpawnHog, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without pidfds, force=True falls back to kill() and polling."""
        monkeypatch.setattr("useroom._fd.can_use_pidfd", False)
        child = scratch_group.create_child("a")
        hog = spawn_hog(0, child)
        child.remove(force=True)
        assert (False, -9) == (os.path.exists(child.path), hog.wait(EVENT_TIMEOUT))


@pytest.mark.kernel
class TestPermissions:
    """Typed errors with the kernel's rule when an unprivileged user lacks a grant.

    The calls run in a forked child whose uids are all ``nobody``.
    """

    def test_attach_file_permission(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """Without write permission on cgroup.procs, attach raises CgroupPermissionError with the v1 rule."""
        hog = spawn_hog(0)
        with pytest.raises(CgroupPermissionError) as info:
            run_as(NOBODY, lambda: Group.open(scratch_group.path).attach(hog.pid))
        assert "euid" in info.value.rule and info.value.advice

    def test_attach_other_users_process(self, scratch_group: Group, spawn_hog: SpawnHog) -> None:
        """With cgroup.procs delegated, moving another user's process is still refused (euid rule)."""
        os.chown(os.path.join(scratch_group.path, "cgroup.procs"), NOBODY, NOBODY)
        hog = spawn_hog(0)  # runs as root
        with pytest.raises(CgroupPermissionError, match="euid"):
            run_as(NOBODY, lambda: Group.open(scratch_group.path).attach(hog.pid))
        assert [] == scratch_group.procs()

    def test_create_child(self, scratch_group: Group) -> None:
        """Creating a child in a directory the user cannot write raises CgroupPermissionError."""
        with pytest.raises(CgroupPermissionError, match="parent group's directory"):
            run_as(NOBODY, lambda: Group.open(scratch_group.path).create_child("a"))

    def test_set_limit(self, scratch_group: Group) -> None:
        """Setting a limit without write permission raises CgroupPermissionError; a PermissionError."""
        with pytest.raises(PermissionError):
            run_as(NOBODY, lambda: Group.open(scratch_group.path).set_limit("1G"))
        assert UNLIMITED == scratch_group.limit()

    def test_oom_notifier(self, scratch_group: Group) -> None:
        """Registering an event needs write permission on cgroup.event_control (0200 here)."""
        mode = stat.S_IMODE(os.stat(os.path.join(scratch_group.path, "cgroup.event_control")).st_mode)
        assert 0o200 == mode
        with pytest.raises(CgroupPermissionError, match="event_control"):
            run_as(NOBODY, lambda: Group.open(scratch_group.path).oom_notifier())

    def test_delegated_subtree(self, scratch_group: Group) -> None:
        """With the group's directory and files chowned to the user, the user creates and limits a child,
        registers for its OOMs and attaches its own process to it."""
        for name in [".", *os.listdir(scratch_group.path)]:
            os.chown(os.path.join(scratch_group.path, name), NOBODY, NOBODY)

        def as_user() -> tuple[int, int, list[int]]:
            child = Group.open(scratch_group.path).create_child("mine", memory_max="64M")
            with child.oom_notifier() as notifier:
                assert not notifier.wait(0)
            child.attach(os.getpid())
            procs = child.procs()
            Group.open(scratch_group.path).attach(os.getpid())  # leave, so the child can be removed
            limit = child.limit()
            child.remove()
            return limit, os.getpid(), procs

        limit, pid, procs = run_as(NOBODY, as_user)
        assert (64 * MIB, [pid]) == (limit, procs)
        assert [] == scratch_group.children()


def gone_pid() -> int:
    """A pid that named a process which has exited and been reaped."""
    hog = Hog(0, hold=False)
    hog.start()
    hog.close()
    return hog.pid


def _cgroup_mounts() -> list[Mount]:
    return [mount for mount in read_mounts() if mount.fstype == "cgroup"]
