"""The scale benchmark: its figures from made-up runs, and short runs on the real kernel.

The short runs check what the benchmark must show whatever the machine's
speed: every OOM resolved by the handler, no deadlock, no kernel kill, the
threads and processes each variant is meant to cost, and nothing left
behind. They never check a time. The supervisor's run needs
``useroom.Supervisor`` and is skipped, saying so, where useroom lacks it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import useroom
from useroom.bench import _scale, _scale_host
from useroom.bench._sandbox import V1ScratchGroup, V2ScratchGroup, own_memcg
from useroom.bench._scale_report import KIB, MIB, ScaleConfig, below_goal, render, summarize

BENCH = [sys.executable, "-m", "useroom.bench", "scale"]
GROUP_PREFIX = "useroom-bench."
#: A short run: 1 and 3 groups, 1 s idle, one round of 1 OOM and one of 3 at once.
SHORT = ["--groups", "1,3", "--baseline-max", "3", "--idle-seconds", "1", "--ooming", "3", "--oom-rounds", "1"]
needs_supervisor = pytest.mark.skipif(not hasattr(useroom, "Supervisor"),
                                      reason="useroom.Supervisor is not in this useroom yet")


def footprint(rss_mib: float, locked_kib: int, threads: int, children: list[int], dog_rss_mib: float = 0,
              dog_locked_kib: int = 0) -> dict[str, Any]:
    return {"rss_kb": int(rss_mib * 1024), "locked_kb": locked_kib, "threads": threads, "children": children,
            "watchdog_rss_kb": int(dog_rss_mib * 1024), "watchdog_locked_kb": dog_locked_kib, "watchdogs_gone": 0}


def oom(index: int, verdict: str = "resolved", latency_us: int | None = 10, kernel_kills: int = 0) -> dict[str, Any]:
    return {"index": index, "hog": 1000 + index, "listed": True, "verdict": verdict, "killed_by": 9,
            "exit_code": None, "by_handler": verdict == "resolved", "kernel_kills": kernel_kills,
            "latency_ns": None if latency_us is None else latency_us * 1000, "events": []}


def made_up_run(**changes: Any) -> dict[str, Any]:
    """Two groups on the baseline: 10 MiB more in the host and 2 watchdogs of 20 MiB each."""
    raw = {
        "variant": "baseline", "groups": 2, "problems": [], "watchdogs": [11, 12], "kill_disabled": 2,
        "first_ns": 300_000_000, "rest_ns": 100_000_000,
        "before": footprint(25, 0, 1, []),
        "after_first": footprint(33, 2048, 3, [11], 20, 1024),
        "after": footprint(35, 3072, 5, [11, 12], 40, 2048),
        "idle": {"seconds": 2.0, "wakeups": 16, "tasks": 6},
        "rounds": [
            {"scenario": "one", "at_once": 1, "groups": [oom(0, latency_us=8)]},
            {"scenario": "many", "at_once": 2, "groups": [oom(0, latency_us=20), oom(1, latency_us=30)]},
        ],
        "stop_ns": 20_000_000, "handler_errors": [],
    }
    return raw | changes


class TestSummarize:
    def test_memory_is_the_host_and_its_watchdogs_over_the_groups(self) -> None:
        """(host + watchdogs) after minus before, over N; marginal: from after the first start, over N - 1."""
        row = summarize(made_up_run())
        assert (10 + 40) * MIB / 2 == row["rss_per_group"]
        assert (3072 + 2048) * KIB / 2 == row["locked_per_group"]
        assert (5 * MIB, 20 * MIB) == (row["host_rss_per_group"], row["watchdog_rss_per_group"])
        assert (2 + 20) * MIB == row["marginal_rss_per_group"]
        assert (1024 + 1024) * KIB == row["marginal_locked_per_group"]

    def test_one_group_has_no_marginal_cost(self) -> None:
        """With a single group there is nothing after the first start."""
        raw = made_up_run(groups=1, after=made_up_run()["after_first"])
        assert (None, None) == (summarize(raw)["marginal_rss_per_group"], summarize(raw)["marginal_locked_per_group"])

    def test_counts_of_threads_processes_and_wakeups(self) -> None:
        """Threads and children gained by the host; wake-ups over the window, and per second."""
        row = summarize(made_up_run())
        assert (4, 2, 2) == (row["threads_added"], row["processes_started"], row["watchdogs"])
        assert (16, 8.0) == (row["idle_wakeups"], row["idle_wakeups_per_s"])
        assert (400_000_000, 200_000_000) == (row["start_ns"], row["start_per_group_ns"])

    def test_latency_is_taken_per_scenario(self) -> None:
        """1 OOM and many at once are separate samples; an OOM without a signal adds none."""
        raw = made_up_run()
        raw["rounds"][1]["groups"].append(oom(1, latency_us=None))
        row = summarize(raw)
        assert (1, 1, 8000, 8000) == (row["one_at_once"], row["one_samples"], row["one_p50_ns"], row["one_p99_ns"])
        assert (2, 2, 20_000, 30_000) == (row["many_at_once"], row["many_samples"], row["many_p50_ns"],
                                          row["many_p99_ns"])

    def test_a_deadlock_or_an_unresolved_oom_is_not_all_resolved(self) -> None:
        """Verdicts are counted; one that is not 'resolved' makes all_resolved false, and kernel kills add up."""
        raw = made_up_run()
        assert summarize(raw)["all_resolved"] is True
        raw["rounds"][1]["groups"] = [oom(0, "deadlock", None), oom(1, "unresolved", None, kernel_kills=1)]
        row = summarize(raw)
        assert (3, 1, 1, 1, 1, False) == (row["ooms"], row["resolved"], row["deadlocks"], row["unresolved"],
                                          row["kernel_kills"], row["all_resolved"])

    def test_a_run_that_never_started_has_no_figures(self) -> None:
        """A host that failed before its start leaves None, not zeros, and no OOM: not all resolved."""
        row = summarize({"variant": "supervisor", "groups": 3, "rounds": [], "problems": ["it failed"]})
        assert (None, None, None, 0, False) == (row["rss_per_group"], row["threads_added"], row["idle_wakeups"],
                                               row["ooms"], row["all_resolved"])


class TestGoals:
    def test_the_supervisor_goals(self) -> None:
        """Each goal a row misses is named with its figure; a row at every goal's edge misses none."""
        bad = summarize(made_up_run())
        assert ["RSS per added group", "locked per added group", "threads added", "processes started",
                "idle wake-ups"] == [line.split(":")[0] for line in below_goal(bad)]
        edge = bad | {"marginal_rss_per_group": 64 * KIB, "marginal_locked_per_group": 16 * KIB, "threads_added": 3,
                      "processes_started": 1, "idle_wakeups": 0}
        assert [] == below_goal(edge)
        assert ["deadlocks", "OOMs resolved"] == [line.split(":")[0] for line in
                                                  below_goal(edge | {"deadlocks": 1, "all_resolved": False})]


