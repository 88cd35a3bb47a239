"""The cgroup v2 backend: value objects and decisions (anywhere), and the real v2 kernel (``cgroup2``).

The ``cgroup2`` tests need a v2 memory hierarchy: .ci/run runs them in a
QEMU guest (tools/vm-run); on a v1 host they are skipped with that reason.
Every group is made below the test process's own group by ``scratch_group``,
which always lifts the limits, thaws, kills and removes it.
"""

from __future__ import annotations

import errno
import os
import pathlib
import signal
import time
from collections.abc import Callable
from typing import Any

import pytest

from helpers import MIB, Hog, run_as, wait_until, SoloWatcher
from useroom.cgroup import Group, backend_class
from useroom.cgroup.v2 import (
    UNPRIVILEGED_PSI_WINDOW_US,
    FileNotifier,
    MemoryEvents,
    PressureTrigger,
    V2Group,
    _psi_reason,
)
from useroom.native import Action, Outcome, Plan, SourceKind, Wake
from useroom._mounts import MemoryHierarchy, Mount, read_memberships, read_mounts
from useroom._units import UNLIMITED
from useroom import FreezeAndDecide, FrozenContext, Handler, KillNewest, OomContext, OomEvent
from useroom.exceptions import (
    CgroupPermissionError,
    GroupBusy,
    GroupGone,
    KernelFormatError,
    PressureTriggerRefused,
    RootGroupError,
    UnsupportedKernel,
)

SpawnHog = Callable[..., Hog]
NOBODY = 65534
#: Long enough for the emulated guest (Python there is 5-10x slower).
EVENT_TIMEOUT = 60.0

V2_EVENTS = "low 0\nhigh 17\nmax 3\noom 2\noom_kill 1\noom_group_kill 0\nsock_throttled 0\n"


class TestMemoryEventsValue:
    def test_from_text(self) -> None:
        """memory.events parses into its counters."""
        assert MemoryEvents(high=17, max=3, oom=2, oom_kill=1) == MemoryEvents.from_text(V2_EVENTS)

    def test_unknown_and_missing_keys(self) -> None:
        """Keys a newer kernel adds are ignored; keys an older one lacks are 0."""
        assert MemoryEvents(high=2) == MemoryEvents.from_text("high 2\nfuture_counter 9\n")

    def test_since(self) -> None:
        """since() gives the counts between two snapshots."""
        before = MemoryEvents(high=3, oom_kill=1)
        after = MemoryEvents(high=10, max=1, oom_kill=1)
        assert MemoryEvents(high=7, max=1) == after.since(before)

    @pytest.mark.parametrize("text", ["high x\n", "high\n", "high 1 2\n"])
    def test_malformed(self, text: str) -> None:
        """A line that is not 'key number' raises KernelFormatError."""
        with pytest.raises(KernelFormatError):
            MemoryEvents.from_text(text)


def _fake_group(tmp_path: pathlib.Path, files: dict[str, str]) -> V2Group:
    """A V2Group on a plain directory: for the parsing and decisions only."""
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    mount = Mount(1, 0, "0:1", "/", str(tmp_path.parent), ("rw",), (), "cgroup2", "cgroup2", ("rw",))
    return V2Group(str(tmp_path), "/" + tmp_path.name, MemoryHierarchy(2, (mount,)))


