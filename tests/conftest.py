"""Fixtures for tests that use real groups and real processes.

- ``own_group`` (session): the memory cgroup of the test process. Every group
  a test makes is below it; nothing outside it is ever written.
- ``scratch_group``: a fresh, uniquely named child of ``own_group`` that is
  always destroyed afterwards, whatever the test left in it (tasks asleep in
  an OOM with the kernel killer off, child groups, a limit): see
  :func:`helpers.destroy_group`.
- ``spawn_hog``: a factory of :class:`helpers.Hog` children, all killed and
  reaped at teardown.
- ``unpriv_env`` (session): a real ordinary user, created if missing and
  removed after, with a venv it can run (see :mod:`unpriv`); ``user_group``:
  a fresh group below ``own_group`` delegated (chowned) to that user, and
  destroyed after the test like ``scratch_group``, with every task left in it.

At the end of the session, any group a test created that is still there is
destroyed and reported as an error.

On a machine without the memory controller, ``own_group`` fails (it never
skips): the ``kernel`` tests must run wherever the suite runs.
"""

from __future__ import annotations

import itertools
import os
import pathlib
from collections.abc import Callable, Iterator

import pytest

from helpers import GROUP_PREFIX, Hog, destroy_group
from unpriv import (
    DELEGATION_PREFIX,
    UserEnv,
    build_user_env,
    delegate,
    ensure_user,
    remove_user,
    remove_user_env,
    stale_delegations,
)
from useroom._cgroup import Group
from useroom.exceptions import UnsupportedKernel

_names = itertools.count()
_created: list[str] = []  # paths of every group the fixtures made
_own_path: list[str] = []  # set once own_group has been resolved


@pytest.fixture(scope="session")
def own_group() -> Group:
    """The memory cgroup of the test process (not the root: groups are made below it)."""
    try:
        group = Group.current()
    except UnsupportedKernel as err:
        pytest.fail(f"the kernel tests need the memory cgroup controller: {err}")
    if group.version != 1:
        pytest.fail(f"the kernel tests need the cgroup v1 memory controller; it is on v{group.version} here")
    _own_path.append(group.path)
    return group


@pytest.fixture
def scratch_group(own_group: Group) -> Iterator[Group]:
    """A new empty group below ``own_group``, destroyed after the test even if it fails or times out."""
    name = f"{GROUP_PREFIX}{os.getpid()}-{next(_names)}"
    path = os.path.join(own_group.path, name)
    _created.append(path)
    os.mkdir(path)  # not create_child(): the fixture must not depend on the code under test
    try:
        yield Group.open(path)
    finally:
        destroy_group(path, below=own_group.path)


@pytest.fixture
def spawn_hog() -> Iterator[Callable[..., Hog]]:
    """``spawn_hog(mib, group=None, hold=True)`` starts a :class:`helpers.Hog`; all are killed and reaped after the test."""
    hogs: list[Hog] = []

    def spawn(mib: int, group: Group | None = None, hold: bool = True) -> Hog:
        hog = Hog(mib, group=group, hold=hold)
        hogs.append(hog)
        return hog

    yield spawn
    errors = []
    for hog in hogs:
        try:
            hog.close()
        except Exception as err:  # every hog must still be tried
            errors.append(f"{hog}: {err!r}")
    assert not errors, f"hogs that could not be reaped: {errors}"


@pytest.fixture(scope="session")
def unpriv_env(own_group: Group) -> Iterator[UserEnv]:
    """The test user and its venv; the user is removed after the session if this session made it."""
    for path in stale_delegations(own_group.path):
        destroy_group(path, below=own_group.path)
    user = ensure_user()
    try:
        env = build_user_env(user, str(pathlib.Path(__file__).resolve().parents[1]))
        try:
            yield env
        finally:
            remove_user_env(env)
    finally:
        remove_user(user)  # its processes were all in user_group groups, destroyed by now


@pytest.fixture
def user_group(own_group: Group, unpriv_env: UserEnv) -> Iterator[str]:
    """A new group below ``own_group``, chowned to the test user; destroyed after the test with all in it."""
    name = f"{DELEGATION_PREFIX}{os.getpid()}-{next(_names)}"
    path = os.path.join(own_group.path, name)
    _created.append(path)
    try:
        yield delegate(own_group.path, name, unpriv_env.user)
    finally:
        if os.path.isdir(path):
            destroy_group(path, below=own_group.path)


#: Groups that examples, check_hook and the hooks benchmark make below the
#: caller's own group, in processes a test may kill mid-OOM.
OTHER_PREFIXES = ("inprocess-service-", "cache-service-", "useroom-check-", "useroom-hooks-bench-",
                  "useroom-demo-", "svc-")


@pytest.fixture(autouse=True)
def _no_example_groups_left(own_group: Group) -> Iterator[None]:
    """After every test, destroy (and fail on) groups that an example, check_hook or a
    benchmark left below the own group: their processes may have been killed mid-OOM."""
    yield
    left = sorted(os.path.join(own_group.path, name) for name in os.listdir(own_group.path)
                  if name.startswith(OTHER_PREFIXES))
    for path in left:
        destroy_group(path, below=own_group.path)
    assert not left, f"groups left behind (now removed): {left}"


@pytest.fixture(scope="session", autouse=True)
def _no_groups_left() -> Iterator[None]:
    """At the end of the session, fail if a group a test made is still there (and remove it)."""
    yield
    if not _own_path:
        return
    own = _own_path[0]
    prefix = f"{GROUP_PREFIX}{os.getpid()}-"
    left = sorted(
        {path for path in _created if os.path.isdir(path)}
        | {os.path.join(own, name) for name in os.listdir(own) if name.startswith(prefix)}
    )
    for path in left:
        destroy_group(path, below=own)
    assert not left, f"groups left behind by the tests (now removed): {left}"
