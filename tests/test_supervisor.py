"""One Supervisor serving many groups on real OOMs: one watcher thread, one
manager thread, one watchdog; groups added and removed while it runs; one
group's episode during another's; a group removed mid-episode; the
watchdog taking one group over while the others carry on."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from helpers import GROUP_PREFIX, Hog, destroy_group, until_resolved, wait_until
from useroom import Group, Handler, KillLargest, KillNewest, Supervisor
from useroom.handler import V2_GAP

pytestmark = pytest.mark.timeout(120)

_names = itertools.count()


@pytest.fixture
def make_groups(own_group: Group) -> Iterator[Callable[..., list[Group]]]:
    """``make_groups(n, limit)``: n new groups with that limit, destroyed
    after the test (tasks killed, kernel killer back, rmdir) whatever happens."""
    made: list[str] = []

    def make(n: int, limit: int = 32 << 20) -> list[Group]:
        out = []
        for _ in range(n):
            path = os.path.join(own_group.path, f"{GROUP_PREFIX}{os.getpid()}-sup{next(_names)}")
            os.mkdir(path)
            made.append(path)
            group = Group.open(path)
            # On v2 the handler's wall is memory.max less the gap.
            group.set_limit(limit + (V2_GAP if group.version == 2 else 0))
            out.append(group)
        return out

    yield make
    for path in made:
        destroy_group(path, below=own_group.path)


@pytest.fixture
def hogs() -> Iterator[Callable[..., Hog]]:
    made: list[Hog] = []

    def spawn(mib: int, group: Group) -> Hog:
        hog = Hog(mib, group=group)
        made.append(hog)
        return hog

    yield spawn
    for hog in made:
        hog.close()


def _threads() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def _sentry_tid() -> int:
    """The thread that hears the watchdog stop (one per watchdog process)."""
    tids = [t.native_id for t in threading.enumerate() if t.name == "useroom-watchdog-stops" and t.is_alive()]
    assert 1 == len(tids), tids
    assert tids[0] is not None
    return tids[0]


def _overrun(hogs, group: Group, mib: int = 64) -> Hog:
    hog = hogs(mib, group)
    hog.start()
    return hog


@pytest.mark.kernel
class TestManyGroups:
    def test_one_watcher_one_manager_one_watchdog_for_all(self, make_groups, hogs) -> None:
        """Six groups cost two threads and one watchdog process; each group's
        OOM is resolved by a kill, recorded in its own handler's events."""
        groups = make_groups(6)
        before = _threads()
        sup = Supervisor(delay="2s")
        handlers = [sup.add(g, policy=KillLargest()) for g in groups]
        with sup:
            added = _threads() - before
            assert {sup.watcher_tid, sup.manager_tid, _sentry_tid()} == added
            assert sup.watchdog is not None and sup.watchdog.pid is not None
            assert all(h.watchdog is sup.watchdog for h in handlers)
            victims = [_overrun(hogs, g) for g in groups]
            for hog in victims:
                assert -signal.SIGKILL == hog.popen.wait(20)
            for handler, hog in zip(handlers, victims):
                events = until_resolved(handler)
                assert "resolved" == events[-1].outcome
                assert hog.pid in {v.pid for e in events for v in e.victims if v.result == 0}
                assert [] == handler.errors
        for group in groups:
            assert False is group.oom_control().kill_disabled  # every setting back
        assert [] == sup.errors

    def test_add_and_remove_while_running(self, make_groups, hogs) -> None:
        """A group added while running is handled; a removed one has its
        settings back and is handled no more (its OOM goes to the kernel)."""
        first, second = make_groups(2)
        with Supervisor(delay="2s") as sup:
            h1 = sup.add(first, policy=KillNewest())
            assert first.oom_control().kill_disabled
            h2 = sup.add(second)
            hog = _overrun(hogs, second)
            assert -signal.SIGKILL == hog.popen.wait(20)
            assert "resolved" == until_resolved(h2)[-1].outcome
            sup.remove(first)
            assert False is first.oom_control().kill_disabled
            assert (h2,) == sup.handlers
            assert False is h1.running
            hog = _overrun(hogs, first)
            assert -signal.SIGKILL == hog.popen.wait(20)  # the kernel's kill now
            assert first.oom_control().oom_kill >= 1
            assert [] == [e for e in h1.events if e.outcome != "not_needed"]
            with pytest.raises(ValueError, match="not served"):
                sup.remove(first)

    def test_adding_a_group_twice_is_refused(self, make_groups) -> None:
        [group] = make_groups(1)
        sup = Supervisor(watchdog=False)
        sup.add(group)
        with pytest.raises(ValueError, match="served already"):
            sup.add(group)
        with pytest.raises(TypeError, match="supervisor's"):
            sup.add(group, delay="1s")

    def test_an_episode_during_another(self, make_groups, hogs) -> None:
        """While group A's on_oom hook is still running, group B runs out:
        B's victim is killed at once (the native watcher does not wait for
        A's episode), and both episodes end resolved. (The hooks pause the
        main thread while they run: the test acts from another thread.)"""
        a, b = make_groups(2)
        release = threading.Event()
        in_hook = threading.Event()
        seen: dict[str, object] = {}
        sup = Supervisor(delay="5s")
        ha = sup.add(a, hook_timeout=3.0, hold_threads=False)

        @ha.on_oom
        def wait_for_b(ctx) -> bool:
            in_hook.set()
            release.wait(2.5)
            seen["hook_ended_ns"] = time.monotonic_ns()
            return False

        hb = sup.add(b)

        def during(hog_b: Hog) -> None:
            try:
                if in_hook.wait(20):
                    hog_b.start()
                    seen["b"] = hog_b.popen.wait(20)
                    seen["b_dead_ns"] = time.monotonic_ns()
            finally:
                release.set()

        with sup:
            hog_b = hogs(64, b)
            actor = threading.Thread(target=during, args=(hog_b,))
            actor.start()
            hog_a = _overrun(hogs, a)
            actor.join(40)
            assert -signal.SIGKILL == seen.get("b")
            assert seen["b_dead_ns"] < seen["hook_ended_ns"], "B waited for A's hook"  # type: ignore[operator]
            eb = until_resolved(hb)[-1]
            assert wait_until(lambda: any(e.hooks for e in ha.events), 10)
            [ea] = [e for e in ha.events if e.hooks][:1]
            assert None is not hog_a
        assert "resolved" == eb.outcome
        assert ea.notified_ns < eb.notified_ns < eb.resolved_ns < ea.hooks[0].started_ns + 2_400_000_000

    def test_a_group_removed_mid_episode(self, make_groups, hogs) -> None:
        """Removing a group whose episode is under way (its hook runs) ends
        it and gives the group back its kernel OOM killer; the other group
        is still served. (The hooks pause the main thread while they run:
        the removal is made from another thread.)"""
        a, b = make_groups(2)
        in_hook = threading.Event()
        release = threading.Event()
        sup = Supervisor(delay="10s")
        ha = sup.add(a, hook_timeout=3.0, hold_threads=False)

        @ha.on_oom
        def stall(ctx) -> bool:
            in_hook.set()
            release.wait(2.5)
            return False

        hb = sup.add(b)

        def remove() -> None:
            try:
                if in_hook.wait(20):
                    sup.remove(a)
            finally:
                release.set()

        with sup:
            remover = threading.Thread(target=remove)
            remover.start()
            hog_a = _overrun(hogs, a)
            remover.join(40)
            assert not remover.is_alive()
            assert (hb,) == sup.handlers
            assert False is a.oom_control().kill_disabled
            assert -signal.SIGKILL == hog_a.popen.wait(20)
            assert any(e.outcome != "not_needed" for e in ha.events)
            hog_b = _overrun(hogs, b)
            assert -signal.SIGKILL == hog_b.popen.wait(20)
            assert "resolved" == until_resolved(hb)[-1].outcome

    def test_the_watchdog_takes_one_group_over_while_the_others_carry_on(self, make_groups, hogs) -> None:
        """A group whose only task the handler may not kill (protected, no
        kernel fallback in the plan) outlasts the delay: the one watchdog
        hands it to the kernel; the other groups' OOMs are meanwhile
        resolved by the handler, each recorded in its own events."""
        stuck, *others = make_groups(3)
        hog = hogs(64, stuck)
        with Supervisor(delay="1s") as sup:
            hs = sup.add(stuck, protect=[hog.pid], kernel_fallback=False)
            ho = [sup.add(g) for g in others]
            hog.start()
            time.sleep(0.2)
            victims = [_overrun(hogs, g) for g in others]
            for v in victims:
                assert -signal.SIGKILL == v.popen.wait(20)
            assert -signal.SIGKILL == hog.popen.wait(20)  # the kernel's, after the delay
            assert wait_until(lambda: any(e.takeover is not None for e in hs.events), 10)
            [takeover] = [e.takeover for e in hs.events if e.takeover is not None]
            assert ("delay", stuck.relpath) == (takeover.reason, takeover.group)
            for h in ho:
                assert "resolved" == until_resolved(h)[-1].outcome
                assert all(e.takeover is None for e in h.events)
            assert sup.watchdog is not None and 0 == sup.watchdog.restarts

    def test_useroom_handle_serves_several_groups(self, make_groups, hogs, tmp_path) -> None:
        """``useroom handle G1 G2`` runs one supervisor for both: each group's
        OOM is resolved by a kill, and the report has each group's events."""
        groups = make_groups(2)
        out = tmp_path / "events.json"
        with subprocess.Popen([sys.executable, "-m", "useroom", "handle", *(g.path for g in groups),
                               "--events-out", str(out)], stdout=subprocess.PIPE, text=True) as proc:
            try:
                assert proc.stdout is not None
                assert "ready\n" == proc.stdout.readline()
                victims = [_overrun(hogs, g) for g in groups]
                for hog in victims:
                    assert -signal.SIGKILL == hog.popen.wait(20)
                proc.send_signal(signal.SIGTERM)
                assert 0 == proc.wait(30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        report = json.loads(out.read_text())
        assert [g.relpath for g in groups] == [entry["group"] for entry in report["groups"]]
        for entry, hog in zip(report["groups"], victims):
            killed = [v["pid"] for e in entry["events"] for v in e["victims"] if v["result"] == 0]
            assert hog.pid in killed
            assert "resolved" in {e["outcome"] for e in entry["events"]}
        assert report["locked_bytes"] > 0

    def test_a_handler_on_its_own_is_a_supervisor_of_one(self, make_groups, hogs) -> None:
        """Handler(group).start() makes a private supervisor; stop() ends it."""
        [group] = make_groups(1)
        with Handler(group) as handler:
            assert handler.supervisor is not None and (handler,) == handler.supervisor.handlers
            hog = _overrun(hogs, group)
            assert -signal.SIGKILL == hog.popen.wait(20)
            assert "resolved" == until_resolved(handler)[-1].outcome
        assert False is handler.running
        assert False is group.oom_control().kill_disabled


@pytest.mark.backends
class TestEitherBackend:
    """What holds on cgroup v1 and v2 alike (the v2 half runs in the guest)."""

    def _settings(self, group: Group) -> tuple[object, ...]:
        if group.version == 2:
            return group.high(), group.limit()  # type: ignore[attr-defined]
        return group.limit(), group.oom_control().kill_disabled

    def test_many_groups_added_and_removed(self, make_groups, hogs) -> None:
        """Three groups under one supervisor, one added while it runs: each
        OOM is resolved by a kill recorded in its own group's events; a
        removed group has its settings back; two threads for all."""
        groups = make_groups(3)
        before = {g.path: self._settings(g) for g in groups}
        threads = _threads()
        sup = Supervisor(delay="2s")
        handlers = [sup.add(g) for g in groups[:2]]
        with sup:
            handlers.append(sup.add(groups[2]))
            assert {sup.watcher_tid, sup.manager_tid, _sentry_tid()} == _threads() - threads
            victims = [_overrun(hogs, g) for g in groups]
            for hog in victims:
                assert -signal.SIGKILL == hog.popen.wait(60)
            for handler, hog in zip(handlers, victims):
                events = until_resolved(handler)
                assert "resolved" == events[-1].outcome
                assert hog.pid in {v.pid for e in events for v in e.victims if v.result == 0}
            sup.remove(groups[0])
            assert before[groups[0].path] == self._settings(groups[0])
            assert tuple(handlers[1:]) == sup.handlers
        for group in groups:
            assert before[group.path] == self._settings(group)

