"""The whole exception hierarchy of useroom.

Every error subclasses :class:`UseroomError` and, where one fits, the matching
builtin, so a caller can catch either (``except useroom.InvalidSize`` or
``except ValueError``).
"""

from __future__ import annotations

__all__ = [
    "CgroupError",
    "CgroupPermissionError",
    "GroupBusy",
    "GroupExists",
    "GroupGone",
    "GroupNotFound",
    "GroupOverlap",
    "InvalidDuration",
    "InvalidName",
    "InvalidSize",
    "KernelFormatError",
    "LimitBelowUsage",
    "MemoryLockError",
    "NotAMemoryCgroup",
    "OutputError",
    "PressureTriggerRefused",
    "PressureWatchError",
    "ProcessGone",
    "ResourceLimitError",
    "RootGroupError",
    "SizeOutOfBounds",
    "UnsupportedKernel",
    "UseroomError",
    "WatcherError",
]


class UseroomError(Exception):
    """Base class of every error raised by useroom."""


class InvalidSize(UseroomError, ValueError):
    """A memory size could not be parsed (``"256M"``, ``"1.5G"`` or an int),
    or is outside the range its parameter allows (:class:`SizeOutOfBounds`)."""


class SizeOutOfBounds(InvalidSize):
    """A size parses but makes no sense where it is given: a reserve or a
    :class:`~useroom.RaiseLimit` step larger than the group's limit (or,
    for a group without one, than the machine's memory), a step above its
    ceiling. ``name`` names the parameter, ``value`` and ``bound`` are
    bytes; the message says what to give instead."""

    def __init__(self, message: str, *, name: str, value: int, bound: int) -> None:
        super().__init__(message)
        self.name = name
        self.value = value
        self.bound = bound


class InvalidDuration(UseroomError, ValueError):
    """A duration could not be parsed (``"2s"``, ``"500ms"`` or a number of
    seconds), or is negative, infinite or not a number."""


class InvalidName(UseroomError, ValueError):
    """A child group name is empty, contains ``/``, or is ``.`` or ``..``."""


class CgroupError(UseroomError, OSError):
    """A cgroup operation failed; ``path`` names the group or file."""

    def __init__(self, errno: int, message: str, path: str | None = None) -> None:
        super().__init__(errno, message, path)
        self.path = path

    def __str__(self) -> str:
        return f"{self.strerror}: {self.path}" if self.path else str(self.strerror)


class GroupNotFound(CgroupError, FileNotFoundError):
    """The path does not exist in a cgroup filesystem."""


class GroupGone(GroupNotFound):
    """The group was removed while it was being used."""


class GroupOverlap(UseroomError, ValueError):
    """A group given a role apart from a handled group (the watchdog's
    group, an overflow group) is the handled group, below it or above it.

    ``group`` and ``handled`` are their paths in the hierarchy,
    ``relation`` says where the first stands (``"same"``, ``"below"`` or
    ``"above"``) and ``role`` names its role.
    """

    def __init__(self, message: str, *, group: str, handled: str, relation: str, role: str) -> None:
        super().__init__(message)
        self.group = group
        self.handled = handled
        self.relation = relation
        self.role = role


class KernelFormatError(UseroomError, ValueError):
    """A kernel file (mountinfo, ``/proc/<pid>/cgroup``, ``memory.stat``) had unexpected text."""


class NotAMemoryCgroup(UseroomError, ValueError):
    """The path is outside every cgroupfs mount, or not in the memory hierarchy."""


class RootGroupError(UseroomError, ValueError):
    """The root memory cgroup has no limit and no OOM notifications."""


class CgroupPermissionError(CgroupError, PermissionError):
    """The kernel refused a cgroup operation.

    ``rule`` names the kernel rule that refused it and ``advice`` says what an
    administrator could grant.
    """

    def __init__(
        self, errno: int, message: str, path: str | None = None, *, rule: str = "", advice: str = ""
    ) -> None:
        super().__init__(errno, message, path)
        self.rule = rule
        self.advice = advice

    def __str__(self) -> str:
        text = super().__str__()
        if self.rule:
            text += f" ({self.rule})"
        if self.advice:
            text += f"; {self.advice}"
        return text


