"""Where one group stands to another in the tree: the same group, below
it, above it, or apart.

A handled group's tasks share its limit and its OOM wait with every group
below it, and its charges count against every group above it. Groups given
a role apart from a handled group (the watchdog's group, an overflow
group) are checked with :func:`require_apart`, each refusing the relations
that defeat its role.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from typing import Final

from useroom.cgroup.base import Group
from useroom.exceptions import GroupOverlap

__all__ = ["Relation", "relation", "require_apart"]


class Relation(enum.Enum):
    """Where a group stands to a handled group."""

    SAME = "same"
    BELOW = "below"
    ABOVE = "above"


_SAID: Final = {
    Relation.SAME: "the handled group itself",
    Relation.BELOW: "below the handled group {handled}",
    Relation.ABOVE: "above the handled group {handled} (one of its ancestors)",
}


def relation(group: Group, handled: Group) -> Relation | None:
    """Where ``group`` stands to ``handled``; None if apart (also in another hierarchy)."""
    if group.version != handled.version or group.hierarchy != handled.hierarchy:
        return None
    mine, theirs = group.relpath.rstrip("/") + "/", handled.relpath.rstrip("/") + "/"
    if mine == theirs:
        return Relation.SAME
    if mine.startswith(theirs):
        return Relation.BELOW
    if theirs.startswith(mine):
        return Relation.ABOVE
    return None


def require_apart(group: Group, handled: Group, *, role: str, why: str,
                  refuse: Collection[Relation] = tuple(Relation)) -> None:
    """Raises :class:`~useroom.GroupOverlap` if ``group`` (given the role
    ``role``, for the message) stands to ``handled`` in one of the relations
    ``refuse`` (all three by default); ``why`` says what that would do."""
    found = relation(group, handled)
    if found is None or found not in refuse:
        return
    where = _SAID[found].format(handled=handled.relpath)
    raise GroupOverlap(f"the {role} {group.relpath} is {where}: {why}", group=group.relpath,
                       handled=handled.relpath, relation=found.value, role=role)
