"""``useroom doctor``: its probes, and its conclusions as root and as a real ordinary user,
with a delegated (chowned) group and with an undelegated one."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from helpers import run_as
from unpriv import USER_MEMLOCK, UserEnv
from useroom import Group
from useroom._doctor import (
    NEEDED_FILES,
    OOM_DELAY_FILE,
    OOM_HANDLER_FILE,
    OOM_RESERVE_FILE,
    group_access,
    probe_declared_handler,
)
from useroom._mounts import read_mounts

MIB = 1 << 20
V1_WRITES = sorted(name for name, (mode, _) in NEEDED_FILES[1].items() if mode == "w")


@pytest.fixture
def open_dir() -> Iterator[str]:
    """A directory every user can enter (pytest's tmp_path is root's only)."""
    path = tempfile.mkdtemp(prefix="useroom-doctor-", dir="/tmp")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _psi_2s_trigger_works() -> bool:
    """An independent probe: a 2 s window trigger on /proc/pressure/memory (allowed to everyone on 6.5+)."""
    try:
        fd = os.open("/proc/pressure/memory", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        os.write(fd, b"some 150000 2000000\0")
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _doctor(env: UserEnv | None, *args: str, group: str | None = None) -> tuple[int, Any]:
    """Run ``useroom doctor --json ARGS`` as root (env None) or as the user (in *group*, if given)."""
    if env is None:
        done = subprocess.run([sys.executable, "-m", "useroom", "doctor", "--json", *args], capture_output=True,
                              text=True, timeout=120, check=False)
    else:
        done = env.run([env.python, "-m", "useroom", "doctor", "--json", *args], group, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


class TestDeclaredHandlerProbe:
    def test_this_kernel_uses_the_shim(self, own_group: Group) -> None:
        """None of the proposed interfaces exists in this kernel's memory groups: the shim is used."""
        probe = probe_declared_handler(own_group.path)
        assert (own_group.path, False, False, False) == (probe.group, probe.delay, probe.reserve, probe.declare)
        assert ("shim", "shim", "shim") == (probe.path, probe.delay_path, probe.reserve_path)
        assert probe_declared_handler() == probe_declared_handler(Group.current().path)

    def test_a_kernel_with_the_interfaces_is_used(self, open_dir: str) -> None:
        """Each interface found is used where the kernel has it; the declared-handler path follows its file."""
        for name in (OOM_DELAY_FILE, OOM_RESERVE_FILE):
            open(os.path.join(open_dir, name), "w").close()
        probe = probe_declared_handler(open_dir)
        assert ("shim", "kernel", "kernel") == (probe.path, probe.delay_path, probe.reserve_path)
        open(os.path.join(open_dir, OOM_HANDLER_FILE), "w").close()
        assert "kernel" == probe_declared_handler(open_dir).path


class TestGroupAccess:
    def test_v2_delegation_by_hand(self, open_dir: str, unpriv_env: UserEnv) -> None:
        """On a v2-shaped directory, as the user: only the files chowned to the user count as writable;
        a group whose every needed file is the user's is delegated."""
        user = unpriv_env.user
        for name in NEEDED_FILES[2]:
            path = os.path.join(open_dir, name)
            open(path, "w").close()
            os.chmod(path, 0o644)
        os.chown(open_dir, user.uid, user.gid)
        for name in ("cgroup.procs", "cgroup.subtree_control"):  # what a hand delegation chowns
            os.chown(os.path.join(open_dir, name), user.uid, user.gid)
        access = run_as(user.uid, lambda: group_access(open_dir, "/user.slice/app", 2), gid=user.gid)
        assert (False, ("memory.max", "memory.high")) == (access.delegated, access.missing)
        for name in ("memory.max", "memory.high"):
            os.chown(os.path.join(open_dir, name), user.uid, user.gid)
        access = run_as(user.uid, lambda: group_access(open_dir, "/user.slice/app", 2), gid=user.gid)
        assert (True, (), user.uid) == (access.delegated, access.missing, access.owner)


