"""The storm benchmark: a respawning storm under the kernel OOM killer and
under a useroom handler inside the group, each victim judged against badness
snapshots that the benchmark takes from outside the group.

The judging is tested on made-up snapshots; the probe on a real process in a
real group; the benchmark itself by short runs on this machine's backend (v1
on the host, v2 in the guest). The agreement goal is not asserted: the run
must produce the figure from real snapshots, whatever it is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from helpers import Hog
from useroom.cgroup import Group
from useroom.bench._sandbox import Lab, own_memcg
from useroom.bench import _storm_driver
from useroom.bench._badness import PAGE, BadnessProbe, Kill, Snapshot, growth_rate, judge, vanished
from useroom.bench._storm_report import StormConfig, merge, schedule

MIB = 1 << 20
BENCH = [sys.executable, "-m", "useroom.bench", "storm"]
GROUP_PREFIX = "useroom-bench."
GUEST = bool(os.environ.get("VMRUN_GUEST"))


def snap(start_ms: float, *tasks: tuple[int, int | None], adj: dict[int, int] | None = None) -> Snapshot:
    """A snapshot taken over 0.1 ms from *start_ms*, of tasks (pid, points) with oom_score_adj 0 or *adj*."""
    start = int(start_ms * 1e6)
    return Snapshot(start, start + 100_000, False, tuple((pid, points, (adj or {}).get(pid, 0))
                                                         for pid, points in tasks))


def kill_at(ms: float, pid: int) -> Kill:
    return Kill(int(ms * 1e6), pid, "worker", "signal step")


class TestPages:
    """The workers' pages are chosen, not left to chance."""

    def test_stress_ng_is_told_its_advice(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(_storm_driver.shutil, "which", lambda name: "/usr/bin/" + name)
        argv = {pages: _storm_driver.driver_argv(StormConfig(driver="stress-ng", pages=pages))
                for pages in _storm_driver.PAGES}
        assert ["--vm-madvise", "nohugepage"] == argv["small"][argv["small"].index("--vm-madvise"):][:2]
        assert ["--vm-madvise", "hugepage"] == argv["huge"][argv["huge"].index("--vm-madvise"):][:2]
        assert "--vm-madvise" not in argv["any"]  # stress-ng's own random advice
        assert "small" == _storm_driver.driver_argv(StormConfig())[-1]

    @pytest.mark.backends
    @pytest.mark.parametrize("pages", ["small", "huge"])
    def test_the_python_workers_get_the_pages_asked_for(self, pages: str) -> None:
        """Huge: the worker's memory is in 2 MiB pages (AnonHugePages); small: none is."""
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as file:
            if "[never]" in file.read():
                pytest.skip("transparent huge pages are off on this machine")
        driver = subprocess.Popen([sys.executable, "-I", "-S", _storm_driver.SCRIPT, "supervise", "1", str(16 * MIB),
                                   pages])
        try:
            huge = None
            deadline = time.monotonic() + 30
            while huge is None and time.monotonic() < deadline:
                time.sleep(0.05)
                for child in psutil.Process(driver.pid).children():
                    if child.memory_info().rss >= 16 * MIB:
                        with open(f"/proc/{child.pid}/smaps_rollup") as file:
                            huge = next(int(line.split()[1]) for line in file if line.startswith("AnonHugePages:"))
            assert huge is not None, "the worker did not touch its memory"
            assert (huge > 0) == (pages == "huge"), huge
        finally:
            driver.kill()
            driver.wait()


class TestJudge:
    def test_the_task_with_the_highest_badness_is_the_match(self) -> None:
        """The victim is judged against the latest snapshot that ended before its signal."""
        snapshots = [snap(0, (1, 100), (2, 300), (3, 200)), snap(5, (1, 100), (2, 300), (3, 400))]
        [verdict] = judge([kill_at(5.2, 3)], snapshots, max_age_ns=50_000_000)
        assert (True, 3, 400, 400) == (verdict["match"], verdict["pick"], verdict["pick_pages"],
                                       verdict["victim_pages"])
        assert 100_000 == verdict["age_ns"]

    def test_another_victim_is_a_mismatch(self) -> None:
        """Killing a smaller task is a mismatch that names the kernel's pick."""
        [verdict] = judge([kill_at(1, 1)], [snap(0, (1, 100), (2, 300))], max_age_ns=50_000_000)
        assert (False, 2, 300, 100) == (verdict["match"], verdict["pick"], verdict["pick_pages"],
                                        verdict["victim_pages"])

    def test_a_snapshot_from_before_the_previous_kill_does_not_measure(self) -> None:
        """Two kills with no snapshot between them: the second is not measured, never counted a match."""
        snapshots = [snap(0, (1, 100), (2, 300), (3, 200))]
        first, second = judge([kill_at(1, 2), kill_at(2, 3)], snapshots, max_age_ns=50_000_000)
        assert (True, None) == (first["match"], first["reason"])
        assert (None, "no snapshot since the previous kill") == (second["match"], second["reason"])

    def test_a_tie_goes_to_the_task_listed_later(self) -> None:
        """As in the kernel's scan, equal points go to the later task."""
        [early, late] = [judge([kill_at(1, pid)], [snap(0, (1, 300), (2, 300))], 50_000_000)[0] for pid in (1, 2)]
        assert (False, 2) == (early["match"], early["pick"])
        assert (True, 2) == (late["match"], late["pick"])

    def test_a_victim_the_snapshot_cannot_judge_is_not_measured(self) -> None:
        """Absent from the snapshot, or listed without memory (exiting): not measured."""
        snapshots = [snap(0, (1, 100), (2, None))]
        absent, exiting = judge([kill_at(1, 9)], snapshots, 50_000_000)[0], judge([kill_at(1, 2)], snapshots,
                                                                                   50_000_000)[0]
        assert (None, "victim not in the snapshot") == (absent["match"], absent["reason"])
        assert (None, "victim not in the snapshot") == (exiting["match"], exiting["reason"])

    def test_an_old_snapshot_does_not_measure(self) -> None:
        """A snapshot older than max_age before the kill is stale."""
        [verdict] = judge([kill_at(60, 1)], [snap(0, (1, 100))], max_age_ns=50_000_000)
        assert (None, "stale snapshot") == (verdict["match"], verdict["reason"])

    def test_no_snapshot_at_all(self) -> None:
        """A kill before the first snapshot is not measured."""
        [verdict] = judge([kill_at(1, 1)], [snap(5, (1, 100))], max_age_ns=50_000_000)
        assert "no snapshot since the previous kill" == verdict["reason"]

    def test_an_earlier_victim_that_still_holds_more_memory_outranks_the_next(self) -> None:
        """The kernel would choose a task still exiting with the most memory, and wait for it: killing
        another then is a mismatch, if that task still held more than the victim after the kill."""
        snapshots = [snap(0, (1, 500), (2, 300)), snap(2, (1, 500), (2, 300)), snap(4, (1, 450), (2, 300))]
        _, second = judge([kill_at(1, 1), kill_at(3, 2)], snapshots, max_age_ns=50_000_000)
        assert (False, 1, True) == (second["match"], second["beaten_by"], second["beaten_by_earlier_victim"])

    def test_an_earlier_victim_whose_memory_may_be_gone_is_too_close_to_call(self) -> None:
        """Gone from the first snapshot after the kill, it may have let go of its memory before the kill."""
        snapshots = [snap(0, (1, 500), (2, 300)), snap(2, (1, 500), (2, 300)), snap(4, (2, 300))]
        _, second = judge([kill_at(1, 1), kill_at(3, 2)], snapshots, max_age_ns=50_000_000)
        assert (None, "too close to call") == (second["match"], second["reason"])

    def test_an_earlier_victim_without_memory_is_no_candidate(self) -> None:
        """Listed without memory (its mm gone), the kernel skips it: the next largest is the match."""
        snapshots = [snap(0, (1, 500), (2, 300)), snap(2, (1, None), (2, 300), (3, 100))]
        _, second = judge([kill_at(1, 1), kill_at(3, 2)], snapshots, max_age_ns=50_000_000)
        assert (True, 2) == (second["match"], second["pick"])

    def test_a_lead_that_growth_could_undo_is_too_close_to_call(self) -> None:
        """At 10 pages/ms, 2 ms after the snapshot began: a lead of 15 pages is too close, 25 is not."""
        rate = 10 / 1e6
        for lead, expected in ((15, (None, "too close to call")), (25, (True, None))):
            [verdict] = judge([kill_at(2, 2)], [snap(0, (1, 100), (2, 100 + lead))], 50_000_000, rate)
            assert expected == (verdict["match"], verdict["reason"]), lead
            assert 20 == pytest.approx(verdict["margin_pages"])
        # The same for a mismatch: the victim might have overtaken the pick, or not.
        for gap, expected in ((15, (None, "too close to call")), (25, (False, None))):
            [verdict] = judge([kill_at(2, 1)], [snap(0, (1, 100), (2, 100 + gap))], 50_000_000, rate)
            assert expected == (verdict["match"], verdict["reason"]), gap

    def test_growth_rate_is_a_percentile_of_the_tasks_growth(self) -> None:
        """Per task, between consecutive snapshots that list it with points; a shrinking or new task adds nothing."""
        snapshots = [snap(0, (1, 100), (2, 500)), snap(1, (1, 200), (2, 400), (3, 900)), snap(3, (1, 300), (3, 950))]
        # Growth: task 1 by 100 pages in 1 ms, then 100 in 2 ms; task 3 by 50 in 2 ms.
        assert 100 / 1e6 == growth_rate(snapshots, 1.0)
        assert 25 / 1e6 == growth_rate(snapshots, 0.1)
        assert 0.0 == growth_rate(snapshots[:1])
        # A changed oom_score_adj moves the points, not the memory.
        adjusted = [snap(0, (1, 100)), snap(1, (1, 16_000), adj={1: 1000}), snap(2, (1, 16_010), adj={1: 1000})]
        assert 10 / 1e6 == growth_rate(adjusted, 1.0)


class TestVanished:
    def test_tasks_that_stop_being_candidates_are_the_victims(self) -> None:
        """A task with points in one snapshot and gone (or without memory) in the next is a victim,
        timed at the start of the first snapshot without it."""
        snapshots = [snap(0, (1, 100), (2, 300)), snap(5, (1, 100), (2, None), (3, 10)), snap(10, (1, 100), (3, 20))]
        assert [Kill(5_000_000, 2, "w2", "vanished")] == vanished(snapshots, {2: "w2"})

    def test_what_vanishes_across_a_restart_is_not_a_victim(self) -> None:
        """The benchmark's own restart of the driver kills tasks: those are left out."""
        snapshots = [snap(0, (1, 100), (2, 300)), snap(5, (4, 100)), snap(10, (5, 10))]
        kills = vanished(snapshots, {}, [(1_000_000, 4_000_000)])
        assert [4] == [kill.pid for kill in kills]


class TestRounds:
    def test_the_variants_alternate_in_abba_order(self) -> None:
        """A load that drifts during the run falls alike on both variants."""
        assert ["kernel", "useroom", "useroom", "kernel", "kernel", "useroom"] == schedule(("kernel", "useroom"), 3)

    def test_rounds_add_up_and_a_lost_record_makes_the_handler_figures_unknown(self) -> None:
        """Counts and times add; one round without the handler's record (it died) makes the kills unknown."""
        def round_(kills: int, record: dict[str, Any] | None) -> dict[str, Any]:
            return {"mode": "useroom", "seconds": 2.0, "sampled_s": 2.5, "kernel_kills": kills, "ooms": 3, "snapshots": 10,
                    "snapshot_us_mean": 100.0, "sampling_cpu_share": 0.05, "growth_pages_per_ms": 1.0,
                    "supervisor_deaths": [], "verdicts": [], "roles": {}, "left_after_kill": [],
                    "handler_alive": record is not None, "handler_rss_kb": 1000, "usage_before_storm": 5,
                    "handler": record}
        record = {"events": [{"victims": []}], "errors": []}
        both = merge([round_(1, record), round_(2, record)])
        assert (4.0, 3, 6, 2, True) == (both["seconds"], both["kernel_kills"], both["ooms"],
                                        len(both["handler"]["events"]), both["handler_alive"])
        lost = merge([round_(1, record), round_(0, None)])
        assert (None, False) == (lost["handler"], lost["handler_alive"])


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab.below_own_memcg() as lab:
        yield lab
    assert [] == lab.problems


@pytest.mark.backends
class TestProbe:
    """The probe reads what the kernel's oom_badness reads, from a real process in a real group."""

    def test_points_follow_the_memory_and_the_scaled_adjustment(self, lab: Lab,
                                                                spawn_hog: Callable[..., Hog]) -> None:
        """Touching 32 MiB adds 32 MiB of pages (and their page tables); oom_score_adj adds
        adj * (limit pages // 1000), as the kernel scales it. (-1000, which makes a task no
        candidate, needs CAP_SYS_RESOURCE, which these machines' root lacks.)"""
        limit = 256 * MIB
        group = lab.create_group("probe", limit=limit, kill_disable=False)
        hog = spawn_hog(32, group=Group.open(group.path))
        probe = BadnessProbe(group.path, limit)
        try:
            [(pid, before, _)] = probe.take().tasks
            hog.start()
            assert hog.wait_touched(60)
            [(_, after, _)] = probe.take().tasks
            assert before is not None and after is not None
            pages = 32 * MIB // PAGE
            assert pid == hog.pid
            assert pages <= after - before <= pages * 1.02
            with open(f"/proc/{hog.pid}/oom_score_adj", "w") as adj:
                adj.write("500")
            [(_, adjusted, adj)] = probe.take().tasks
            assert adjusted is not None
            assert 500 * (limit // PAGE // 1000) == adjusted - after and 500 == adj
        finally:
            probe.close()

    def test_a_spared_process_and_its_children_are_not_listed(self, lab: Lab,
                                                              spawn_hog: Callable[..., Hog]) -> None:
        """The handler is spared, and so is a process it starts (its watchdog, inside the group on v2)."""
        group = lab.create_group("probe-spare", limit=256 * MIB, kill_disable=False)
        other = spawn_hog(0, group=Group.open(group.path))
        # A parent that forks a child inside the group when told, says its pid, and ends both on EOF.
        parent = subprocess.Popen([sys.executable, "-c", _FORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        lab.adopt(parent.pid, parent)
        assert parent.stdin is not None and parent.stdout is not None
        assert b"ready\n" == parent.stdout.readline()
        group.attach(parent.pid)
        parent.stdin.write(b"fork\n")
        parent.stdin.flush()
        child = int(parent.stdout.readline())
        probe = BadnessProbe(group.path, 256 * MIB, spare=[parent.pid])
        try:
            assert {parent.pid, child, other.pid} == set(group.procs())
            assert [other.pid] == [pid for pid, _, _ in probe.take().tasks]
        finally:
            probe.close()
            parent.stdin.close()
            assert 0 == parent.wait(30)
            parent.stdout.close()


_FORKER = """\
import os, signal, sys
sys.stdout.buffer.write(b"ready\\n"); sys.stdout.flush()
sys.stdin.readline()
child = os.fork()
if child == 0:
    signal.pause()
    os._exit(0)
sys.stdout.buffer.write(b"%d\\n" % child); sys.stdout.flush()
sys.stdin.read()
os.kill(child, signal.SIGKILL)
os.waitpid(child, 0)
"""


def _bench_groups() -> list[str]:
    own = own_memcg()
    return sorted(os.path.join(own, name) for name in os.listdir(own) if name.startswith(GROUP_PREFIX))


def _storm_processes(bench_pid: int) -> list[str]:
    """Live processes of a storm run: its handler, its supervisor, a watchdog of its groups."""
    marks = (b"_storm_handler", b"bench/_storm_driver.py", f"{GROUP_PREFIX}{bench_pid}.".encode())
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
    """Fails the test if a storm run left a group below the own memcg."""
    before = set(_bench_groups())
    yield
    assert [] == sorted(set(_bench_groups()) - before), "the benchmark left groups behind"


@pytest.mark.backends
@pytest.mark.timeout(600)
def test_a_short_storm_in_both_variants(no_leftovers: None, tmp_path: Any) -> None:
    """Kills happen in both variants, the handler survives, the table is printed with both rows, the
    victims are judged against real snapshots (the kernel's own victims too), and nothing is left."""
    seconds = "8" if GUEST else "5"  # two rounds each, from each round's first OOM
    figures = tmp_path / "storm.json"
    bench = subprocess.Popen(BENCH + ["--seconds", seconds, "--json", str(figures)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    out, err = bench.communicate(timeout=500)
    assert 0 == bench.returncode, f"{out}\n{err}"
    assert [] == _storm_processes(bench.pid)
    data = json.loads(figures.read_text())
    assert ([], None) == (data["problems"], data["interrupted"])
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant "))
    assert ["kernel", "useroom"] == [line.split()[0] for line in lines[header + 1:header + 3]]
    kernel, useroom = data["rows"]
    assert kernel["kernel_kills"] > 0
    assert useroom["handler_kills"] > 0 and useroom["handler_alive"] is True
    assert 0 < useroom["kills_per_s"] and useroom["rate_ratio"] is not None
    for row in (useroom, kernel):
        rounds = data["raw"][row["variant"]]
        assert 2 == row["rounds"] == len(rounds)
        verdicts = [v for r in rounds for v in r["verdicts"]]
        measured = [v for v in verdicts if v["match"] is not None]
        assert row["measured"] == len(measured) > 0, row["variant"]
        assert row["matches"] == sum(v["match"] for v in measured)
        assert row["agreement_pct"] == pytest.approx(100.0 * row["matches"] / row["measured"])
        assert row["victims"] == len(verdicts) == row["measured"] + sum(row["unmeasured"].values())
        for verdict in measured:
            # Judged from a snapshot taken before the kill that lists the victim as a candidate.
            assert verdict["age_ns"] >= 0
            listed = {pid: points for pid, points, _ in verdict["snapshot"]}
            assert verdict["victim_pages"] == listed[verdict["pid"]] is not None
            assert verdict["match"] == (verdict["pick"] == verdict["pid"])
    for r in data["raw"]["useroom"]:
        # The handler's victims are the handler's record, timed by the plan's signal steps.
        victims = [v for e in r["handler"]["events"] for v in e["victims"]]
        assert all(v["t_from"] == "signal step" for v in victims)
        # The handler (and its watchdog, on v2 in the group too) is never a candidate: it protects itself.
        spared = {r["handler"]["pid"], r["handler"]["watchdog_pid"]}
        assert all(not spared & {task[0] for task in v["snapshot"]} for v in r["verdicts"] if "snapshot" in v)
    assert useroom["handler_kills"] == sum(v["signal"] == "SIGKILL" and v["result"] == 0
                                           for r in data["raw"]["useroom"] for e in r["handler"]["events"]
                                           for v in e["victims"])


@pytest.mark.kernel
@pytest.mark.timeout(120)
def test_an_interrupted_storm_leaves_nothing(no_leftovers: None) -> None:
    """SIGINT while the handler's storm runs: every process and group is gone, and the output says so."""
    bench = subprocess.Popen(BENCH + ["--variants", "useroom", "--seconds", "30"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert bench.stderr is not None
        for line in bench.stderr:
            if line.startswith("  useroom: storm running in "):
                break
        else:
            raise AssertionError("the benchmark ended before its useroom storm started")
        bench.send_signal(signal.SIGINT)
        out, _ = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert 128 + signal.SIGINT == bench.returncode
    assert "interrupted by SIGINT" in out
    assert [] == _storm_processes(bench.pid)
