"""The native core on its own: waits, arena, plans and the event ring.

These need no cgroup; the real-kernel OOM tests are in test_watcher_kernel.py.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import json
import os
import pathlib
import platform
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import attrs
import pytest

from useroom import native
from useroom.native import (
    Action,
    Candidate,
    ActionKind,
    Epoll,
    EventFd,
    NativeWatcher,
    Outcome,
    Plan,
    SourceKind,
)
from helpers import SoloWatcher


_IMPORT_PROBE = """
import json, sys
calls = []
def profile(frame, event, arg):
    if event == "c_call" and getattr(arg, "__name__", "").startswith("uro_"):
        calls.append(arg.__name__)
sys.setprofile(profile)
import useroom
from useroom.native import features, fds, hold, locking, plan, watcher
sys.setprofile(None)
at_import, cached = list(calls), features.can_use_mrelease.cache_info().currsize
sys.setprofile(profile)
features.can_use_mrelease(); features.can_use_mrelease(); hold.can_hold_threads()
sys.setprofile(None)
print(json.dumps([at_import, cached, calls[len(at_import):],
                  features.can_use_mrelease.cache_info().currsize]))
"""


class TestImport:
    def test_import_runs_no_probe_and_no_setup(self) -> None:
        """Importing useroom and every module of the native package calls
        nothing in the core: the probes and the hold's one-time lookups run
        at their first use, once (a fresh interpreter, every call into the
        core traced)."""
        out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True,
                             check=True, timeout=60)
        at_import, cached, first_use, cached_after = json.loads(out.stdout)
        assert ([], 0) == (at_import, cached)
        assert ["uro_mrelease", "uro_hooks_init", "uro_hold_init"] == first_use
        assert 1 == cached_after


class TestEventFd:
    def test_counter_adds_and_resets(self) -> None:
        """Writes add to the counter; a read returns the sum and resets it."""
        with EventFd() as efd:
            efd.write(2)
            efd.write(5)
            assert 7 == efd.read()
            assert False is efd.wait(0)

    def test_nonblocking_read_of_zero_counter(self) -> None:
        """A non-blocking eventfd with a zero counter raises BlockingIOError naming read."""
        with EventFd(nonblocking=True) as efd, pytest.raises(BlockingIOError, match="read"):
            efd.read()

    def test_close_is_idempotent(self) -> None:
        """close() twice is fine; fileno() afterwards raises ValueError."""
        efd = EventFd()
        efd.close()
        efd.close()
        assert True is efd.closed
        with pytest.raises(ValueError, match="closed"):
            efd.fileno()

    def test_close_on_exec(self) -> None:
        """The eventfd is close-on-exec."""
        with EventFd() as efd:
            assert False is os.get_inheritable(efd.fileno())

    def test_dropped_open_warns(self) -> None:
        """An eventfd garbage-collected while open warns with ResourceWarning."""
        efd = EventFd()
        with pytest.warns(ResourceWarning, match="unclosed EventFd"):
            del efd
            gc.collect()


class TestEpoll:
    def test_timeout_returns_nothing(self) -> None:
        """A wait with nothing ready returns an empty list once the timeout passes."""
        with Epoll() as ep, EventFd() as efd:
            ep.add(efd.fileno(), 42)
            assert [] == ep.wait(0.01)

    def test_ready_fd_reported_with_its_data(self) -> None:
        """Ready fds come back with the data they were added with."""
        with Epoll() as ep, EventFd() as a, EventFd() as b:
            ep.add(a.fileno(), 1)
            ep.add(b.fileno(), 2)
            b.write(1)
            assert [(2, native.EPOLLIN)] == ep.wait(1.0)

    def test_removed_fd_not_reported(self) -> None:
        """After remove(), a ready fd is no longer reported."""
        with Epoll() as ep, EventFd() as efd:
            ep.add(efd.fileno(), 1)
            ep.remove(efd.fileno())
            efd.write(1)
            assert [] == ep.wait(0)

    def test_errors_name_the_syscall(self) -> None:
        """Adding a closed fd raises OSError(EBADF) naming epoll_ctl."""
        with Epoll() as ep:
            r, w = os.pipe()
            os.close(r)
            os.close(w)
            with pytest.raises(OSError, match="epoll_ctl") as info:
                ep.add(r, 1)
            assert errno.EBADF == info.value.errno

    def test_interrupted_wait_resumes(self) -> None:
        """A signal during a wait does not end it early: the wait resumes."""
        hits = []
        old = signal.signal(signal.SIGUSR1, lambda *_: hits.append(1))
        try:
            with Epoll() as ep, EventFd() as efd:
                ep.add(efd.fileno(), 9)
                timer = threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGUSR1))
                writer = threading.Timer(0.2, efd.write, (1,))
                timer.start()
                writer.start()
                try:
                    assert [(9, native.EPOLLIN)] == ep.wait(10.0)
                finally:
                    timer.join()
                    writer.join()
        finally:
            signal.signal(signal.SIGUSR1, old)
        assert [1] == hits


class TestArenaAndCore:
    def test_watcher_memory_is_locked(self) -> None:
        """As root (CAP_IPC_LOCK) the watcher's state, ring and stack are all locked."""
        with SoloWatcher() as w:
            report = w.arena
            assert 0 == report.size % os.sysconf("SC_PAGESIZE")
            assert report.size == report.locked
            assert 0 == report.lock_errno

    def test_unlocked_arena_when_not_asked(self) -> None:
        """lock=False maps and prefaults the arena but locks nothing."""
        with SoloWatcher(lock=False) as w:
            assert 0 == w.arena.locked

    def test_core_image_locked(self) -> None:
        """lock_core() locks every page of the native module, critical code included."""
        core = native.lock_core()
        assert core.image_size == core.locked
        assert 0 < core.critical_code_size < core.image_size

    def test_refused_lock_is_reported_not_raised(self) -> None:
        """With RLIMIT_MEMLOCK too small and no CAP_IPC_LOCK, the arena still maps
        and prefaults; the report carries the refusal."""
        script = (
            "import resource\n"
            "resource.setrlimit(resource.RLIMIT_MEMLOCK, (4096, 4096))\n"
            "from useroom.native import NativeWatcher\n"
            "w = NativeWatcher(); r = w.arena; w.close()\n"
            "print(r.size, r.locked, r.lock_errno)\n"
        )
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed for this test"
        out = subprocess.run(
            [setpriv, "--bounding-set", "-ipc_lock", sys.executable, "-c", script],
            capture_output=True, text=True, check=True,
        )
        size, locked, err = map(int, out.stdout.split())
        assert size > 0
        assert 0 == locked
        assert errno.ENOMEM == err

    @pytest.mark.skipif(platform.machine() != "x86_64", reason="parses x86-64 disassembly")
    def test_critical_code_calls_nothing_outside_itself(self) -> None:
        """The critical section makes no call or jump outside itself: no libc,
        no PLT, no memcpy inserted by the compiler."""
        objdump = shutil.which("objdump")
        assert objdump, "objdump (binutils) is needed for this test"
        so = native.core_path()
        text = subprocess.run(
            [objdump, "-d", "--no-show-raw-insn", "-j", "uro_crit", so],
            capture_output=True, text=True, check=True,
        ).stdout
        starts = [int(m, 16) for m in re.findall(r"^([0-9a-f]+) <", text, re.M)]
        addrs = [int(m, 16) for m in re.findall(r"^\s+([0-9a-f]+):", text, re.M)]
        lo, hi = min(starts), max(addrs)
        targets = re.findall(r"\b(?:call|jmp|j[a-z]+)\s+([0-9a-f]+) <", text)
        assert targets, "the disassembly has no branches: the check would be vacuous"
        outside = [t for t in targets if not lo <= int(t, 16) <= hi]
        assert [] == outside
        assert [] == re.findall(r"call\s+\*", text)