@pytest.mark.kernel
class TestAsRoot:
    def test_root_is_told_to_ask_as_the_user(self, own_group: Group) -> None:
        """As root: the own group, every needed file usable, the locked set measured and fitting, the
        layout as mounted, the shim; the advice says the conclusions are root's."""
        status, found = _doctor(None)
        assert (0, True, 0) == (status, found["ready"], found["uid"])
        v2_mounted = any(mount.fstype == "cgroup2" for mount in read_mounts())
        assert (1, "hybrid" if v2_mounted else "v1") == (found["memory_version"], found["layout"])
        group = found["group"]
        assert (own_group.relpath, own_group.path, True, []) == (group["relpath"], group["path"],
                                                                 group["delegated"], group["missing"])
        memlock = found["memlock"]
        assert memlock["fits"] is True
        assert memlock["needed"] == memlock["locked"] == sum(size for size, _ in memlock["parts"].values())
        assert "shim" == found["declared_handler"]["path"]
        assert found["features"]["pidfd"]["available"] is True
        assert "you are root" in found["advice"][0]


@pytest.mark.kernel
class TestAsTheUser:
    def test_delegated_group(self, unpriv_env: UserEnv, user_group: str) -> None:
        """In a group chowned to the user: delegated, every needed file writable, the locked set fits
        the user's RLIMIT_MEMLOCK within 4 MiB, PSI triggers only with 2 s windows; ready, and the only
        advice is that upstream is retiring cgroup v1."""
        status, found = _doctor(unpriv_env, group=user_group)
        assert (0, True, unpriv_env.user.uid, unpriv_env.user.name) == (status, found["ready"], found["uid"],
                                                                         found["user"])
        group = found["group"]
        assert (user_group, True, True, [], unpriv_env.user.uid) == (
            group["path"], group["delegated"], group["can_create_children"], group["missing"], group["owner"])
        assert V1_WRITES == sorted(f["name"] for f in group["files"] if f["access"] == "w" and f["allowed"])
        memlock = found["memlock"]
        assert (True, USER_MEMLOCK) == (memlock["fits"], memlock["limit"])
        assert 0 < memlock["locked"] <= 4 * MIB
        psi = found["features"]["psi_triggers"]
        assert _psi_2s_trigger_works() == psi["available"]
        if psi["available"]:
            assert "windows must be a multiple of 2 s" in psi["detail"]
        # On this v1 host, the one piece of advice: upstream is retiring v1.
        [retiring] = found["advice"]
        assert "cgroup v1, which upstream is retiring" in retiring and "CONFIG_MEMCG_V1" in retiring

    def test_undelegated_current_group(self, unpriv_env: UserEnv, own_group: Group) -> None:
        """Left in root's group: not delegated, nothing writable, no child groups; the advice gives the
        administrator's mkdir and chown for a group of the user's and the rule for moving into it."""
        status, found = _doctor(unpriv_env, group=None)
        assert (1, False) == (status, found["ready"])
        group = found["group"]
        assert (own_group.relpath, False, False, 0) == (group["relpath"], group["delegated"],
                                                        group["can_create_children"], group["owner"])
        assert V1_WRITES == sorted(group["missing"])
        target = os.path.join(own_group.path, unpriv_env.user.name)
        [delegate] = [line for line in found["advice"] if line.startswith("ask an administrator")]
        assert f"mkdir {target} && chown -R {unpriv_env.user.name}: {target}" in delegate
        assert "you may move only your own processes" in delegate
        assert any(", ".join(V1_WRITES[:1]) in line and line.startswith("in ") for line in found["advice"])
        assert found["memlock"]["fits"] is True  # what is missing is the delegation only

    def test_human_readable_report(self, unpriv_env: UserEnv, user_group: str, own_group: Group) -> None:
        """Without --json: the group, its verdict, each file, the locked set and the advice, in words;
        asked about root's parent group, the user hears that it is not delegated."""
        done = unpriv_env.run([unpriv_env.python, "-m", "useroom", "doctor", own_group.path], user_group,
                              timeout=120)
        assert 1 == done.returncode, done.stderr
        text = done.stdout
        assert f"memory group: {own_group.relpath} ({own_group.path}), owner uid 0 (root): NOT delegated" in text
        assert "memory.oom_control: not writable (to turn the kernel OOM killer off" in text
        assert "useroom's locked set needs" in text and ": fits" in text
        assert "declared handler: shim" in text
        assert "conclusion: not ready" in text
        assert "ask an administrator to delegate a group to you" in text

    def test_a_group_that_does_not_exist(self, unpriv_env: UserEnv, user_group: str) -> None:
        """A missing group is reported, not a traceback."""
        status, found = _doctor(unpriv_env, os.path.join(user_group, "nope"), group=user_group)
        assert (1, None) == (status, found["group"])
        assert os.strerror(errno.ENOENT) in found["group_error"] or "no group" in found["group_error"]
