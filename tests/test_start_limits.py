"""A start that runs out of fds or tasks says which limit, and leaves nothing behind.

Each class runs ``_start_limits_probe.py`` once in a process of its own, in
a fresh group (the limits are the process's, or its user's), which handles
``app`` below that group from outside it, with an ``on_oom`` hook (so every
thread a handler may start is started). The probe measures what a running
handler holds, then sweeps the soft limit upward from what the process
holds before any start, one start per value, up to the first that starts:
what start needs. Then it starts with 1, 2 and 4 times that.

- RLIMIT_NOFILE, as root (the limit applies to root too);
- RLIMIT_NPROC, as the test user: the kernel does not apply it to root.
  It counts the user's tasks, so the process runs in a group delegated to
  that user.

Every start below what start needs must raise a ResourceLimitError (an
OSError with the kernel's errno) naming the limit, its value and the
remedy, whatever step ran out; and after each failure or stop nothing may
be left: no fd, no thread, no child process (zombies included), and the
group's OOM killer setting and limit as they were.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import GROUP_PREFIX, destroy_group
from unpriv import DELEGATION_PREFIX, UserEnv, delegate
from useroom.cgroup import Group

pytestmark = [pytest.mark.kernel]

PROBE = pathlib.Path(__file__).resolve().parent / "_start_limits_probe.py"
#: What start needs may exceed what a running handler holds by the fds of
#: the watchdog's spawn (its standard error, the exec status pipe, the
#: socket's other end, /dev/null) and a file the manager reads meanwhile.
TRANSIENT_FDS = 8
_names = itertools.count()


def _report(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert 0 == done.returncode, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    # Dropped fds would warn on their way out: nothing may rely on that.
    assert "ResourceWarning" not in done.stderr, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@pytest.fixture(scope="class")
def nofile(own_group: Group) -> Iterator[dict[str, Any]]:
    """The probe's report for RLIMIT_NOFILE, run as root in a fresh group below ours."""
    path = os.path.join(own_group.path, f"{GROUP_PREFIX}{os.getpid()}-limits-{next(_names)}")
    os.mkdir(path)
    try:
        done = subprocess.run([sys.executable, "-W", "always::ResourceWarning", str(PROBE), "nofile", path],
                              capture_output=True, text=True, timeout=400, check=False,
                              stdin=subprocess.DEVNULL)
        yield _report(done)
    finally:
        destroy_group(path, below=own_group.path)


@pytest.fixture(scope="class")
def nproc(own_group: Group, unpriv_env: UserEnv) -> Iterator[dict[str, Any]]:
    """The probe's report for RLIMIT_NPROC, run as the test user in a group delegated to it."""
    name = f"{DELEGATION_PREFIX}{os.getpid()}-limits-{next(_names)}"
    path = os.path.join(own_group.path, name)
    try:
        delegate(own_group.path, name, unpriv_env.user)
        probe = os.path.join(unpriv_env.project, "tests", PROBE.name)
        done = unpriv_env.run([unpriv_env.python, "-W", "always::ResourceWarning", probe, "nproc", path], path,
                              timeout=400)
        yield _report(done)
    finally:
        if os.path.isdir(path):
            destroy_group(path, below=own_group.path)


