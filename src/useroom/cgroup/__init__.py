"""The cgroup layer: one version-neutral :class:`Group` interface and its
backends, :class:`V1Group` (cgroup v1) and :class:`V2Group` (cgroup v2).

:mod:`useroom.cgroup.base` holds the interface and the errno translation,
:mod:`useroom.cgroup.values` the snapshots read from control files,
:mod:`useroom.cgroup.notify` the v1 eventfd notifier,
:mod:`useroom.cgroup.lineage` where one group stands to another;
:mod:`useroom.cgroup.v1` and :mod:`useroom.cgroup.v2` the backends. The
registry of backends by version lives here, so that the base never imports
a backend and a backend only imports the base.
"""

from __future__ import annotations

from useroom.cgroup.base import Group, backend_class
from useroom.cgroup.notify import EventRegistration, Notifier, OomCounter
from useroom.cgroup.values import OomControl, Stats, parse_key_values
from useroom.cgroup.v1 import V1Group
from useroom.cgroup.v2 import FileNotifier, MemoryEvents, PressureTrigger, V2Group

__all__ = [
    "EventRegistration",
    "FileNotifier",
    "Group",
    "MemoryEvents",
    "Notifier",
    "OomControl",
    "OomCounter",
    "PressureTrigger",
    "Stats",
    "V1Group",
    "V2Group",
    "backend_class",
    "parse_key_values",
]

Group.backends.update({1: V1Group, 2: V2Group})
