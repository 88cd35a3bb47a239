"""Where the memory controller is mounted, and which group a process is in.

Parsers take the text of ``/proc/<pid>/mountinfo`` or ``/proc/<pid>/cgroup``
and are pure; thin wrappers (``read_*``) read the real files. Nothing here
assumes ``/sys/fs/cgroup/memory``: the memory hierarchy is the cgroup v1 mount
whose super options name ``memory`` or, when no v1 hierarchy has it, a
cgroup2 mount whose root ``cgroup.controllers`` lists ``memory`` (a controller
is bound to one hierarchy at a time, so the two cannot both hold it).
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable, Iterable
from typing import Final

import attrs

from useroom.exceptions import KernelFormatError, UnsupportedKernel

__all__ = [
    "MemoryHierarchy",
    "Membership",
    "Mount",
    "find_memory_hierarchy",
    "memory_hierarchy",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "read_memberships",
    "read_mounts",
    "read_text",
]

CGROUP_FSTYPES: Final = frozenset({"cgroup", "cgroup2"})

# cgroup v1 super options that are not controllers (see cgroup1_show_options).
_V1_NON_CONTROLLER_OPTIONS: Final = frozenset(
    {"rw", "ro", "noprefix", "clone_children", "xattr", "cpuset_v2_mode", "none", "all", "favordynmods"}
)
_OCTAL_ESCAPE: Final = re.compile(r"\\([0-7]{3})")


@attrs.frozen
class Mount:
    """One line of ``/proc/<pid>/mountinfo`` (see proc(5)), with escapes decoded."""

    mount_id: int
    parent_id: int
    device: str
    #: The path within the filesystem that is mounted here ("/" for the whole of it).
    root: str
    mount_point: str
    mount_options: tuple[str, ...]
    optional_fields: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]

    @property
    def cgroup_version(self) -> int | None:
        """1 or 2 for a cgroup filesystem, else None."""
        return {"cgroup": 1, "cgroup2": 2}.get(self.fstype)

    @property
    def controllers(self) -> frozenset[str]:
        """The v1 controllers (and ``name=...`` of a named hierarchy) bound to this mount.

        Empty for a cgroup2 mount, whose controllers are listed in its root
        ``cgroup.controllers`` instead, and for any other filesystem.
        """
        if self.fstype != "cgroup":
            return frozenset()
        return frozenset(
            option
            for option in self.super_options
            if option not in _V1_NON_CONTROLLER_OPTIONS and ("=" not in option or option.startswith("name="))
        )

    def fs_path(self, cgroup_path: str) -> str | None:
        """Return where the group *cgroup_path* is seen through this mount.

        None when the group is outside the subtree mounted here (a mount whose
        ``root`` is not "/" shows only part of the hierarchy).
        """
        relative = _relative_to(_normalize(cgroup_path), _normalize(self.root))
        if relative is None:
            return None
        return self.mount_point if relative == "" else posixpath.join(self.mount_point, relative)

    def cgroup_path(self, fs_path: str) -> str | None:
        """Return the group path within the hierarchy for *fs_path*, or None if not below this mount."""
        relative = _relative_to(_normalize(fs_path), _normalize(self.mount_point))
        if relative is None:
            return None
        return self.root if relative == "" else posixpath.join(self.root, relative)


@attrs.frozen
class Membership:
    """One line of ``/proc/<pid>/cgroup``: ``hierarchy-id:controllers:path``.

    v1 lines name their controllers (``4:memory:/a``, ``1:name=systemd:/``);
    the cgroup2 line is ``0::/path``.
    """

    hierarchy_id: int
    controllers: frozenset[str]
    path: str

    @property
    def version(self) -> int:
        """2 for the unified hierarchy's line, else 1."""
        return 2 if self.hierarchy_id == 0 and not self.controllers else 1


@attrs.frozen
class MemoryHierarchy:
    """The hierarchy that holds the memory controller, and every mount of it."""

    version: int
    mounts: tuple[Mount, ...] = attrs.field(validator=attrs.validators.min_len(1))

    @property
    def mount(self) -> Mount:
        """The mount to use for paths: one showing the whole hierarchy if there is one."""
        for mount in self.mounts:
            if mount.root == "/":
                return mount
        return self.mounts[0]

    def fs_path(self, cgroup_path: str) -> str | None:
        """Return a filesystem path for the group *cgroup_path*, or None if no mount shows it."""
        for mount in sorted(self.mounts, key=lambda mount: mount.root != "/"):
            path = mount.fs_path(cgroup_path)
            if path is not None:
                return path
        return None

    def cgroup_path(self, fs_path: str) -> str | None:
        """Return the group path for a filesystem path below one of the mounts, or None."""
        for mount in sorted(self.mounts, key=lambda mount: len(mount.mount_point), reverse=True):
            path = mount.cgroup_path(fs_path)
            if path is not None:
                return path
        return None

    def membership(self, memberships: Iterable[Membership]) -> Membership | None:
        """Pick the line of ``/proc/<pid>/cgroup`` that belongs to this hierarchy."""
        for membership in memberships:
            if self.version == 1 and "memory" in membership.controllers:
                return membership
            if self.version == 2 and membership.version == 2:
                return membership
        return None


