"""Tasks below a handled group, which its victim table does not reach.

A handler's victims are the tasks of its group's own ``cgroup.procs``:
the native plan pins them at each refresh and reads that one file again at
the OOM. Tasks in child groups are charged to the handled group too (the
limit is hierarchical), yet neither list names them, so an OOM they cause
would find an empty plan and go to the kernel's killer every time, with
the policy and ``protect`` ignored. On cgroup v2 this is the rule rather
than the exception: a group that enables memory for its children may hold
no process itself.

So a handler refuses to start on a group with tasks below it, naming
them; and tasks that appear below it later are reported once (a warning
and an entry in ``errors``). To handle a tree, handle its leaf groups: one
supervisor (``useroom handle A/x A/y``) serves them all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from useroom.cgroup import Group
from useroom.exceptions import NestedTasksError

__all__ = ["NestedTasks", "refuse_nested", "tasks_below"]

logger = logging.getLogger(__name__)


def tasks_below(group: Group) -> dict[str, int]:
    """The child groups below *group* (at any depth) that hold processes,
    by relpath, with how many. Groups that vanish meanwhile are skipped."""
    found: dict[str, int] = {}
    pending = list(group.children())
    while pending:
        child = pending.pop()
        try:
            count = len(child.procs())
            pending.extend(child.children())
        except OSError:  # CgroupError is one: removed meanwhile
            continue
        if count:
            found[child.relpath] = count
    return dict(sorted(found.items()))


def _describe(group: Group, found: dict[str, int]) -> str:
    shown = ", ".join(f"{path} ({count} {'process' if count == 1 else 'processes'})"
                      for path, count in list(found.items())[:3])
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    return (f"{group.relpath} has processes in its child groups: {shown}{more}. The handler's victims are "
            "the group's own processes, so an OOM they cause would go to the kernel's killer; handle the "
            "child groups instead (one supervisor serves many: useroom handle GROUP...), or move the "
            "processes into the group")


def refuse_nested(group: Group) -> None:
    """Raises :class:`~useroom.NestedTasksError` if *group* has processes in
    child groups."""
    found = tasks_below(group)
    if found:
        raise NestedTasksError(_describe(group, found), group=group.relpath, nested=found)


class NestedTasks:
    """Reports, once, processes that appeared below a running handler's group."""

    def __init__(self) -> None:
        self._said = False

    def check(self, group: Group, note: Callable[[BaseException], None]) -> None:
        if self._said:
            return
        try:
            found = tasks_below(group)
        except OSError:
            return  # ENOMEM at the limit, or the group is gone: the next refresh looks again
        if found:
            self._said = True
            err = NestedTasksError(_describe(group, found), group=group.relpath, nested=found)
            note(err)
            logger.warning("%s", err, extra={"group": group.relpath, "cause": "nested_tasks",
                                             "nested": found})
