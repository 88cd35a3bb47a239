"""What the kernel's ``oom_badness()`` reads, taken from outside a group, and victims judged by it.

The storm benchmark's victim agreement: a :class:`BadnessProbe` takes
:class:`Snapshot` s of a group; :func:`judge` says of each :class:`Kill`
whether the kernel would have chosen its victim at that moment, as far as
the snapshots can tell; :func:`vanished` finds the kernel's own victims
between two snapshots. Standard library only.
"""

from __future__ import annotations

import bisect
import math
import mmap
import os
import time
from collections.abc import Iterable
from typing import Any, Final, NamedTuple

from useroom._victims import ProcAdj, ProcStatus

__all__ = ["PAGE", "BadnessProbe", "Kill", "Snapshot", "growth_rate", "judge", "parent_of", "rss_kb", "vanished"]

PAGE: Final = mmap.PAGESIZE


class Snapshot(NamedTuple):
    """What the kernel's ``oom_badness()`` would have read, at one moment.

    ``tasks`` holds ``(pid, points, oom_score_adj)`` for every process the
    group listed but the spared ones, in ``cgroup.procs`` order; ``points``
    is None for a task the kernel would not pick: no memory left (exiting),
    ``oom_score_adj`` -1000, or gone before its files were read (then the
    adjustment reads 0).
    """

    start_ns: int
    end_ns: int
    notified: bool
    tasks: tuple[tuple[int, int | None, int], ...]


class BadnessProbe:
    """Takes :class:`Snapshot` s of one group, from outside it.

    The kernel's ``oom_badness()`` in a memcg OOM: ``get_mm_rss`` + swap
    entries + page-table pages, then ``adj *= totalpages / 1000`` (integer
    division first) where ``totalpages`` is the memcg's limit in pages (plus
    swap, of which these machines have none); ``oom_score_adj`` -1000 and
    tasks without an ``mm`` are skipped. The status file shows those three
    in kB. Each process's two files are opened once, at its first sighting,
    and read again with ``pread`` at offset 0 (a seq_file regenerates): a
    snapshot is one ``cgroup.procs`` read and two ``pread`` s per task. An
    fd of ``/proc/PID`` names that process, never a later one with its pid.

    ``spare``: pids never listed (the handler); a process whose parent is
    spared (the handler's watchdog, which on v2 shares the group) is spared
    too: the handler protects both.
    """

    def __init__(self, group_path: str, limit_bytes: int, spare: Iterable[int] = ()) -> None:
        self._procs = os.path.join(group_path, "cgroup.procs")
        self._page_kb = PAGE // 1024
        self._adj_unit = limit_bytes // PAGE // 1000
        self.spare = set(spare)
        #: Each task's status and oom_score_adj files, opened at its first sight.
        self._open: dict[int, tuple[ProcStatus, ProcAdj]] = {}
        #: ppid and name of every process ever seen, from its first sighting.
        self.parents: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.snapshots: list[Snapshot] = []
        #: Time spent taking snapshots, in ns.
        self.busy_ns = 0

    def take(self, notified: bool = False) -> Snapshot:
        start = time.monotonic_ns()
        with open(self._procs, "rb", buffering=0) as procs:
            listing = procs.read(1 << 16)
        tasks = []
        for field in listing.split():
            pid = int(field)
            if pid in self.spare:
                continue
            points, adj = self._points(pid)
            if pid in self.spare:
                continue  # at its first sight: a child of a spared process
            tasks.append((pid, points, adj))
        if len(self._open) > len(tasks):
            listed = {task[0] for task in tasks}
            for pid in [pid for pid in self._open if pid not in listed]:
                self._forget(pid)
        end = time.monotonic_ns()
        snapshot = Snapshot(start, end, notified, tuple(tasks))
        self.snapshots.append(snapshot)
        self.busy_ns += end - start
        return snapshot

    def _points(self, pid: int) -> tuple[int | None, int]:
        fds = self._open.get(pid)
        if fds is None:
            fds = self._first_sight(pid)
            if fds is None:
                return None, 0
        status_file, adj_file = fds
        status = status_file.read()
        try:
            adj = adj_file.read()
        except ProcessLookupError:
            return None, 0  # ESRCH: it exited after the listing
        if not status:
            return None, 0
        rss = _kb(status, b"VmRSS:")
        if rss < 0 or adj == -1000:
            return None, adj
        unit = self._page_kb
        pages = rss // unit + max(_kb(status, b"VmSwap:"), 0) // unit + max(_kb(status, b"VmPTE:"), 0) // unit
        return pages + adj * self._adj_unit, adj

    def _first_sight(self, pid: int) -> tuple[ProcStatus, ProcAdj] | None:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                head, _, tail = stat.read().rpartition(b")")
            ppid = int(tail.split()[1])
            self.parents[pid] = ppid
            self.names[pid] = head.partition(b"(")[2].decode(errors="replace")
            if ppid in self.spare:
                self.spare.add(pid)
                return None
            status_file = ProcStatus(pid)
        except (OSError, ValueError, IndexError):
            return None
        try:
            adj_file = ProcAdj(pid)
        except OSError:
            status_file.close()
            return None
        self._open[pid] = (status_file, adj_file)
        return status_file, adj_file

    def _forget(self, pid: int) -> None:
        for file in self._open.pop(pid):
            file.close()

    def close(self) -> None:
        for pid in list(self._open):
            self._forget(pid)


