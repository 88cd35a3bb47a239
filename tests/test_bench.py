"""The deadlock benchmark: its bookkeeping, its figures on the real kernel, and that it leaves nothing behind."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from helpers import MIB, destroy_group
from useroom._mounts import memory_hierarchy
from useroom.bench.__main__ import main
from useroom.bench._deadlock import (
    Block,
    Config,
    Episode,
    attribute_events,
    check_available,
    notify_to_signal_ns,
    outcome_name,
    schedule,
)
from useroom.bench._handlers import HandlerProcess, HandlerReport
from useroom.bench._report import percentile
from useroom.bench._sandbox import (
    BenchError,
    Child,
    OomControl,
    V1ScratchGroup,
    V2ScratchGroup,
    own_memcg,
    scratch_kind,
)

BENCH = [sys.executable, "-m", "useroom.bench", "deadlock"]
GROUP_PREFIX = "useroom-bench."


class TestSchedule:
    def test_blocks_interleave_and_rotate(self) -> None:
        """Blocks go round-robin, the order rotating each round; naive runs one episode per block."""
        config = Config(variants=("kernel", "naive"), episodes=25, naive_episodes=2, block=10)
        expected = [("kernel", 10), ("naive", 1), ("naive", 1), ("kernel", 10), ("kernel", 5)]
        assert expected == [(variant.name, count) for variant, count in schedule(config)]

    def test_every_episode_is_scheduled_once(self) -> None:
        """The blocks of each variant add up to its episode count."""
        config = Config(variants=("kernel", "useroom-standalone", "no-handler"), episodes=33, naive_episodes=4,
                        block=7)
        totals: dict[str, int] = {}
        for variant, count in schedule(config):
            totals[variant.name] = totals.get(variant.name, 0) + count
        assert {"kernel": 33, "useroom-standalone": 33, "no-handler": 4} == totals


class TestConfig:
    def test_worker_must_exceed_the_limit(self) -> None:
        """A worker that fits under the limit would make an episode without an OOM: refused."""
        with pytest.raises(BenchError, match="more than the limit"):
            Config(limit=64 << 20, worker_size=64 << 20)

    def test_unknown_variant(self) -> None:
        """An unknown variant name is refused with the known ones listed."""
        with pytest.raises(BenchError, match="known: kernel, naive"):
            Config(variants=("kernel", "fast"))

    def test_cli_refuses_bad_sizes_before_touching_any_group(self) -> None:
        """--worker-size below --limit exits with 2 and says why."""
        out, err = io.StringIO(), io.StringIO()
        assert 2 == main(["deadlock", "--variants", "kernel", "--worker-size", "32M"], out=out, err=err)
        assert "more than the limit" in err.getvalue()
        assert "" == out.getvalue()

    def test_cli_refuses_unknown_variant(self, capsys: pytest.CaptureFixture[str]) -> None:
        """An unknown --variants name is a usage error (exit status 2)."""
        with pytest.raises(SystemExit) as exit_info:
            main(["deadlock", "--variants", "kernel,fast"])
        assert 2 == exit_info.value.code
        assert "unknown variant 'fast'" in capsys.readouterr().err

    def test_missing_handler_api_is_named(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Without useroom.Handler the in-process variant cannot run, and the reason says so."""
        import useroom

        monkeypatch.delattr(useroom, "Handler", raising=False)
        [reason] = check_available(("kernel", "useroom-inprocess"))
        assert reason.startswith("useroom-inprocess:")
        assert "Handler" in reason


