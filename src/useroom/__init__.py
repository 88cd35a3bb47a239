"""useroom: be the out-of-memory handler of your own memory cgroups.

Unprivileged, and reliable even when the handler runs inside the group that
is out of memory. See the documentation for the design and the rules.
"""

import logging as _logging

from useroom._check import HookReport, check_hook
from useroom.cgroup import EventRegistration, Group, Notifier, OomControl, Stats
from useroom.cgroup.v2 import FileNotifier, MemoryEvents, PressureTrigger, V2Group
from useroom._declare import Declaration
from useroom.handler import EventOutcome, Handler, OomEvent, StepRecord, Supervisor, VictimRecord
from useroom.handler.degraded import Degradation, DegradedMode
from useroom.handler.export import EventLog, MetricsFile
from useroom._hardening import HardeningReport, lock_memory, release_memory
from useroom._hooks import HookRecord, OomContext, PressureContext, PressureSource
from useroom.policy import (
    DryRun,
    FreezeAndDecide,
    FrozenContext,
    KillByPriority,
    KillLargest,
    KillGroup,
    KillNewest,
    MoveToOverflow,
    Phase,
    Policy,
    RaiseLimit,
    StepTag,
)
from useroom._units import UNLIMITED, format_size, parse_size
from useroom.watchdog import DEFAULT_DELAY, Takeover
from useroom.exceptions import (
    CgroupError,
    CgroupPermissionError,
    DegradedWarning,
    GroupBusy,
    GroupExists,
    GroupGone,
    GroupNotFound,
    GroupOverlap,
    InvalidDuration,
    InvalidName,
    InvalidSize,
    KernelFormatError,
    LimitBelowUsage,
    MemoryLockError,
    NestedTasksError,
    NotAMemoryCgroup,
    OutputError,
    PressureTriggerRefused,
    PressureWatchError,
    ProcessGone,
    ResourceLimitError,
    RootGroupError,
    SizeOutOfBounds,
    UnsupportedKernel,
    UseroomError,
    WatcherError,
)

__version__ = "0.1.0"

# A library configures no logging: records go where the program sends them.
_logging.getLogger(__name__).addHandler(_logging.NullHandler())

__all__ = [
    "DEFAULT_DELAY",
    "UNLIMITED",
    "CgroupError",
    "CgroupPermissionError",
    "Declaration",
    "Degradation",
    "DegradedMode",
    "DegradedWarning",
    "DryRun",
    "EventLog",
    "EventOutcome",
    "EventRegistration",
    "FileNotifier",
    "FreezeAndDecide",
    "FrozenContext",
    "Group",
    "GroupBusy",
    "GroupExists",
    "GroupGone",
    "GroupNotFound",
    "GroupOverlap",
    "Handler",
    "HardeningReport",
    "HookRecord",
    "HookReport",
    "InvalidDuration",
    "InvalidName",
    "InvalidSize",
    "KernelFormatError",
    "KillByPriority",
    "KillGroup",
    "KillLargest",
    "KillNewest",
    "LimitBelowUsage",
    "MemoryEvents",
    "MemoryLockError",
    "MetricsFile",
    "MoveToOverflow",
    "NestedTasksError",
    "NotAMemoryCgroup",
    "Notifier",
    "OomContext",
    "OomControl",
    "OomEvent",
    "OutputError",
    "Phase",
    "Policy",
    "PressureContext",
    "PressureSource",
    "PressureTrigger",
    "PressureTriggerRefused",
    "PressureWatchError",
    "ProcessGone",
    "RaiseLimit",
    "ResourceLimitError",
    "RootGroupError",
    "SizeOutOfBounds",
    "Stats",
    "StepRecord",
    "StepTag",
    "Supervisor",
    "Takeover",
    "UnsupportedKernel",
    "UseroomError",
    "V2Group",
    "VictimRecord",
    "WatcherError",
    "check_hook",
    "format_size",
    "lock_memory",
    "parse_size",
    "release_memory",
]