def parse_mountinfo(text: str) -> tuple[Mount, ...]:
    """Parse the text of ``/proc/<pid>/mountinfo``.

    Raises :class:`~useroom.exceptions.KernelFormatError` for a line that does
    not have the documented shape.
    """
    # split("\n"), not splitlines(): the kernel does not escape "\r" and the like.
    return tuple(_parse_mount_line(number, line) for number, line in enumerate(text.split("\n"), 1) if line)


def parse_proc_cgroup(text: str) -> tuple[Membership, ...]:
    """Parse the text of ``/proc/<pid>/cgroup``.

    Raises :class:`~useroom.exceptions.KernelFormatError` for a malformed line.
    """
    memberships = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line:
            continue
        fields = line.split(":", 2)
        if len(fields) != 3 or not _is_decimal(fields[0]) or not fields[2].startswith("/"):
            raise KernelFormatError(f"/proc/<pid>/cgroup line {number} is not 'id:controllers:/path': {line[:200]!r}")
        controllers = frozenset(fields[1].split(",")) if fields[1] else frozenset()
        memberships.append(Membership(int(fields[0]), controllers, fields[2]))
    return tuple(memberships)


def find_memory_hierarchy(
    mounts: Iterable[Mount], read_controllers: Callable[[Mount], str | None]
) -> MemoryHierarchy | None:
    """Return the memory controller's hierarchy among *mounts*, or None if it is not mounted.

    *read_controllers* returns the text of a cgroup2 mount's
    ``cgroup.controllers`` (None if unreadable); it is called only when no v1
    mount has the memory controller.
    """
    mounts = tuple(mounts)
    v1 = tuple(mount for mount in mounts if "memory" in mount.controllers)
    if v1:
        return MemoryHierarchy(1, v1)
    v2 = []
    for mount in mounts:
        if mount.fstype == "cgroup2":
            controllers = read_controllers(mount)
            if controllers is not None and "memory" in controllers.split():
                v2.append(mount)
    return MemoryHierarchy(2, tuple(v2)) if v2 else None


def read_text(path: str) -> str:
    """Read a whole (small, kernel-generated) file; bytes that are not UTF-8 are kept as surrogates."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return os.fsdecode(b"".join(chunks))


def read_mounts(pid: int | str = "self") -> tuple[Mount, ...]:
    """Parse ``/proc/<pid>/mountinfo``."""
    return parse_mountinfo(read_text(f"/proc/{pid}/mountinfo"))


def read_memberships(pid: int | str = "self") -> tuple[Membership, ...]:
    """Parse ``/proc/<pid>/cgroup`` (raises FileNotFoundError if the process is gone)."""
    return parse_proc_cgroup(read_text(f"/proc/{pid}/cgroup"))


def memory_hierarchy(mounts: Iterable[Mount] | None = None) -> MemoryHierarchy:
    """Find the memory controller's hierarchy among *mounts* (default: this process's mounts).

    Raises :class:`~useroom.exceptions.UnsupportedKernel` if it is not mounted.
    """
    hierarchy = find_memory_hierarchy(read_mounts() if mounts is None else mounts, _read_cgroup_controllers)
    if hierarchy is None:
        raise UnsupportedKernel(
            "no cgroup filesystem with the memory controller is mounted "
            "(no v1 mount with 'memory' in /proc/self/mountinfo, no cgroup2 mount listing it in cgroup.controllers)"
        )
    return hierarchy


def _read_cgroup_controllers(mount: Mount) -> str | None:
    try:
        return read_text(posixpath.join(mount.mount_point, "cgroup.controllers"))
    except OSError:
        return None


def _parse_mount_line(number: int, line: str) -> Mount:
    fields = line.split(" ")
    try:
        separator = fields.index("-", 6)
    except ValueError:
        separator = -1
    if separator < 0 or len(fields) != separator + 4 or not all(_is_decimal(field) for field in fields[:2]):
        raise KernelFormatError(f"mountinfo line {number} does not have the shape of proc(5): {line[:200]!r}")
    return Mount(
        mount_id=int(fields[0]),
        parent_id=int(fields[1]),
        device=fields[2],
        root=_unescape(fields[3]),
        mount_point=_unescape(fields[4]),
        mount_options=tuple(_unescape(option) for option in fields[5].split(",")),
        optional_fields=tuple(_unescape(field) for field in fields[6:separator]),
        fstype=_unescape(fields[separator + 1]),
        source=_unescape(fields[separator + 2]),
        super_options=tuple(_unescape(option) for option in fields[separator + 3].split(",")),
    )


def _unescape(field: str) -> str:
    """Decode the kernel's octal escapes (space is ``\\040``, backslash ``\\134``)."""
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match[1], 8)), field)


def _is_decimal(text: str) -> bool:
    # str.isdecimal() also accepts non-ASCII digits, which int() would take too.
    return 0 < len(text) <= 20 and text.isascii() and text.isdecimal()


def _normalize(path: str) -> str:
    """Make an absolute path canonical without touching the filesystem ("//a/./b/" -> "/a/b")."""
    return posixpath.normpath(posixpath.join("/", path)).replace("//", "/", 1)


def _relative_to(path: str, base: str) -> str | None:
    """Return *path* below *base* ("" for *base* itself), or None; both absolute and normalized."""
    if base == "/":
        return path.lstrip("/")
    if path == base:
        return ""
    if path.startswith(base + "/"):
        return path[len(base) + 1 :]
    return None