def _kb(status: bytes, key: bytes) -> int:
    """The kB value of *key* in a ``/proc/PID/status`` text, -1 if absent (no mm)."""
    at = status.find(key)
    if at < 0:
        return -1
    return int(status[at + len(key):status.index(b"kB", at)])


class Kill(NamedTuple):
    """A victim: when its signal was sent (``t_ns``, CLOCK_MONOTONIC), which pid, and from where the time is."""

    t_ns: int
    pid: int
    name: str
    t_from: str


def growth_rate(snapshots: list[Snapshot], fraction: float = 0.99) -> float:
    """How fast a task's memory grew in this run, in pages per ns: the
    *fraction* percentile over every task and every two consecutive
    snapshots that both list it as a candidate with the same
    ``oom_score_adj`` (a changed one, such as stress-ng setting 1000 on a
    fresh worker, is not growth); 0 with no growth seen."""
    rates = []
    for earlier, later in zip(snapshots, snapshots[1:], strict=False):
        span = later.start_ns - earlier.start_ns
        if span <= 0:
            continue
        before = {pid: (points, adj) for pid, points, adj in earlier.tasks}
        for pid, points, adj in later.tasks:
            was, was_adj = before.get(pid, (None, 0))
            if points is not None and was is not None and adj == was_adj and points > was:
                rates.append((points - was) / span)
    if not rates:
        return 0.0
    rates.sort()
    return rates[min(len(rates) - 1, math.ceil(fraction * len(rates)) - 1)]


class _Bound(NamedTuple):
    """What a task's badness may have been at the kill: between ``low`` and ``high``."""

    pid: int
    low: float
    high: float
    position: int  # in the listing: a tie goes to the later task

    def beats(self, other: _Bound) -> bool:
        """Certainly above *other* at the kill (the kernel's scan keeps the later of equals)."""
        return self.low > other.high or (self.low == other.high and self.position > other.position)