class TestFakeTree:
    """Values and decisions of the backend on a directory of plain files (the kernel tests are below)."""

    def test_limits_read(self, tmp_path: pathlib.Path) -> None:
        """'max' reads as UNLIMITED, a number as itself."""
        group = _fake_group(tmp_path, {"memory.max": "max\n", "memory.high": "16777216\n"})
        assert (UNLIMITED, 16 * MIB) == (group.limit(), group.high())

    def test_limits_written(self, tmp_path: pathlib.Path) -> None:
        """set_limit and set_high write bytes, or 'max' for UNLIMITED."""
        group = _fake_group(tmp_path, {"memory.max": "", "memory.high": ""})
        group.set_limit("64M")
        group.set_high("max")
        assert ("67108864", "max") == ((tmp_path / "memory.max").read_text(), (tmp_path / "memory.high").read_text())

    def test_malformed_limit(self, tmp_path: pathlib.Path) -> None:
        """A limit that is neither 'max' nor a number raises KernelFormatError."""
        with pytest.raises(KernelFormatError):
            _fake_group(tmp_path, {"memory.max": "lots\n"}).limit()

    def test_missing_file_is_unsupported(self, tmp_path: pathlib.Path) -> None:
        """A file the kernel lacks (memory.peak before 5.19) raises UnsupportedKernel naming the version."""
        with pytest.raises(UnsupportedKernel, match="5.19"):
            _fake_group(tmp_path, {}).peak()

    def test_oom_control_meaning(self, tmp_path: pathlib.Path) -> None:
        """On v2 the kernel killer is never disabled, nobody waits in an OOM; kills come from memory.events."""
        control = _fake_group(tmp_path, {"memory.events": V2_EVENTS}).oom_control()
        assert (False, False, 1) == (control.kill_disabled, control.under_oom, control.oom_kill)

    def test_oom_kill_cannot_be_disabled(self, tmp_path: pathlib.Path) -> None:
        """set_oom_kill(False) raises UnsupportedKernel pointing at memory.high; True is a no-op."""
        group = _fake_group(tmp_path, {})
        group.set_oom_kill(True)
        with pytest.raises(UnsupportedKernel, match="memory.high"):
            group.set_oom_kill(False)

    def test_no_thread_moves(self, tmp_path: pathlib.Path) -> None:
        """v2's memory controller moves whole processes: attach_thread raises UnsupportedKernel."""
        group = _fake_group(tmp_path, {})
        assert False is group.moves_threads
        with pytest.raises(UnsupportedKernel, match="whole processes"):
            group.attach_thread(1)

    def test_no_usage_thresholds(self, tmp_path: pathlib.Path) -> None:
        """v2 has no usage thresholds: UnsupportedKernel names the alternatives."""
        with pytest.raises(UnsupportedKernel, match="PSI"):
            _fake_group(tmp_path, {}).usage_threshold("1M")

    def test_subtree_busy_names_rule(self, tmp_path: pathlib.Path) -> None:
        """EBUSY from cgroup.subtree_control becomes GroupBusy naming the no-internal-process rule."""
        error = _fake_group(tmp_path, {})._subtree_error(OSError(errno.EBUSY, "busy"))
        assert isinstance(error, GroupBusy)
        assert "no internal processes" in str(error)

    def test_subtree_unavailable(self, tmp_path: pathlib.Path) -> None:
        """ENOENT from cgroup.subtree_control (memory not available here) is UnsupportedKernel."""
        error = _fake_group(tmp_path, {})._subtree_error(OSError(errno.ENOENT, "missing"))
        assert isinstance(error, UnsupportedKernel)

    def test_psi_reasons(self) -> None:
        """A refused trigger's reason names the 2 s rule only when the window breaks it."""
        assert "multiple of 2 s" in _psi_reason(errno.EINVAL, 1_000_000, "/x/memory.pressure")
        assert "multiple of 2 s" not in _psi_reason(errno.EINVAL, 2_000_000, "/x/memory.pressure")
        assert "PSI" in _psi_reason(errno.ENOENT, 2_000_000, "/x/memory.pressure")

    @pytest.mark.parametrize(("stall", "window"), [(0, 2), (3, 2), (-1, 2)])
    def test_trigger_arguments(self, tmp_path: pathlib.Path, stall: float, window: float) -> None:
        """A trigger needs 0 < stall <= window."""
        with pytest.raises(ValueError):
            PressureTrigger.open(str(tmp_path / "memory.pressure"), stall, window)


def _unified_pressure_file() -> str:
    """memory.pressure of this process's group in the cgroup2 hierarchy (with or without memory)."""
    line = next(m for m in read_memberships() if m.version == 2)
    mount = next(m for m in read_mounts() if m.fstype == "cgroup2" and m.fs_path(line.path) is not None)
    path = mount.fs_path(line.path)
    assert path is not None
    return os.path.join(path, "memory.pressure")


def _has_cap_sys_resource() -> bool:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("CapEff:"))
    return bool(int(line.split()[1], 16) & (1 << 24))


@pytest.mark.backends
class TestPressureTriggerRules:
    """The 2 s rule on the real kernel, here and in the guest (host: v1 memory, cgroup2 with PSI)."""

    def test_window_rule(self) -> None:
        """A 1 s window is accepted with CAP_SYS_RESOURCE and refused, naming the 2 s rule, without it;
        round_up then gets a 2 s trigger."""
        path = _unified_pressure_file()
        if _has_cap_sys_resource():
            with PressureTrigger.open(path, 0.1, 1.0) as trigger:
                assert 1_000_000 == trigger.window_us
        else:
            with pytest.raises(PressureTriggerRefused) as info:
                PressureTrigger.open(path, 0.1, 1.0)
            assert (errno.EINVAL, True) == (info.value.errno, "multiple of 2 s" in str(info.value))
            with PressureTrigger.open(path, 0.1, 1.0, round_up=True) as trigger:
                assert UNPRIVILEGED_PSI_WINDOW_US == trigger.window_us

    def test_two_second_window(self) -> None:
        """A window that is a multiple of 2 s is accepted, privileged or not; it does not fire idle."""
        with PressureTrigger.open(_unified_pressure_file(), 1.5, 2.0) as trigger:
            assert (2_000_000, False) == (trigger.window_us, trigger.wait(0))


# ---------------------------------------------------------------------------
# On the real v2 kernel (the guest).


@pytest.fixture
def v2group(scratch_group: Group) -> V2Group:
    assert isinstance(scratch_group, V2Group)
    return scratch_group


def _hog_in(spawn_hog: SpawnHog, group: Group, mib: int, hold: bool = True) -> Hog:
    return spawn_hog(mib, group, hold)  # type: ignore[no-any-return]


@pytest.mark.cgroup2
class TestV2Discovery:
    def test_current(self, own_group: Group) -> None:
        """current() is a V2Group where the memory controller is on cgroup2."""
        assert (2, V2Group) == (own_group.version, type(own_group))
        assert V2Group is backend_class(2)

    def test_scratch_has_memory_files(self, v2group: V2Group) -> None:
        """A child of a group that enabled +memory has the v2 memory files the backend names."""
        for name in (v2group.limit_file, v2group.high_file, v2group.usage_file, v2group.events_file,
                     v2group.events_local_file, v2group.freeze_file, v2group.kill_file, v2group.pressure_file):
            assert os.path.isfile(os.path.join(v2group.path, name)), name
        assert "memory" in v2group.controllers()


