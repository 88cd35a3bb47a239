"""Checks of a handler's arguments, made when it is constructed, so that a
bad one fails before anything is opened, moved or started.

- sizes against what they apply to: a reserve or a :class:`RaiseLimit`
  step is at most the group's limit (a grant or a step larger than the
  limit is no limit at all); for a group without a limit, and for any
  ceiling, the bound is the machine's memory (``MemTotal``). The limit may
  change before the handler starts, so :func:`sizes_fit` checks again then;
- the types of arguments used only at start (``policy=``,
  ``watchdog_group=``), which would otherwise fail deep inside it;
- output paths: a file that cannot be written fails now, not when the
  first episode (or the end of the run) has something to write.
"""

from __future__ import annotations

import errno
import math
import os
import stat
from collections.abc import Iterable

from useroom._units import UNLIMITED, format_size, parse_size
from useroom._members import MembershipLine, member_line
from useroom.cgroup import Group
from useroom.exceptions import InvalidName, InvalidSize, OutputError, SizeOutOfBounds
from useroom.policy import DryRun, KillLargest, Policy, RaiseLimit

__all__ = ["fractions", "keep_events", "physical_memory", "policy", "reserve", "sizes_fit", "timeouts",
           "watchdog_group", "writable_path"]

#: What the messages suggest as a reserve: a few MiB run Python's hooks.
_TYPICAL_RESERVE = "16M"


def physical_memory() -> int:
    """The machine's memory in bytes: its physical pages, what ``/proc/meminfo`` shows as ``MemTotal``."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _readable(size: int) -> str:
    """``size`` for a message: exact where that is short, else rounded down
    to a tenth of a GiB or MiB (so that it stays within a bound it names)."""
    exact = format_size(size)
    if exact == "max" or exact.endswith(("PiB", "TiB", "GiB", "MiB")) or size < 1 << 20:
        return exact
    suffix, unit = ("GiB", 1 << 30) if size >= 1 << 30 else ("MiB", 1 << 20)
    return f"{math.floor(size * 10 / unit) / 10:g}{suffix}"


def _bound(group: Group) -> tuple[int, str]:
    """The largest reserve or step for ``group``, and what that bound is, in words."""
    limit, ram = group.limit(), physical_memory()
    if limit < ram:
        return limit, f"the limit of {group.relpath} ({_readable(limit)})"
    return ram, f"this machine's memory ({_readable(ram)}, MemTotal)" + (
        ", the bound for a group without a limit" if limit == UNLIMITED else "")


def _shown(value: object, size: int) -> str:
    return f"{value!r} ({format_size(size)})"


def _size(name: str, value: str | int) -> int:
    """``value`` parsed; InvalidSize names the parameter."""
    try:
        return parse_size(value)
    except InvalidSize as err:
        raise InvalidSize(f"{name}: {err}") from None


def reserve(value: str | int | None, group: Group) -> int:
    """The reserve in bytes (0 for None); raises :class:`SizeOutOfBounds`
    for ``"max"`` or a reserve larger than the group's limit."""
    if value is None:
        return 0
    size = _size("reserve", value)
    _check_reserve(size, value, group)
    return size


def _check_reserve(size: int, value: object, group: Group) -> None:
    bound, what = _bound(group)
    if size == UNLIMITED:
        raise SizeOutOfBounds(
            f"reserve={value!r} is no size: the reserve is how far the handler raises the limit of "
            f"{group.relpath} during an episode, and {value!r} would lift the limit altogether. Give a size, "
            f"at most {what}; a few MiB is usually enough (reserve={_TYPICAL_RESERVE!r})",
            name="reserve", value=size, bound=bound)
    if size > bound:
        raise SizeOutOfBounds(
            f"reserve={_shown(value, size)} is larger than {what}: a grant that size is no limit at all. "
            f"Give a reserve of at most {_readable(bound)}; a few MiB is usually enough "
            f"(reserve={_TYPICAL_RESERVE!r}), or raise the group's limit first",
            name="reserve", value=size, bound=bound)


def policy(value: object, group: Group) -> Policy:
    """``value`` (KillLargest() for None) if it is a :class:`Policy` whose
    sizes fit ``group``; TypeError naming ``policy=`` otherwise."""
    if value is None:
        return KillLargest()
    if isinstance(value, type) and issubclass(value, Policy):
        raise TypeError(f"policy= takes a policy object, not the class {value.__name__}: "
                        f"pass {value.__name__}(...)")
    if not isinstance(value, Policy):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:40] + "..."
        raise TypeError(f"policy= must be a useroom.Policy such as KillLargest() or RaiseLimit('16M', '512M'), "
                        f"not {type(value).__name__} {shown}")
    _check_steps(value, group)
    return value