def _records_until(w: NativeWatcher, n: int, timeout: float = 5.0) -> list[native.EventRecord]:
    got: list[native.EventRecord] = []
    while len(got) < n:
        new = w.wait(timeout)
        assert new, f"no record within {timeout}s (have {len(got)} of {n})"
        got.extend(new)
    return got


@pytest.fixture
def sleeper() -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


class TestPlanValidation:
    def test_too_many_actions(self) -> None:
        """A plan longer than the native table is refused."""
        with pytest.raises(ValueError, match="at most"):
            Plan([Action.check(0)] * (native.PLAN_MAX + 1))

    def test_payload_too_long(self) -> None:
        """A write payload must fit the preallocated action."""
        with pytest.raises(ValueError, match="payload"):
            Action.write(1, b"x" * (native.DATA_MAX + 1))

    def test_bad_fd(self) -> None:
        """Negative fds are refused."""
        with pytest.raises(ValueError, match="fd"):
            Action.signal_pidfd(-1, signal.SIGKILL)

    def test_check_needs_needle(self) -> None:
        """A plan with a check file must say what 'resolved' looks like."""
        with pytest.raises(ValueError, match="needle"):
            Plan([], check_fd=3)

    def test_negative_timeout(self) -> None:
        """Timeouts are seconds >= 0."""
        with pytest.raises(ValueError, match="timeout"):
            Action.check(-1)


