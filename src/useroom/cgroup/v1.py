"""The cgroup v1 memory controller backend.

v1 is what makes a user-space OOM handler possible at all: with
``memory.oom_control`` set to 1, tasks that hit the limit sleep (in
``mem_cgroup_oom_synchronize``, killable) until user space raises the limit,
kills or moves a task, or re-enables the kernel killer. Notifications are
registered by writing ``"<eventfd> <control fd> [args]"`` to
``cgroup.event_control``.

Errno values measured on Linux 6.18:

- ``rmdir`` with tasks or child groups: EBUSY; ``mkdir`` of an existing
  group: EEXIST.
- writing a missing pid to ``cgroup.procs``: ESRCH (0 means "the writer").
- ``memory.limit_in_bytes`` below what the kernel can reclaim: EBUSY; the
  value is rounded down to a page; "-1" lifts the limit, which then reads as
  9223372036854771712 (``LONG_MAX`` rounded down to a page).
- an fd opened on a group that was then removed: ENODEV on read and write;
  opening a file of a removed group: ENOENT.
- ``memory.oom_control`` takes only 0 or 1 (EINVAL otherwise) and, like the
  limit, cannot be set on the root group.
- ``cgroup.event_control`` is mode 0200 (owner only) on this kernel; older
  kernels made it world-writable.
- a writer that is not root gets EACCES from ``cgroup.procs`` for a process
  whose uid and saved uid both differ from its euid, even with the file
  writable (``__cgroup1_procs_write``); v1 has no common-ancestor rule.
"""

from __future__ import annotations

import errno
import os
import pwd
import select
from collections.abc import Mapping
from typing import ClassVar, Final

from useroom.cgroup.base import Group
from useroom.cgroup.notify import EventRegistration, OomCounter
from useroom.cgroup.values import OomControl
from useroom._units import PAGE_SIZE, UNLIMITED, format_size, parse_size
from useroom.exceptions import CgroupError, CgroupPermissionError, InvalidSize, LimitBelowUsage, ProcessGone

__all__ = ["V1Group"]

# What v1 reports for "no limit": PAGE_COUNTER_MAX pages, i.e. LONG_MAX rounded
# down to a page (9223372036854771712 with 4 KiB pages).
_V1_NO_LIMIT: Final = UNLIMITED // PAGE_SIZE * PAGE_SIZE


