"""``watchdog_group=`` is refused at or below the handled group, when the handler is made.

In the handled group, or below it, the watchdog's memory is charged to that
group: on cgroup v1 it sleeps in the very OOM wait it must end, and with the
handler gone the group stays under OOM for good. Such a group is refused
with :class:`useroom.GroupOverlap` (a ValueError) before anything is
touched. Above the handled group (the parent, where the watchdog goes by
default when the process is inside the handled group) and beside it, it
starts and runs there.

``MoveToOverflow`` refuses its overflow group through the same check, at,
below and above the handled group.

The groups: ``app`` (handled, with a limit), ``app/inner`` below it,
``dog`` beside it, all below a scratch group, which is above ``app``.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from useroom import Group, GroupOverlap, Handler, MoveToOverflow, Supervisor

pytestmark = [pytest.mark.kernel]


class Tree:
    def __init__(self, scratch: Group) -> None:
        self.top = scratch
        self.app = scratch.create_child("app", memory_max="64M")
        self.inner = self.app.create_child("inner")
        self.dog = scratch.create_child("dog")


@pytest.fixture
def tree(scratch_group: Group) -> Tree:
    return Tree(scratch_group)


def _memcg(pid: int) -> str:
    for line in pathlib.Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    raise AssertionError(f"process {pid} has no memory cgroup")


def _children() -> set[int]:
    me = str(os.getpid())
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdecimal():
            try:
                status = pathlib.Path(f"/proc/{entry}/status").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if f"\nPPid:\t{me}\n" in status:
                out.add(int(entry))
    return out


class TestRefused:
    @pytest.mark.parametrize("where", ["same", "below"])
    def test_refused_when_the_handler_is_made(self, tree: Tree, where: str) -> None:
        """The handled group itself, or a group below it: GroupOverlap (a ValueError) from the
        constructor, naming both groups, where the one stands and why; the group is untouched and
        no watchdog is spawned."""
        chosen = tree.app if where == "same" else tree.inner
        before = (tree.app.oom_control(), tree.app.limit(), _children())
        with pytest.raises(GroupOverlap) as caught:
            Handler(tree.app, watchdog_group=chosen)
        err = caught.value
        assert isinstance(err, ValueError)
        assert (chosen.relpath, tree.app.relpath, where, "watchdog group") == \
            (err.group, err.handled, err.relation, err.role)
        message = str(err)
        assert message.startswith(f"the watchdog group {chosen.relpath} is ")
        assert "OOM wait" in message and "its parent or a sibling" in message
        if where == "below":
            assert f"below the handled group {tree.app.relpath}" in message
        assert before == (tree.app.oom_control(), tree.app.limit(), _children())

    def test_refused_by_a_supervisor_when_the_group_is_added(self, tree: Tree) -> None:
        """A supervisor's ``watchdog_group`` is checked against each group added: ``add`` of the
        group it is in raises GroupOverlap and serves nothing; a group it is beside is added."""
        supervisor = Supervisor(watchdog_group=tree.inner)
        with pytest.raises(GroupOverlap) as caught:
            supervisor.add(tree.app)
        assert "below" == caught.value.relation
        assert () == supervisor.handlers
        handler = supervisor.add(tree.dog)
        assert (handler,) == supervisor.handlers

    def test_not_a_group(self, tree: Tree) -> None:
        """A path where a Group belongs is a TypeError from the constructor, not a failure at start."""
        with pytest.raises(TypeError, match="watchdog_group= must be a useroom.Group"):
            Handler(tree.app, watchdog_group=tree.dog.path)  # type: ignore[arg-type]


class TestAccepted:
    @pytest.mark.parametrize("where", ["above", "sibling"])
    def test_the_watchdog_runs_there(self, tree: Tree, where: str) -> None:
        """The parent (above the handled group) or a sibling: the handler starts, its watchdog runs
        in that group, and the stop ends it."""
        chosen = tree.top if where == "above" else tree.dog
        with Handler(tree.app, thresholds=(), watchdog_group=chosen) as handler:
            link = handler.watchdog
            assert link is not None and link.pid is not None
            assert chosen.relpath == _memcg(link.pid)
            pid = link.pid
        assert pid not in _children()


class TestOverflowGroup:
    @pytest.mark.parametrize("where", ["same", "below", "above"])
    def test_the_same_check_refuses_an_overflow_group(self, tree: Tree, where: str) -> None:
        """MoveToOverflow refuses its overflow group at, below and above the handled group with the
        same GroupOverlap, saying why."""
        overflow = {"same": tree.app, "below": tree.inner, "above": tree.top}[where]
        policy = MoveToOverflow(overflow)
        with pytest.raises(GroupOverlap) as caught:
            policy.arm(tree.app)
        assert (where, "overflow group") == (caught.value.relation, caught.value.role)
        assert "still charged to the handled group" in str(caught.value)

    def test_a_sibling_overflow_group_is_armed(self, tree: Tree) -> None:
        """A sibling overflow group passes the check and is armed."""
        policy = MoveToOverflow(tree.dog)
        policy.arm(tree.app)
        policy.disarm()
