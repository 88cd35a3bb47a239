"""Parsing of /proc/<pid>/mountinfo and /proc/<pid>/cgroup, and finding the memory hierarchy."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from useroom._mounts import (
    MemoryHierarchy,
    Membership,
    Mount,
    find_memory_hierarchy,
    memory_hierarchy,
    parse_mountinfo,
    parse_proc_cgroup,
    read_memberships,
    read_mounts,
)
from useroom.exceptions import KernelFormatError

# This project's machines: memory on cgroup v1, a cgroup2 mount without memory.
HYBRID_MOUNTINFO = """\
23 1 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

# A current distribution: one cgroup2 mount holding every controller.
UNIFIED_MOUNTINFO = """\
25 30 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
33 25 0:28 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
"""

# A container: the memory hierarchy is bind-mounted from a subtree.
CONTAINER_MOUNTINFO = """\
700 600 0:32 /docker/abc /sys/fs/cgroup/memory ro,nosuid,nodev,noexec,relatime master:15 - cgroup cgroup rw,memory
"""

mounts = st.builds(
    Mount,
    mount_id=st.integers(0, 2**31),
    parent_id=st.integers(0, 2**31),
    device=st.from_regex(r"\A[0-9]{1,3}:[0-9]{1,3}\Z"),
    root=st.text(min_size=1).map(lambda text: "/" + text),
    mount_point=st.text(min_size=1).map(lambda text: "/" + text),
    mount_options=st.lists(st.text(st.characters(exclude_characters=","), min_size=1), min_size=1).map(tuple),
    optional_fields=st.lists(st.text(min_size=1).filter(lambda text: text != "-")).map(tuple),
    fstype=st.text(min_size=1),
    source=st.text(),
    super_options=st.lists(st.text(min_size=1), min_size=1).map(tuple),
)

PROC_CGROUP_V1 = """\
9:name=systemd:/
4:memory:/process_api/3c33
2:cpu,cpuacct:/
0::/
"""


class TestParseMountinfo:
    def test_fields(self) -> None:
        """Each field of a line lands in the matching attribute."""
        expected = Mount(
            mount_id=23,
            parent_id=1,
            device="0:22",
            root="/",
            mount_point="/sys",
            mount_options=("rw", "nosuid", "nodev", "noexec", "relatime"),
            optional_fields=("shared:7",),
            fstype="sysfs",
            source="sysfs",
            super_options=("rw",),
        )
        assert expected == parse_mountinfo(HYBRID_MOUNTINFO)[0]

    def test_every_line(self) -> None:
        """Every non-empty line is one Mount, in order."""
        assert [23, 31, 32, 35, 40, 41] == [mount.mount_id for mount in parse_mountinfo(HYBRID_MOUNTINFO)]

    def test_octal_escapes(self) -> None:
        """Space, tab, newline and backslash in paths are decoded from the kernel's octal escapes."""
        line = r"50 1 8:1 /a\040b /mnt/x\011y\012z\134w rw - ext4 /dev/my\040disk rw"
        mount = parse_mountinfo(line)[0]
        assert ("/a b", "/mnt/x\ty\nz\\w", "/dev/my disk") == (mount.root, mount.mount_point, mount.source)

    def test_several_optional_fields(self) -> None:
        """Optional fields are all kept, up to the '-' separator."""
        line = "50 1 8:1 / /mnt rw shared:1 master:2 propagate_from:3 - ext4 /dev/sda1 rw,errors=continue"
        mount = parse_mountinfo(line)[0]
        assert ("shared:1", "master:2", "propagate_from:3") == mount.optional_fields
        assert ("ext4", ("rw", "errors=continue")) == (mount.fstype, mount.super_options)

    def test_empty_source(self) -> None:
        """An empty source field (two spaces) is kept as an empty string."""
        mount = parse_mountinfo("50 1 0:5 / /mnt rw - tmpfs  rw")[0]
        assert ("tmpfs", "", ("rw",)) == (mount.fstype, mount.source, mount.super_options)

    @pytest.mark.parametrize(
        "line",
        [
            "garbage",
            "1 2 3 4 5 6",
            "1 2 0:1 / /mnt rw ext4 /dev/sda rw",  # no separator
            "1 2 0:1 / /mnt rw - ext4 /dev/sda",  # nothing after the source
            "1 2 0:1 / /mnt rw - ext4 /dev/sda rw extra",
            "x 2 0:1 / /mnt rw - ext4 /dev/sda rw",
            "\u0661 2 0:1 / /mnt rw - ext4 /dev/sda rw",
        ],
    )
    def test_malformed(self, line: str) -> None:
        """A line without the documented shape raises KernelFormatError naming the line."""
        with pytest.raises(KernelFormatError, match="line 2"):
            parse_mountinfo(HYBRID_MOUNTINFO.splitlines()[0] + "\n" + line)

    @given(st.lists(mounts))
    def test_round_trip(self, mounts: list[Mount]) -> None:
        """Mounts formatted the way the kernel formats them (escaping space, tab, newline, backslash,
        and commas inside super options) parse back to equal records."""
        assert tuple(mounts) == parse_mountinfo("".join(format_mount(mount) + "\n" for mount in mounts))

    @given(st.text())
    def test_arbitrary_text_raises_only_kernel_format_error(self, text: str) -> None:
        """Any text parses or raises KernelFormatError, never another error."""
        try:
            parse_mountinfo(text)
        except KernelFormatError:
            pass


