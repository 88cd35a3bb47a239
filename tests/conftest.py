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
skips): the ``kernel`` tests must run wherever the suite runs, and fail
where the memory controller is not on v1. ``cgroup2`` tests are skipped on a
v1 host (with the reason); .ci/run runs them, with the ``backends`` tests, in
a cgroup v2 guest (tools/vm-run).
"""

from __future__ import annotations

import itertools
import os
import pathlib
from collections.abc import Callable, Iterator

import pytest

from helpers import GROUP_PREFIX, LEAF_PREFIX, Hog, destroy_group
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
from useroom.cgroup import Group
from useroom._mounts import memory_hierarchy
from useroom.exceptions import UnsupportedKernel

_names = itertools.count()
_created: list[str] = []  # paths of every group the fixtures made
_own_path: list[str] = []  # set once own_group has been resolved


def _hierarchy_version() -> int | None:
    try:
        return memory_hierarchy().version
    except UnsupportedKernel:
        return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``cgroup2`` tests need a v2 memory hierarchy: on a v1 host they are skipped, saying where
    they run (.ci/run runs them in a v2 guest); ``kernel`` tests need v1 and fail elsewhere."""
    version = _hierarchy_version()
    delegated = pytest.mark.skip(reason="runs as a non-root user in a systemd-delegated v2 subtree: .ci/run runs "
                                 "it in a systemd guest (tools/vm-run -S -- tools/v2-delegated PYTHON)")
    if version != 2 or os.geteuid() == 0:
        for item in items:
            if item.get_closest_marker("delegated") is not None:
                item.add_marker(delegated)
    if version == 2:
        return
    skip = pytest.mark.skip(reason="cgroup v2 test: the memory controller is on v1 here; .ci/run runs it in the "
                            "v2 guest (tools/vm-run -- python -m pytest -m 'cgroup2 or backends')")
    for item in items:
        if item.get_closest_marker("cgroup2") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def own_group() -> Group:
    """The memory cgroup below which the tests make their groups.

    On v1, the test process's own group. On v2 (the guest), the same, but
    the memory controller must be enabled for its children, which a v2
    group that holds processes cannot do (the "no internal processes" rule,
    the root excepted): then the group's processes (a delegated scope: the
    test run's own) are moved to a leaf child first.
    """
    try:
        group = Group.current()
    except UnsupportedKernel as err:
        pytest.fail(f"the kernel tests need the memory cgroup controller: {err}")
    if group.version == 2:
        group = _prepare_v2_base(group)
    _own_path.append(group.path)
    return group


def _prepare_v2_base(group: Group) -> Group:
    subtree = os.path.join(group.path, "cgroup.subtree_control")
    with open(subtree) as file:
        if "memory" in file.read().split():
            return group
    if not group.is_root:
        leaf = os.path.join(group.path, f"{LEAF_PREFIX}{os.getpid()}")
        os.mkdir(leaf)
        for _ in range(100):  # processes forked meanwhile are moved by the next round
            with open(os.path.join(group.path, "cgroup.procs")) as file:
                pids = [int(pid) for pid in file.read().split()]
            if not pids:
                break
            for pid in pids:
                try:
                    with open(os.path.join(leaf, "cgroup.procs"), "w") as file:
                        file.write(str(pid))
                except ProcessLookupError:
                    pass
    with open(subtree, "w") as file:
        file.write("+memory")
    return group


@pytest.fixture(autouse=True)
def _backend_required(request: pytest.FixtureRequest) -> None:
    """A ``kernel`` test (the v1 suite) fails where the memory controller is not on v1."""
    if request.node.get_closest_marker("kernel") is not None and _hierarchy_version() != 1:
        pytest.fail(f"this test needs the cgroup v1 memory controller; it is on v{_hierarchy_version()} here")


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
def elsewhere(own_group: Group) -> Iterator[Group]:
    """A second new group below ``own_group``, without a limit (where tests move tasks to)."""
    name = f"{GROUP_PREFIX}{os.getpid()}-{next(_names)}"
    path = os.path.join(own_group.path, name)
    _created.append(path)
    os.mkdir(path)
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
                  "useroom-demo-", "svc-", "useroom-watchdog-bench-")


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
