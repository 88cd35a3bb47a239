"""useroom: be the out-of-memory handler of your own memory cgroups.

Unprivileged, and reliable even when the handler runs inside the group that
is out of memory. See the documentation for the design and the rules.
"""

from useroom._check import HookReport, check_hook
from useroom._cgroup import EventRegistration, Group, OomControl, Stats
from useroom._handler import Handler, OomEvent, StepRecord, VictimRecord
from useroom._hardening import HardeningReport, lock_memory
from useroom._hooks import HookRecord, OomContext, PressureContext
from useroom._policy import (
    DryRun,
    FreezeAndDecide,
    FrozenContext,
    KillByPriority,
    KillLargest,
    KillNewest,
    Policy,
    RaiseLimit,
)
from useroom._units import UNLIMITED, format_size, parse_size
from useroom.exceptions import (
    CgroupError,
    CgroupPermissionError,
    GroupBusy,
    GroupExists,
    GroupGone,
    GroupNotFound,
    InvalidName,
    InvalidSize,
    KernelFormatError,
    LimitBelowUsage,
    MemoryLockError,
    NotAMemoryCgroup,
    ProcessGone,
    RootGroupError,
    UnsupportedKernel,
    UseroomError,
    WatcherError,
)

__version__ = "0.1.0"

__all__ = [
    "UNLIMITED",
    "CgroupError",
    "CgroupPermissionError",
    "DryRun",
    "EventRegistration",
    "FreezeAndDecide",
    "FrozenContext",
    "Group",
    "GroupBusy",
    "GroupExists",
    "GroupGone",
    "GroupNotFound",
    "Handler",
    "HardeningReport",
    "HookRecord",
    "HookReport",
    "InvalidName",
    "InvalidSize",
    "KernelFormatError",
    "KillByPriority",
    "KillLargest",
    "KillNewest",
    "LimitBelowUsage",
    "MemoryLockError",
    "NotAMemoryCgroup",
    "OomContext",
    "OomControl",
    "OomEvent",
    "Policy",
    "PressureContext",
    "ProcessGone",
    "RaiseLimit",
    "RootGroupError",
    "Stats",
    "StepRecord",
    "UnsupportedKernel",
    "UseroomError",
    "VictimRecord",
    "WatcherError",
    "check_hook",
    "format_size",
    "lock_memory",
    "parse_size",
]
