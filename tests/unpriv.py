"""A real ordinary user for the unprivileged tests, and a way to run commands as that user.

What root sets up (and always takes down), as an administrator would:

- :func:`ensure_user`: a system user without a home, created with
  ``useradd`` unless it exists already; :func:`remove_user` deletes it again
  only if this session created it.
- :func:`build_user_env`: a copy of the project (sources, tests, examples)
  and a virtual environment with useroom installed from that copy, both in a
  world-readable directory outside ``/root``: the interpreter that runs the
  test session may live where the user cannot read (a pyenv under a 0700
  home). The venv is built on a system interpreter the user can execute.
- :func:`delegate`: a group below the test session's own memcg, its
  directory and files chowned to the user: cgroup v1 delegation.

:meth:`UserEnv.run` then runs a command as the user with ``setpriv``: real,
effective and saved uid and gid of the user, no supplementary groups, no
capabilities (the kernel clears them when root changes uid, and the
inheritable and bounding sets are emptied too), and the default
RLIMIT_MEMLOCK of 8 MiB (set with ``prlimit``, so a CI container's own
limit does not matter). The command first moves
itself into the delegated group, which v1 allows because the process is the
user's own, so all it starts is charged there and the fixtures find (and
kill, by pid) whatever is left in that subtree. Nothing here is used by the
library: it never calls sudo, setpriv or anything privileged.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Final

#: The test user; it is reused if it exists (and then never removed).
USER_NAME: Final = "useroom-test"
#: Groups delegated by the fixtures are named ``<prefix><pid>-<n>``.
DELEGATION_PREFIX: Final = "useroom-unpriv-"
_COPY_IGNORE: Final = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "_core.c", ".pytest_cache",
    ".mypy_cache", ".hypothesis", "out",
)
#: Exit status of a user command that could not join its delegated group.
JOIN_FAILED: Final = 97
_SHELL_JOIN: Final = f'echo $$ > "$1/cgroup.procs" || exit {JOIN_FAILED}; shift; exec "$@"'
#: RLIMIT_MEMLOCK (soft and hard) of every user command: the kernel's default
#: (MLOCK_LIMIT, 8 MiB since Linux 5.16), whatever this session inherited.
USER_MEMLOCK: Final = 8 << 20


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    #: True if this session created the user (and so removes it).
    created: bool


def ensure_user(name: str = USER_NAME) -> User:
    """The ordinary user *name*, created if missing (a system user: no home, no login shell)."""
    try:
        entry = pwd.getpwnam(name)
        return User(name, entry.pw_uid, entry.pw_gid, created=False)
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    done = subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", name],
        capture_output=True, text=True, timeout=60, check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"useradd {name} failed ({done.returncode}): {done.stderr.strip()}")
    entry = pwd.getpwnam(name)
    if entry.pw_uid == 0:
        raise AssertionError(f"user {name} has uid 0")
    return User(name, entry.pw_uid, entry.pw_gid, created=True)


def remove_user(user: User) -> None:
    """Delete *user* if this session created it (its processes must be gone)."""
    if not user.created:
        return
    userdel = shutil.which("userdel") or "/usr/sbin/userdel"
    done = subprocess.run([userdel, user.name], capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise AssertionError(f"userdel {user.name} failed ({done.returncode}): {done.stderr.strip()}")


def _user_can_run(user: User, python: str) -> bool:
    # The path itself is tested first: exec() alone is not proof enough, some
    # sandboxes run another interpreter when the one named is unreachable.
    check = 'test -r "$1" && test -x "$1" && exec "$1" -c "import sys; assert sys.version_info >= (3, 10)"'
    try:
        done = subprocess.run(
            _setpriv(user) + ["/bin/sh", "-c", check, "sh", python],
            capture_output=True, timeout=60, check=False, env=_user_environ("/"),
        )
    except OSError:
        return False
    return done.returncode == 0


def user_interpreter(user: User) -> str:
    """A Python interpreter (3.10+) the user can execute: this one's base if the user can reach
    it, else a system one of the same version, else the system's python3."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    candidates = [os.path.realpath(getattr(sys, "_base_executable", sys.executable)),
                  f"/usr/bin/python{version}", f"/usr/local/bin/python{version}", "/usr/bin/python3"]
    for candidate in dict.fromkeys(candidates):
        if os.path.exists(candidate) and _user_can_run(user, candidate):
            return candidate
    raise AssertionError(f"no Python interpreter that user {user.name} can run among {candidates}")