class TestOptions:
    def test_a_hog_that_fits_is_refused_before_any_group(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--hog-size at or below --limit would make no OOM: a usage error."""
        with pytest.raises(SystemExit) as exit_info:
            _scale.main(["--limit", "16M", "--hog-size", "16M"])
        assert 2 == exit_info.value.code
        assert "--hog-size must exceed --limit" in capsys.readouterr().err

    @pytest.mark.parametrize("text", ["0", "1,x", ""])
    def test_group_counts_are_positive_integers(self, text: str, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit) as exit_info:
            _scale.main(["--groups", text])
        assert 2 == exit_info.value.code
        assert "group counts" in capsys.readouterr().err

    def test_the_supervisor_asked_for_where_there_is_none(self, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
        """Asking for the supervisor without useroom.Supervisor says so and exits 2."""
        monkeypatch.setattr(_scale, "supervisor_available", lambda: False)
        assert 2 == _scale.main(["--variants", "supervisor"])
        assert "no useroom.Supervisor" in capsys.readouterr().err

    def test_the_baseline_stops_at_baseline_max_and_scenarios_at_ooming(self) -> None:
        config = ScaleConfig(groups=(1, 10, 100), baseline_max=10, ooming=50)
        assert (["supervisor", "baseline"], ["supervisor"]) == (config.variants_for(10), config.variants_for(100))
        assert ([1, 1], [1, 50]) == (config.scenarios(1), config.scenarios(100))


class _FakeSupervisor:
    """Records how the host drives useroom.Supervisor's API."""

    def __init__(self, **options: Any) -> None:
        self.options = options
        self.calls: list[str] = []
        self.watchdog = None

    def add(self, group: str, policy: Any) -> Any:
        self.calls.append(f"add {group}")
        return type("FakeHandler", (), {"errors": [], "group": group})()

    def start(self) -> None:
        self.calls.append("start")
        self.watchdog = type("FakeLink", (), {"pid": 4242})()

    def stop(self) -> None:
        self.calls.append("stop")


class TestSupervisorWiring:
    def test_the_first_group_starts_it_and_the_rest_join_it_running(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """One Supervisor with the delay and a watchdog; started after the first add; its one watchdog reported."""
        monkeypatch.setattr(useroom, "Supervisor", _FakeSupervisor, raising=False)
        served = _scale_host._Supervised(1.5)
        for group in ("a", "b", "c"):
            served.add(group)  # type: ignore[arg-type]
        served.stop()
        fake = served.supervisor
        assert {"delay": 1.5, "watchdog": True} == fake.options
        assert ["add a", "start", "add b", "add c", "stop"] == fake.calls
        assert (["a", "b", "c"], [4242]) == ([h.group for h in served.handlers], served.watchdogs())


class TestRender:
    def test_one_line_per_run(self) -> None:
        """A header line, a rule, then one line per run with its counts."""
        rows = [summarize(made_up_run()), summarize(made_up_run(variant="supervisor"))]
        lines = render(rows, "title").splitlines()
        header = next(i for i, line in enumerate(lines) if line.startswith("groups "))
        assert ["baseline", "supervisor"] == [lines[header + 2 + i].split()[1] for i in range(2)]
        assert "3/3" in lines[header + 2]


# -- on the real kernel -------------------------------------------------------------

def _bench_groups() -> list[str]:
    own = own_memcg()
    return sorted(os.path.join(own, name) for name in os.listdir(own) if name.startswith(GROUP_PREFIX))


def _leftovers(bench_pid: int, mark: str) -> list[str]:
    """Live processes of a run: its host and watchdogs (their command lines name its groups), its hogs
    (forked from the benchmark: its command line, with *mark*)."""
    marks = (f"{GROUP_PREFIX}{bench_pid}.".encode(), mark.encode())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdecimal():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as file:
                cmdline = file.read()  # empty for a zombie: it holds nothing
        except OSError:
            continue
        if any(mark in cmdline for mark in marks):
            found.append(entry + ": " + cmdline.replace(b"\0", b" ").decode(errors="replace"))
    return found


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    """Fails the test if a run left a group below the own memcg."""
    before = set(_bench_groups())
    yield
    assert [] == sorted(set(_bench_groups()) - before), "the benchmark left groups behind"


def _run(variant: str, figures: Path) -> tuple[dict[str, Any], str, int]:
    bench = subprocess.Popen(BENCH + SHORT + ["--variants", variant, "--json", str(figures)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = bench.communicate(timeout=400)
    assert 0 == bench.returncode, f"{out}\n{err}"
    assert [] == _leftovers(bench.pid, str(figures))
    data: dict[str, Any] = json.loads(figures.read_text())
    assert ([], None) == (data["problems"], data["interrupted"])
    return data, out, bench.pid


def _check_ooms(row: dict[str, Any]) -> None:
    """1 + min(3, N) OOMs, every one resolved by the handler's kill, no kernel kill, a latency each."""
    expected = 1 + min(3, row["groups"])
    assert (expected, expected, 0, 0) == (row["ooms"], row["resolved"], row["deadlocks"], row["unresolved"])
    assert (expected, 0, 0) == (row["by_handler"], row["kernel_kills"], row["not_listed"])
    assert expected == row["one_samples"] + row["many_samples"]
    assert row["all_resolved"] is True


@pytest.mark.kernel
@pytest.mark.timeout(600)
def test_a_short_run_of_the_baseline(no_leftovers: None, tmp_path: Path) -> None:
    """One Handler per group: two threads and a watchdog process each, every OOM resolved, the table printed."""
    data, out, _ = _run("baseline", tmp_path / "scale.json")
    rows = data["rows"]
    assert [(1, "baseline"), (3, "baseline")] == [(row["groups"], row["variant"]) for row in rows]
    for row in rows:
        n = row["groups"]
        assert (3 * n, n, n, n) == (row["threads_added"], row["processes_started"], row["watchdogs"],
                                    row["kill_disabled"])
        assert row["rss_per_group"] > 0 and row["locked_per_group"] > 0
        assert row["idle_wakeups"] is not None and row["idle_seconds"] >= 1
        _check_ooms(row)
    for raw in data["raw"]:
        # Every task counted: the host's threads but its main thread, and each watchdog's.
        assert raw["idle"]["tasks"] >= 3 * raw["groups"] and [] == raw["idle"]["tasks_changed"]
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("groups "))
    assert [["1", "baseline"], ["3", "baseline"]] == [line.split()[:2] for line in lines[header + 2:header + 4]]


@needs_supervisor
@pytest.mark.kernel
@pytest.mark.timeout(600)
def test_a_short_run_of_the_supervisor(no_leftovers: None, tmp_path: Path) -> None:
    """One Supervisor for every group: two threads and one watchdog process whatever N, no wake-up at idle,
    every OOM resolved."""
    data, _, _ = _run("supervisor", tmp_path / "scale.json")
    rows = data["rows"]
    assert [(1, "supervisor"), (3, "supervisor")] == [(row["groups"], row["variant"]) for row in rows]
    for row in rows:
        assert (3, 1, 1, row["groups"]) == (row["threads_added"], row["processes_started"], row["watchdogs"],
                                            row["kill_disabled"])
        assert 0 == row["idle_wakeups"]
        _check_ooms(row)


@pytest.mark.kernel
@pytest.mark.timeout(120)
def test_an_interrupted_run_leaves_nothing(no_leftovers: None, tmp_path: Path) -> None:
    """SIGINT in the idle window: every process and group is gone, and the output says so."""
    figures = tmp_path / "scale.json"
    bench = subprocess.Popen(BENCH + ["--variants", "baseline", "--groups", "2", "--idle-seconds", "60",
                                      "--json", str(figures)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert bench.stderr is not None
        for line in bench.stderr:
            if "idle for" in line:
                break
        else:
            raise AssertionError("the benchmark ended before its idle window")
        bench.send_signal(signal.SIGINT)
        out, _ = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert 128 + signal.SIGINT == bench.returncode
    assert "interrupted by SIGINT" in out
    assert [] == _leftovers(bench.pid, str(figures))
    assert signal.SIGINT == json.loads(figures.read_text())["interrupted"]


class TestV2Limit:
    def test_the_wall_is_the_limit_on_either_version(self) -> None:
        """v1 groups get the limit itself; v2 groups get V2_GAP more in memory.max, so the handler's
        memory.high (memory.max - V2_GAP) is the limit."""
        from useroom.handler import V2_GAP

        assert (16 * MIB, 16 * MIB + V2_GAP) == (V1ScratchGroup.backstop(16 * MIB, V2_GAP),
                                                 V2ScratchGroup.backstop(16 * MIB, V2_GAP))


@pytest.mark.cgroup2
@pytest.mark.timeout(900)
def test_a_short_run_on_cgroup_v2(no_leftovers: None, tmp_path: Path) -> None:
    """On cgroup v2 (the guest): each handler holds memory.high as its wall, every OOM is resolved by its
    kill with no deadlock and no kernel kill, and nothing is left behind."""
    figures = tmp_path / "scale.json"
    variants = "supervisor,baseline" if hasattr(useroom, "Supervisor") else "baseline"
    bench = subprocess.Popen(BENCH + ["--groups", "1,2", "--baseline-max", "2", "--idle-seconds", "1", "--ooming",
                                      "2", "--oom-rounds", "1", "--variants", variants, "--json", str(figures)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = bench.communicate(timeout=800)
    assert 0 == bench.returncode, f"{out}\n{err}"
    assert [] == _leftovers(bench.pid, str(figures))
    data: dict[str, Any] = json.loads(figures.read_text())
    assert ([], None) == (data["problems"], data["interrupted"])
    assert "cgroup v2" in out
    rows = data["rows"]
    assert {(n, v) for n in (1, 2) for v in variants.split(",")} == {(row["groups"], row["variant"]) for row in rows}
    for row in rows:
        n = row["groups"]
        assert n == row["kill_disabled"], "every group's memory.high set by its handler"
        expected = 1 + n
        assert (expected, expected, 0, 0) == (row["ooms"], row["resolved"], row["deadlocks"], row["unresolved"])
        # Not "not_listed": v2 has no usage thresholds to refresh the victim table as a hog
        # warms up; the handler finds it at the OOM, as a task new since the last refresh.
        assert (expected, 0) == (row["by_handler"], row["kernel_kills"])
        assert row["all_resolved"] is True
        assert 0 == row["idle_wakeups"], "nothing wakes at idle (the watchdog's memory.events watch neither)"
