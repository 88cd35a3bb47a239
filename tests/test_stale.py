"""Refreshes that keep failing (the handler's process out of fds): the safe mode, on the kernel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import wait_until
from useroom import Group
from useroom.handler.stale import STALE_FAILURES, STALE_SECONDS, StaleTable

HERE = os.path.dirname(os.path.abspath(__file__))


class TestCounting:
    def test_enomem_never_counts(self) -> None:
        """ENOMEM (the group at its limit) is the design, not a stale table."""
        table = StaleTable()
        assert not any(table.failed(OSError(12, "no memory"), t) for t in range(10))
        assert not table.active

    def test_enough_failures_over_enough_time(self) -> None:
        """STALE_FAILURES failures in a row spanning STALE_SECONDS: the safe mode, once; one
        success ends it."""
        table = StaleTable()
        err = OSError(24, "too many open files")
        starts = [table.failed(err, i * STALE_SECONDS / 2) for i in range(STALE_FAILURES + 3)]
        assert 1 == sum(starts) and table.active
        assert starts.index(True) == max(STALE_FAILURES - 1, 2)
        assert table.succeeded() and not table.active and not table.succeeded()

    def test_a_success_resets_the_count(self) -> None:
        table = StaleTable()
        err = OSError(24, "too many open files")
        for _ in range(STALE_FAILURES - 1):
            table.failed(err, 0.0)
        table.succeeded()
        assert not table.failed(err, 100.0)


class Service:
    def __init__(self, group: Group) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "_stale_service.py"), group.path],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert "ready" == self.readline()

    def readline(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def ask(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.readline()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


@pytest.mark.kernel
@pytest.mark.timeout(90)
class TestSafeMode:
    def test_out_of_fds_the_kernel_picks_then_the_handler_again(self, scratch_group: Group, spawn_hog) -> None:
        """The handler's process runs out of fds: its refreshes fail, and after a while it turns the
        kernel's killer on and arms a plan without the table's victims. A 100 MiB task that appears
        then is killed (by the kernel: the handler could pin it no more), the small bystander the
        table knew lives. Fds back, the next refresh ends the safe mode: the killer is off again."""
        group = scratch_group
        group.set_limit("64M")
        bystander = spawn_hog(8, group=group)
        bystander.start()
        assert bystander.wait_touched(10)
        service = Service(group)
        try:
            assert wait_until(lambda: group.oom_control().kill_disabled, 5)
            time.sleep(0.3)  # refreshes see the bystander
            assert "exhausted" == service.ask("exhaust")
            assert wait_until(lambda: not group.oom_control().kill_disabled, STALE_SECONDS + 5)
            assert "StaleTableError" in json.loads(service.ask("errors"))
            culprit = spawn_hog(100, group=group)
            culprit.start()
            assert -signal.SIGKILL == culprit.wait(20)
            assert None is bystander.returncode
            assert "restored" == service.ask("restore")
            assert wait_until(lambda: group.oom_control().kill_disabled, 5)
            report = json.loads(service.ask("stop"))
        finally:
            service.close()
        assert bystander.pid not in [v["pid"] for e in report["events"] for v in e["victims"]]
        assert None is bystander.returncode
