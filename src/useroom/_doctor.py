"""``useroom doctor``: what this user and this kernel allow an OOM handler to do.

Everything is probed as the calling user, never assumed from the uid: which
cgroup version holds the memory controller and where it is mounted, the
user's memory group and whether it is delegated to them (the files a
handler writes are writable), RLIMIT_MEMLOCK against the locked set that
useroom really locks (measured in a fresh interpreter, because hardening
changes a process for good), pidfd, process_mrelease and PSI trigger
support, and which declared-handler path would be used. The conclusions
end in what to ask an administrator for.

:func:`probe_declared_handler` is the probe for the kernel interfaces that
were proposed for user-space OOM handling and never merged (see the design,
"The kernel interfaces that were proposed"); the declared handler uses it
to choose between the kernel interface and useroom's shim.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import posixpath
import pwd
import resource
import signal
import subprocess
import sys
from collections.abc import Iterable
from typing import Any, Final

import attrs

from useroom._declare import KERNEL_FILES
from useroom._mounts import (
    CGROUP_FSTYPES,
    MemoryHierarchy,
    Mount,
    memory_hierarchy,
    read_memberships,
    read_mounts,
    read_text,
)
from useroom.exceptions import KernelFormatError, UnsupportedKernel

__all__ = [
    "DeclaredHandlerProbe",
    "Diagnosis",
    "FileAccess",
    "GroupAccess",
    "MemlockFit",
    "Probe",
    "diagnose",
    "measure_locked_set",
    "probe_declared_handler",
    "probe_psi_triggers",
]

# The proposed interfaces' files: the ones Handler.declare() probes.
OOM_DELAY_FILE: Final = KERNEL_FILES["delay"]
OOM_RESERVE_FILE: Final = KERNEL_FILES["reserve"]
OOM_HANDLER_FILE: Final = KERNEL_FILES["handler"]

#: Files a handler needs in the group it handles, by cgroup version:
#: name -> (access, what for). "w": written, "r": read.
NEEDED_FILES: Final[dict[int, dict[str, tuple[str, str]]]] = {
    1: {
        "memory.limit_in_bytes": ("w", "set the limit; grant and restore headroom"),
        "memory.oom_control": ("w", "turn the kernel OOM killer off, and back on as the last resort"),
        "cgroup.event_control": ("w", "register the OOM and usage notifications"),
        "cgroup.procs": ("w", "attach processes"),
        "tasks": ("w", "attach threads"),
        "memory.usage_in_bytes": ("r", "read the usage"),
        "memory.stat": ("r", "read the statistics"),
    },
    2: {
        "cgroup.procs": ("w", "attach processes"),
        "cgroup.subtree_control": ("w", "enable the memory controller for child groups"),
        "memory.max": ("w", "set the hard limit (the kernel's backstop)"),
        "memory.high": ("w", "set the throttling limit (the wall the handler holds)"),
        "memory.events": ("r", "watch OOM and high events"),
        "memory.current": ("r", "read the usage"),
    },
}

#: PSI trigger window used by the probe: unprivileged triggers need a
#: window that is a multiple of 2 s (Linux 6.5+); others need CAP_SYS_RESOURCE.
PSI_WINDOW_US: Final = 2_000_000
_PSI_SHORT_WINDOW_US: Final = 1_000_000
_MEASURE_TIMEOUT_S: Final = 60.0
_MEASURE_FLAG: Final = "--measure-locked-set"


@attrs.frozen
class DeclaredHandlerProbe:
    """Which of the proposed kernel interfaces the group's directory has.

    ``path`` is ``"kernel"`` when the kernel has a declared-handler
    interface and ``"shim"`` otherwise (useroom's watchdog); likewise
    :attr:`delay_path` (OOM killer delay, else the watchdog's timer) and
    :attr:`reserve_path` (OOM reserve, else the headroom grant).
    """

    #: The group directory probed ("" if none could be found).
    group: str
    delay: bool
    reserve: bool
    declare: bool

    @property
    def path(self) -> str:
        return "kernel" if self.declare else "shim"

    @property
    def delay_path(self) -> str:
        return "kernel" if self.delay else "shim"

    @property
    def reserve_path(self) -> str:
        return "kernel" if self.reserve else "shim"

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self) | {"path": self.path, "delay_path": self.delay_path,
                                     "reserve_path": self.reserve_path}

    def describe(self) -> str:
        def found(name: str, present: bool) -> str:
            return f"{name} {'present' if present else 'absent'}"

        return (f"{self.path} ({found(OOM_HANDLER_FILE, self.declare)}); OOM delay: "
                f"{'kernel' if self.delay else 'shim, the watchdog times the OOM'} "
                f"({found(OOM_DELAY_FILE, self.delay)}); OOM reserve: "
                f"{'kernel' if self.reserve else 'shim, the headroom grant'} ({found(OOM_RESERVE_FILE, self.reserve)})")


def probe_declared_handler(group_dir: str | None = None) -> DeclaredHandlerProbe:
    """Probe the memory group directory *group_dir* (default: the caller's) for the proposed interfaces.

    Only the files' existence is checked: nothing is written.
    """
    if group_dir is None:
        group_dir = _own_group_dir() or ""
    if not group_dir:
        return DeclaredHandlerProbe("", False, False, False)
    return DeclaredHandlerProbe(
        group_dir,
        delay=os.path.exists(posixpath.join(group_dir, OOM_DELAY_FILE)),
        reserve=os.path.exists(posixpath.join(group_dir, OOM_RESERVE_FILE)),
        declare=os.path.exists(posixpath.join(group_dir, OOM_HANDLER_FILE)),
    )


@attrs.frozen
class FileAccess:
    """One control file a handler needs: whether it exists and the caller may use it."""

    name: str
    #: "w" (written) or "r" (read).
    access: str
    purpose: str
    exists: bool
    allowed: bool
    owner: int | None
    mode: int | None


@attrs.frozen
class GroupAccess:
    """A memory group and what the caller may do with it."""

    relpath: str
    path: str
    version: int
    is_root: bool
    owner: int
    owner_name: str
    #: May create (and remove) child groups: the directory is writable.
    can_create_children: bool
    files: tuple[FileAccess, ...]

    @property
    def missing(self) -> tuple[str, ...]:
        """The needed files the caller cannot use."""
        return tuple(f.name for f in self.files if not f.allowed)

    @property
    def delegated(self) -> bool:
        """Every file a handler needs is usable and child groups can be made."""
        return not self.is_root and not self.missing and self.can_create_children

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self) | {"missing": list(self.missing), "delegated": self.delegated}


@attrs.frozen
class MemlockFit:
    """RLIMIT_MEMLOCK against the set useroom locks (the hardening plus one watcher)."""

    #: Soft and hard RLIMIT_MEMLOCK in bytes, -1 for unlimited.
    limit: int
    hard_limit: int
    #: What the set needs (native core + arena pool + a watcher's arena), bytes; None if not measured.
    needed: int | None
    #: VmLck of a fresh interpreter after hardening and starting a watcher.
    locked: int | None
    #: Bytes each part asked for and got locked: {"core": (size, locked), ...}.
    parts: dict[str, tuple[int, int]]
    notes: tuple[str, ...]
    #: Why it could not be measured.
    error: str | None

    @property
    def fits(self) -> bool | None:
        """Every part fully locked (None if not measured)."""
        if self.error is not None or not self.parts:
            return None
        return all(size == locked for size, locked in self.parts.values())


@attrs.frozen
class Probe:
    """A kernel feature and whether this user can use it."""

    name: str
    available: bool
    detail: str


@attrs.frozen
class Diagnosis:
    """What :func:`diagnose` found; :meth:`describe` for people, :meth:`to_dict` for scripts."""

    uid: int
    user: str
    kernel: str
    #: "v1", "v2", "hybrid" (memory on v1 beside a cgroup2 mount) or None (no memory controller).
    layout: str | None
    memory_version: int | None
    #: (mount point, version, controllers) of every cgroup mount.
    mounts: tuple[tuple[str, int, tuple[str, ...]], ...]
    group: GroupAccess | None
    group_error: str | None
    memlock: MemlockFit
    features: tuple[Probe, ...]
    declared_handler: DeclaredHandlerProbe
    advice: tuple[str, ...]

    @property
    def ready(self) -> bool:
        """This user can run a handler for the group: delegated, supported, and the locked set fits."""
        return (self.group is not None and self.group.delegated and self.memory_version in (1, 2)
                and self.memlock.fits is True)

    def to_dict(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "user": self.user,
            "kernel": self.kernel,
            "layout": self.layout,
            "memory_version": self.memory_version,
            "mounts": [{"mount_point": m, "version": v, "controllers": list(c)} for m, v, c in self.mounts],
            "group": self.group.to_dict() if self.group else None,
            "group_error": self.group_error,
            "memlock": attrs.asdict(self.memlock) | {"fits": self.memlock.fits},
            "features": {probe.name: {"available": probe.available, "detail": probe.detail}
                         for probe in self.features},
            "declared_handler": self.declared_handler.to_dict(),
            "ready": self.ready,
            "advice": list(self.advice),
        }

    def describe(self) -> str:
        lines = [f"useroom doctor: uid {self.uid} ({self.user}), kernel {self.kernel}"]
        if self.memory_version is None:
            lines.append("cgroup: no memory controller is mounted")
        else:
            lines.append(f"cgroup: {self.layout}; the memory controller is on cgroup v{self.memory_version}")
        for mount_point, version, controllers in self.mounts:
            lines.append(f"  {mount_point}: cgroup v{version} ({', '.join(controllers) or 'no controllers'})")
        group = self.group
        if group is None:
            lines.append(f"memory group: unknown ({self.group_error})")
        else:
            state = "delegated to you" if group.delegated else "NOT delegated to you"
            if group.is_root:
                state += " (the root group: it has no limit and no OOM notifications)"
            lines.append(f"memory group: {group.relpath} ({group.path}), owner uid {group.owner} "
                         f"({group.owner_name}): {state}")
            lines.append(f"  child groups: {'can create' if group.can_create_children else 'cannot create'}")
            for file in group.files:
                verb = "writable" if file.access == "w" else "readable"
                status = verb if file.allowed else ("missing" if not file.exists else f"not {verb}")
                lines.append(f"  {file.name}: {status} (to {file.purpose})")
        memlock = self.memlock
        limit = _human(memlock.limit)
        if memlock.error is not None:
            lines.append(f"memory locking: RLIMIT_MEMLOCK {limit}; the locked set could not be measured: "
                         f"{memlock.error}")
        else:
            parts = ", ".join(f"{name} {_human(locked)} of {_human(size)}" for name, (size, locked)
                              in memlock.parts.items())
            verdict = "fits" if memlock.fits else "does NOT fit"
            lines.append(f"memory locking: RLIMIT_MEMLOCK {limit} (hard {_human(memlock.hard_limit)}); "
                         f"useroom's locked set needs {_human(memlock.needed)}, locked "
                         f"{_human(memlock.locked)} ({parts}): {verdict}")
        for probe in self.features:
            lines.append(f"{probe.name}: {'yes' if probe.available else 'no'} ({probe.detail})")
        lines.append(f"declared handler: {self.declared_handler.describe()}")
        lines.append("conclusion: " + ("ready: you can run a handler for this group" if self.ready
                                      else "not ready"))
        if self.advice:
            lines.append("what to do, or ask an administrator for:")
            lines.extend(f"  - {line}" for line in self.advice)
        return "\n".join(lines)


def diagnose(group: str | None = None, *, measure: bool = True) -> Diagnosis:
    """Probe what the calling user can do, for *group* (a cgroupfs path or a path in
    the memory hierarchy; default: the caller's own memory group).

    With ``measure`` the locked set is measured in a fresh interpreter
    (:func:`measure_locked_set`). Never raises for what it finds missing.
    """
    uid = os.geteuid()
    user = _user_name(uid)
    mounts = _cgroup_mounts()
    hierarchy: MemoryHierarchy | None
    try:
        hierarchy = memory_hierarchy()
    except (UnsupportedKernel, KernelFormatError, OSError):
        hierarchy = None
    version = hierarchy.version if hierarchy else None
    layout = _layout(hierarchy, mounts)

    access: GroupAccess | None = None
    group_error: str | None = None
    if hierarchy is None:
        group_error = "no memory controller"
    else:
        try:
            path, relpath = _resolve_group(hierarchy, group)
            access = group_access(path, relpath, hierarchy.version)
        except (OSError, ValueError, KernelFormatError) as err:
            group_error = str(err)

    memlock = measure_locked_set() if measure else _memlock_unmeasured()
    features = (_probe_pidfd(), _probe_mrelease(), probe_psi_triggers())
    declared = probe_declared_handler(access.path if access else "")
    advice = _advice(uid, user, hierarchy, access, group_error, memlock, features)
    return Diagnosis(uid=uid, user=user, kernel=platform.release(), layout=layout, memory_version=version,
                     mounts=mounts, group=access, group_error=group_error, memlock=memlock,
                     features=features, declared_handler=declared, advice=tuple(advice))


def group_access(path: str, relpath: str, version: int) -> GroupAccess:
    """What the caller may do with the group directory *path* (cgroup *version*)."""
    st = os.stat(path)
    files = []
    for name, (mode, purpose) in NEEDED_FILES.get(version, {}).items():
        file = posixpath.join(path, name)
        try:
            fst: os.stat_result | None = os.stat(file)
        except OSError:
            fst = None
        allowed = fst is not None and _access(file, os.W_OK if mode == "w" else os.R_OK)
        files.append(FileAccess(name, mode, purpose, fst is not None, allowed,
                                fst.st_uid if fst else None, fst.st_mode & 0o7777 if fst else None))
    return GroupAccess(
        relpath=relpath, path=path, version=version, is_root=relpath == "/", owner=st.st_uid,
        owner_name=_user_name(st.st_uid), can_create_children=_access(path, os.W_OK | os.X_OK),
        files=tuple(files),
    )


def measure_locked_set(timeout: float = _MEASURE_TIMEOUT_S) -> MemlockFit:
    """Harden a fresh interpreter as a handler does and start a watcher there; report what it locked.

    The child inherits this process's RLIMIT_MEMLOCK and capabilities, so
    the figures are this user's.
    """
    limit, hard = _rlimit()
    argv = [sys.executable, "-m", "useroom._doctor", _MEASURE_FLAG]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        return MemlockFit(limit, hard, None, None, {}, (), f"{argv[0]}: {err}")
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return MemlockFit(limit, hard, None, None, {}, (), tail[0])
    try:
        data = json.loads(done.stdout)
        parts = {name: (int(size), int(locked)) for name, (size, locked) in data["parts"].items()}
        return MemlockFit(limit, hard, sum(size for size, _ in parts.values()), int(data["locked"]), parts,
                          tuple(data["notes"]), None)
    except (ValueError, KeyError, TypeError) as err:
        return MemlockFit(limit, hard, None, None, {}, (), f"unexpected output {done.stdout[:200]!r}: {err}")


def probe_psi_triggers() -> Probe:
    """Whether this user can create PSI memory triggers, where, and which windows.

    Tries a 2 s window (allowed unprivileged on 6.5+) on the caller's cgroup2
    group's ``memory.pressure`` and on ``/proc/pressure/memory``; where it
    works, a 1 s window tells whether the 2 s rule applies to this user.
    """
    results = []
    usable = []
    short_ok = False
    for path in _psi_files():
        outcome = _try_psi_trigger(path, PSI_WINDOW_US)
        results.append(f"{path}: {outcome}")
        if outcome == "ok":
            usable.append(path)
            short_ok = short_ok or _try_psi_trigger(path, _PSI_SHORT_WINDOW_US) == "ok"
    if not results:
        return Probe("psi_triggers", False, "no PSI memory.pressure file (kernel without CONFIG_PSI?)")
    if usable:
        rule = ("any window (CAP_SYS_RESOURCE)" if short_ok else
                "windows must be a multiple of 2 s (no CAP_SYS_RESOURCE; a 1 s window is refused)")
        return Probe("psi_triggers", True, f"{rule}; " + "; ".join(results))
    return Probe("psi_triggers", False, "; ".join(results))


# -- probes -------------------------------------------------------------------


def _probe_pidfd() -> Probe:
    if not hasattr(os, "pidfd_open") or not hasattr(signal, "pidfd_send_signal"):
        return Probe("pidfd", False, "this Python lacks os.pidfd_open (3.9+)")
    try:
        fd = os.pidfd_open(os.getpid())
    except OSError as err:
        return Probe("pidfd", False, f"pidfd_open: {err.strerror} (Linux 5.3+)")
    try:
        signal.pidfd_send_signal(fd, 0)
    except OSError as err:
        return Probe("pidfd", False, f"pidfd_send_signal: {err.strerror} (Linux 5.1+)")
    finally:
        os.close(fd)
    return Probe("pidfd", True, "victims are signalled through pidfds: no pid-reuse race")


def _probe_mrelease() -> Probe:
    try:
        from useroom import native
    except ImportError as err:
        return Probe("process_mrelease", False, f"the native core does not load: {err}")
    if native.can_use_mrelease():
        return Probe("process_mrelease", True, "a killed victim's memory is reaped at once (Linux 5.15+)")
    return Probe("process_mrelease", False, "ENOSYS (Linux 5.15+): the kernel's reaper frees victims' memory")


def _psi_files() -> list[str]:
    files = []
    try:
        memberships = read_memberships()
    except (OSError, KernelFormatError):
        memberships = ()
    unified = next((m.path for m in memberships if m.version == 2), None)
    if unified is not None:
        for mount in _read_mounts_quietly():
            if mount.fstype == "cgroup2":
                directory = mount.fs_path(unified)
                if directory is not None and os.path.exists(posixpath.join(directory, "memory.pressure")):
                    files.append(posixpath.join(directory, "memory.pressure"))
                    break
    if os.path.exists("/proc/pressure/memory"):
        files.append("/proc/pressure/memory")
    return files


def _try_psi_trigger(path: str, window_us: int) -> str:
    """Create (and at once drop) a trigger; "ok" or the errno name of the refusal."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        return f"open: {errno.errorcode.get(err.errno or 0, err.errno)}"
    try:
        os.write(fd, f"some 150000 {window_us}\0".encode())
    except OSError as err:
        return f"{window_us // 1000} ms window: {errno.errorcode.get(err.errno or 0, err.errno)}"
    finally:
        os.close(fd)  # closing the file destroys the trigger
    return "ok"


# -- helpers ------------------------------------------------------------------


def _resolve_group(hierarchy: MemoryHierarchy, group: str | None) -> tuple[str, str]:
    """(filesystem path, path in the hierarchy) of *group*, or of the caller's group."""
    if group is None:
        membership = hierarchy.membership(read_memberships())
        if membership is None:
            raise UnsupportedKernel("/proc/self/cgroup has no line for the memory hierarchy")
        relpath = membership.path
        path = hierarchy.fs_path(relpath)
        if path is None:
            raise FileNotFoundError(errno.ENOENT, f"your memory group {relpath} is not visible through any mount")
        return path, relpath
    real = os.path.realpath(group)
    relpath_of_fs = hierarchy.cgroup_path(real)
    if relpath_of_fs is not None and os.path.isdir(real):
        return real, relpath_of_fs
    path = hierarchy.fs_path(posixpath.normpath(posixpath.join("/", group)))
    if path is None or not os.path.isdir(path):
        raise FileNotFoundError(errno.ENOENT, f"no group {group} in the memory hierarchy")
    return path, posixpath.normpath(posixpath.join("/", group))


def _own_group_dir() -> str | None:
    try:
        hierarchy = memory_hierarchy()
        return _resolve_group(hierarchy, None)[0]
    except (OSError, UnsupportedKernel, KernelFormatError):
        return None


def _read_mounts_quietly() -> tuple[Mount, ...]:
    try:
        return read_mounts()
    except (OSError, KernelFormatError):
        return ()


def _cgroup_mounts() -> tuple[tuple[str, int, tuple[str, ...]], ...]:
    found = []
    for mount in _read_mounts_quietly():
        if mount.fstype not in CGROUP_FSTYPES or mount.cgroup_version is None:
            continue
        if mount.fstype == "cgroup2":
            try:
                controllers = tuple(read_text(posixpath.join(mount.mount_point, "cgroup.controllers")).split())
            except OSError:
                controllers = ()
        else:
            controllers = tuple(sorted(mount.controllers))
        found.append((mount.mount_point, mount.cgroup_version, controllers))
    return tuple(found)


def _layout(hierarchy: MemoryHierarchy | None, mounts: Iterable[tuple[str, int, tuple[str, ...]]]) -> str | None:
    if hierarchy is None:
        return None
    if hierarchy.version == 2:
        return "v2"
    return "hybrid" if any(version == 2 for _, version, _ in mounts) else "v1"


def _access(path: str, mode: int) -> bool:
    return os.access(path, mode, effective_ids=os.access in os.supports_effective_ids)


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _rlimit() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return (-1 if soft == resource.RLIM_INFINITY else soft, -1 if hard == resource.RLIM_INFINITY else hard)


def _memlock_unmeasured() -> MemlockFit:
    limit, hard = _rlimit()
    return MemlockFit(limit, hard, None, None, {}, (), "not measured")


def _human(value: int | None) -> str:
    if value is None:
        return "unknown"
    if value < 0:
        return "unlimited"
    if value >= 1 << 20:
        return f"{value / (1 << 20):.2f} MiB"
    return f"{value / 1024:.0f} KiB"


def _advice(uid: int, user: str, hierarchy: MemoryHierarchy | None, group: GroupAccess | None,
            group_error: str | None, memlock: MemlockFit, features: tuple[Probe, ...]) -> list[str]:
    from useroom._hardening import memlock_advice  # imports the native core

    advice = []
    if uid == 0:
        advice.append("you are root, so these conclusions are root's: run `useroom doctor` as the user "
                      "who will run the handler")
    if hierarchy is None:
        advice.append("no memory cgroup controller is mounted: an administrator must enable it "
                      "(cgroup v2: list 'memory' in the parent's cgroup.subtree_control; v1: mount -t cgroup "
                      "-o memory)")
        return advice
    if hierarchy.version == 1:
        advice.append("the memory controller is on cgroup v1, which upstream is retiring: memory.oom_control "
                      "is deprecated (a warning since about Linux 6.12) and kernels since 6.11 build without "
                      "v1 memory unless CONFIG_MEMCG_V1=y; useroom keeps v1 as legacy: plan the move to "
                      "cgroup v2 (systemd: systemd.unified_cgroup_hierarchy=1 on the kernel command line)")
    if group is None:
        advice.append(f"your memory group could not be checked: {group_error}")
    elif not group.delegated:
        advice.extend(_delegation_advice(user, group))
    if memlock.fits is False and memlock.needed is not None:
        advice.append("the locked set does not fit: " + memlock_advice(memlock.needed, memlock.limit,
                                                                       memlock.hard_limit))
    elif memlock.fits is None and memlock.error != "not measured":
        advice.append(f"the locked set could not be measured ({memlock.error}): run `useroom doctor` "
                      "where useroom's native core loads")
    for probe in features:
        if probe.name == "pidfd" and not probe.available:
            advice.append("no pidfds: victims are signalled by pid (a kernel of 5.3 or later closes the "
                          "pid-reuse race)")
    return advice


def _delegation_advice(user: str, group: GroupAccess) -> list[str]:
    advice = []
    if group.is_root:
        advice.append(f"{group.relpath} is the root memory group, which has no limit and no OOM notifications: "
                      "a handler needs a group below it")
    if group.version == 1:
        if group.is_root or group.owner != os.geteuid():
            target = posixpath.join(group.path, user)
            advice.append(
                f"ask an administrator to delegate a group to you (cgroup v1: a directory and its files, "
                f"chowned): mkdir {target} && chown -R {user}: {target}; then move your shell into it "
                f"(echo $$ > {target}/cgroup.procs: you may move only your own processes)")
        else:
            advice.append(f"ask an administrator to chown the rest of {group.path} to you "
                          f"(chown -R {user}: {group.path})")
    else:
        advice.append(
            "ask for a delegated subtree (cgroup v2): systemd-run --user --scope -p Delegate=yes <command>, "
            "or a user service with Delegate=yes; by hand, an administrator chowns the directory and its "
            "cgroup.procs, cgroup.threads and cgroup.subtree_control to you. Moving a process also needs "
            "write access to cgroup.procs of the common ancestor of its old and new group")
    if group.missing:
        advice.append(f"in {group.path} you cannot use: {', '.join(group.missing)}")
    if not group.can_create_children:
        advice.append(f"you cannot create child groups in {group.path} (the directory is not writable)")
    return advice


def _measure_main() -> int:
    """The child of :func:`measure_locked_set`: harden, start a watcher, print JSON."""
    from useroom import native
    from useroom._hardening import vm_locked, lock_memory

    report = lock_memory()
    watcher = native.NativeWatcher()
    try:
        watcher.start()
        try:
            arena = watcher.arena
            parts = {"native core": (report.core.image_size, report.core.locked),
                     "watcher arena": (arena.size, arena.locked)}
            if report.pool is not None:
                parts["arena pool"] = (report.pool.size, report.pool.locked)
            json.dump({"locked": vm_locked(), "parts": parts, "notes": list(report.notes)}, sys.stdout)
        finally:
            watcher.stop()
    finally:
        watcher.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == [_MEASURE_FLAG]:
        sys.exit(_measure_main())
    sys.exit(f"usage: {sys.argv[0]} {_MEASURE_FLAG} (internal; see `useroom doctor`)")