class V1Group(Group):
    """A group of the cgroup v1 memory controller."""

    version: ClassVar[int] = 1
    limit_file: ClassVar[str] = "memory.limit_in_bytes"
    handling: ClassVar[str] = "the handler disables the kernel OOM killer and acts at the limit"
    usage_file: ClassVar[str] = "memory.usage_in_bytes"
    wall_file: ClassVar[str] = "memory.limit_in_bytes"
    wall_write_checks_fit: ClassVar[bool] = True  # EBUSY below the usage
    procs_pread_relists: ClassVar[bool] = False  # the first read of each open file loads the list
    wall_sleep_max: ClassVar[float] = 0.0  # the OOM wait ends when the limit fits
    moves_threads: ClassVar[bool] = True  # the tasks file
    parent_holds_processes: ClassVar[bool] = True
    #: Writing "0" enables the kernel OOM killer, "1" disables it.
    oom_control_file: ClassVar[str] = "memory.oom_control"
    event_control_file: ClassVar[str] = "cgroup.event_control"
    permission_rules: ClassVar[Mapping[str, tuple[str, str]]] = {
        **Group.permission_rules,
        "attach-owner": (
            "v1: a writer that is not root may move only processes whose real or saved uid equals its "
            "effective uid; write permission on cgroup.procs does not extend that",
            "start the process as this user, or have root attach it: delegating a group cannot grant "
            "moving another user's processes",
        ),
        "attach": (
            "v1: writing cgroup.procs needs write permission on it, and the writer's euid to match "
            "the target's uid (or saved uid), or root",
            "chown the group's cgroup.procs to the user, and attach only that user's processes",
        ),
        "create": (
            "creating a group needs write permission on the parent group's directory",
            "chown the parent group's directory to the user (delegation)",
        ),
        "write": (
            "writing a control file needs write permission on it",
            "chown the group's control files (memory.limit_in_bytes, memory.oom_control, ...) to the user",
        ),
        "notify": (
            "v1: registering an event writes cgroup.event_control, which needs write permission on it "
            "(owner-only, mode 0200, on recent kernels; world-writable on older ones)",
            "chown the group's cgroup.event_control to the user",
        ),
    }

    __slots__ = ()

    def attach(self, pid: int) -> None:
        try:
            super().attach(pid)
        except CgroupPermissionError as err:
            procs = self._file(self.procs_file)
            if err.errno != errno.EACCES or not os.access(procs, os.W_OK):
                raise
            # The file let us write: the kernel's uid rule refused it.
            rule, advice = self.permission_rules["attach-owner"]
            raise CgroupPermissionError(
                err.errno,
                f"cannot attach pid {pid} ({_owner_text(pid)}) to {self.relpath}: Permission denied: "
                f"this process runs as euid {os.geteuid()} ({_user_text(os.geteuid())})",
                procs, rule=rule, advice=advice,
            ) from err.__cause__

    def attach_thread(self, tid: int) -> None:
        """Move one thread *tid* into the group (cgroup v1's ``tasks``).

        The memory controller charges a process's pages to the group of its
        mm's owner wherever its threads are, but a thread's kernel
        allocations (open files, pidfds, read buffers) to the thread's own
        group. Raises :class:`ProcessGone` if there is no such thread.
        """
        try:
            self._write("tasks", str(tid))
        except OSError as err:
            if err.errno == errno.ESRCH:
                raise ProcessGone(f"cannot move thread {tid} to {self.relpath}: no such thread") from err
            raise self._error(err, f"move thread {tid} to", self._file("tasks"), rule="attach") from err

    def _error(self, err: OSError, action: str, path: str, **options: str) -> CgroupError:
        error = super()._error(err, action, path, **options)
        if not isinstance(error, CgroupPermissionError) or options.get("rule") == "attach":
            return error
        # Name who owns what was refused, and who asked.
        try:
            st = os.stat(path)
            owner = f"owned by uid {st.st_uid} ({_user_text(st.st_uid)}), mode {st.st_mode & 0o7777:04o}"
        except OSError:
            owner = "its owner unknown"
        return CgroupPermissionError(
            error.errno or 0, f"{error.strerror} (the file is {owner}; this process runs as euid "
            f"{os.geteuid()} ({_user_text(os.geteuid())}))", error.path, rule=error.rule, advice=error.advice,
        )

    def limit(self) -> int:
        value = self._read_int(self.limit_file, "read the limit of")
        return UNLIMITED if value >= _V1_NO_LIMIT else value

    def set_limit(self, size: str | int) -> None:
        self._refuse_root("set a limit on")
        limit = parse_size(size)
        try:
            self._write(self.limit_file, "-1" if limit == UNLIMITED else str(limit))
        except OSError as err:
            if err.errno == errno.EBUSY:
                raise LimitBelowUsage(
                    err.errno,
                    f"cannot set the limit of {self.relpath} to {format_size(limit)}: its usage is "
                    f"{self._usage_text()} and the kernel could not reclaim enough",
                    self._file(self.limit_file),
                ) from err
            raise self._error(
                err, "set the limit of", self._file(self.limit_file), rule="write", detail=f" to {format_size(limit)}"
            ) from err

    def oom_control(self) -> OomControl:
        return OomControl.from_text(self._read(self.oom_control_file, "read the OOM state of"))

    def set_oom_kill(self, enabled: bool) -> None:
        self._refuse_root("change the OOM killer of")
        try:
            self._write(self.oom_control_file, "0" if enabled else "1")
        except OSError as err:
            action = "enable" if enabled else "disable"
            raise self._error(
                err, f"{action} the OOM killer of", self._file(self.oom_control_file), rule="write"
            ) from err

    def oom_notifier(self) -> EventRegistration:
        self._refuse_root("get OOM notifications for")
        return self._register(self.oom_control_file, "", f"OOM of {self.relpath}")

    def usage_threshold(self, size: str | int) -> EventRegistration:
        self._refuse_root("set a usage threshold on")
        threshold = parse_size(size)
        if threshold == UNLIMITED:
            raise InvalidSize("a usage threshold is a number of bytes, not 'max'")
        return self._register(
            self.usage_file, f" {threshold}", f"usage of {self.relpath} crossing {format_size(threshold)}"
        )

    def _register(self, control_file: str, arguments: str, description: str) -> EventRegistration:
        """Register an eventfd on *control_file* through cgroup.event_control."""
        eventfd = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            control_fd = self.open_file(control_file, os.O_RDONLY)
        except BaseException:
            os.close(eventfd)
            raise
        registration = EventRegistration(eventfd, control_fd, description)  # owns both fds from here
        try:
            self._write(self.event_control_file, f"{eventfd} {control_fd}{arguments}")
        except OSError as err:
            registration.close()
            raise self._error(
                err, "register an event on", self._file(self.event_control_file), rule="notify"
            ) from err
        except BaseException:
            registration.close()
            raise
        return registration

    def _release(self) -> None:
        # Either change wakes tasks asleep in the OOM wait; both, so that they
        # also do not fall asleep again while they are being killed.
        for name, value in ((self.oom_control_file, "0"), (self.limit_file, "-1")):
            try:
                self._write(name, value)
            except OSError as err:
                raise self._error(err, "release", self._file(name), rule="write") from err

    def _usage_text(self) -> str:
        try:
            return format_size(self.usage())
        except Exception:  # noqa: BLE001 - only decorates a message; the EBUSY is what matters
            return "unknown"

    def oom_counter(self) -> OomCounter:
        """The notifications of :meth:`oom_notifier`, counted (see :class:`_EventfdOomCounter`)."""
        return _EventfdOomCounter(self.oom_notifier())


def _user_text(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "no such user"


def _owner_text(pid: int) -> str:
    """ "uid 0 (root)" for the owner of process *pid*, from /proc (the real uid, as the kernel checks it)."""
    try:
        # Binary: a process that cannot read the interpreter's library
        # (a uid switched after start) cannot import a codec either.
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(b"Uid:"):
                    real, _, saved = (int(field) for field in line.split()[1:4])
                    uids = f"uid {real}" if real == saved else f"uid {real}, saved uid {saved}"
                    return f"{uids} ({_user_text(real)})"
    except (OSError, ValueError):
        pass
    return "owner unknown"


class _EventfdOomCounter(OomCounter):
    """v1: an eventfd registered on ``memory.oom_control``, which the kernel
    signals at every OOM of the group, its killer on or off (each task's
    failed charge: tasks that fail together count each); the count is the
    sum of the eventfd's counters."""

    poll_events: ClassVar[int] = select.POLLIN

    def __init__(self, registration: EventRegistration) -> None:
        super().__init__()
        self._registration = registration

    def fileno(self) -> int:
        return self._registration.fileno()

    def update(self) -> int:
        self.count += self._registration.read(0)
        return self.count

    def close(self) -> None:
        self._registration.close()