def judge(kills: Iterable[Kill], snapshots: list[Snapshot], max_age_ns: int,
          rate: float = 0.0) -> list[dict[str, Any]]:
    """For each kill: would the kernel's ``oom_badness()`` have chosen its
    victim at that moment, as far as the snapshots can tell?

    The kill is judged with the latest snapshot that ended before it, if
    that snapshot began after the previous kill (before it, the group's state
    was another one), is at most *max_age_ns* old and lists the victim as a
    task the kernel could pick. Between the snapshot and the kill a live
    task may have grown by up to *rate* pages per ns (see
    :func:`growth_rate`). A task signalled by an earlier kill and still
    holding memory is still a candidate, as for the kernel (it would choose
    it and wait for it to exit rather than kill another); its memory only
    shrinks, to what the first snapshot after the kill shows (or to nothing,
    if that one does not list it). The verdict is a ``match`` if the victim
    certainly had the highest badness, a mismatch if another task certainly
    had a higher one (``beaten_by``; ``beaten_by_earlier_victim`` when that
    task was still exiting), and otherwise not measured (``reason``: too
    close to call).
    """
    ends = [snapshot.end_ns for snapshot in snapshots]
    starts = [snapshot.start_ns for snapshot in snapshots]
    verdicts = []
    previous: int | None = None
    signalled: set[int] = set()
    for kill in sorted(kills):
        verdict: dict[str, Any] = {"t_ns": kill.t_ns, "pid": kill.pid, "name": kill.name, "t_from": kill.t_from,
                                   "match": None, "reason": None}
        at = bisect.bisect_left(ends, kill.t_ns) - 1
        snapshot = snapshots[at] if at >= 0 else None
        if snapshot is None or (previous is not None and snapshot.start_ns <= previous):
            verdict["reason"] = "no snapshot since the previous kill"
        elif kill.t_ns - snapshot.end_ns > max_age_ns:
            verdict["reason"] = "stale snapshot"
        else:
            verdict["age_ns"] = kill.t_ns - snapshot.end_ns
            verdict["snapshot"] = snapshot.tasks
            listed = [(pid, points) for pid, points, _ in snapshot.tasks if points is not None]
            if kill.pid not in dict(listed):
                verdict["reason"] = "victim not in the snapshot"
            else:
                _decide(verdict, kill, listed, snapshots, starts, signalled, rate * (kill.t_ns - snapshot.start_ns))
        verdicts.append(verdict)
        previous = kill.t_ns
        signalled.add(kill.pid)
    return verdicts


def _decide(verdict: dict[str, Any], kill: Kill, listed: list[tuple[int, int]], snapshots: list[Snapshot],
            starts: list[int], signalled: set[int], margin: float) -> None:
    after_at = bisect.bisect_right(starts, kill.t_ns)
    after = {pid: points for pid, points, _ in snapshots[after_at].tasks} if after_at < len(snapshots) else {}
    bounds = []
    for position, (pid, points) in enumerate(listed):
        if pid in signalled:
            left = after.get(pid)
            bounds.append(_Bound(pid, -math.inf if left is None else left, points, position))
        else:
            bounds.append(_Bound(pid, points, points + margin, position))
    victim = next(bound for bound in bounds if bound.pid == kill.pid)
    others = [bound for bound in bounds if bound.pid != kill.pid]
    pick, best = listed[0]
    for pid, points in listed:
        if points >= best:
            pick, best = pid, points
    verdict.update(pick=pick, pick_pages=best, victim_pages=victim.low, margin_pages=margin)
    beaten_by = [other for other in others if other.beats(victim)]
    if all(victim.beats(other) for other in others):
        verdict["match"] = True
    elif beaten_by:
        verdict["match"] = False
        verdict["beaten_by"] = beaten_by[0].pid
        verdict["beaten_by_earlier_victim"] = beaten_by[0].pid in signalled
    else:
        verdict["reason"] = "too close to call"


def vanished(snapshots: list[Snapshot], names: dict[int, str],
             quiet: Iterable[tuple[int, int]] = ()) -> list[Kill]:
    """The tasks that could be picked in one snapshot and not in the next: the
    kernel's victims in a group where nothing else ends a task. Their time is
    the start of the first snapshot without them (the kill came before).
    Vanishings across a *quiet* window (start_ns, end_ns), the benchmark's
    own restart of the driver, are left out."""
    windows = list(quiet)
    kills: list[Kill] = []
    alive: set[int] = set()
    last_start = 0
    for snapshot in snapshots:
        now = {pid for pid, points, _ in snapshot.tasks if points is not None}
        gone = alive - now
        if gone and not any(start <= snapshot.start_ns and end >= last_start for start, end in windows):
            kills.extend(Kill(snapshot.start_ns, pid, names.get(pid, "?"), "vanished") for pid in sorted(gone))
        alive, last_start = now, snapshot.start_ns
    return kills


# -- /proc ---------------------------------------------------------------------

def parent_of(pid: int) -> int | None:
    """The parent of process *pid* (``/proc/PID/stat``); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rpartition(b")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def rss_kb(pid: int) -> int | None:
    """The VmRSS of process *pid* in kB; None if it is gone or has no memory."""
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            rss = _kb(status.read(), b"VmRSS:")
    except OSError:
        return None
    return rss if rss >= 0 else None