class TestMount:
    def test_v1_controllers(self) -> None:
        """A v1 mount's controllers are its super options that name controllers, including name=."""
        mounts = {mount.mount_point: mount for mount in parse_mountinfo(HYBRID_MOUNTINFO)}
        assert frozenset({"memory"}) == mounts["/sys/fs/cgroup/memory"].controllers
        assert frozenset({"name=systemd"}) == mounts["/sys/fs/cgroup/systemd"].controllers
        assert frozenset() == mounts["/sys/fs/cgroup/unified"].controllers
        assert frozenset() == mounts["/sys"].controllers

    def test_v1_controllers_skip_options(self) -> None:
        """Options such as release_agent= and clone_children are not controllers."""
        line = "1 1 0:1 / /c rw - cgroup cgroup rw,cpu,cpuacct,clone_children,release_agent=/bin/x,noprefix"
        assert frozenset({"cpu", "cpuacct"}) == parse_mountinfo(line)[0].controllers

    def test_cgroup_version(self) -> None:
        """cgroup is version 1, cgroup2 version 2, anything else None."""
        versions = [mount.cgroup_version for mount in parse_mountinfo(HYBRID_MOUNTINFO)]
        assert [None, None, 1, 1, 1, 2] == versions

    def test_paths_of_whole_hierarchy_mount(self) -> None:
        """A mount of the hierarchy's root maps group paths to paths below the mount point and back."""
        mount = parse_mountinfo(HYBRID_MOUNTINFO)[3]
        assert "/sys/fs/cgroup/memory/a/b" == mount.fs_path("/a/b")
        assert "/sys/fs/cgroup/memory" == mount.fs_path("/")
        assert "/a/b" == mount.cgroup_path("/sys/fs/cgroup/memory/a/b/")
        assert "/" == mount.cgroup_path("/sys/fs/cgroup/memory")
        assert None is mount.cgroup_path("/sys/fs/cgroup/memoryx")
        assert None is mount.cgroup_path("/sys/fs/cgroup")

    def test_paths_of_subtree_mount(self) -> None:
        """A mount of a subtree shows only groups below its root."""
        mount = parse_mountinfo(CONTAINER_MOUNTINFO)[0]
        assert "/sys/fs/cgroup/memory/x" == mount.fs_path("/docker/abc/x")
        assert "/sys/fs/cgroup/memory" == mount.fs_path("/docker/abc")
        assert None is mount.fs_path("/docker/abcd")
        assert None is mount.fs_path("/")
        assert "/docker/abc/x" == mount.cgroup_path("/sys/fs/cgroup/memory/x")

    def test_dot_dot_is_normalized(self) -> None:
        """'..' cannot climb out of the mount point."""
        mount = parse_mountinfo(HYBRID_MOUNTINFO)[3]
        assert None is mount.cgroup_path("/sys/fs/cgroup/memory/../cpu")
        assert "/sys/fs/cgroup/memory/a" == mount.fs_path("/../../a")


class TestParseProcCgroup:
    def test_lines(self) -> None:
        """v1 lines, named hierarchies and the cgroup2 line are parsed."""
        expected = (
            Membership(9, frozenset({"name=systemd"}), "/"),
            Membership(4, frozenset({"memory"}), "/process_api/3c33"),
            Membership(2, frozenset({"cpu", "cpuacct"}), "/"),
            Membership(0, frozenset(), "/"),
        )
        assert expected == parse_proc_cgroup(PROC_CGROUP_V1)

    def test_version(self) -> None:
        """Only the '0::' line is the cgroup2 membership."""
        assert [1, 1, 1, 2] == [membership.version for membership in parse_proc_cgroup(PROC_CGROUP_V1)]

    def test_colon_in_path(self) -> None:
        """A path may contain ':'; only the first two separate fields."""
        assert "/a:b" == parse_proc_cgroup("0::/a:b")[0].path

    @pytest.mark.parametrize("line", ["garbage", "4:memory", "x:memory:/", "4:memory:relative", ":memory:/"])
    def test_malformed(self, line: str) -> None:
        """A line that is not 'id:controllers:/path' raises KernelFormatError."""
        with pytest.raises(KernelFormatError):
            parse_proc_cgroup(line)

    @given(
        st.lists(
            st.builds(
                Membership,
                st.integers(0, 2**31),
                st.frozensets(st.text(st.characters(exclude_characters=",:\n"), min_size=1)),
                st.text(st.characters(exclude_characters="\n")).map(lambda text: "/" + text),
            )
        )
    )
    def test_round_trip(self, memberships: list[Membership]) -> None:
        """Formatted memberships parse back to equal records."""
        text = "".join(f"{m.hierarchy_id}:{','.join(sorted(m.controllers))}:{m.path}\n" for m in memberships)
        assert tuple(memberships) == parse_proc_cgroup(text)

    @given(st.text())
    def test_arbitrary_text_raises_only_kernel_format_error(self, text: str) -> None:
        """Any text parses or raises KernelFormatError, never another error."""
        try:
            parse_proc_cgroup(text)
        except KernelFormatError:
            pass


