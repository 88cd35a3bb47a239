"""Every example script, run for real."""

from __future__ import annotations

import pathlib
import signal
import subprocess
import sys

import pytest

from useroom import Group

pytestmark = [pytest.mark.kernel, pytest.mark.timeout(120)]

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


class TestExamples:
    def test_inprocess_service(self) -> None:
        """The service handles its workers' OOMs from inside its group and survives."""
        out = subprocess.run(
            [sys.executable, str(EXAMPLES / "inprocess_service.py"), "--workers", "3"],
            capture_output=True, text=True, timeout=100,
        )
        assert 0 == out.returncode, out.stderr
        assert "3 of 3 workers killed by the handler; the service is alive" in out.stdout
        import re

        assert 3 == len(re.findall(r": (resolved|superseded): SIGKILL", out.stdout))

    def test_job_runner(self) -> None:
        """One supervisor for eight jobs' groups: the greedy jobs are killed by
        their groups' handlers, the others finish, the runner lives."""
        out = subprocess.run(
            [sys.executable, str(EXAMPLES / "job_runner.py"), "--jobs", "8", "--greedy", "3"],
            capture_output=True, text=True, timeout=100,
        )
        assert 0 == out.returncode, out.stderr
        assert "8 jobs in 8 groups: 8 handlers, 1 watcher thread, 1 manager thread" in out.stdout
        assert 3 == out.stdout.count("killed by its handler")
        assert "3 of 8 jobs killed, 5 finished; the runner is alive" in out.stdout

    def test_standalone_handler(self, scratch_group: Group, spawn_hog) -> None:
        """The standalone handler, inside the group, kills the task that overran and reports it."""
        scratch_group.set_limit("64M")
        with subprocess.Popen(
            [sys.executable, str(EXAMPLES / "standalone_handler.py"), scratch_group.path, "--join"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ) as proc:
            self._drive_standalone(proc, scratch_group, spawn_hog)

    def _drive_standalone(self, proc: subprocess.Popen[str], scratch_group: Group, spawn_hog) -> None:
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith(f"handling {scratch_group.relpath}")
            assert proc.pid in scratch_group.procs()
            hog = spawn_hog(160, group=scratch_group)
            hog.start()
            assert -signal.SIGKILL == hog.wait(30)
            line = proc.stdout.readline()
            assert line.startswith("OOM 1: resolved in "), line
            assert f"SIGKILL {hog.pid}" in line
            proc.send_signal(signal.SIGTERM)
            assert 0 == proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def test_cache_service(self) -> None:
        """Under repeated OOMs the cache service keeps serving, its hook runs every
        episode and resolves it, and nothing is killed."""
        out = subprocess.run(
            [sys.executable, str(EXAMPLES / "cache_service.py"), "--seconds", "4"],
            capture_output=True, text=True, timeout=100,
        )
        assert 0 == out.returncode, out.stderr
        import re

        served = int(re.search(r"served (\d+) requests", out.stdout).group(1))
        episodes, by_hook, runs, killed = map(int, re.search(
            r"OOM episodes: (\d+); resolved by the hook: (\d+); hook runs: (\d+); tasks killed: (\d+)",
            out.stdout).groups())
        assert episodes >= 3, out.stdout
        assert (episodes, episodes, 0) == (by_hook, runs, killed)
        assert served > 1000
