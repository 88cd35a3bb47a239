"""Values read from a group's control files: snapshots, never handles."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Final

import attrs

from useroom.exceptions import KernelFormatError

__all__ = ["OomControl", "Stats", "parse_key_values"]

_KEY_VALUE: Final = re.compile(r"([^ ]+) (-?[0-9]{1,20})", re.ASCII)


@attrs.frozen
class OomControl:
    """The OOM state of a group (v1 ``memory.oom_control``).

    ``kill_disabled``: the kernel OOM killer is off, so tasks that hit the
    limit sleep until user space resolves the OOM. ``under_oom``: they are
    asleep now. ``oom_kill``: how many tasks the kernel OOM killer has killed
    in the group (0 on kernels older than 4.13, which do not report it).
    """

    kill_disabled: bool
    under_oom: bool
    oom_kill: int

    @classmethod
    def from_text(cls, text: str) -> OomControl:
        """Parse the text of v1 ``memory.oom_control`` (``oom_kill_disable 0`` lines)."""
        values = parse_key_values(text, "memory.oom_control")
        try:
            return cls(
                kill_disabled=bool(values["oom_kill_disable"]),
                under_oom=bool(values["under_oom"]),
                oom_kill=values.get("oom_kill", 0),
            )
        except KeyError as err:
            raise KernelFormatError(f"memory.oom_control has no {err.args[0]!r} line: {text[:200]!r}") from err


@attrs.frozen(eq=False)
class Stats(Mapping[str, int]):
    """A snapshot of ``memory.stat``: a read-only mapping of its keys to ints.

    Keys are the kernel's, which differ between versions (v1 ``rss``,
    ``cache``, ``total_*``; v2 ``anon``, ``file``); the properties give the
    common ones under one name, 0 when the kernel does not report them.
    """

    _items: tuple[tuple[str, int], ...]

    @classmethod
    def from_text(cls, text: str) -> Stats:
        """Parse the text of ``memory.stat`` (``key value`` lines)."""
        return cls(tuple(parse_key_values(text, "memory.stat").items()))

    @property
    def rss(self) -> int:
        """Anonymous memory (v1 ``rss``, v2 ``anon``), in bytes."""
        return self._first("rss", "anon")

    @property
    def cache(self) -> int:
        """Page cache (v1 ``cache``, v2 ``file``), in bytes."""
        return self._first("cache", "file")

    @property
    def shmem(self) -> int:
        """Shared memory and tmpfs, in bytes."""
        return self._first("shmem")

    @property
    def mapped_file(self) -> int:
        """Mapped file pages (v1 ``mapped_file``, v2 ``file_mapped``), in bytes."""
        return self._first("mapped_file", "file_mapped")

    @property
    def swap(self) -> int:
        """Swap used (v1 only; v2 reports it in ``memory.swap.current``), in bytes."""
        return self._first("swap")

    @property
    def unevictable(self) -> int:
        """Unevictable memory, such as mlocked pages, in bytes."""
        return self._first("unevictable")

    def _first(self, *keys: str) -> int:
        values = self._dict()
        for key in keys:
            if key in values:
                return values[key]
        return 0

    def _dict(self) -> dict[str, int]:
        return dict(self._items)

    def __getitem__(self, key: str) -> int:
        return self._dict()[key]

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Stats):
            return self._dict() == other._dict()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(frozenset(self._items))


def parse_key_values(text: str, name: str) -> dict[str, int]:
    values = {}
    for line in text.split("\n"):
        if not line:
            continue
        match = _KEY_VALUE.fullmatch(line)
        if match is None:
            raise KernelFormatError(f"{name}: line {line[:200]!r} is not 'key number'")
        values[match[1]] = int(match[2])
    return values