_SIZED = ("import sys, time\nb = bytearray(int(sys.argv[1]) << 20)\nb[::4096] = b'x' * len(b[::4096])\n"
          "print('ready', flush=True)\ntime.sleep(60)\n")


@contextlib.contextmanager
def _sized(*mibs: int) -> Iterator[tuple[list[subprocess.Popen[bytes]], list[Any]]]:
    """Processes that each touch MiB of memory and wait, with their
    ``Pidfd``s; killed, reaped and closed on the way out."""
    from useroom._victims import Pidfd

    procs = [subprocess.Popen([sys.executable, "-c", _SIZED, str(mib)], stdout=subprocess.PIPE) for mib in mibs]
    fds: list[Any] = []
    try:
        for p in procs:
            assert b"ready\n" == p.stdout.readline()  # type: ignore[union-attr]
        fds = [Pidfd(p.pid) for p in procs]
        yield procs, fds
    finally:
        for p in procs:
            p.kill()
            p.wait()
            p.stdout.close()  # type: ignore[union-attr]
        for f in fds:
            f.close()


class TestEpisodes:
    """Episodes run on the calling thread (run_episode) or by the watcher thread,
    with a plain file standing in for memory.oom_control."""

    @pytest.fixture
    def check_file(self, tmp_path: pathlib.Path):
        path = tmp_path / "oom_control"
        path.write_bytes(b"oom_kill_disable 1\nunder_oom 1\n")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        yield path, fd
        os.close(fd)

    def test_no_plan(self) -> None:
        """An OOM source with nothing armed records NO_PLAN and acts on nothing."""
        with SoloWatcher(lock=False) as w, EventFd() as src:
            idx = w.add_source(src.fileno(), SourceKind.OOM)
            w.run_episode(idx)
            [rec] = w.records()
            assert Outcome.NO_PLAN == rec.outcome
            assert () == rec.steps

    def test_signal_plan_kills_victim(self, sleeper: subprocess.Popen[bytes]) -> None:
        """A pidfd SIGKILL plan kills the victim; mrelease and the step times are recorded."""
        pidfd = os.pidfd_open(sleeper.pid)
        try:
            with SoloWatcher(lock=False) as w, EventFd() as src:
                idx = w.add_source(src.fileno(), SourceKind.OOM)
                w.arm(Plan([Action.signal_pidfd(pidfd, signal.SIGKILL), Action.mrelease(pidfd)]))
                w.run_episode(idx)
                [rec] = w.records()
                assert -signal.SIGKILL == sleeper.wait(5)
                assert Outcome.ACTED == rec.outcome
                assert [ActionKind.SIGNAL_PIDFD, ActionKind.MRELEASE] == [s.kind for s in rec.steps]
                assert 0 == rec.steps[0].result
                assert rec.notified_ns <= rec.acted_ns <= rec.steps[0].t_ns <= rec.steps[1].t_ns
        finally:
            os.close(pidfd)

    def test_signal_best_picks_by_badness_now(self) -> None:
        """SIGNAL_BEST reads each candidate's /proc/<pid>/status and
        oom_score_adj at the episode: the one with the most RSS + swap + page
        tables, plus the adj scaled to the limit, is killed, the pick and its
        points are recorded, MRELEASE and AWAIT act on the pick, and a second
        SIGNAL_BEST picks among the rest."""
        with _sized(8, 40, 24) as (procs, fds):
            small, big, middle = procs
            # The plan was compiled with adj 0 (adj_kb); the middle one sets
            # 500 after that (half the 64 MiB limit: 32 MiB) and outranks the biggest.
            candidates = [Candidate(f.fileno(), f.status.fileno(), p.pid, adj_fd=f.adj.fileno())  # type: ignore[union-attr]
                          for f, p in zip(fds, procs)]
            with open(f"/proc/{middle.pid}/oom_score_adj", "w") as file:
                file.write("500")
            with SoloWatcher(lock=False) as w, EventFd() as src:
                idx = w.add_source(src.fileno(), SourceKind.OOM)
                w.arm(Plan([Action.signal_best(signal.SIGKILL), Action.mrelease(0).on_pick(),
                            Action.await_readable(0, 5).on_pick(), Action.signal_best(signal.SIGKILL)],
                           candidates=candidates, limit_kb=64 << 10))
                w.run_episode(idx)
                [rec] = w.records()
            assert -signal.SIGKILL == middle.wait(5)
            assert -signal.SIGKILL == big.wait(5)
            assert None is small.poll()
            first, reaped, awaited, second = rec.steps
            assert (2, 0) == (first.pick, first.result)
            assert 24 << 10 < first.points - (32 << 10) < 40 << 10
            assert reaped.result in (0, -errno.ESRCH) and 1 == awaited.result  # ESRCH: it had exited already
            assert (1, 0) == (second.pick, second.result)
            assert 40 << 10 <= second.points < 60 << 10

    def test_signal_best_spares_a_candidate_that_set_adj_minus_1000(self) -> None:
        """A candidate that set oom_score_adj -1000 after the plan was compiled is never picked."""
        with _sized(40, 8) as (procs, fds):
            big, small = procs
            try:
                with open(f"/proc/{big.pid}/oom_score_adj", "w") as file:
                    file.write("-1000")
            except PermissionError:
                pytest.skip("lowering oom_score_adj needs CAP_SYS_RESOURCE")
            with SoloWatcher(lock=False) as w, EventFd() as src:
                idx = w.add_source(src.fileno(), SourceKind.OOM)
                w.arm(Plan([Action.signal_best(signal.SIGKILL)], limit_kb=64 << 10,
                           candidates=[Candidate(f.fileno(), f.status.fileno(), p.pid,  # type: ignore[union-attr]
                                                 adj_fd=f.adj.fileno()) for f, p in zip(fds, procs)]))
                w.run_episode(idx)
                [killed] = w.records()[-1].steps
            assert (small.pid, 0) == (killed.pid, killed.result)
            assert -signal.SIGKILL == small.wait(5)
            assert None is big.poll()

    def test_signal_best_reads_the_adj_of_now_not_the_plans(self) -> None:
        """A candidate compiled with a high adj (adj_kb) that is back to 0 now loses to a bigger one."""
        with _sized(40, 8) as (procs, fds):
            big, small = procs
            candidates = [Candidate(f.fileno(), f.status.fileno(), p.pid, adj_fd=f.adj.fileno())  # type: ignore[union-attr]
                          for f, p in zip(fds, procs)]
            stale = [candidates[0], attrs.evolve(candidates[1], adj_kb=64 << 10)]
            with SoloWatcher(lock=False) as w, EventFd() as src:
                idx = w.add_source(src.fileno(), SourceKind.OOM)
                w.arm(Plan([Action.signal_best(signal.SIGKILL)], limit_kb=64 << 10, candidates=stale))
                w.run_episode(idx)
                [killed] = w.records()[-1].steps
            assert (big.pid, 0) == (killed.pid, killed.result)
            assert 40 << 10 <= killed.points < 60 << 10
            assert -signal.SIGKILL == big.wait(5)

    def test_signal_best_waits_for_its_last_victim(self) -> None:
        """A pick does not kill again while its last victim is still exiting
        (512 MiB take a while to tear down): it waits for the exit, returns
        WAITED, and the next pick of a later episode goes ahead."""
        with _sized(512, 8) as (procs, fds):
            big, small = procs
            plan = Plan([Action.signal_best(signal.SIGKILL, 5), Action.signal_best(signal.SIGKILL, 5)],
                        candidates=[Candidate(f.fileno(), f.status.fileno(), p.pid)  # type: ignore[union-attr]
                                    for f, p in zip(fds, procs)])
            with SoloWatcher(lock=False) as w, EventFd() as src:
                idx = w.add_source(src.fileno(), SourceKind.OOM)
                w.arm(plan)
                w.run_episode(idx)
                killed, waited = w.records()[-1].steps
                assert (big.pid, 0) == (killed.pid, killed.result)
                assert (0, native.WAITED) == (waited.pid, waited.result)
                assert None is small.poll()
                w.run_episode(idx)  # the victim is gone: the next pick kills
                again = w.records()[-1].steps[0]
                assert (small.pid, 0) == (again.pid, again.result)
            assert -signal.SIGKILL == big.wait(5) == small.wait(5)

    def test_signal_best_with_nobody_left(self, sleeper: subprocess.Popen[bytes]) -> None:
        """No live candidate: ESRCH, no pick, and the pick's MRELEASE is skipped."""
        from useroom._victims import Pidfd

        fd = Pidfd(sleeper.pid)
        try:
            assert fd.status is not None
            sleeper.kill()
            sleeper.wait()
            with SoloWatcher(lock=False) as w, EventFd() as src:
                idx = w.add_source(src.fileno(), SourceKind.OOM)
                w.arm(Plan([Action.signal_best(signal.SIGKILL), Action.mrelease(0).on_pick()],
                           candidates=[Candidate(fd.fileno(), fd.status.fileno(), sleeper.pid)]))
                w.run_episode(idx)
                [rec] = w.records()
            assert [(-errno.ESRCH, -1), (-errno.ESRCH, -1)] == [(s.result, s.pick) for s in rec.steps]
        finally:
            fd.close()

    def test_check_until_exit_ends_when_the_victim_is_gone(self, check_file) -> None:
        """A CHECK until_exit(), the check still failing, ends as soon as the
        victim has exited (its memory is back: the group is out again), not
        at its timeout; on the pick's pidfd too, and at once when the pick
        waited for the last victim instead of picking."""
        _, cfd = check_file  # says under_oom 1 throughout
        with _sized(8, 512, 8) as (procs, fds):  # 512 MiB take a while to tear down: the second pick waits
            first = fds[0].fileno()
            plan = Plan([Action.signal_pidfd(first, signal.SIGKILL), Action.check(30).until_exit(first),
                         Action.signal_best(signal.SIGKILL, 5), Action.signal_best(signal.SIGKILL, 5),
                         Action.check(30).until_exit().on_pick()],
                        check_fd=cfd, resolved_needle=b"under_oom 0",
                        candidates=[Candidate(f.fileno(), f.status.fileno(), p.pid)  # type: ignore[union-attr]
                                    for f, p in zip(fds[1:], procs[1:])])
            with SoloWatcher(lock=False) as w, EventFd() as src:
                idx = w.add_source(src.fileno(), SourceKind.OOM)
                w.arm(plan)
                started = time.monotonic()
                w.run_episode(idx)
                took = time.monotonic() - started
                [rec] = w.records()
            assert [0, 0, 0, native.WAITED, 0] == [step.result for step in rec.steps]
            assert procs[1].pid == rec.steps[2].pid
            assert Outcome.UNRESOLVED == rec.outcome
            assert took < 10  # not the 30 s of any check
            assert all(-signal.SIGKILL == p.wait(5) for p in procs[:2])

    def test_until_exit_is_for_checks(self) -> None:
        with pytest.raises(ValueError, match="CHECK"):
            Action.await_readable(3, 1).until_exit(3)
        with pytest.raises(ValueError, match="until_exit"):
            Action.check(1).on_pick()

    def test_exited_victim_is_skipped(self, sleeper: subprocess.Popen[bytes], check_file) -> None:
        """A victim that already exited gives ESRCH and the following check is
        skipped instead of waited out."""
        _, cfd = check_file
        pidfd = os.pidfd_open(sleeper.pid)
        try:
            sleeper.kill()
            sleeper.wait()
            with SoloWatcher(lock=False) as w, EventFd() as src:
                idx = w.add_source(src.fileno(), SourceKind.OOM)
                w.arm(Plan([Action.signal_pidfd(pidfd, signal.SIGKILL), Action.check(30)],
                           check_fd=cfd, resolved_needle=b"under_oom 0"))
                w.run_episode(idx)
                [rec] = w.records()
                assert [-errno.ESRCH, 0] == [s.result for s in rec.steps]
                assert Outcome.UNRESOLVED == rec.outcome
        finally:
            os.close(pidfd)

    def test_not_needed_when_not_under_oom(self, check_file, sleeper) -> None:
        """A notification while the check already says resolved runs no action."""
        path, cfd = check_file
        path.write_bytes(b"oom_kill_disable 1\nunder_oom 0\n")
        pidfd = os.pidfd_open(sleeper.pid)
        try:
            with SoloWatcher(lock=False) as w, EventFd() as src:
                idx = w.add_source(src.fileno(), SourceKind.OOM)
                w.arm(Plan([Action.signal_pidfd(pidfd, signal.SIGKILL)], check_fd=cfd,
                           resolved_needle=b"under_oom 0"))
                w.run_episode(idx)
                [rec] = w.records()
                assert Outcome.NOT_NEEDED == rec.outcome
                assert () == rec.steps
                assert None is sleeper.poll()
        finally:
            os.close(pidfd)

    def test_gone_when_check_unreadable(self, tmp_path: pathlib.Path, sleeper) -> None:
        """A check fd that fails to read (the group was removed) records GONE, no action."""
        dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
        pidfd = os.pidfd_open(sleeper.pid)
        try:
            with SoloWatcher(lock=False) as w, EventFd() as src:
                idx = w.add_source(src.fileno(), SourceKind.OOM)
                w.arm(Plan([Action.signal_pidfd(pidfd, signal.SIGKILL)], check_fd=dfd,
                           resolved_needle=b"under_oom 0"))
                w.run_episode(idx)
                [rec] = w.records()
                assert Outcome.GONE == rec.outcome
                assert None is sleeper.poll()
        finally:
            os.close(pidfd)
            os.close(dfd)

    def test_check_waits_for_resolution(self, check_file) -> None:
        """A check returns as soon as the file says resolved, with its time recorded;
        later actions do not run."""
        path, cfd = check_file
        with SoloWatcher(lock=False) as w, EventFd() as src, EventFd() as poke, EventFd() as later:
            idx = w.add_source(src.fileno(), SourceKind.OOM)
            w.arm(Plan([Action.wake(poke.fileno()), Action.check(30), Action.wake(later.fileno())],
                       check_fd=cfd, resolved_needle=b"under_oom 0"))
            w.start()

            def resolve() -> None:
                poke.wait(10)
                path.write_bytes(b"oom_kill_disable 1\nunder_oom 0\n")

            t = threading.Thread(target=resolve)
            t.start()
            src.write(1)
            [rec] = _records_until(w, 1)
            t.join()
            assert Outcome.RESOLVED == rec.outcome
            assert [0, 1] == [s.result for s in rec.steps]
            assert rec.acted_ns <= rec.resolved_ns
            assert False is later.wait(0)

    def test_await_times_out_and_reads(self) -> None:
        """AWAIT gives -ETIMEDOUT when nothing comes, and the counter when read=True."""
        with SoloWatcher(lock=False) as w, EventFd() as src, EventFd() as reply:
            idx = w.add_source(src.fileno(), SourceKind.OOM)
            w.arm(Plan([Action.await_readable(reply.fileno(), 0.01, read=True)]))
            w.run_episode(idx)
            reply.write(4)
            w.run_episode(idx)
            first, second = w.records()
            assert -errno.ETIMEDOUT == first.steps[0].result
            assert 4 == second.steps[0].result
            assert False is reply.wait(0)

    def test_write_action_writes_at_offset_zero(self, tmp_path: pathlib.Path) -> None:
        """WRITE puts the preformatted bytes at offset 0 and records the count."""
        path = tmp_path / "limit"
        path.write_bytes(b"")
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            with SoloWatcher(lock=False) as w, EventFd() as src:
                idx = w.add_source(src.fileno(), SourceKind.OOM)
                w.arm(Plan([Action.write(fd, b"268435456")]))
                w.run_episode(idx)
                w.run_episode(idx)
                assert [9, 9] == [r.steps[0].result for r in w.records()]
            assert b"268435456" == path.read_bytes()
        finally:
            os.close(fd)

    def test_arming_replaces_plan(self) -> None:
        """The episode after arm() runs the new plan."""
        with SoloWatcher(lock=False) as w, EventFd() as src, EventFd() as a, EventFd() as b:
            idx = w.add_source(src.fileno(), SourceKind.OOM)
            w.arm(Plan([Action.wake(a.fileno())]))
            w.run_episode(idx)
            w.arm(Plan([Action.wake(b.fileno())]))
            w.run_episode(idx)
            assert (1, 1) == (a.read(), b.read())

    def test_guards_resolving_and_always(self, tmp_path: pathlib.Path) -> None:
        """A guarded action runs only if its guard succeeded; a resolving action's
        success ends the episode; 'always' actions still run afterwards."""
        path = tmp_path / "out"
        path.write_bytes(b"")
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            with SoloWatcher(lock=False) as w, EventFd() as src, EventFd() as a, EventFd() as b:
                idx = w.add_source(src.fileno(), SourceKind.OOM)
                w.arm(Plan([
                    Action.signal_pid(2**22 + 1, 0),          # 0: fails (no such pid)
                    Action.wake(a.fileno()).after(0),         # 1: skipped, its guard failed
                    Action.write(fd, b"x").resolving(),       # 2: resolves
                    Action.wake(a.fileno()),                  # 3: not run, resolved
                    Action.wake(b.fileno()).after(2).always(),  # 4: runs
                ]))
                w.run_episode(idx)
                [rec] = w.records()
                assert (False, True) == (a.wait(0), b.wait(0))
            assert Outcome.RESOLVED == rec.outcome
            assert [0, 2, 4] == [s.index for s in rec.steps]
            assert rec.resolved_ns > 0
        finally:
            os.close(fd)

    def test_forward_source(self) -> None:
        """A forward source is recorded with its counter and wakes Python; no plan runs."""
        with SoloWatcher(lock=False) as w, EventFd() as fwd, EventFd() as a:
            idx = w.add_source(fwd.fileno(), SourceKind.FORWARD)
            w.arm(Plan([Action.wake(a.fileno())]))
            w.start()
            fwd.write(3)
            [rec] = _records_until(w, 1)
            assert (idx, 3, Outcome.FORWARDED) == (rec.source, rec.count, rec.outcome)
            assert False is a.wait(0)

    def test_overwritten_records_are_counted_lost(self) -> None:
        """Records Python did not read before the ring wrapped are counted, not invented."""
        with SoloWatcher(lock=False) as w, EventFd() as src:
            idx = w.add_source(src.fileno(), SourceKind.FORWARD)
            total = native.RING_SIZE + 5
            for _ in range(total):
                w.run_episode(idx)
            recs = w.records()
            assert native.RING_SIZE == len(recs)
            assert 5 == w.lost
            assert list(range(6, total + 1)) == [r.seq for r in recs]


