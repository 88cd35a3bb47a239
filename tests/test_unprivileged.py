"""Unprivileged operation, proven as a real ordinary user on the real kernel.

Root only sets up what an administrator would (the user, a venv it can run,
a group chowned to it: see ``unpriv.py`` and the ``unpriv_env`` and
``user_group`` fixtures); everything under test runs as that user, with no
capability: the integration suite (handler, hooks, watcher, watchdog, examples,
the cgroup layer), the hard case of the deadlock benchmark, and the refusals.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from typing import Any

import pytest

from useroom import Group
from unpriv import USER_MEMLOCK, UserEnv

pytestmark = [pytest.mark.kernel]

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: The integration suite run as the user: every test of these files but the root-only ones.
#: test_watchdog.py: the watchdog runs in the user's own group, outside the handled one, and takes
#: over from stopped, killed and stuck handlers with no privilege.
SUITE = ("tests/test_handler.py", "tests/test_hooks.py", "tests/test_watcher_kernel.py", "tests/test_examples.py",
         "tests/test_cgroup_v1.py", "tests/test_watchdog.py")
#: Tests that switch to other uids themselves (run_as), which only root can do.
ROOT_ONLY = ("tests/test_cgroup_v1.py::TestPermissions", "tests/test_cgroup_v1.py::TestRemove::test_force_refuses_caller")
MIB = 1 << 20


def _json_run(env: UserEnv, code: str, group: str, *args: str, timeout: float = 60.0) -> Any:
    """Run *code* as the user in *group*; it prints one JSON value last."""
    done = env.python_run(code, group, *args, timeout=timeout)
    assert 0 == done.returncode, f"exit {done.returncode}\nstdout: {done.stdout}\nstderr: {done.stderr}"
    return json.loads(done.stdout.strip().splitlines()[-1])


_WHO = """
import json, os
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
memory = [l.split(":", 2)[2].strip() for l in open("/proc/self/cgroup") if l.split(":")[1] == "memory"][0]
print(json.dumps({"ids": [os.getresuid(), os.getresgid()], "groups": os.getgroups(), "memory": memory,
                  "caps": {k: int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}}))
"""


class TestTheUser:
    def test_an_ordinary_user_without_capabilities_in_its_group(self, unpriv_env: UserEnv, user_group: str,
                                                                own_group: Group) -> None:
        """Commands run with the user's uids and gids, no supplementary group, no capability at all,
        in the delegated group, which the user owns while its parent stays root's."""
        user = unpriv_env.user
        who = _json_run(unpriv_env, _WHO, user_group)
        assert [[user.uid] * 3, [user.gid] * 3] == who["ids"]
        assert [] == who["groups"]
        assert {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": 0, "CapAmb": 0} == who["caps"]
        assert own_group.relpath + "/" + os.path.basename(user_group) == who["memory"]
        assert (user.uid, 0) == (os.stat(user_group).st_uid, os.stat(own_group.path).st_uid)


class TestSuiteAsTheUser:
    @pytest.mark.timeout(300)
    def test_integration_suite_passes_as_the_user(self, unpriv_env: UserEnv, user_group: str,
                                                  tmp_path: pathlib.Path) -> None:
        """The handler, hooks, watcher, examples and cgroup-layer tests all pass as the user in its
        delegated group: every test collected here runs there, none fails, none is skipped."""
        deselect = [arg for node in ROOT_ONLY for arg in ("--deselect", node)]
        collected = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *SUITE, *deselect],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        )
        match = re.search(r"(\d+)(?:/\d+)? tests? collected", collected.stdout)
        assert match, collected.stdout + collected.stderr
        expected = int(match[1])
        run = os.path.join(unpriv_env.project, f"run-{os.path.basename(user_group)}")
        junit = run + ".xml"
        # --basetemp: the user's temporary files go with the project copy, not to /tmp/pytest-of-<user>.
        done = unpriv_env.run([unpriv_env.python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               f"--basetemp={run}", f"--junitxml={junit}", *SUITE, *deselect], user_group,
                              timeout=280)
        assert 0 == done.returncode, done.stdout[-6000:] + done.stderr[-3000:]
        suite = ElementTree.parse(junit).getroot().find("testsuite")
        assert suite is not None
        counts = {key: int(suite.get(key, "0")) for key in ("tests", "failures", "errors", "skipped")}
        assert {"tests": expected, "failures": 0, "errors": 0, "skipped": 0} == counts


