"""One native watcher serving many groups: records by group, episodes that
wait without holding the thread, groups added and removed while it runs.

Plain files stand in for ``memory.oom_control`` (the check) and eventfds
for the notifications: what is tested here is the watcher's scheduling,
not the kernel's (see test_supervisor for the real groups).
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from useroom import native
from useroom.native import Action, EventFd, EventRecord, NativeWatcher, Outcome, Plan, SourceKind, WatchedGroup

UNDER = b"oom_kill_disable 1\nunder_oom 1\n"
CLEAR = b"oom_kill_disable 1\nunder_oom 0\n"


class _Check:
    """A file standing in for one group's memory.oom_control."""

    def __init__(self, path: pathlib.Path) -> None:
        self.path = path
        path.write_bytes(UNDER)
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def clear(self) -> None:
        self.path.write_bytes(CLEAR)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def checks(tmp_path: pathlib.Path) -> Iterator[list[_Check]]:
    made = [_Check(tmp_path / f"oom_control.{i}") for i in range(8)]
    yield made
    for check in made:
        check.close()


def _until(w: NativeWatcher, pred, timeout: float = 5.0) -> list[EventRecord]:
    """Reads records until ``pred(all so far)`` holds."""
    got: list[EventRecord] = []
    deadline = time.monotonic() + timeout
    while not pred(got):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out with {len(got)} records: {[(r.group, r.outcome.name) for r in got]}"
        got.extend(w.wait(left))
    return got


def _waiting_plan(check: _Check, wake: EventFd, timeout: float) -> Plan:
    """Wakes ``wake``, then waits up to ``timeout`` for the check to clear."""
    return Plan([Action.wake(wake.fileno()), Action.check(timeout)], check_fd=check.fd,
                resolved_needle=b"under_oom 0")


@pytest.fixture
def sleepers() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(4)]
    yield procs
    for p in procs:
        p.kill()
        p.wait()