def _check_steps(value: Policy, group: Group) -> None:
    """A raising policy's step is at most the group's limit, its ceiling
    at most the machine's memory."""
    if isinstance(value, (RaiseLimit, DryRun)) and value.step is not None and value.ceiling is not None:
        kind = type(value).__name__
        bound, what = _bound(group)
        if value.step > bound:
            raise SizeOutOfBounds(
                f"{kind} step {format_size(value.step)} is larger than {what}: a step that size is no limit at "
                f"all. Give a step of at most {_readable(bound)}, or raise the group's limit first",
                name="step", value=value.step, bound=bound)
        ram = physical_memory()
        if value.ceiling > ram:
            raise SizeOutOfBounds(
                f"{kind} ceiling {format_size(value.ceiling)} is larger than this machine's memory "
                f"({_readable(ram)}, MemTotal): a limit that high is no limit at all. Give a ceiling of "
                f"at most {_readable(ram)}", name="ceiling", value=value.ceiling, bound=ram)


def sizes_fit(group: Group, size: int, value: Policy) -> None:
    """At start: the reserve and the policy's steps still fit the group's
    limit, which may have changed since the handler was made."""
    if size:
        _check_reserve(size, size, group)
    _check_steps(value, group)


def membership(group: Group, longest: int) -> MembershipLine:
    """The group's line in ``/proc/<pid>/cgroup``, which the plans check each
    signal against; at most ``longest`` bytes (what a plan holds)."""
    line = member_line(group)
    if len(line.line) > longest:
        raise InvalidName(
            f"the group path {group.relpath[:80]}... is too long: a handler checks that a task is still in "
            f"the group before each signal, against its /proc/<pid>/cgroup line, of at most {longest} bytes "
            f"(this one has {len(line.line)})"
        )
    return line


def fractions(values: Iterable[float]) -> tuple[float, ...]:
    """Usage thresholds, sorted: fractions of the limit in (0, 1)."""
    result = tuple(sorted(values))
    for fraction in result:
        if not 0 < fraction < 1:
            raise ValueError(f"thresholds are fractions of the limit in (0, 1), not {fraction!r}")
    return result


def timeouts(**values: float) -> None:
    """Each of ``values`` (seconds, by parameter name) is > 0."""
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0 seconds, not {value!r}")


def keep_events(value: object) -> int:
    """``keep_events=``: how many episodes a handler keeps in full, a whole
    number >= 0 (0 keeps only the counters). TypeError for another type,
    ValueError for a negative number, each naming the option."""
    if isinstance(value, bool) or not isinstance(value, int):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:30] + "..."
        raise TypeError(f"keep_events= is how many episodes to keep in full, a whole number such as 1000, "
                        f"not {type(value).__name__} {shown}")
    if value < 0:
        raise ValueError(f"keep_events={value} is negative: give how many episodes to keep in full, 0 or more "
                         "(0 keeps only the counters; the oldest are dropped first, and counted)")
    return value


def watchdog_group(value: object) -> None:
    """``watchdog_group=`` is None or a :class:`Group`."""
    if value is not None and not isinstance(value, Group):
        hint = f": open it first, Group.open({value!r})" if isinstance(value, (str, os.PathLike)) else ""
        raise TypeError(f"watchdog_group= must be a useroom.Group or None, not {type(value).__name__}{hint}")


def writable_path(path: str | os.PathLike[str], what: str) -> str:
    """``path`` as a str, if ``what`` (say "the event log") can be written
    there: its directory exists and this user may create files in it, and
    the path is not a directory or a file this user may not write.
    Raises :class:`OutputError` naming the path and the reason."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} is a path (str or os.PathLike), not {type(path).__name__}")
    text = os.fspath(path)
    if not text:
        raise OutputError(errno.ENOENT, f"cannot write {what}: the path is empty", text)
    directory = os.path.dirname(os.path.abspath(text))
    try:
        is_dir = stat.S_ISDIR(os.stat(directory).st_mode)
    except OSError as err:
        raise OutputError(err.errno, f"cannot write {what} to {text}: its directory {directory}: "
                                     f"{err.strerror}", text) from None
    if not is_dir:
        raise OutputError(errno.ENOTDIR, f"cannot write {what} to {text}: {directory} is not a directory", text)
    if os.path.isdir(text):
        raise OutputError(errno.EISDIR, f"cannot write {what} to {text}: it is a directory", text)
    exists = os.path.exists(text)
    target, mode = (text, os.W_OK) if exists else (directory, os.W_OK | os.X_OK)
    if not os.access(target, mode, effective_ids=os.access in os.supports_effective_ids):
        whose = "the file" if exists else f"its directory {directory}"
        raise OutputError(errno.EACCES, f"cannot write {what} to {text}: {whose} is not writable by this user "
                                        f"(uid {os.geteuid()}); give a path where it may write", text)
    return text