class TestFigures:
    def test_percentile_is_nearest_rank(self) -> None:
        """p99 of 1..100 is 99, of one value that value; no values, no percentile."""
        assert 99 == percentile(list(range(1, 101)), 0.99)
        assert 50 == percentile(list(range(100, 0, -1)), 0.5)
        assert 7 == percentile([7], 0.99)
        assert None is percentile([], 0.5)

    def test_notify_to_signal_uses_the_first_signal_step(self) -> None:
        """The first SIGNAL step counts, whatever steps come before it and however the kind is spelt."""
        event = {
            "notified_ns": 1_000,
            "steps": [
                {"kind": "CHECK", "result": 0, "t_ns": 1_200},
                {"kind": "SIGNAL_PIDFD", "result": 0, "t_ns": 1_500},
                {"kind": "signal_pid", "result": 0, "t_ns": 1_900},
            ],
        }
        assert 500 == notify_to_signal_ns(event)
        assert None is notify_to_signal_ns({"notified_ns": 1_000, "steps": [{"kind": "WRITE", "t_ns": 1_100}]})
        assert None is notify_to_signal_ns({"steps": [{"kind": "SIGNAL_PIDFD", "t_ns": 1_100}]})

    def test_numeric_step_kinds(self) -> None:
        """A step kind written as the native enum's number is recognised too."""
        from useroom.native import ActionKind

        event = {"notified_ns": 10, "steps": [{"kind": int(ActionKind.SIGNAL_PID), "result": 0, "t_ns": 35}]}
        assert 25 == notify_to_signal_ns(event)

    def test_outcome_names(self) -> None:
        """Outcomes compare by their bare lower-case name."""
        assert ["resolved", "not_needed", "unresolved"] == [
            outcome_name(value) for value in ("Outcome.RESOLVED", "NOT_NEEDED", "unresolved")
        ]

    def test_handler_report_shapes(self) -> None:
        """Both report shapes are accepted; anything else is a problem, not an exception."""
        events = [{"notified_ns": 1}]
        assert HandlerReport(events=tuple(events)) == HandlerReport.from_json(events)
        assert HandlerReport(locked_bytes=4096, events=tuple(events)) == HandlerReport.from_json(
            {"locked_bytes": 4096, "events": events}
        )
        assert "unexpected JSON shape" in (HandlerReport.from_json({"records": []}).problem or "")

    def test_events_go_to_the_episode_whose_window_holds_them(self) -> None:
        """Events are counted in the episode whose window holds their notification, others are stray; an
        episode is resolved by the handler only without a rescue, a kernel kill or a failed event."""

        def episode(start: int, end: int, *, kernel_kills: int = 0, rescued: bool = False) -> Episode:
            return Episode(variant="useroom-standalone", index=1, block=1, group="g", start_ns=start,
                           outcome="deadlock" if rescued else "resolved", end_ns=None if rescued else end,
                           window_end_ns=end, worker_exit_ns=[], worker_signals=[], worker_codes=[],
                           kernel_kills=kernel_kills, gone_before_rescue=0, rescued=rescued)

        def event(notified: int, outcome: str = "RESOLVED") -> dict[str, object]:
            return {"notified_ns": notified, "outcome": outcome,
                    "steps": [{"kind": "SIGNAL_PIDFD", "result": 0, "t_ns": notified + 7}]}

        clean, failed, killed, stuck = episode(100, 200), episode(300, 400), episode(500, 600, kernel_kills=1), \
            episode(700, 800, rescued=True)
        block = Block("useroom-standalone", 1, "g", episodes=[clean, failed, killed, stuck])
        block.report = HandlerReport(events=(event(150), event(160, "NOT_NEEDED"), event(250), event(310),
                                             event(320, "UNRESOLVED"), event(550), event(750)))
        attribute_events(block)
        assert [2, 2, 1, 1] == [e.handler_events for e in block.episodes]
        assert [True, False, False, False] == [e.handler_resolved for e in block.episodes]
        assert [7, 7] == clean.notify_to_signal_ns
        assert 1 == block.stray_events

    def test_oom_control_parse(self) -> None:
        """The three lines of memory.oom_control."""
        assert OomControl(True, False, 3) == OomControl.parse("oom_kill_disable 1\nunder_oom 0\noom_kill 3\n")


class TestSandbox:
    def test_each_version_has_its_scratch_group(self) -> None:
        """Each cgroup version has its scratch group, and the machine's is its hierarchy's."""
        assert (V1ScratchGroup, V2ScratchGroup) == (scratch_kind(1), scratch_kind(2))
        assert memory_hierarchy().version == scratch_kind().version

    def test_the_hard_limit_that_puts_the_wall(self) -> None:
        """v1: the wall is the hard limit; v2: memory.max is the gap above the wall (memory.high)."""
        assert (64 * MIB, 80 * MIB) == (V1ScratchGroup.backstop(64 * MIB, 16 * MIB),
                                        V2ScratchGroup.backstop(64 * MIB, 16 * MIB))

    def test_a_child_owns_its_pidfd_until_reaped(self) -> None:
        """A child polls readable through its pidfd once it has exited; reaping closes the pidfd."""
        popen = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        child = Child.adopt(popen.pid, popen)
        try:
            assert (False, []) == (child.exited(), select.select([child], [], [], 0)[0])
            assert popen.stdin is not None
            popen.stdin.close()
            assert child.pidfd.exited(30)
            assert [child] == select.select([child], [], [], 0)[0]
            assert child.wait(30) and 0 == child.exit_code
            assert child.pidfd.closed
            with pytest.raises(ValueError):
                child.fileno()
            child.kill()  # reaped: nothing to signal
        finally:
            child.kill()
            child.wait(30)