@dataclasses.dataclass(frozen=True)
class UserEnv:
    """The user, a world-readable work directory, a copy of the project and the user's venv."""

    user: User
    workdir: str
    #: The copy of the project (owned by the user: pytest and hypothesis write there).
    project: str
    python: str

    def command(self, argv: Sequence[str], group: str | None, *, root_owned: bool = False) -> list[str]:
        """*argv* run as the user, after joining the delegated *group* (a directory; None: stay
        in the caller's group, which the user does not own). With *root_owned*, *group* is one
        of root's, which root joins before it drops to the user: the user then runs in a group
        it cannot write, as in a login session's scope."""
        if group is None:
            return _setpriv(self.user) + list(argv)
        if root_owned:
            return ["/bin/sh", "-c", _SHELL_JOIN, "sh", group, *_setpriv(self.user), *argv]
        return _setpriv(self.user) + ["/bin/sh", "-c", _SHELL_JOIN, "sh", group, *argv]

    def run(self, argv: Sequence[str], group: str | None, *, timeout: float,
            cwd: str | None = None, root_owned: bool = False) -> subprocess.CompletedProcess[str]:
        """Run *argv* as the user in *group*; fails the test if it runs longer than *timeout* s.

        On timeout the command is killed; whatever it started is left in
        *group*'s subtree, for the fixture that delegated it to kill. With
        *group* None, use it only for commands that start nothing lasting.
        """
        try:
            return subprocess.run(self.command(argv, group, root_owned=root_owned), capture_output=True, text=True, timeout=timeout,
                                  check=False, cwd=cwd or self.project, env=_user_environ(self.workdir),
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as err:
            raise AssertionError(f"{list(argv)[:6]} as {self.user.name} did not finish within {timeout} s; "
                                 f"stdout: {err.stdout!r:.2000}; stderr: {err.stderr!r:.2000}") from err

    def python_run(self, code: str, group: str, *args: str, timeout: float = 60.0
                   ) -> subprocess.CompletedProcess[str]:
        """Run Python *code* (``-c``) with the user's interpreter, as the user, in *group*."""
        return self.run([self.python, "-c", code, *args], group, timeout=timeout)


def build_user_env(user: User, source: str) -> UserEnv:
    """Copy the project at *source* and build the user's venv with useroom (and the test extras)
    installed from the copy, in a new directory under /tmp that the user can read."""
    workdir = tempfile.mkdtemp(prefix="useroom-unpriv-", dir="/tmp" if os.path.isdir("/tmp") else None)
    try:
        os.chmod(workdir, 0o755)
        project = os.path.join(workdir, "project")
        shutil.copytree(source, project, ignore=_COPY_IGNORE)
        venv = os.path.join(workdir, "venv")
        base = user_interpreter(user)
        subprocess.run([base, "-m", "venv", "--without-pip", venv], check=True, capture_output=True, timeout=120)
        python = os.path.join(venv, "bin", "python")
        # This interpreter's pip installs into the venv (pip 22.3+: --python), so
        # the venv needs no ensurepip (Debian's python3-venv).
        done = subprocess.run(
            [sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--disable-pip-version-check",
             "--no-input", project + "[test]"],
            capture_output=True, text=True, timeout=600, check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"installing useroom into the user's venv failed:\n{done.stdout}\n{done.stderr}")
        for directory, _, files in os.walk(venv):
            _world_readable(directory)
            for name in files:
                _world_readable(os.path.join(directory, name))
        # The copy is the user's: the test session run as the user writes there.
        for directory, _, files in os.walk(project):
            os.chown(directory, user.uid, user.gid)
            for name in files:
                os.chown(os.path.join(directory, name), user.uid, user.gid)
        return UserEnv(user, workdir, project, python)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def remove_user_env(env: UserEnv) -> None:
    shutil.rmtree(env.workdir)


def delegate(parent: str, name: str, user: User) -> str:
    """Make group *name* below the group directory *parent* and chown it (directory and files) to *user*."""
    path = os.path.join(parent, name)
    os.mkdir(path)
    os.chown(path, user.uid, user.gid)
    for entry in os.listdir(path):
        file = os.path.join(path, entry)
        if os.path.isfile(file):
            os.chown(file, user.uid, user.gid)
    return path


def stale_delegations(parent: str) -> list[str]:
    """Delegated groups below *parent* whose test session (by the pid in the name) is gone."""
    stale = []
    for name in os.listdir(parent):
        if not name.startswith(DELEGATION_PREFIX):
            continue
        pid = name[len(DELEGATION_PREFIX):].split("-", 1)[0]
        if pid.isdecimal() and int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}"):
            stale.append(os.path.join(parent, name))
    return stale


def _setpriv(user: User) -> list[str]:
    setpriv, prlimit = shutil.which("setpriv"), shutil.which("prlimit")
    if setpriv is None or prlimit is None:
        raise AssertionError("setpriv and prlimit (util-linux) are needed to run commands as the test user")
    return [prlimit, f"--memlock={USER_MEMLOCK}:{USER_MEMLOCK}", "--", setpriv, f"--reuid={user.uid}",
            f"--regid={user.gid}", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "--"]


def _user_environ(home: str) -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1"}


def _world_readable(path: str) -> None:
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode):
        return
    extra = stat.S_IRGRP | stat.S_IROTH
    if stat.S_ISDIR(mode) or mode & stat.S_IXUSR:
        extra |= stat.S_IXGRP | stat.S_IXOTH
    os.chmod(path, stat.S_IMODE(mode) | extra)
