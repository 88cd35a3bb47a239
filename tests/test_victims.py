"""The victim table: what it reads of each task, and when it asks psutil."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import psutil
import pytest

from useroom import Group
from useroom._victims import VictimTable, _StatusFields

STATUS = (b"Name:\tstress-ng vm\nUmask:\t0022\nState:\tR (running)\nTgid:\t7\nUid:\t1000\t1000\t1000\t1000\n"
          b"Gid:\t1000\t1000\t1000\t1000\nVmPeak:\t  210000 kB\nVmRSS:\t   65536 kB\nRssAnon:\t   65000 kB\n")

# A child that grows on "g" and renames itself (its comm) on "n", answering each with a line.
CHILD = """
import ctypes, sys
prctl = ctypes.CDLL(None).prctl
held = []
for line in sys.stdin:
    if line.startswith("g"):
        held.append(bytearray(32 << 20))
    elif line.startswith("n"):
        prctl(15, ctypes.c_char_p(b"renamed"), 0, 0, 0)  # PR_SET_NAME
    print("ok", flush=True)
"""


class TestStatusFields:
    def test_the_name_the_size_and_the_real_uid(self) -> None:
        assert _StatusFields(b"stress-ng vm", 64 << 20, 1000) == _StatusFields.parse(STATUS)

    def test_a_zombie_or_an_exited_task_has_none(self) -> None:
        """A zombie's status has no VmRSS; the file of an exited task reads empty."""
        zombie = STATUS.replace(b"VmRSS:\t   65536 kB\n", b"")
        assert None is _StatusFields.parse(zombie)
        assert None is _StatusFields.parse(b"")

    def test_a_garbled_number_is_none(self) -> None:
        assert None is _StatusFields.parse(STATUS.replace(b"65536", b"lots"))

    def test_this_process(self) -> None:
        """Against psutil's view of the same process, on the real /proc."""
        with open("/proc/self/status", "rb") as file:
            fields = _StatusFields.parse(file.read())
        me = psutil.Process()
        assert fields is not None
        assert (os.getuid(), me.name()[:15].encode()) == (fields.uid, fields.comm)
        assert abs(fields.rss - me.memory_info().rss) < 8 << 20


@pytest.fixture
def child(scratch_group: Group) -> Iterator[subprocess.Popen[str]]:
    with subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True) as proc:
        try:
            scratch_group.attach(proc.pid)
            yield proc
        finally:
            proc.kill()


def _ask(proc: subprocess.Popen[str], what: str) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(what + "\n")
    proc.stdin.flush()
    assert "ok\n" == proc.stdout.readline()


@pytest.mark.backends
class TestRefresh:
    def test_a_known_task_is_measured_again_without_psutil(self, scratch_group: Group,
                                                           child: subprocess.Popen[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
        """The second refresh reads the size from the status file opened with the pidfd:
        it sees the growth, and psutil is not asked."""
        table = VictimTable(scratch_group)
        try:
            first, = table.refresh()
            pidfd = table.pidfd(first.pid)
            asked: list[int] = []
            real = psutil.Process
            monkeypatch.setattr(psutil, "Process", lambda pid: asked.append(pid) or real(pid))
            _ask(child, "g")
            second, = table.refresh()
            assert [] == asked
            assert (first.pid, first.name, first.create_time) == (second.pid, second.name, second.create_time)
            assert second.rss >= first.rss + (30 << 20)
            assert pidfd is not None and table.pidfd(second.pid) is pidfd
        finally:
            table.close()

    def test_an_adjustment_set_after_the_first_refresh_is_seen(self, scratch_group: Group,
                                                               child: subprocess.Popen[str]) -> None:
        """oom_score_adj is read through the file opened with the pidfd, at every refresh."""
        table = VictimTable(scratch_group)
        try:
            first, = table.refresh()
            with open(f"/proc/{child.pid}/oom_score_adj", "w") as file:
                file.write("500")
            second, = table.refresh()
            assert (0, 500) == (first.oom_score_adj, second.oom_score_adj)
            pidfd = table.pidfd(second.pid)
            assert pidfd is not None and pidfd.adj is not None
        finally:
            table.close()

    def test_a_renamed_task_is_asked_again(self, scratch_group: Group, child: subprocess.Popen[str]) -> None:
        """A new comm (exec, PR_SET_NAME) means a new name: psutil is asked for it."""
        table = VictimTable(scratch_group)
        try:
            first, = table.refresh()
            _ask(child, "n")
            second, = table.refresh()
            assert ("renamed", first.create_time) == (second.name, second.create_time) != (first.name, 0.0)
        finally:
            table.close()

    def test_a_task_that_exits_leaves_the_table(self, scratch_group: Group, child: subprocess.Popen[str]) -> None:
        table = VictimTable(scratch_group)
        try:
            assert [child.pid] == [v.pid for v in table.refresh()]
            child.kill()
            child.wait()
            deadline = time.monotonic() + 5
            while table.refresh() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert () == table.victims
        finally:
            table.close()