def _failures(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [attempt for attempt in report["sweep"] if attempt["outcome"] != "started"]


def _check_sweep(report: dict[str, Any], limit: str, code: int, words: tuple[str, ...]) -> None:
    failures = _failures(report)
    assert failures, "the sweep began where start already succeeds: it tested nothing"
    assert [] == [f for f in failures if f["outcome"] != "ResourceLimitError"]
    assert [] == [f for f in failures if (f["limit"], f["errno"], f["value"]) != (limit, code, f["soft"])]
    assert [] == [f for f in failures if not (f["oserror"] and f["useroom"])]
    for failure in failures:
        message = failure["message"]
        assert f"at most {failure['soft']} " in message
        for word in words:
            assert word in message


def _check_started(report: dict[str, Any]) -> None:
    for start in [report["first"], *report["factors"]]:
        assert "started" == start["outcome"], start
        assert start["watchdog"], start


@pytest.mark.timeout(450)
class TestOpenFiles:
    def test_what_start_needs(self, nofile: dict[str, Any]) -> None:
        """Start needs at most a few fds more than a running handler holds (its highest fd + 1):
        those of the watchdog's spawn."""
        assert nofile["need"] is not None, nofile["sweep"][-1]
        assert nofile["running"] <= nofile["need"] <= nofile["running"] + TRANSIENT_FDS

    def test_each_shortage_is_a_typed_error(self, nofile: dict[str, Any]) -> None:
        """Below what start needs, every start fails with a ResourceLimitError (an OSError, errno
        EMFILE) naming RLIMIT_NOFILE, its value and how to raise it, whichever step ran out."""
        _check_sweep(nofile, "RLIMIT_NOFILE", errno.EMFILE, ("RLIMIT_NOFILE", "ulimit -n", "LimitNOFILE="))

    def test_a_failed_start_leaves_nothing(self, nofile: dict[str, Any]) -> None:
        """After each failed start: no fd, thread or child process left, and the group's OOM killer
        setting and limit as they were."""
        assert [] == [(f["soft"], f["left"]) for f in _failures(nofile) if f["left"]]

    def test_one_two_four_times_what_it_needs(self, nofile: dict[str, Any]) -> None:
        """With 1, 2 and 4 times what start needs, the handler starts with its watchdog, and its stop
        leaves nothing behind."""
        assert [1, 2, 4] == [f["soft"] // nofile["need"] for f in nofile["factors"]]
        _check_started(nofile)
        assert [] == [(f["soft"], f["left"]) for f in [nofile["first"], *nofile["factors"]] if f["left"]]


@pytest.mark.timeout(450)
class TestTasks:
    def test_what_start_needs(self, nproc: dict[str, Any]) -> None:
        """Start needs the tasks a running handler has: this process, the native watcher, the
        manager and the hook thread, the watchdog and the thread that hears it stop
        (RLIMIT_NPROC counts threads)."""
        assert nproc["need"] is not None, nproc["sweep"][-1]
        assert nproc["before"] + 5 == nproc["running"] == nproc["need"]

    def test_each_shortage_is_a_typed_error(self, nproc: dict[str, Any]) -> None:
        """Below what start needs, every start fails with a ResourceLimitError (an OSError, errno
        EAGAIN) naming RLIMIT_NPROC, its value and how to raise it, whether a thread or the watchdog
        process was refused."""
        _check_sweep(nproc, "RLIMIT_NPROC", errno.EAGAIN, ("RLIMIT_NPROC", "ulimit -u", "LimitNPROC="))
        refused = {f["message"].split(":")[0] for f in _failures(nproc)}
        assert {"cannot start the native watcher thread", "cannot start the hook thread",
                "cannot start the manager thread", "cannot start the watchdog process",
                "cannot start the watchdog's stop sentry thread"} == refused

    def test_a_failed_start_leaves_nothing(self, nproc: dict[str, Any]) -> None:
        """After each failed start: no fd, thread or child process left, and the group's OOM killer
        setting and limit as they were."""
        assert [] == [(f["soft"], f["left"]) for f in _failures(nproc) if f["left"]]

    def test_one_two_four_times_what_it_needs(self, nproc: dict[str, Any]) -> None:
        """With 1, 2 and 4 times what start needs, the handler starts with its watchdog, and its stop
        leaves nothing behind."""
        assert [1, 2, 4] == [f["soft"] // nproc["need"] for f in nproc["factors"]]
        _check_started(nproc)
        assert [] == [(f["soft"], f["left"]) for f in [nproc["first"], *nproc["factors"]] if f["left"]]