class TestManyGroups:
    def test_an_episode_that_waits_does_not_hold_the_others(self, checks: list[_Check],
                                                            sleepers: list[subprocess.Popen[bytes]]) -> None:
        """While group A's episode waits for its OOM to end, group B's
        notification is served: B's victim is killed and B's record is out
        while A's episode is still in progress."""
        pidfd = os.pidfd_open(sleepers[0].pid)
        with NativeWatcher(lock=False) as w, EventFd() as src_a, EventFd() as src_b, EventFd() as woke_a:
            a, b = w.add_group(), w.add_group()
            ia = a.add_source(src_a.fileno(), SourceKind.OOM)
            ib = b.add_source(src_b.fileno(), SourceKind.OOM)
            a.arm(_waiting_plan(checks[0], woke_a, timeout=30))
            b.arm(Plan([Action.signal_pidfd(pidfd, signal.SIGKILL), Action.check(5)],
                       check_fd=checks[1].fd, resolved_needle=b"under_oom 0"))
            w.start()
            src_a.write(1)
            assert woke_a.wait(5)  # A's episode is at its check now
            assert a.in_episode
            src_b.write(1)
            assert -signal.SIGKILL == sleepers[0].wait(5)
            checks[1].clear()
            [rec_b] = _until(w, lambda got: len(got) >= 1)
            assert (b.index, ib, Outcome.RESOLVED) == (rec_b.group, rec_b.source, rec_b.outcome)
            assert a.in_episode, "A's episode ended early"
            checks[0].clear()
            [rec_a] = _until(w, lambda got: len(got) >= 1)
            assert (a.index, ia, Outcome.RESOLVED) == (rec_a.group, rec_a.source, rec_a.outcome)
            assert rec_a.notified_ns < rec_b.notified_ns < rec_b.resolved_ns < rec_a.resolved_ns
        os.close(pidfd)

    def test_records_carry_the_group_and_its_episode_number(self, checks: list[_Check]) -> None:
        """Each group numbers its own episodes 1, 2, ...; forwards have none."""
        with NativeWatcher(lock=False) as w, EventFd() as s0, EventFd() as s1, EventFd() as fwd:
            g0, g1 = w.add_group(), w.add_group()
            i0 = g0.add_source(s0.fileno(), SourceKind.OOM)
            i1 = g1.add_source(s1.fileno(), SourceKind.OOM)
            f1 = g1.add_source(fwd.fileno(), SourceKind.FORWARD)
            for g, check in ((g0, checks[0]), (g1, checks[1])):
                check.clear()
                g.arm(Plan([Action.check(1)], check_fd=check.fd, resolved_needle=b"under_oom 0"))
            for _ in range(3):
                g0.run_episode(i0)
            g1.run_episode(i1)
            g1.run_episode(f1, 4)
            recs = w.records()
            assert [(g0.index, 1), (g0.index, 2), (g0.index, 3), (g1.index, 1), (g1.index, 0)] == \
                [(r.group, r.episode) for r in recs]
            assert [Outcome.NOT_NEEDED] * 4 + [Outcome.FORWARDED] == [r.outcome for r in recs]
            assert 4 == recs[-1].count

    def test_groups_added_and_removed_while_it_runs(self, checks: list[_Check]) -> None:
        """A group added to a running watcher is served; one removed is not
        any more, and its index is given to the next group added."""
        with NativeWatcher(lock=False) as w, EventFd() as s0, EventFd() as s1, EventFd() as s2:
            g0 = w.add_group()
            g0.add_source(s0.fileno(), SourceKind.FORWARD)
            w.start()
            g1 = w.add_group()
            g1.add_source(s1.fileno(), SourceKind.FORWARD)
            s1.write(1)
            assert [g1.index] == [r.group for r in _until(w, lambda got: len(got) >= 1)]
            index = g0.index
            g0.close()
            assert g0.closed and g0 not in w.groups
            s0.write(1)  # no longer waited on
            g2 = w.add_group()
            assert index == g2.index
            g2.add_source(s2.fileno(), SourceKind.FORWARD)
            s2.write(1)
            s1.write(1)
            recs = _until(w, lambda got: len(got) >= 2)
            assert sorted([g1.index, g2.index]) == sorted(r.group for r in recs)
            assert [] == w.wait(0.1)

    def test_a_group_removed_mid_episode(self, checks: list[_Check]) -> None:
        """Removing a group whose episode waits ends that episode, recorded
        UNRESOLVED with the steps it ran; the other groups carry on."""
        with NativeWatcher(lock=False) as w, EventFd() as s0, EventFd() as s1, EventFd() as woke:
            g0, g1 = w.add_group(), w.add_group()
            i0 = g0.add_source(s0.fileno(), SourceKind.OOM)
            g1.add_source(s1.fileno(), SourceKind.FORWARD)
            g0.arm(_waiting_plan(checks[0], woke, timeout=30))
            w.start()
            s0.write(1)
            assert woke.wait(5)
            index = g0.index
            g0.close()
            [rec] = _until(w, lambda got: len(got) >= 1)
            assert (index, i0, Outcome.UNRESOLVED) == (rec.group, rec.source, rec.outcome)
            assert [native.ActionKind.WAKE] == [s.kind for s in rec.steps]
            assert native.STATE_WAITING == w.state
            s1.write(1)
            assert [g1.index] == [r.group for r in _until(w, lambda got: len(got) >= 1)]

    def test_a_notification_during_the_check_supersedes_it(self, checks: list[_Check]) -> None:
        """The group runs out again while the check waits (the OOM lock
        changed hands): the episode ends superseded and the next begins."""
        with NativeWatcher(lock=False) as w, EventFd() as src, EventFd() as woke:
            g = w.add_group()
            idx = g.add_source(src.fileno(), SourceKind.OOM)
            g.arm(Plan([Action.wake(woke.fileno()), Action.check(30, supersede=True)], check_fd=checks[0].fd,
                       resolved_needle=b"under_oom 0"))
            w.start()
            src.write(1)
            assert woke.wait(5)
            woke.read()
            src.write(2)
            first = _until(w, lambda got: len(got) >= 1)[0]
            assert (Outcome.SUPERSEDED, 1) == (first.outcome, first.episode)
            assert woke.wait(5), "the next episode did not begin"
            checks[0].clear()
            second = _until(w, lambda got: len(got) >= 1)[0]
            assert (idx, 2, 2, Outcome.RESOLVED) == (second.source, second.episode, second.count, second.outcome)

    def test_stop_lets_the_episodes_in_progress_end(self, checks: list[_Check]) -> None:
        """stop() returns once the episodes in progress are over; none is cut."""
        with NativeWatcher(lock=False) as w, EventFd() as src, EventFd() as woke:
            g = w.add_group()
            g.add_source(src.fileno(), SourceKind.OOM)
            g.arm(_waiting_plan(checks[0], woke, timeout=0.3))
            w.start()
            src.write(1)
            assert woke.wait(5)
            w.stop()
            [rec] = w.records()
            assert Outcome.UNRESOLVED == rec.outcome
            assert [native.ActionKind.WAKE, native.ActionKind.CHECK] == [s.kind for s in rec.steps]

    def test_a_hundred_groups_at_once(self, tmp_path: pathlib.Path) -> None:
        """A hundred groups notified together: every episode runs, each
        record names its own group, and the waits overlap (the last record
        is out long before a hundred checks in a row would take)."""
        n = 100
        with NativeWatcher(lock=False) as w:
            sources = [EventFd() for _ in range(n)]
            wakes = [EventFd() for _ in range(n)]
            checks = [_Check(tmp_path / f"c{i}") for i in range(n)]
            try:
                groups: list[WatchedGroup] = []
                for src, wake, check in zip(sources, wakes, checks):
                    g = w.add_group()
                    g.add_source(src.fileno(), SourceKind.OOM)
                    # Each waits its check's full 0.2 s: one at a time, 20 s.
                    g.arm(_waiting_plan(check, wake, timeout=0.2))
                    groups.append(g)
                w.start()
                for src in sources:
                    src.write(1)
                recs = _until(w, lambda got: len(got) >= n, timeout=10)
                assert sorted(g.index for g in groups) == sorted(r.group for r in recs)
                assert {Outcome.UNRESOLVED} == {r.outcome for r in recs}
                span = max(r.notified_ns for r in recs) - min(r.notified_ns for r in recs)
                assert all(w_.wait(0) for w_ in wakes)
                assert span < 0.2e9 * n / 4, "the episodes ran one after the other"
            finally:
                for fd in (*sources, *wakes, *checks):
                    fd.close()

    def test_a_group_costs_at_most_16_kib_of_locked_memory(self) -> None:
        """What each added group maps (and locks): its plans, sources and record."""
        assert native.group_arena_size() <= 16 << 10
        with NativeWatcher() as w:
            g = w.add_group()
            report = g.arena
            assert report.size == native.group_arena_size()
            assert report.fully_locked or report.lock_errno

    def test_closed_group_refuses_use(self) -> None:
        """A closed group raises WatcherError; closing twice is fine."""
        from useroom.exceptions import WatcherError

        with NativeWatcher(lock=False) as w:
            g = w.add_group()
            g.close()
            g.close()
            with pytest.raises(WatcherError, match="closed"):
                g.arm(Plan([]))