class TestFindMemoryHierarchy:
    def test_v1_memory_wins(self) -> None:
        """A v1 mount with the memory controller is the memory hierarchy; cgroup2 is not asked."""
        mounts = parse_mountinfo(HYBRID_MOUNTINFO)

        def read_controllers(mount: Mount) -> str:
            raise AssertionError(f"cgroup.controllers of {mount.mount_point} read")

        hierarchy = find_memory_hierarchy(mounts, read_controllers)
        assert hierarchy is not None
        assert (1, "/sys/fs/cgroup/memory") == (hierarchy.version, hierarchy.mount.mount_point)

    def test_v2_with_memory(self) -> None:
        """Without a v1 memory mount, a cgroup2 mount whose cgroup.controllers lists memory is it."""
        hierarchy = find_memory_hierarchy(parse_mountinfo(UNIFIED_MOUNTINFO), lambda mount: "cpuset cpu io memory pids\n")
        assert hierarchy is not None
        assert (2, "/sys/fs/cgroup") == (hierarchy.version, hierarchy.mount.mount_point)

    def test_v2_without_memory(self) -> None:
        """A cgroup2 mount without memory in cgroup.controllers is not the memory hierarchy."""
        mounts = [mount for mount in parse_mountinfo(HYBRID_MOUNTINFO) if mount.mount_point != "/sys/fs/cgroup/memory"]
        assert None is find_memory_hierarchy(mounts, lambda mount: "hugetlb\n")

    def test_unreadable_controllers(self) -> None:
        """A cgroup2 mount whose cgroup.controllers cannot be read is skipped."""
        assert None is find_memory_hierarchy(parse_mountinfo(UNIFIED_MOUNTINFO), lambda mount: None)

    def test_memory_is_a_word(self) -> None:
        """'memory' must be a whole word of cgroup.controllers."""
        assert None is find_memory_hierarchy(parse_mountinfo(UNIFIED_MOUNTINFO), lambda mount: "nomemory memoryx")

    def test_prefers_whole_hierarchy_mount(self) -> None:
        """Of several mounts of the hierarchy, paths go through the one that shows its root."""
        mounts = parse_mountinfo(CONTAINER_MOUNTINFO + HYBRID_MOUNTINFO)
        hierarchy = find_memory_hierarchy(mounts, lambda mount: None)
        assert hierarchy is not None
        assert 2 == len(hierarchy.mounts)
        assert "/sys/fs/cgroup/memory/docker/abc" == hierarchy.fs_path("/docker/abc")
        assert "/sys/fs/cgroup/memory" == hierarchy.mount.mount_point

    def test_membership(self) -> None:
        """The v1 hierarchy picks the memory line of /proc/<pid>/cgroup; cgroup2 picks '0::'."""
        memberships = parse_proc_cgroup(PROC_CGROUP_V1)
        v1 = MemoryHierarchy(1, parse_mountinfo(HYBRID_MOUNTINFO)[3:4])
        v2 = MemoryHierarchy(2, parse_mountinfo(UNIFIED_MOUNTINFO)[1:])
        assert "/process_api/3c33" == getattr(v1.membership(memberships), "path", None)
        assert "/" == getattr(v2.membership(memberships), "path", None)

    def test_needs_a_mount(self) -> None:
        """A hierarchy without mounts is refused."""
        with pytest.raises(ValueError):
            MemoryHierarchy(1, ())


@pytest.mark.kernel
class TestThisMachine:
    def test_memory_hierarchy(self) -> None:
        """This machine's memory controller is found on cgroup v1 (from mountinfo, not a fixed path)."""
        hierarchy = memory_hierarchy()
        assert 1 == hierarchy.version
        assert any(mount.mount_point == hierarchy.mount.mount_point for mount in read_mounts())

    def test_own_memberships(self) -> None:
        """This process is in a memory group that exists below the hierarchy's mount."""
        hierarchy = memory_hierarchy()
        membership = hierarchy.membership(read_memberships())
        assert membership is not None
        path = hierarchy.fs_path(membership.path)
        assert path is not None
        assert os.path.isfile(os.path.join(path, "memory.limit_in_bytes"))


def format_mount(mount: Mount) -> str:
    """Format *mount* as the kernel does in mountinfo."""
    return " ".join(
        [
            str(mount.mount_id),
            str(mount.parent_id),
            mount.device,
            escape(mount.root),
            escape(mount.mount_point),
            ",".join(escape(option) for option in mount.mount_options),
            *(escape(field) for field in mount.optional_fields),
            "-",
            escape(mount.fstype),
            escape(mount.source),
            ",".join(escape(option, ",") for option in mount.super_options),
        ]
    )


def escape(text: str, extra: str = "") -> str:
    """The kernel's mangle(): octal escapes for space, tab, newline, backslash (and *extra*)."""
    return "".join(f"\\{ord(char):03o}" if char in " \t\n\\" + extra else char for char in text)