class _Registry:
    """The part of a Lab that HandlerProcess.start uses: it registers each child."""

    def __init__(self) -> None:
        self.children: list[Child] = []

    def adopt(self, pid: int, popen: subprocess.Popen[Any] | None = None) -> Child:
        self.children.append(Child.adopt(pid, popen))
        return self.children[-1]


class TestHandlerProcess:
    def test_stderr_is_copied_by_this_process_and_never_blocks_the_handler(
            self, tmp_path: os.PathLike[str]) -> None:
        """A handler's stderr is a pipe (not a file, whose pages its group would be charged) that
        this process copies to the file: a handler that writes more than a pipe holds is never
        blocked, and the file holds it all once the handler is closed."""
        script = ("import os, stat, sys\n"
                  "sys.stderr.write('x' * 200000 + '\\nlast line\\n')\n"
                  "sys.stderr.flush()\n"
                  "print(stat.S_ISFIFO(os.fstat(2).st_mode), flush=True)\n"
                  "sys.stdin.read()\n")
        path = os.path.join(tmp_path, "stderr")
        handler = HandlerProcess.start(_Registry(), [sys.executable, "-c", script],  # type: ignore[arg-type]
                                       stderr_path=path, events_path=None)
        try:
            assert handler.popen.stdout is not None
            fd = handler.popen.stdout.fileno()
            said = b""
            while not said.endswith(b"\n"):
                assert [fd] == select.select([fd], [], [], 30)[0], "the handler is blocked on its stderr"
                said += os.read(fd, 100)
            assert b"True\n" == said
        finally:
            handler.close()
        with open(path) as file:
            text = file.read()
        assert (200000, "last line") == (text.count("x"), text.splitlines()[-1])
        assert "last line" == handler.tail_text().splitlines()[-1].strip()


@pytest.fixture
def bench_groups() -> Iterator[Callable[[], list[str]]]:
    """Lists the benchmark's groups below the own memcg; after the test, removes any left and fails."""
    own = own_memcg()

    def listing() -> list[str]:
        return sorted(os.path.join(own, name) for name in os.listdir(own) if name.startswith(GROUP_PREFIX))

    before = set(listing())
    yield listing
    left = sorted(set(listing()) - before)
    for path in left:
        destroy_group(path, below=own)
    assert [] == left, "the benchmark left groups behind (now removed)"


def run_bench(tmp_path: os.PathLike[str], *args: str, timeout: float,
              exit_codes: tuple[int, ...] = (0,)) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """Run ``python -m useroom.bench deadlock *args`` to completion; return it and its --json figures.

    Fails unless it exits with one of ``exit_codes`` (0: every block ran as planned).
    """
    figures = os.path.join(tmp_path, "figures.json")
    done = subprocess.run(BENCH + [*args, "--json", figures], capture_output=True, text=True, timeout=timeout,
                          check=False)
    assert done.returncode in exit_codes, f"{done.stdout}\n{done.stderr}"
    with open(figures) as file:
        return done, json.load(file)


def _table_rows(output: str) -> list[str]:
    """The rows of the printed table: the lines between its header rule and the next blank line."""
    lines = output.splitlines()
    start = next(number for number, line in enumerate(lines) if line.startswith("variant ")) + 2
    end = lines.index("", start)
    return lines[start:end]


def _stuck_group(bench: subprocess.Popen[str]) -> str:
    """The group of the episode a --verbose benchmark announced, once it is under OOM."""
    assert bench.stderr is not None
    for line in bench.stderr:  # other lines may come first (a group of a killed run removed)
        if "episode starting in " in line:
            break
    else:
        raise AssertionError("the benchmark ended without starting an episode")
    group = line.rsplit(" ", 1)[1].strip()
    efd = _register_oom_eventfd(group)
    try:
        assert [efd] == select.select([efd], [], [], 30)[0], "no OOM within 30 s"
    finally:
        os.close(efd)
    return group


