"""A start that ran out of something the kernel limits, explained.

A handler's start opens about twenty fds, starts two threads (three with
``on_oom`` hooks) and one process, the watchdog. The kernel refuses a file
past RLIMIT_NOFILE (EMFILE) or the system's table (ENFILE), a thread or a
process past the user's RLIMIT_NPROC (EAGAIN, also the pids controller and
``kernel.threads-max``), and memory (ENOMEM). Each becomes a
:class:`~useroom.ResourceLimitError` naming the limit, its value and how to
raise it. :func:`spawning` wraps the creation of a thread or a process:
only there does EAGAIN mean a process limit, and only there does Python's
``threading`` raise a RuntimeError with no errno. :func:`exhausted` is for
the boundary of a start, where any EMFILE, ENFILE or ENOMEM is one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
from collections.abc import Callable, Iterator

from useroom.exceptions import CgroupError, ResourceLimitError, UseroomError

__all__ = ["exhausted", "spawning"]

#: The RLIMIT_NOFILE the advice suggests at least: the usual default soft
#: limit, and far more than a handler of a few groups needs.
SUGGESTED_NOFILE = 1024


def _rlimit(which: int) -> tuple[int, int]:
    """(soft, hard), -1 for unlimited."""
    soft, hard = resource.getrlimit(which)
    return (-1 if soft == resource.RLIM_INFINITY else soft), (-1 if hard == resource.RLIM_INFINITY else hard)


def _shown(value: int) -> str:
    return "unlimited" if value < 0 else str(value)


def _file_max() -> int:
    try:
        with open("/proc/sys/fs/file-max", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return -1


def nofile(code: int, doing: str) -> ResourceLimitError:
    """EMFILE: this process has as many fds open as RLIMIT_NOFILE allows."""
    soft, hard = _rlimit(resource.RLIMIT_NOFILE)
    want = max(SUGGESTED_NOFILE, 2 * soft)
    if 0 <= hard < want:
        want = hard
    how = (f"`ulimit -n {want}` in the shell that starts it, LimitNOFILE={want} in its systemd unit, or "
           f"resource.setrlimit(resource.RLIMIT_NOFILE, ({want}, hard)) before the start")
    if want <= soft:  # the soft limit is at the hard one: only a privileged raise helps
        how = "the hard limit must be raised first (as root: `prlimit --nofile`, or LimitNOFILE= in its unit)"
    return ResourceLimitError(
        code, f"{doing}: this process may have at most {soft} open files (RLIMIT_NOFILE, soft; hard "
              f"{_shown(hard)}), and that many are open",
        limit="RLIMIT_NOFILE", value=soft,
        advice=f"raise RLIMIT_NOFILE: {how}. A handler needs about 20 fds for one group, 10 to 30 more for each "
               "further group (usage thresholds and on_oom hooks take more), and four per task in its groups "
               "(a pidfd and three /proc files)")


def file_max(code: int, doing: str) -> ResourceLimitError:
    """ENFILE: the system's table of open files is full."""
    value = _file_max()
    return ResourceLimitError(
        code, f"{doing}: the system's table of open files is full (fs.file-max is {_shown(value)})",
        limit="fs.file-max", value=value,
        advice="close files elsewhere on the system, or raise it (as root: sysctl fs.file-max=N)")


def nproc(code: int, doing: str) -> ResourceLimitError:
    """EAGAIN from clone(): the user has as many tasks as RLIMIT_NPROC allows (or another cap)."""
    soft, hard = _rlimit(resource.RLIMIT_NPROC)
    return ResourceLimitError(
        code, f"{doing}: the kernel refused a new thread or process: user {os.getuid()} may have at most "
              f"{_shown(soft)} processes and threads (RLIMIT_NPROC, soft; hard {_shown(hard)})",
        limit="RLIMIT_NPROC", value=soft,
        advice="raise RLIMIT_NPROC: `ulimit -u N` in the shell that starts it, or LimitNPROC=N in its systemd "
               "unit; a handler needs two threads (three with on_oom hooks) and one watchdog process. The "
               "same refusal comes from the pids controller (pids.max, TasksMax=) and kernel.threads-max")


def memory(code: int, doing: str, group: Callable[[], tuple[str, int]] | None = None) -> ResourceLimitError:
    """ENOMEM: RLIMIT_AS if it is set, else the memory cgroup's limit (``group``: its name and limit)."""
    soft, _ = _rlimit(resource.RLIMIT_AS)
    if soft >= 0:
        return ResourceLimitError(
            code, f"{doing}: out of memory: this process may map at most {soft} bytes (RLIMIT_AS)",
            limit="RLIMIT_AS", value=soft,
            advice="raise RLIMIT_AS: `ulimit -v` (KiB) in the shell that starts it, or LimitAS= in its unit")
    name, value = "this process's memory cgroup", -1
    if group is not None:
        with contextlib.suppress(OSError, UseroomError):
            name, value = group()
    return ResourceLimitError(
        code, f"{doing}: out of memory in {name} (limit {_shown(value)} bytes)",
        limit="memory", value=value,
        advice="start the handler while the group has room below its limit, or give it more memory "
               "(memory.limit_in_bytes on cgroup v1, memory.max on v2, MemoryMax= in a systemd unit)")


def exhausted(err: BaseException, doing: str,
              group: Callable[[], tuple[str, int]] | None = None) -> ResourceLimitError | None:
    """The ResourceLimitError that ``err`` stands for, if the kernel ran
    out of fds (EMFILE, ENFILE) or memory (ENOMEM); else None. Errors that
    explain themselves already (a ResourceLimitError, a MemoryLockError, any
    useroom error but a CgroupError, which quotes only the kernel) are left
    alone. ``doing`` starts the message; ``group`` gives the name and the
    limit of the memory cgroup an ENOMEM is charged to."""
    if not isinstance(err, OSError) or isinstance(err, ResourceLimitError):
        return None
    if isinstance(err, UseroomError) and not isinstance(err, CgroupError):
        return None
    what = f"{doing} ({err})"
    if err.errno == errno.EMFILE:
        return nofile(err.errno, what)
    if err.errno == errno.ENFILE:
        return file_max(err.errno, what)
    if err.errno == errno.ENOMEM:
        return memory(err.errno, what, group)
    return None


@contextlib.contextmanager
def spawning(what: str) -> Iterator[None]:
    """Around the creation of one thread or process (``what``, for the
    message): the kernel's refusal becomes a ResourceLimitError. EAGAIN
    means a task limit; ``threading`` reports a refused thread as a bare
    RuntimeError (pthread_create's EAGAIN, or ENOMEM for its stack, is not
    kept), which is taken for the task limit too."""
    try:
        yield
    except UseroomError:
        raise
    except RuntimeError as err:
        raise nproc(errno.EAGAIN, f"cannot start {what}") from err
    except OSError as err:
        if err.errno == errno.EAGAIN:
            raise nproc(err.errno, f"cannot start {what}") from err
        limited = exhausted(err, f"cannot start {what}")
        if limited is not None:
            raise limited from err
        raise