class TestHardCaseAsTheUser:
    @pytest.mark.timeout(240)
    def test_no_deadlock_and_the_locked_set_fits(self, unpriv_env: UserEnv, user_group: str) -> None:
        """The hard case as the user (handler inside the group, kernel killer off): every episode of
        both in-group handlers ends without rescue, none deadlocks, the handlers recorded events for
        them (the criteria of the root run, TestHardCase), and what a handler locked is within the
        default RLIMIT_MEMLOCK and at most 4 MiB; the table prints it."""
        figures = os.path.join(unpriv_env.project, f"hard-{os.path.basename(user_group)}.json")
        episodes = 30
        done = unpriv_env.run(
            [unpriv_env.python, "-m", "useroom.bench", "deadlock", "--variants", "useroom-standalone",
             "useroom-inprocess", "--episodes", str(episodes), "--json", figures], user_group, timeout=220)
        assert 0 == done.returncode, done.stdout + done.stderr
        with open(figures) as file:
            data = json.load(file)
        machine = data["machine"]
        assert (unpriv_env.user.uid, False, False) == (machine["uid"], machine["cap_ipc_lock"],
                                                       machine["cap_sys_resource"])
        assert USER_MEMLOCK == machine["memlock_limit"]
        for variant in ("useroom-standalone", "useroom-inprocess"):
            row = data["summary"][variant]
            assert (episodes, episodes, 0, 0) == (row["episodes"], row["resolved"], row["deadlocks"],
                                                  row["stalled"]), variant
            assert row["handler_events"] >= episodes, variant
            assert 0 < row["locked_bytes"] <= min(4 * MIB, machine["memlock_limit"]), variant
        assert [] == data["problems"]
        assert [] == [e for block in data["blocks"] for e in block["episodes"] if e["rescued"]]
        locked = max(data["summary"][v]["locked_bytes"] for v in ("useroom-standalone", "useroom-inprocess"))
        assert f"memory locked by a handler: {locked} bytes" in done.stdout
        assert [] == [name for name in os.listdir(user_group) if name.startswith("useroom-bench.")]


_REFUSAL = """
import errno, json, sys, useroom
def refusal(call):
    try:
        call()
    except useroom.UseroomError as err:
        print(json.dumps({"type": type(err).__name__, "errno": err.errno, "text": str(err),
                          "rule": err.rule, "advice": err.advice,
                          "permission_error": isinstance(err, PermissionError)}))
    else:
        print(json.dumps(None))
"""


class TestRefusals:
    """What the kernel refuses an ordinary user: each error says what, by which rule, and what to grant."""

    def test_attach_another_users_process(self, unpriv_env: UserEnv, user_group: str) -> None:
        """Into its own group, with cgroup.procs its own, the user still cannot move root's process:
        v1's uid rule, and the advice says delegation cannot grant it."""
        sleeper = subprocess.Popen(["sleep", "60"])
        try:
            error = _json_run(unpriv_env, _REFUSAL + "refusal(lambda: useroom.Group.current().attach(int(sys.argv[1])))",
                              user_group, str(sleeper.pid))
            with open(f"/proc/{sleeper.pid}/cgroup") as file:
                membership = file.read()
        finally:
            sleeper.kill()
            sleeper.wait()
        assert ("CgroupPermissionError", 13, True) == (error["type"], error["errno"], error["permission_error"])
        assert f"cannot attach pid {sleeper.pid} (uid 0 (root))" in error["text"]
        assert f"euid {unpriv_env.user.uid}" in error["text"]
        assert "real or saved uid equals its effective uid" in error["rule"]
        assert "have root attach it" in error["advice"]
        assert os.path.basename(user_group) not in membership

    def test_write_a_group_it_does_not_own(self, unpriv_env: UserEnv, user_group: str,
                                           scratch_group: Group) -> None:
        """Root's group, beside the user's: setting its limit or making a child in it is refused, naming
        the file, its owner, the rule and the chown that would delegate it; nothing changes."""
        code = _REFUSAL + ("group = useroom.Group.open(sys.argv[1])\n"
                           "refusal(lambda: group.set_limit('1G'))\nrefusal(lambda: group.create_child('mine'))\n")
        done = unpriv_env.python_run(code, user_group, scratch_group.path)
        assert 0 == done.returncode, done.stderr
        limit, child = (json.loads(line) for line in done.stdout.strip().splitlines())
        assert ("CgroupPermissionError", 13) == (limit["type"], limit["errno"])
        assert f"cannot set the limit of {scratch_group.relpath} to 1GiB" in limit["text"]
        assert "owned by uid 0 (root), mode 0644" in limit["text"]
        assert "memory.limit_in_bytes" in limit["text"]
        assert "needs write permission" in limit["rule"]
        assert "chown" in limit["advice"]
        assert ("CgroupPermissionError", 13) == (child["type"], child["errno"])
        assert "parent group's directory" in child["rule"] and "chown" in child["advice"]
        assert (scratch_group.limit(), []) == (Group.open(scratch_group.path).limit(), scratch_group.children())
        assert not os.path.exists(os.path.join(scratch_group.path, "mine"))

    def test_lock_more_than_its_limit(self, unpriv_env: UserEnv, user_group: str) -> None:
        """A pool larger than RLIMIT_MEMLOCK: strict hardening raises MemoryLockError before locking
        anything, naming the limit, the rule and what an administrator could raise or grant; without
        strict, the pool is only prefaulted and the report says why; mlockall is refused likewise."""
        code = _REFUSAL + """
import resource
from useroom._hardening import vm_locked
refusal(lambda: useroom.lock_memory(pool="16M", strict=True))
locked_after_refusal = vm_locked()
report = useroom.lock_memory(pool="16M", mlockall=True)
print(json.dumps({"limit": resource.getrlimit(resource.RLIMIT_MEMLOCK)[0], "after_refusal": locked_after_refusal,
                  "pool": [report.pool.size, report.pool.locked], "mlockall": report.mlockall,
                  "notes": report.notes, "locked": report.locked_bytes}))
"""
        done = unpriv_env.python_run(code, user_group)
        assert 0 == done.returncode, done.stderr
        error, report = (json.loads(line) for line in done.stdout.strip().splitlines())
        limit = report["limit"]
        assert USER_MEMLOCK == limit
        assert ("MemoryLockError", True) == (error["type"], error["permission_error"])
        assert f"RLIMIT_MEMLOCK is {limit >> 20}MiB" in error["text"]
        assert "cannot lock" in error["text"] and "pymalloc arena pool" in error["text"]
        assert "RLIMIT_MEMLOCK" in error["rule"] and "CAP_IPC_LOCK" in error["rule"]
        assert "LimitMEMLOCK=" in error["advice"] and "grant CAP_IPC_LOCK" in error["advice"]
        assert 0 == report["after_refusal"]
        assert ([16 * MIB, 0], False) == (report["pool"], report["mlockall"])
        assert any(note.startswith("mlockall refused (ENOMEM)") and "LimitMEMLOCK=infinity" in note
                   for note in report["notes"])
        assert any("pool prefaulted but not locked" in note and "LimitMEMLOCK=" in note
                   for note in report["notes"])
        assert 0 < report["locked"] <= limit