def _register_oom_eventfd(group: str) -> int:
    """An eventfd that becomes readable when *group* is (or already was) under OOM."""
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    ofd = os.open(os.path.join(group, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
    try:
        control = os.open(os.path.join(group, "cgroup.event_control"), os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(control, f"{efd} {ofd}".encode())
        finally:
            os.close(control)
    finally:
        os.close(ofd)
    return efd


@pytest.mark.kernel
class TestDeadlockRun:
    def test_short_run_reports_figures_and_cleans_up(self, bench_groups: Callable[[], list[str]],
                                                     tmp_path: os.PathLike[str]) -> None:
        """Kernel episodes resolve with one kernel kill per worker; the no-handler episode is a rescued
        deadlock; the naive one is counted either way; the table has every row and no group is left."""
        done, data = run_bench(tmp_path, "--variants", "kernel", "naive", "no-handler", "--episodes", "5",
                               "--naive-episodes", "1", "--deadlock-after", "3", timeout=100)
        summary = data["summary"]
        kernel, naive, no_handler = summary["kernel"], summary["naive"], summary["no-handler"]
        assert (5, 5, 0, 20) == (kernel["episodes"], kernel["resolved"], kernel["deadlocks"], kernel["kernel_kills"])
        assert 0 < kernel["median_ns"] <= kernel["p99_ns"] < 3e9
        assert 1.0 == kernel["ratio"]
        assert (1, 1, 1) == (naive["episodes"], naive["resolved"] + naive["deadlocks"], naive["naive"]["reports"])
        assert (1, 1, 0) == (no_handler["episodes"], no_handler["deadlocks"], no_handler["kernel_kills"])
        episodes = [episode for block in data["blocks"] for episode in block["episodes"]]
        assert 7 == len(episodes)
        # Every worker of every episode ended by SIGKILL: from the OOM handling or from the rescue.
        assert [[signal.SIGKILL] * 4] * 7 == [episode["worker_signals"] for episode in episodes]
        [stuck] = [episode for episode in episodes if episode["variant"] == "no-handler"]
        assert (True, 0, None) == (stuck["rescued"], stuck["gone_before_rescue"], stuck["end_ns"])
        assert stuck["window_end_ns"] - stuck["start_ns"] >= 3e9
        assert ["kernel", "naive", "no-handler"] == [row.split()[0] for row in _table_rows(done.stdout)]
        assert [] == data["problems"]
        assert [] == bench_groups()

    @pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
    def test_signal_while_stuck_rescues_everything(self, bench_groups: Callable[[], list[str]],
                                                   signum: signal.Signals) -> None:
        """A signal while the workers sleep in the OOM wait: the benchmark frees them, removes the group
        and exits with 128 + the signal, printing the (partial) table."""
        bench = subprocess.Popen(
            BENCH + ["--variants", "no-handler", "--episodes", "1", "--deadlock-after", "100", "--verbose"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            group = _stuck_group(bench)
            with open(os.path.join(group, "memory.oom_control")) as file:
                assert OomControl.parse(file.read()).under_oom
            with open(os.path.join(group, "cgroup.procs")) as file:
                stuck = [int(pid) for pid in file.read().split()]
            assert 4 == len(stuck)
            bench.send_signal(signum)
            out, err = bench.communicate(timeout=60)
        finally:
            if bench.poll() is None:
                bench.kill()
                bench.communicate()
        assert 128 + signum == bench.returncode, err
        assert "interrupted by signal" in out
        assert not os.path.exists(group)
        assert [] == [pid for pid in stuck if os.path.exists(f"/proc/{pid}")]
        assert [] == bench_groups()

    def test_sigkill_leaves_no_task_stuck_and_the_next_run_removes_the_group(
        self, bench_groups: Callable[[], list[str]]
    ) -> None:
        """SIGKILL (no finally runs) while the workers sleep in the OOM wait: they die with the benchmark
        (parent-death signal), and the next run removes the group the killed one left."""
        bench = subprocess.Popen(
            BENCH + ["--variants", "no-handler", "--episodes", "1", "--deadlock-after", "100", "--verbose"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        pidfds: list[int] = []
        try:
            group = _stuck_group(bench)
            with open(os.path.join(group, "cgroup.procs")) as file:
                pidfds = [os.pidfd_open(int(pid)) for pid in file.read().split()]
            assert 4 == len(pidfds)
            bench.kill()
            bench.communicate(timeout=30)
            for pidfd in pidfds:
                assert [pidfd] == select.select([pidfd], [], [], 30)[0], "a worker outlived the benchmark"
        finally:
            for pidfd in pidfds:
                os.close(pidfd)
            if bench.poll() is None:
                bench.kill()
                bench.communicate()
        assert [group] == bench_groups()
        done = subprocess.run(BENCH + ["--variants", "kernel", "--episodes", "1"], capture_output=True, text=True,
                              timeout=60, check=False)
        assert 0 == done.returncode, done.stderr
        assert f"removed {group}, left by an earlier run" in done.stderr
        assert [] == bench_groups()


@pytest.mark.kernel
class TestHardCase:
    """The product's claim, on the real kernel: a handler inside the group that is
    out of memory, with the kernel OOM killer disabled, resolves every episode."""

    @pytest.mark.timeout(600)
    def test_no_deadlock_in_50_episodes_per_variant(self, bench_groups: Callable[[], list[str]],
                                                   tmp_path: os.PathLike[str]) -> None:
        """50 episodes each of the standalone and the in-process in-group handler: 0 deadlocks,
        every worker gone, and events with timings recorded for the episodes."""
        done, data = run_bench(tmp_path, "--variants", "useroom-standalone", "useroom-inprocess",
                               "--episodes", "50", timeout=560)
        for variant in ("useroom-standalone", "useroom-inprocess"):
            row = data["summary"][variant]
            assert (50, 50, 0, 0) == (row["episodes"], row["resolved"], row["deadlocks"], row["stalled"]), variant
            assert row["handler_events"] >= 50, variant
            assert row["notify_to_signal_p50_ns"] is not None, variant
            assert 0 < row["locked_bytes"] <= 4 << 20, variant
        episodes = [episode for block in data["blocks"] for episode in block["episodes"]]
        assert 100 == len(episodes)
        assert all(not episode["rescued"] for episode in episodes)
        assert [] == data["problems"]
        assert [] == bench_groups()


@pytest.mark.cgroup2
@pytest.mark.timeout(900)
def test_v2_mode(bench_groups: Callable[[], list[str]], tmp_path: os.PathLike[str]) -> None:
    """On cgroup v2 (the guest) the same table for the kernel and both useroom handlers: no
    deadlock, every episode resolved, most of the handlers' episodes resolved by them; the
    report says v2 and emulated; the v1-only variants are refused with the reason."""
    done, data = run_bench(tmp_path, "--episodes", "5", timeout=800, exit_codes=(0, 1))
    assert 2 == data["machine"]["cgroup_version"]
    assert "cgroup v2 memcg" in done.stdout and "EMULATED" in done.stdout
    # Known, open: on v2 the in-process handler does not yet find workers
    # started since its last refresh at the wall, and the kernel's backstop
    # at memory.max sometimes takes the service itself (measured in 2 of 3
    # runs in the guest, with and without the hooks work). Its block then
    # ends early: never with a deadlock or a stall, and nothing else may go wrong.
    problems = [(b["variant"], b["problem"]) for b in data["blocks"] if b["problem"]]
    inprocess_died = bool(problems)
    assert all(v == "useroom-inprocess" and p.startswith("the handler exited during the block")
               for v, p in problems), problems
    assert [] == data["problems"]
    assert done.returncode == int(inprocess_died)
    for variant in ("kernel", "useroom-standalone", "useroom-inprocess"):
        row = data["summary"][variant]
        assert (0, 0) == (row["deadlocks"], row["stalled"]), variant
        if variant != "useroom-inprocess" or not inprocess_died:
            assert (5, 5) == (row["episodes"], row["resolved"]), variant
    assert data["summary"]["kernel"]["kernel_kills"] >= 5
    for variant in ("useroom-standalone",) + (() if inprocess_died else ("useroom-inprocess",)):
        # Most by the handler at the wall; now and then the workers cross the
        # gap to memory.max first and the kernel's backstop takes one (1 in
        # 30 episodes when measured): v2's model, not a failure.
        row = data["summary"][variant]
        assert row["handler_resolved"] >= 3 and row["handler_events"] >= 5, variant
    assert [] == bench_groups()
    refused = subprocess.run(BENCH + ["--variants", "naive"], capture_output=True, text=True, timeout=60,
                             check=False)
    assert 2 == refused.returncode and "needs cgroup v1" in refused.stderr


@pytest.mark.kernel
@pytest.mark.timeout(120)
def test_watchdog_benchmark_prints_each_scenario(tmp_path) -> None:
    """One run per scenario: every faulty handler's episode is taken over; the baseline
    without a watchdog stays stuck (and is rescued)."""
    run = subprocess.run([sys.executable, "-m", "useroom.bench", "watchdog", "--runs", "1", "--delay", "0.3",
                          "--stuck-after", "0.5", "--json", str(tmp_path / "raw.json")],
                         capture_output=True, text=True, timeout=100)
    assert 0 == run.returncode, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("scenario")
    raw = json.loads((tmp_path / "raw.json").read_text())
    by = {r["scenario"]: r for r in raw}
    assert "handler-stopped" == by["stopped"]["takeover"]["reason"]
    assert "handler-exited" == by["killed"]["takeover"]["reason"]
    assert "delay" == by["delay"]["takeover"]["reason"]
    assert by["delay"]["takeover"]["acted_ns"] - by["delay"]["takeover"]["notified_ns"] >= 0.3e9
    assert True is by["baseline"]["stuck"]
    assert "baseline: stopped, no watchdog" in run.stdout