@pytest.mark.cgroup2
class TestV2Limits:
    def test_defaults(self, v2group: V2Group) -> None:
        """A new group has no memory.max and no memory.high, and is not OOM-grouped."""
        assert (UNLIMITED, UNLIMITED, False) == (v2group.limit(), v2group.high(), v2group.oom_group())

    def test_set_and_read(self, v2group: V2Group) -> None:
        """memory.max and memory.high are set and read back, rounded down to a page."""
        page = os.sysconf("SC_PAGE_SIZE")
        v2group.set_limit(64 * MIB + 1)
        v2group.set_high("32M")
        assert (64 * MIB // page * page, 32 * MIB) == (v2group.limit(), v2group.high())
        v2group.set_limit("max")
        assert UNLIMITED == v2group.limit()

    def test_root_refused(self) -> None:
        """The root group has no memory.max: RootGroupError."""
        with pytest.raises(RootGroupError):
            Group.open("/").limit()

    def test_usage_peak_stats(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """A hog's pages show in memory.current, memory.peak and memory.stat's anon."""
        hog = _hog_in(spawn_hog, v2group, 24)
        hog.start()
        assert hog.wait_touched(EVENT_TIMEOUT)
        usage, peak, stats = v2group.usage(), v2group.peak(), v2group.stats()
        assert usage >= 24 * MIB and peak >= usage and stats.rss >= 24 * MIB
        hog.kill()
        hog.wait(EVENT_TIMEOUT)
        assert v2group.usage() < 24 * MIB <= v2group.peak()

    def test_oom_group_setting(self, v2group: V2Group) -> None:
        """memory.oom.group is set and read back."""
        v2group.set_oom_group(True)
        assert v2group.oom_group()

    def test_reclaim_nothing(self, v2group: V2Group) -> None:
        """memory.reclaim of an empty group reclaims less than asked: False."""
        assert not v2group.reclaim("1M")


@pytest.mark.cgroup2
class TestV2KernelKiller:
    def test_max_kills_and_counts(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """At memory.max the kernel OOM-kills the hog, and memory.events counts max, oom and oom_kill;
        the events notifier wakes on the change."""
        v2group.set_limit("32M")
        with v2group.events_notifier() as notifier:
            hog = _hog_in(spawn_hog, v2group, 64, hold=False)
            hog.start()
            assert -9 == hog.wait(EVENT_TIMEOUT)
            assert notifier.wait(EVENT_TIMEOUT)
            events = MemoryEvents.from_text(notifier.read(0))
        assert events.max > 0 and events.oom >= 1 and events.oom_kill == 1
        assert 1 == v2group.oom_control().oom_kill
        assert events.oom_kill == v2group.events(local=True).oom_kill

    def test_local_events_of_parent(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """A child's OOM kill counts in the parent's memory.events, not in its memory.events.local."""
        child = v2group.create_child("c", memory_max="32M")
        assert isinstance(child, V2Group)
        hog = _hog_in(spawn_hog, child, 64, hold=False)
        hog.start()
        assert -9 == hog.wait(EVENT_TIMEOUT)
        assert (1, 0) == (v2group.events().oom_kill, v2group.events(local=True).oom_kill)

    def test_oom_group_kills_all(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """With memory.oom.group, the kernel kills every task of the group, the bystander too."""
        v2group.set_limit("48M")
        v2group.set_oom_group(True)
        bystander = _hog_in(spawn_hog, v2group, 4)
        bystander.start()
        assert bystander.wait_touched(EVENT_TIMEOUT)
        hog = _hog_in(spawn_hog, v2group, 96, hold=False)
        hog.start()
        assert (-9, -9) == (hog.wait(EVENT_TIMEOUT), bystander.wait(EVENT_TIMEOUT))
        assert v2group.events().oom_group_kill >= 1

    def test_limit_below_usage_kills(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """A memory.max below what cannot be reclaimed (anon, no swap) OOM-kills instead of failing."""
        hog = _hog_in(spawn_hog, v2group, 24)
        hog.start()
        assert hog.wait_touched(EVENT_TIMEOUT)
        v2group.set_limit("8M")
        assert -9 == hog.wait(EVENT_TIMEOUT)


@pytest.mark.cgroup2
class TestV2HighWall:
    def test_throttled_not_killed(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """At memory.high the hog is throttled, never killed: memory.events counts high, the notifier
        wakes, the hog is still alive with usage held near the wall; cgroup.kill ends it."""
        v2group.set_high("16M")
        with v2group.events_notifier() as notifier:
            hog = _hog_in(spawn_hog, v2group, 64)
            hog.start()
            assert notifier.wait(EVENT_TIMEOUT)
            events = MemoryEvents.from_text(notifier.read(0))
        assert events.high > 0 and events.oom_kill == 0
        assert hog.returncode is None
        assert not hog.wait_touched(1.0)  # still held at the wall
        assert v2group.usage() < 64 * MIB
        v2group.kill()
        assert -9 == hog.wait(EVENT_TIMEOUT)

    def test_lifting_the_wall_lets_it_run(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """Lifting memory.high lets a throttled hog finish."""
        v2group.set_high("16M")
        with v2group.events_notifier() as notifier:
            hog = _hog_in(spawn_hog, v2group, 48)
            hog.start()
            assert notifier.wait(EVENT_TIMEOUT)
        v2group.set_high("max")
        assert hog.wait_touched(EVENT_TIMEOUT)
        assert v2group.events().oom_kill == 0

    def test_pressure_trigger_wakes(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """A PSI trigger on the group's memory.pressure wakes while the hog stalls at the wall."""
        v2group.set_high("16M")
        with v2group.pressure_notifier(0.05, 2.0) as trigger:
            assert isinstance(trigger, PressureTrigger)
            assert not trigger.wait(0)
            hog = _hog_in(spawn_hog, v2group, 64)
            hog.start()
            assert trigger.wait(EVENT_TIMEOUT)
        v2group.kill()
        assert -9 == hog.wait(EVENT_TIMEOUT)

    def test_trigger_reports_removal(self, v2group: V2Group) -> None:
        """Removing the group makes its trigger report POLLERR: GroupGone."""
        child = v2group.create_child("gone")
        assert isinstance(child, V2Group)
        with child.pressure_trigger(0.1, 2.0) as trigger:
            child.remove()
            with pytest.raises(GroupGone):
                trigger.wait(EVENT_TIMEOUT)

    def test_refused_trigger_falls_back(self, v2group: V2Group, monkeypatch: pytest.MonkeyPatch) -> None:
        """When the kernel refuses every trigger, pressure_notifier returns a memory.events notifier."""

        def refuse(*args: object, **kwargs: object) -> PressureTrigger:
            raise PressureTriggerRefused(errno.EPERM, "refused", "memory.pressure", reason="test")

        monkeypatch.setattr(PressureTrigger, "open", refuse)
        with v2group.pressure_notifier(0.1, 2.0) as notifier:
            assert isinstance(notifier, FileNotifier)
            assert notifier.path.endswith("memory.events")


@pytest.mark.cgroup2
class TestV2FreezeKill:
    def test_freeze_and_thaw(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """A frozen hog does not run (it cannot answer 'go'); thawed, it does."""
        hog = _hog_in(spawn_hog, v2group, 1)
        v2group.freeze()
        assert v2group.frozen()
        hog.start()
        assert not hog.wait_touched(1.0)
        v2group.thaw()
        assert not v2group.frozen()
        assert hog.wait_touched(EVENT_TIMEOUT)

    def test_frozen_tasks_die_on_kill(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """cgroup.kill kills frozen tasks, and every task at once; the group is then unpopulated."""
        hogs = [_hog_in(spawn_hog, v2group, 1) for _ in range(2)]
        v2group.freeze()
        assert v2group.populated()
        v2group.kill()
        assert [-9, -9] == [hog.wait(EVENT_TIMEOUT) for hog in hogs]
        assert wait_until(lambda: not v2group.populated(), EVENT_TIMEOUT)

    def test_remove_force(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """remove(force=True) lifts the wall, kills and removes a subtree with throttled tasks."""
        child = v2group.create_child("wall")
        assert isinstance(child, V2Group)
        child.set_high("8M")
        hog = _hog_in(spawn_hog, child, 32)
        hog.start()
        assert wait_until(lambda: child.events().high > 0, EVENT_TIMEOUT)
        child.remove(force=True)
        assert (False, -9) == (os.path.exists(child.path), hog.wait(EVENT_TIMEOUT))


@pytest.mark.cgroup2
class TestV2Rules:
    def test_create_enables_memory(self, v2group: V2Group) -> None:
        """create_child enables +memory for the children first, so the child has memory files."""
        child = v2group.create_child("a", memory_max="64M")
        assert "memory" in v2group.subtree_control()
        assert 64 * MIB == child.limit()

    def test_no_internal_processes(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """A group with a process cannot enable memory for children (GroupBusy naming the rule), and a
        group that enabled it refuses processes."""
        hog = _hog_in(spawn_hog, v2group, 0)
        with pytest.raises(GroupBusy, match="no internal processes"):
            v2group.create_child("a")
        hog.kill()
        hog.wait(EVENT_TIMEOUT)
        assert wait_until(lambda: not v2group.populated(), EVENT_TIMEOUT)
        child = v2group.create_child("a")
        inner = _hog_in(spawn_hog, child, 0)  # a leaf takes processes
        with pytest.raises(GroupBusy, match="no internal processes"):
            v2group.attach(inner.pid)
        assert [inner.pid] == child.procs()

    def test_attach_needs_common_ancestor(self, v2group: V2Group) -> None:
        """An unprivileged user may write the destination's cgroup.procs and still be refused: the
        common ancestor's cgroup.procs is not theirs (CgroupPermissionError naming the rule)."""
        dst = v2group.create_child("dst")
        os.chown(os.path.join(dst.path, "cgroup.procs"), NOBODY, NOBODY)
        with pytest.raises(CgroupPermissionError) as info:
            run_as(NOBODY, lambda: dst.attach(os.getpid()))
        assert "common ancestor" in info.value.rule and info.value.advice
        assert [] == dst.procs()

    def test_delegated_subtree(self, v2group: V2Group) -> None:
        """With a subtree delegated (directory, cgroup.procs, cgroup.subtree_control chowned) and the
        user's process inside it, the user creates a child with memory, limits it, moves itself in and
        out, and removes it."""
        home = v2group.create_child("home")  # the leaf the user's process starts in
        for path in (v2group.path, home.path):
            for name in (".", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control"):
                os.chown(os.path.join(path, name), NOBODY, NOBODY)

        def enter_home() -> None:  # as root, before the uid changes
            with open(os.path.join(home.path, "cgroup.procs"), "w") as procs:
                procs.write(str(os.getpid()))

        def as_user() -> tuple[int, list[int], str]:
            child = Group.open(v2group.path).create_child("mine", memory_max="64M")
            child.attach(os.getpid())
            procs = child.procs()
            Group.open(home.path).attach(os.getpid())  # leave, so the child can be removed
            limit = child.limit()
            child.remove()
            return limit, procs, Group.current().relpath

        limit, procs, where = run_as(NOBODY, as_user, setup=enter_home)
        assert (64 * MIB, 1, home.relpath) == (limit, len(procs), where)
        assert ["home"] == [group.name for group in v2group.children()]


@pytest.mark.cgroup2
class TestV2NativeWake:
    """The native watcher's v2 wake sources: memory.events changes and PSI triggers (EPOLLPRI)."""

    def test_events_file_forwards(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """A FILE source on memory.events records an event when the hog hits the wall, once per
        change (the watcher re-reads the file, so it does not spin), and keeps waiting."""
        v2group.set_high("16M")
        with v2group.events_notifier() as notifier, SoloWatcher() as watcher:
            source = watcher.add_source(notifier.fileno(), SourceKind.FORWARD, Wake.FILE)
            watcher.start()
            assert [] == watcher.wait(0.5)
            hog = _hog_in(spawn_hog, v2group, 64)
            hog.start()
            records = watcher.wait(EVENT_TIMEOUT)
            assert records and {(source, Outcome.FORWARDED)} == {(r.source, r.outcome) for r in records}
            v2group.kill()
            assert -9 == hog.wait(EVENT_TIMEOUT)
            watcher.wait(0.5)
            loops = watcher.heartbeat
            assert [] == watcher.wait(1.0)  # nothing changes: no record, no spin
            assert watcher.heartbeat - loops <= 1
            assert watcher.running

    def test_trigger_forwards(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """A TRIGGER source (a PSI trigger on memory.pressure) records an event when the hog stalls."""
        v2group.set_high("16M")
        with v2group.pressure_trigger(0.05, 2.0) as trigger, SoloWatcher() as watcher:
            source = watcher.add_source(trigger.fileno(), SourceKind.FORWARD, Wake.TRIGGER)
            watcher.start()
            hog = _hog_in(spawn_hog, v2group, 64)
            hog.start()
            records = watcher.wait(EVENT_TIMEOUT)
            assert records and (source, Outcome.FORWARDED) == (records[0].source, records[0].outcome)
        v2group.kill()
        assert -9 == hog.wait(EVENT_TIMEOUT)

    def test_removed_group_trigger_is_gone(self, v2group: V2Group) -> None:
        """When a PSI trigger's group is removed (POLLERR), the watcher records GONE once and stops
        waiting on it."""
        child = v2group.create_child("watched")
        assert isinstance(child, V2Group)
        with child.pressure_trigger(0.1, 2.0) as trigger, SoloWatcher() as watcher:
            source = watcher.add_source(trigger.fileno(), SourceKind.OOM, Wake.TRIGGER)
            watcher.start()
            child.remove()
            records = watcher.wait(EVENT_TIMEOUT)
            records += watcher.wait(0.5)
            assert [(source, Outcome.GONE)] == [(r.source, r.outcome) for r in records]
            assert watcher.running

    def test_removed_group_file_is_silent(self, v2group: V2Group) -> None:
        """Removing a group does not signal its memory.events (no kernfs change): the FILE source
        stays quiet, and the watcher does not spin on it."""
        child = v2group.create_child("watched")
        assert isinstance(child, V2Group)
        with child.events_notifier() as notifier, SoloWatcher() as watcher:
            watcher.add_source(notifier.fileno(), SourceKind.OOM, Wake.FILE)
            watcher.start()
            loops = watcher.heartbeat
            child.remove()
            assert [] == watcher.wait(1.0)
            assert watcher.heartbeat - loops <= 1

    def test_plan_acts_on_the_high_event(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """An OOM plan on the memory.events source kills the victim when the hog hits the wall, and
        its check (memory.current below the wall) sees the episode resolved; the kernel killed nobody."""
        wall = 16 * MIB
        v2group.set_limit("64M")
        v2group.set_high(wall)
        hog = _hog_in(spawn_hog, v2group, 48)
        pidfd = os.pidfd_open(hog.pid)
        check_fd = v2group.open_file(v2group.usage_file, os.O_RDONLY)
        try:
            os.pread(check_fd, 64, 0)  # allocates the seq_file buffer ahead
            with v2group.events_notifier() as notifier, SoloWatcher() as watcher:
                watcher.add_source(notifier.fileno(), SourceKind.OOM, Wake.FILE)
                watcher.arm(Plan((Action.signal_pidfd(pidfd, signal.SIGKILL), Action.mrelease(pidfd),
                                  Action.check(EVENT_TIMEOUT)), check_fd=check_fd, resolved_below=wall))
                watcher.start()
                hog.start()
                records = watcher.wait(EVENT_TIMEOUT)
                assert records
                first = records[0]
                assert Outcome.RESOLVED == first.outcome, first
                assert first.notified_ns < first.acted_ns < first.resolved_ns
                assert -9 == hog.wait(EVENT_TIMEOUT)
        finally:
            os.close(pidfd)
            os.close(check_fd)
        assert (0, True) == (v2group.events().oom_kill, v2group.usage() < wall)


_IN_GROUP_HANDLER = """\
import json, os, sys, time
import useroom
group = useroom.Group.open(sys.argv[1])
group.attach(os.getpid())
with useroom.Handler(group, reserve="16M", delay=5.0) as handler:
    print("ready", flush=True)
    deadline = time.monotonic() + float(sys.argv[2])
    # memory.events also changes for what needs nothing (not_needed): wait for an acted one.
    while not any(e.outcome != "not_needed" for e in handler.events) and time.monotonic() < deadline:
        handler.wait_for_events(len(handler.events) + 1, deadline - time.monotonic())
    events = [e for e in handler.events if e.outcome != "not_needed"]
    print(json.dumps([[e.outcome, [v.pid for v in e.victims]] for e in events]), flush=True)
"""


def run_in_group_handler(group: V2Group, spawn_hog: SpawnHog) -> tuple[Hog, list[list[Any]]]:
    """Run _IN_GROUP_HANDLER in *group* (memory.max 128M), start a 200 MiB hog there once a
    refresh has put it in the plan, and return the hog (dead by SIGKILL) and the handler's
    acted episodes as ``[outcome, [victim pids]]``. The handler process never outlives this."""
    import json
    import subprocess
    import sys

    group.set_limit("128M")
    handler = subprocess.Popen([sys.executable, "-c", _IN_GROUP_HANDLER, group.path, str(EVENT_TIMEOUT)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert handler.stdout is not None
        assert "ready" == handler.stdout.readline().strip()
        assert handler.pid in group.procs()
        hog = _hog_in(spawn_hog, group, 200)
        time.sleep(0.7)  # a refresh puts it in the plan
        hog.start()
        assert -9 == hog.wait(EVENT_TIMEOUT)
        events = json.loads(handler.stdout.readline())
        assert 0 == handler.wait(EVENT_TIMEOUT)
    finally:
        handler.kill()
        handler.wait()
        if handler.stdout is not None:
            handler.stdout.close()
    return hog, events


def _acted(handler: Handler, timeout: float = EVENT_TIMEOUT) -> list[OomEvent]:
    """The episodes that needed action, once one has ended resolved (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        acted = [e for e in handler.events if e.outcome != "not_needed"]
        left = deadline - time.monotonic()
        if any(e.outcome == "resolved" for e in acted) or left <= 0:
            return acted
        handler.wait_for_events(len(handler.events) + 1, left)


@pytest.mark.cgroup2
class TestV2Handler:
    """useroom.Handler on v2: memory.high is the wall, memory.max the kernel's backstop."""

    def test_wall_below_the_users_max(self, v2group: V2Group) -> None:
        """With only memory.max set, the wall is memory.max minus the gap and the hard limit stays;
        with memory.high set below memory.max, that is the wall; stop restores both files."""
        v2group.set_limit("64M")
        with Handler(v2group, reserve="8M", thresholds=(), refresh_interval=0.5) as handler:
            assert (48 * MIB, 64 * MIB) == (v2group.high(), v2group.limit())
            assert handler.watchdog is not None  # for a death: the plan's kernel step is v2's delay shim
        assert (UNLIMITED, 64 * MIB) == (v2group.high(), v2group.limit())
        v2group.set_high("32M")
        with Handler(v2group, reserve="8M", thresholds=(), refresh_interval=0.5):
            assert (32 * MIB, 64 * MIB) == (v2group.high(), v2group.limit())
        assert (32 * MIB, 64 * MIB) == (v2group.high(), v2group.limit())

    def test_needs_a_limit(self, v2group: V2Group) -> None:
        """No memory.max and no memory.high: nothing to hold the wall at, a clear error."""
        with pytest.raises(ValueError, match="neither memory.max nor memory.high"):
            Handler(v2group).start()
        assert (UNLIMITED, UNLIMITED) == (v2group.high(), v2group.limit())

    def test_kills_the_largest_at_the_wall(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """The largest task is killed by the native plan when the grower reaches the wall; the
        others live; the kernel killed nobody."""
        v2group.set_limit("96M")  # wall 80M
        big, small = _hog_in(spawn_hog, v2group, 40), _hog_in(spawn_hog, v2group, 10)
        for hog in (big, small):
            hog.start()
            assert hog.wait_touched(EVENT_TIMEOUT)
        with Handler(v2group, thresholds=(), refresh_interval=0.5) as handler:
            grower = _hog_in(spawn_hog, v2group, 40)
            assert wait_until(lambda: {big.pid, small.pid, grower.pid} <= {v.pid for v in handler.victims},
                              EVENT_TIMEOUT)
            grower.start()
            assert -signal.SIGKILL == big.wait(EVENT_TIMEOUT)
            assert grower.wait_touched(EVENT_TIMEOUT)
            events = _acted(handler)
        assert "resolved" == events[-1].outcome
        assert [big.pid] == [v.pid for e in events for v in e.victims if v.result == 0]
        assert None is small.returncode
        assert 0 == v2group.events().oom_kill

    def test_the_wall_opens_for_the_kills_and_comes_back(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """The kill phase opens the wall (memory.high=max) before its first
        kill and writes it back after its last: the episode's steps say so,
        the wall is back once it ends, and the grower, never throttled for
        the victim's overage, completes."""
        v2group.set_limit("96M")  # wall 80M
        big = _hog_in(spawn_hog, v2group, 50)
        big.start()
        assert big.wait_touched(EVENT_TIMEOUT)
        with Handler(v2group, thresholds=(), refresh_interval=0.5) as handler:
            grower = _hog_in(spawn_hog, v2group, 40)  # at the wall it has 30 MiB: big is the largest
            assert wait_until(lambda: {big.pid, grower.pid} <= {v.pid for v in handler.victims}, EVENT_TIMEOUT)
            grower.start()
            assert -signal.SIGKILL == big.wait(EVENT_TIMEOUT)
            assert grower.wait_touched(EVENT_TIMEOUT)
            events = _acted(handler)
            assert wait_until(lambda: 80 * MIB == v2group.high(), EVENT_TIMEOUT)
        killing = next(e for e in events if e.victims)
        writes = [s for s in killing.steps if s.kind == "WRITE" and s.phase == "kill"]
        kills = [i for i, s in enumerate(killing.steps) if s.kind == "SIGNAL_BEST"]
        assert 2 == len(writes) and all(0 <= s.result for s in writes)
        assert killing.steps.index(writes[0]) < kills[0] < killing.steps.index(writes[1])
        assert 0 == v2group.events().oom_kill

    def test_grant_finds_a_task_not_in_the_table(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """A task started after the last refresh: the plan's grant wakes the manager, which
        refreshes and kills it; the wall is back afterwards."""
        v2group.set_limit("64M")  # wall 48M with the 16M reserve as the gap
        # KillNewest plans only its table's tasks (KillLargest's pick finds a newcomer itself).
        with Handler(v2group, KillNewest(), reserve="16M", thresholds=(), refresh_interval=3600) as handler:
            newcomer = _hog_in(spawn_hog, v2group, 120)
            assert newcomer.pid not in {v.pid for v in handler.victims}
            newcomer.start()
            assert -signal.SIGKILL == newcomer.wait(EVENT_TIMEOUT)
            events = _acted(handler)
            assert 48 * MIB == v2group.high()
        assert "resolved" == events[-1].outcome
        assert [(newcomer.pid, "handler")] == [(v.pid, v.by) for e in events for v in e.victims]
        assert 0 == v2group.events().oom_kill

    def test_on_oom_hook_resolves_without_a_kill(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """An on_oom hook runs during the hooks' grant and frees the memory (here: it ends the
        hog itself); the plan kills nobody."""
        v2group.set_limit("64M")
        hog = _hog_in(spawn_hog, v2group, 120)
        # Registered before start: the first plan already has the hooks' phase.
        handler = Handler(v2group, reserve="16M", thresholds=(), refresh_interval=0.5, protect=(hog.pid,))

        @handler.on_oom
        def free(ctx: OomContext) -> bool:
            os.kill(hog.pid, signal.SIGKILL)
            hog.wait(EVENT_TIMEOUT)  # reaped: its memory is back
            return True

        with handler:
            hog.start()
            assert -signal.SIGKILL == hog.wait(EVENT_TIMEOUT)
            events = _acted(handler)
        assert "resolved" == events[-1].outcome
        assert [] == [v for e in events for v in e.victims]
        assert [True] == [h.freed for e in events for h in e.hooks][:1]
        assert 0 == v2group.events().oom_kill

    def test_freeze_and_decide_freezes_the_group(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """With the handler outside the group, FreezeAndDecide freezes the whole group through
        cgroup.freeze while the callback decides; the chosen task dies, the rest are thawed."""
        v2group.set_limit("96M")  # wall 80M
        big, small = _hog_in(spawn_hog, v2group, 24), _hog_in(spawn_hog, v2group, 20)
        for hog in (big, small):
            hog.start()
            assert hog.wait_touched(EVENT_TIMEOUT)
        freeze = os.path.join(v2group.path, "cgroup.freeze")
        seen: list[tuple[list[int], str]] = []

        def decide(ctx: FrozenContext) -> list[int]:
            with open(freeze) as f:
                seen.append((sorted(v.pid for v in ctx.victims), f.read().strip()))
            return [small.pid]

        with Handler(v2group, FreezeAndDecide(decide), reserve="16M", thresholds=(), refresh_interval=0.5) as handler:
            grower = _hog_in(spawn_hog, v2group, 50)
            assert wait_until(lambda: grower.pid in {v.pid for v in handler.victims}, EVENT_TIMEOUT)
            grower.start()
            assert -signal.SIGKILL == small.wait(EVENT_TIMEOUT)
            assert grower.wait_touched(EVENT_TIMEOUT)
            events = _acted(handler)
        assert (sorted([big.pid, small.pid, grower.pid]), "1") == seen[0]  # decided while frozen
        assert not v2group.frozen() and None is big.returncode
        frozen = [s for e in events for s in e.steps if s.phase == "freeze" and s.kind == "WRITE"]
        assert any("cgroup.freeze" in s.explanation for s in frozen)
        assert any(s.explanation == "thaw the group" and s.ok for s in frozen)
        assert [(small.pid, "handler")] == [(v.pid, v.by) for e in events for v in e.victims if v.result == 0]

    def test_watchdog_restores_the_group_after_the_handler_dies(self, v2group: V2Group,
                                                                tmp_path: pathlib.Path) -> None:
        """The handler's process dies by SIGKILL: its watchdog puts back memory.high and
        memory.max as they were before the handler, logs it, and exits."""
        import subprocess
        import sys

        v2group.set_limit("64M")
        log = tmp_path / "watchdog.jsonl"
        code = ("import sys, time, useroom\n"
                "h = useroom.Handler(useroom.Group.open(sys.argv[1]), watchdog_log=sys.argv[2]).start()\n"
                "print('ready', h.watchdog.pid, flush=True)\n"
                "time.sleep(600)\n")
        proc = subprocess.Popen([sys.executable, "-c", code, v2group.path, str(log)], stdout=subprocess.PIPE,
                                text=True)
        watchdog = 0
        try:
            assert proc.stdout is not None
            word, pid = proc.stdout.readline().split()
            watchdog = int(pid)
            assert (48 * MIB, 64 * MIB) == (v2group.high(), v2group.limit())
            proc.kill()
            proc.wait(EVENT_TIMEOUT)
            assert wait_until(lambda: v2group.high() == UNLIMITED, EVENT_TIMEOUT)
            assert 64 * MIB == v2group.limit()
            assert wait_until(lambda: not os.path.exists(f"/proc/{watchdog}"), EVENT_TIMEOUT)
        finally:
            proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
            if watchdog and os.path.exists(f"/proc/{watchdog}"):
                os.kill(watchdog, signal.SIGKILL)
        import json
        records = [json.loads(line) for line in log.read_text().splitlines()]
        [exited] = [r for r in records if r.get("event") == "handler-exited"]
        assert {"memory.high": UNLIMITED, "memory.max": 64 * MIB} == exited["restored"]

    def test_pressure_hook_fires_on_v2(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """v2 has no usage thresholds: the manager compares memory.current with the pressure
        hook's size at each step, and calls it once on the way up."""
        v2group.set_limit("96M")
        seen: list[int] = []
        handler = Handler(v2group, thresholds=(), refresh_interval=0.05)
        handler.on_pressure(0.25)(lambda ctx: seen.append(ctx.usage))  # before start: armed from the first step
        with handler:
            hog = _hog_in(spawn_hog, v2group, 40)
            hog.start()
            assert hog.wait_touched(EVENT_TIMEOUT)
            assert wait_until(lambda: bool(seen), EVENT_TIMEOUT)
            time.sleep(0.3)
        assert 1 == len(seen) and seen[0] >= 20 * MIB

    def test_handler_inside_the_group(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """With the handler's own process inside the group, the hog that hits the wall is still
        killed by the native plan (the watcher charges nothing, so it is never throttled)."""
        hog, events = run_in_group_handler(v2group, spawn_hog)
        assert events and events[0][0] in ("resolved", "superseded")
        assert hog.pid in [pid for _, pids in events for pid in pids]
        assert 0 == v2group.events().oom_kill

    def test_delay_shim_lifts_the_wall(self, v2group: V2Group, spawn_hog: SpawnHog) -> None:
        """With no victim the plan may kill (the hog is protected) and no reserve, the kernel step
        lifts the wall: the hog runs into memory.max and the kernel kills it; the wall comes back."""
        v2group.set_limit("48M")  # wall 32M
        hog = _hog_in(spawn_hog, v2group, 96)
        with Handler(v2group, thresholds=(), refresh_interval=0.5, delay=5.0, protect=(hog.pid,)) as handler:
            hog.start()
            assert -9 == hog.wait(EVENT_TIMEOUT)
            events = _acted(handler)
            assert any(s.phase == "kernel" for e in events for s in e.steps)
            assert wait_until(lambda: v2group.high() == 32 * MIB, EVENT_TIMEOUT)
        assert 1 == v2group.events().oom_kill


def run_demo_in(group: V2Group, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m useroom demo`` started in *group* (which it has to itself)."""
    import subprocess
    import sys

    procs = os.path.join(group.path, "cgroup.procs")
    return subprocess.run(["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, sys.executable, "-m", "useroom",
                           "demo", *args], capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.cgroup2
def test_demo_on_v2(v2group: V2Group) -> None:
    """`useroom demo` on v2, started in a group of its own that holds a process: it steps into a
    leaf to give its demo group the memory controller, the handler kills at the wall, and it
    puts everything back (no group left, the controller off again, the process back)."""
    done = run_demo_in(v2group, "--workers", "2", "--size", "100M")
    assert 0 == done.returncode, done.stdout + done.stderr
    assert "memory.high as its wall" in done.stdout and "kernel OOM kills=0" in done.stdout
    assert "SIGKILL" in done.stdout
    assert [] == v2group.children()
    assert "memory" not in v2group.subtree_control()


@pytest.mark.cgroup2
class TestEnterChildV2:
    def test_another_process_in_the_group_is_busy_and_nothing_changes(self, scratch_group: Group,
                                                                       spawn_hog: Callable[..., Hog]) -> None:
        """With another process still in the group, memory cannot be enabled for its children (no
        internal processes): GroupBusy, the caller moves back, and the child is gone."""
        from test_group_backends import enter_child_in

        hog = spawn_hog(0, scratch_group)
        hog.start()
        result = enter_child_in(scratch_group, "64M")
        assert {"error": "GroupBusy", "here": scratch_group.relpath, "children": []} == result
        assert [hog.pid] == scratch_group.procs()