class GroupBusy(CgroupError):
    """The group still has tasks (or children) and cannot be removed."""


class GroupExists(CgroupError, FileExistsError):
    """A child group of that name already exists."""


class LimitBelowUsage(CgroupError):
    """The kernel could not reclaim enough to bring usage under the new limit."""


class MemoryLockError(UseroomError, PermissionError):
    """The kernel would refuse to lock memory that useroom was asked to lock.

    ``what`` names the memory, ``requested`` its size in bytes (0: the whole
    process), ``limit`` the soft RLIMIT_MEMLOCK (-1: unlimited) and
    ``locked`` what the process had locked already; ``rule`` names the kernel
    rule and ``advice`` what an administrator could grant.
    """

    def __init__(
        self, errno: int, message: str, *, what: str = "", requested: int = 0, limit: int = -1, locked: int = 0,
        rule: str = "", advice: str = "",
    ) -> None:
        super().__init__(errno, message)
        self.what = what
        self.requested = requested
        self.limit = limit
        self.locked = locked
        self.rule = rule
        self.advice = advice

    def __str__(self) -> str:
        return f"{self.strerror} ({self.rule}); {self.advice}"


class OutputError(UseroomError, OSError):
    """A file useroom writes what it collected to (an event log, a metrics
    file, the watchdog's log, a report) cannot be written; ``filename``
    names it, ``errno`` and ``strerror`` say why. Paths are checked when
    the object that writes them is made, before anything starts."""

    def __init__(self, errno: int | None, message: str, path: str) -> None:
        super().__init__(errno, message, path)

    def __str__(self) -> str:
        return str(self.strerror)


class ProcessGone(UseroomError, ProcessLookupError):
    """The process exited, or its pid now names another process."""


class ResourceLimitError(UseroomError, OSError):
    """The kernel refused a file, a thread or a process because a limit was
    reached (a handler's start raises it, with every step undone).

    ``errno`` is the kernel's (EMFILE, ENFILE, EAGAIN or ENOMEM); ``limit``
    names the limit (``RLIMIT_NOFILE``, ``fs.file-max``, ``RLIMIT_NPROC``,
    ``RLIMIT_AS`` or ``memory``: the memory cgroup's limit), ``value`` is its
    value when the kernel refused (-1: unlimited or unknown), and ``advice``
    says how to raise it.
    """

    def __init__(self, errno: int, message: str, *, limit: str, value: int = -1, advice: str = "") -> None:
        super().__init__(errno, message)
        self.limit = limit
        self.value = value
        self.advice = advice

    def __str__(self) -> str:
        return f"{self.strerror}; {self.advice}" if self.advice else str(self.strerror)


class UnsupportedKernel(UseroomError, OSError):
    """The running kernel lacks an interface this operation needs."""


class WatcherError(UseroomError, RuntimeError):
    """The native watcher is not in a state that allows the operation."""


class PressureTriggerRefused(UnsupportedKernel):
    """The kernel refused a PSI trigger; ``reason`` says the likely rule, ``path`` the pressure file."""

    def __init__(self, errno: int, message: str, path: str | None = None, *, reason: str = "") -> None:
        super().__init__(errno, message, path)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        text = str(self.strerror)
        return f"{text} ({self.reason})" if self.reason else text


class PressureWatchError(UseroomError):
    """``$MEMORY_PRESSURE_WATCH`` or ``$MEMORY_PRESSURE_WRITE`` (systemd's memory
    pressure protocol) cannot be used; ``variable`` names which. The handler
    runs without that source and says so."""

    def __init__(self, message: str, *, variable: str) -> None:
        super().__init__(message)
        self.variable = variable


class DegradedWarning(UserWarning):
    """The handler runs in a weaker mode than it was built for (memory not all
    locked, no pidfds, no process_mrelease, no watchdog): see
    ``Handler.degraded``. Warned once per mode and supervisor."""


class NestedTasksError(UseroomError, ValueError):
    """The handled group has processes in child groups, which are never
    victims (the victims are the group's own processes): handle the child
    groups instead. ``nested`` maps each such group's relpath to its count."""

    def __init__(self, message: str, *, group: str, nested: dict[str, int]) -> None:
        super().__init__(message)
        self.group = group
        self.nested = nested