class TestWatcherLifecycle:
    def test_start_stop_restart(self) -> None:
        """The watcher can be stopped and started again, and handles events each time."""
        with SoloWatcher() as w, EventFd() as fwd:
            w.add_source(fwd.fileno(), SourceKind.FORWARD)
            for _ in range(2):
                w.start()
                fwd.write(1)
                assert 1 == len(_records_until(w, 1))
                w.stop()
                assert False is w.running

    def test_double_start_refused(self) -> None:
        """Starting a running watcher raises WatcherError."""
        from useroom.exceptions import WatcherError

        with SoloWatcher() as w:
            w.start()
            with pytest.raises(WatcherError, match="already running"):
                w.start()

    def test_sources_are_bounded(self) -> None:
        """More sources than the native table holds fail with ENOSPC."""
        with SoloWatcher(lock=False) as w:
            fds = [EventFd() for _ in range(native.SOURCES_MAX + 1)]
            try:
                for efd in fds[:-1]:
                    w.add_source(efd.fileno(), SourceKind.FORWARD)
                with pytest.raises(OSError) as info:
                    w.add_source(fds[-1].fileno(), SourceKind.FORWARD)
                assert errno.ENOSPC == info.value.errno
            finally:
                for efd in fds:
                    efd.close()

    def test_close_is_idempotent_and_final(self) -> None:
        """close() twice is fine; using a closed watcher raises WatcherError."""
        from useroom.exceptions import WatcherError

        w = SoloWatcher()
        w.start()
        w.close()
        w.close()
        assert True is w.closed
        with pytest.raises(WatcherError, match="closed"):
            w.arm(Plan([]))
