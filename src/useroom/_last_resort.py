"""The last resort, recorded: an episode whose hooks could not free enough
and that found nothing else to kill. The kernel OOM killer comes next and
takes the handler's own process, and its events with it; the handler keeps
these notes and sends each to the watchdog, whose log outlives it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from useroom._hooks import HookRecord, hooks_short_by

__all__ = ["LastResorts"]


class LastResorts:
    """The episodes that found nothing left to kill with the usage above the
    limit, one dict each (its ``seq``, how many hook runs, the bytes they
    released, by how much the usage still exceeded the limit, whether the
    kernel OOM killer is next); the newest 100. A sequence: ``len``,
    iteration, indexing."""

    KEEP = 100

    def __init__(self) -> None:
        self._notes: list[dict[str, Any]] = []

    def record(self, seq: int, records: tuple[HookRecord, ...], limit: int, *,
               kernel_next: bool) -> dict[str, Any] | None:
        """Records one; None if that episode is recorded already (the hook
        thread and the handler's thread may both see it)."""
        if self._notes and self._notes[-1]["seq"] == seq:
            return None
        note = {"seq": seq, "hooks": len(records), "released": sum(h.released for h in records),
                "short_by": hooks_short_by(records, limit), "kernel_next": kernel_next}
        self._notes.append(note)
        del self._notes[:-self.KEEP]
        return note

    def __len__(self) -> int:
        return len(self._notes)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(list(self._notes))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._notes[index]