#: As the user, in a group of root's: handle the delegated group's child ``app`` (64 MiB), through
#: the API or through ``useroom handle``, and overrun it once with a hog that joins it itself.
_BESIDE = r"""
import json, os, signal, subprocess, sys, useroom
mode, delegated, out = sys.argv[1], sys.argv[2], sys.argv[3]
app = useroom.Group.open(delegated).create_child("app")
app.set_limit("64M")
HOG = ('echo $$ > "$0" && exec "$1" -c "'
       'import time; b = [bytearray(1 << 20) for _ in range(256)]; time.sleep(60)"')
def overrun():
    hog = subprocess.Popen(["/bin/sh", "-c", HOG, os.path.join(app.path, "cgroup.procs"), sys.executable])
    return hog.pid, hog.wait(60)
where = lambda pid: useroom.Group.of_pid(pid).relpath
if mode == "api":
    with useroom.Handler(app) as handler:
        watchdog = where(handler.watchdog.pid)
        pid, code = overrun()
        handler.wait_for_events(1, 20)
        killed = [v.pid for e in handler.events for v in e.victims if v.result == 0]
else:
    with subprocess.Popen([sys.executable, "-m", "useroom", "handle", app.path, "-q", "--events-out", out],
                          stdout=subprocess.PIPE, text=True) as cli:
        ready = cli.stdout.readline()
        watchdog = where([int(c) for c in open(f"/proc/{cli.pid}/task/{cli.pid}/children").read().split()][0])
        pid, code = overrun()
        cli.send_signal(signal.SIGTERM)
        assert ready == "ready\n" and 0 == cli.wait(30), ready
    killed = [v["pid"] for e in json.load(open(out))["events"] for v in e["victims"] if v["result"] == 0]
app.remove()
print(json.dumps({"here": where(os.getpid()), "watchdog": watchdog, "pid": pid, "code": code, "killed": killed}))
"""


class TestBesideTheGroups:
    """The handler of a user's delegated group runs beside it, in a group of root's that the user cannot
    write (a login session's scope): it starts, and its watchdog stays where it was born."""

    @pytest.mark.timeout(120)
    @pytest.mark.parametrize("mode", ["api", "cli"])
    def test_handles_a_delegated_group_from_a_group_of_roots(self, unpriv_env: UserEnv, user_group: str,
                                                             scratch_group: Group, mode: str) -> None:
        """``Handler(Group.open("D/app"))`` and ``useroom handle D/app``, as the user in root's group:
        the overrun is resolved by killing the hog, and the watchdog runs in the handler's group."""
        out = os.path.join(unpriv_env.project, f"beside-{mode}-{os.path.basename(user_group)}.json")
        done = unpriv_env.run([unpriv_env.python, "-c", _BESIDE, mode, user_group, out], scratch_group.path,
                              timeout=100, root_owned=True)
        assert 0 == done.returncode, f"stdout: {done.stdout}\nstderr: {done.stderr}"
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert (scratch_group.relpath, scratch_group.relpath) == (result["here"], result["watchdog"])
        assert -9 == result["code"]
        assert result["pid"] in result["killed"]
        assert 0 == os.stat(scratch_group.path).st_uid
