"""A respawning storm: the kernel OOM killer alone versus a useroom handler inside the group.

``python -m useroom.bench storm [--seconds 10] [--rounds 2] [--workers 2] [--worker-size 200M]
[--limit 64M] [--driver python|stress-ng] [--json PATH]``

Both variants run in the same benchmark, in rounds that alternate in ABBA
order (kernel, useroom, useroom, kernel) so that a load that drifts during
the run weighs alike on both.

The workload is a service that a kill does not end: a supervisor that does
not grow and ``workers`` processes that each touch ``worker-size`` bytes
(more than the whole group may hold) and keep them; when a worker dies the
supervisor starts another at once. The group is at its limit again a few
tens of milliseconds after every kill, for as long as the run lasts. The
``python`` driver's supervisor is this file run as a script (``python -I -S``,
about 16 MiB RSS: the size of a small daemon; the package is not imported);
its workers are forked from it, so a fresh worker starts with the
supervisor's pages mapped and is, for a moment, about as large (the kernel's
badness counts them too). ``stress-ng --vm N --vm-bytes SIZE --vm-keep``
respawns the vm workers the OOM killer takes (its main process and its
per-worker parents are the supervisor; it gives the workers
``oom_score_adj`` 1000). A supervisor that is killed is counted, and the
benchmark starts the driver again.

Each variant runs ``--seconds`` in a fresh group below the caller's memory
cgroup:

- ``kernel``: no handler; the kernel OOM killer meets the limit (v1
  ``memory.limit_in_bytes``, v2 ``memory.max``).
- ``useroom``: ``useroom.Handler(group, useroom.KillLargest())`` in a small
  process inside the group (``python -m useroom.bench _storm_handler``); the
  limit is its wall (v1: the kernel killer off; v2: ``memory.high``, with
  ``memory.max`` a gap above it as the kernel's backstop).

Victim agreement is measured outside the group, by this process: it
watches the group's OOM notification itself and, at each one and every
``--sample-ms`` in between (less often where a snapshot costs more than
``--sample-budget`` of a CPU allows), reads what the kernel's ``oom_badness()`` reads
for every task (``/proc/PID/status`` VmRSS + VmSwap + VmPTE, and
``oom_score_adj``). Each handler kill is judged against the latest snapshot
taken before its signal was sent, if no other kill came between the two.
The handler's native plan signals tens of microseconds after the
notification, before any reader of ``/proc`` could finish, which is why the
periodic samples exist: on cgroup v1 the group's tasks sleep in the OOM wait
from the moment it is declared, so a sample from just before still shows the
state the kernel would have judged. The same snapshots judge the kernel's
own victims in the ``kernel`` variant (tasks that vanished between two
snapshots): that figure is the accuracy of the measurement itself.

This file's module-level imports are the standard library's only, because
it doubles as the supervisor's script; the package is imported inside the
functions that need it.
"""

from __future__ import annotations

import bisect
import json
import math
import mmap
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from typing import IO, TYPE_CHECKING, Any, Final, NamedTuple, NoReturn

if TYPE_CHECKING:
    from useroom import OomEvent
    from useroom.cgroup.base import OomCounter
    from useroom.bench._sandbox import Child, Lab, Pidfd, ScratchGroup, SignalGuard

__all__ = ["BadnessProbe", "Kill", "Snapshot", "StormConfig", "growth_rate", "handler_main", "judge", "main",
           "vanished"]

PAGE: Final = mmap.PAGESIZE
MIB: Final = 1 << 20
DRIVERS: Final = ("python", "stress-ng")
#: The baseline first: the useroom row's kill rate is given relative to it.
VARIANTS: Final = ("kernel", "useroom")
_SCRIPT: Final = os.path.abspath(__file__)
_PR_SET_PDEATHSIG: Final = 1
#: How long the handler process may take to start (the emulated guest is 5-10x slower).
_HANDLER_START_TIMEOUT_S: Final = 120.0
_HANDLER_STOP_TIMEOUT_S: Final = 60.0
_EMPTY_TIMEOUT_S: Final = 10.0
#: How long a round waits for its first OOM (the storm's start) before it gives up.
_START_ALLOWANCE_S: Final = 60.0

#: The goals of the useroom variant, as data: (figure, key of the row, test, shown).
GOALS: Final[tuple[tuple[str, str, Callable[[Any], bool], str], ...]] = (
    ("kernel kills in the group", "kernel_kills", lambda v: v == 0, "0"),
    ("supervisor killed", "supervisor_killed", lambda v: v == 0, "0"),
    ("handler alive at the end", "handler_alive", lambda v: v is True, "yes"),
    ("kill rate vs the kernel's", "rate_ratio", lambda v: v is not None and v >= 0.9, ">= 0.9x"),
    ("victim agreement", "agreement_pct", lambda v: v is not None and v >= 95.0, ">= 95%"),
)


# -- the python driver's supervisor (this file run as a script) --------------

#: The workers' pages: small (4 KiB), huge (2 MiB transparent huge pages),
#: or "any" (the system's setting; stress-ng then advises each worker's
#: buffer at random, one choice per worker slot that its respawns repeat,
#: and a worker on huge pages fills the group about twice as fast, so the
#: kill rate of a run depended on that draw).
PAGES: Final = ("small", "huge", "any")
_ADVICE: Final = {"small": "MADV_NOHUGEPAGE", "huge": "MADV_HUGEPAGE"}
_STRESS_NG_ADVICE: Final = {"small": "nohugepage", "huge": "hugepage"}

def supervise(workers: int, size: int, pages: str = "any") -> NoReturn:
    """Start *workers* workers and start a new one whenever one dies, forever.

    Runs in its own small process in the group; ends by a signal. Its
    workers die with it (``PR_SET_PDEATHSIG``).
    """
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    me = os.getpid()
    for _ in range(workers):
        _spawn(me, size, prctl, pages)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            pass
        _spawn(me, size, prctl, pages)


def _spawn(parent: int, size: int, prctl: Any, pages: str) -> None:
    while True:
        try:
            pid = os.fork()
            break
        except OSError:
            # ENOMEM or EAGAIN: fork's kernel memory is charged to the group,
            # which is at its limit; the kill that ends the OOM makes room.
            time.sleep(0.001)
    if pid:
        return
    try:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if pages in _ADVICE:
            memory.madvise(getattr(mmap, _ADVICE[pages]))
        for offset in range(0, size, PAGE):
            memory[offset] = 1
        while True:  # kept: only a kill ends a worker (it never fits)
            signal.pause()
    finally:
        os._exit(0)


# -- the badness snapshots -----------------------------------------------------

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
        self._open: dict[int, tuple[int, int]] = {}
        #: ppid and name of every process ever seen, from its first sighting.
        self.parents: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self.snapshots: list[Snapshot] = []
        #: Time spent taking snapshots, in ns.
        self.busy_ns = 0

    def take(self, notified: bool = False) -> Snapshot:
        start = time.monotonic_ns()
        fd = os.open(self._procs, os.O_RDONLY | os.O_CLOEXEC)
        try:
            listing = os.read(fd, 1 << 16)
        finally:
            os.close(fd)
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
        status_fd, adj_fd = fds
        try:
            status = os.pread(status_fd, 4096, 0)
            adj = int(os.pread(adj_fd, 16, 0))
        except (OSError, ValueError):
            return None, 0  # ESRCH: it exited after the listing
        rss = _kb(status, b"VmRSS:")
        if rss < 0 or adj == -1000:
            return None, adj
        unit = self._page_kb
        pages = rss // unit + max(_kb(status, b"VmSwap:"), 0) // unit + max(_kb(status, b"VmPTE:"), 0) // unit
        return pages + adj * self._adj_unit, adj

    def _first_sight(self, pid: int) -> tuple[int, int] | None:
        try:
            with open(f"/proc/{pid}/stat", "rb") as stat:
                head, _, tail = stat.read().rpartition(b")")
            ppid = int(tail.split()[1])
            self.parents[pid] = ppid
            self.names[pid] = head.partition(b"(")[2].decode(errors="replace")
            if ppid in self.spare:
                self.spare.add(pid)
                return None
            status_fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
        except (OSError, ValueError, IndexError):
            return None
        try:
            adj_fd = os.open(f"/proc/{pid}/oom_score_adj", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            os.close(status_fd)
            return None
        self._open[pid] = (status_fd, adj_fd)
        return status_fd, adj_fd

    def _forget(self, pid: int) -> None:
        for fd in self._open.pop(pid):
            os.close(fd)

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
    for earlier, later in zip(snapshots, snapshots[1:]):
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


# -- the handler's process (inside the group) --------------------------------------

class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    raise _Stop


def handler_main(argv: list[str]) -> int:
    """``python -m useroom.bench _storm_handler SPEC_JSON``: a useroom handler
    (KillLargest) for the group this process was started in.

    Says ``started PID WATCHDOG_PID`` on stdout once it handles the group,
    then runs until a line or EOF on stdin, or SIGTERM; then stops the
    handler and writes its episodes (every victim with the time its signal
    was sent) to the spec's ``out`` as JSON.
    """
    import useroom

    spec = json.loads(argv[0])
    result: dict[str, Any] = {"pid": os.getpid(), "watchdog_pid": None, "started": False, "events": [],
                              "errors": [], "start_error": None}
    signal.signal(signal.SIGTERM, _raise_stop)
    handler: useroom.Handler | None = None
    try:
        try:
            handler = useroom.Handler(useroom.Group.current(), useroom.KillLargest())
            handler.start()
        except Exception as err:
            result["start_error"] = repr(err)
            return 1
        result["started"] = True
        watchdog = handler.watchdog.pid if handler.watchdog is not None else None
        result["watchdog_pid"] = watchdog
        os.write(1, f"started {os.getpid()} {watchdog or 0}\n".encode())
        os.read(0, 64)  # blocks until "stop" or EOF; SIGTERM raises _Stop
    except _Stop:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the record below must be written
        if handler is not None:
            handler.stop()
            result["events"] = [_event_record(e) for e in handler.events if e.outcome != "not_needed"]
            result["errors"] = [repr(err) for err in handler.errors][-20:]
            result["lost"] = handler.lost
            result["locked_bytes"] = handler.locked_bytes
        partial = spec["out"] + ".partial"
        with open(partial, "w") as file:
            json.dump(result, file)
        os.rename(partial, spec["out"])
    return 0


def _event_record(event: OomEvent) -> dict[str, Any]:
    import attrs

    claimed: set[int] = set()  # the signal steps already given a victim
    return {
        "seq": event.seq,
        "notified_ns": event.notified_ns,
        "acted_ns": event.acted_ns,
        "resolved_ns": event.resolved_ns,
        "outcome": event.outcome,
        "resolved_by": event.resolved_by,
        "fallback": event.fallback,
        "takeover": event.takeover.reason if event.takeover is not None else None,
        "action": event.action,
        "victims": [{**attrs.asdict(victim), **_signal_time(event, victim, claimed)} for victim in event.victims],
    }


def _signal_time(event: OomEvent, victim: Any, used: set[int]) -> dict[str, Any]:
    """When *victim*'s signal was sent: the start of the plan's signal step
    that names it; for a kill by the handler's Python code during a grant, the
    end of the step that raised the limit for it (its signal came later);
    else when the plan began to act."""
    from useroom import StepTag

    if victim.by == "plan":
        for index, step in enumerate(event.steps):
            if index not in used and step.kind.startswith("SIGNAL") and step.pid == victim.pid:
                used.add(index)
                return {"t_ns": step.started_ns, "t_from": "signal step"}
    else:
        for step in event.steps:
            if step.tag is StepTag.GRANT and step.ok:
                return {"t_ns": step.t_ns, "t_from": "grant step"}
    return {"t_ns": event.acted_ns or event.notified_ns, "t_from": "episode"}


# -- the benchmark -----------------------------------------------------------------

class StormConfig(NamedTuple):
    #: Storm time per variant, split over the rounds.
    seconds: float = 10.0
    #: Each variant runs this many times, alternating in ABBA order (kernel,
    #: useroom, useroom, kernel, ...): the machine's load drifts (another
    #: guest on the same cores), and both variants then see it alike.
    rounds: int = 2
    workers: int = 2
    worker_size: int = 200 * MIB
    limit: int = 64 * MIB
    driver: str = "python"
    #: One of PAGES: what the workers' memory is made of.
    pages: str = "small"
    sample_ms: float = 2.0
    #: The periodic snapshots may take this share of one CPU: the interval
    #: grows to (cost of the last snapshot / budget) when that is longer than
    #: sample_ms (the emulated guest's reads are ~10x slower, on one core).
    sample_budget: float = 0.1
    max_age_ms: float = 50.0
    #: cgroup v2, useroom variant: memory.max this far above the wall
    #: (twice the handler's least gap, as the hooks benchmark's).
    gap: int = 32 * MIB
    #: "equal": the useroom variant's limit (v2: wall and memory.max) is
    #: raised by the handler process's own charge, so that the workload has
    #: the room it has in the kernel variant; "shared": the handler's charge
    #: comes out of the workload's room.
    room: str = "equal"


def _enter_group(procs_path: str) -> Callable[[], None]:
    """A ``preexec_fn``: die with the benchmark, then move into the group
    before exec, so that everything the program touches is charged there."""
    from useroom.bench._sandbox import die_with_parent

    def enter() -> None:
        die_with_parent()
        fd = os.open(procs_path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")  # "0": the writer itself
        finally:
            os.close(fd)
    return enter


def _driver_argv(config: StormConfig) -> list[str]:
    if config.driver == "stress-ng":
        stress_ng = shutil.which("stress-ng")
        assert stress_ng is not None
        advice = ["--vm-madvise", _STRESS_NG_ADVICE[config.pages]] if config.pages in _STRESS_NG_ADVICE else []
        return [stress_ng, "--vm", str(config.workers), "--vm-bytes", str(config.worker_size), "--vm-keep",
                *advice, "--timeout", str(math.ceil(config.seconds) + 120)]
    return [sys.executable, "-I", "-S", _SCRIPT, "supervise", str(config.workers), str(config.worker_size),
            config.pages]


class _Handler(NamedTuple):
    child: Child
    popen: subprocess.Popen[bytes]
    pid: int
    out: str
    #: A pidfd of the handler's watchdog, if it has one: a child of the
    #: handler, not of this process, which ends by itself once the handler is
    #: gone (on v1 outside the group, where no emptying of the group reaches it).
    watchdog: Pidfd | None


def _start_handler(lab: Lab, group: ScratchGroup, workdir: str) -> _Handler:
    from useroom.bench._sandbox import BenchError

    out = os.path.join(workdir, f"{group.name}.handler.json")
    popen = subprocess.Popen([sys.executable, "-m", "useroom.bench", "_storm_handler", json.dumps({"out": out})],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             preexec_fn=_enter_group(os.path.join(group.path, "cgroup.procs")))
    child = lab.adopt(popen.pid, popen)
    assert popen.stdout is not None
    line = _read_line(popen.stdout, _HANDLER_START_TIMEOUT_S)
    if not line.startswith(b"started "):
        child.wait(10)
        why = ""
        if os.path.exists(out):
            with open(out) as file:
                why = f": {json.load(file).get('start_error')}"
        raise BenchError(f"the handler process did not start (said {line!r}){why}")
    watchdog = int(line.split()[2])
    return _Handler(child, popen, popen.pid, out, _pidfd_of_child(watchdog, popen.pid) if watchdog else None)


def _pidfd_of_child(pid: int, parent: int) -> Pidfd | None:
    """A pidfd of *pid* if it is (still) a child of *parent*, else None."""
    from useroom.bench._sandbox import Pidfd

    try:
        pidfd = Pidfd(pid)
    except ProcessLookupError:
        return None
    if _parent(pid) != parent:  # checked after the pidfd pinned it
        pidfd.close()
        return None
    return pidfd


def _end_watchdog(handler: _Handler, timeout: float = _EMPTY_TIMEOUT_S) -> bool:
    """Wait for the handler's watchdog to exit, SIGKILL it after *timeout*; whether it exited by itself."""
    watchdog = handler.watchdog
    if watchdog is None:
        return True
    try:
        if watchdog.exited(timeout):
            return True
        watchdog.send_signal(signal.SIGKILL)
        watchdog.exited(timeout)
        return False
    except ProcessLookupError:
        return True
    finally:
        watchdog.close()


def _read_line(pipe: IO[bytes], timeout: float) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while not data.endswith(b"\n"):
        if not select.select([pipe], [], [], max(0.0, deadline - time.monotonic()))[0]:
            break
        chunk = os.read(pipe.fileno(), 256)
        if not chunk:
            break
        data += chunk
    return data


def _stop_handler(handler: _Handler) -> dict[str, Any] | None:
    """Ask the handler to stop and write its record; None if there is none (it died)."""
    stdin = handler.popen.stdin
    if stdin is not None:
        try:
            stdin.write(b"stop\n")
            stdin.close()
        except OSError:
            pass  # it is gone
    if not handler.child.wait(_HANDLER_STOP_TIMEOUT_S):
        handler.child.kill()
        handler.child.wait(10)
    if handler.popen.stdout is not None:
        handler.popen.stdout.close()
    if not os.path.exists(handler.out):
        return None
    with open(handler.out) as file:
        record: dict[str, Any] = json.load(file)
    return record


def _kill_tasks(group: ScratchGroup, spare: int | None = None, timeout: float = _EMPTY_TIMEOUT_S) -> list[int]:
    """SIGKILL every task of *group* until none is left but *spare* and its
    children (the handler and, on v2, its watchdog); the pids still there
    after *timeout* seconds.

    Each pid is pinned with a pidfd and checked to be in the group after
    that (by its ``/proc/PID/cgroup``), so a pid reused meanwhile by another
    process is never signalled.
    """
    from useroom.bench._sandbox import Pidfd

    deadline = time.monotonic() + timeout
    while True:
        try:
            left = [pid for pid in group.procs() if pid != spare and _parent(pid) != spare]
        except FileNotFoundError:
            return []
        if not left or time.monotonic() > deadline:
            return left
        for pid in left:
            try:
                pidfd = Pidfd(pid)
            except ProcessLookupError:
                continue
            with pidfd:
                try:
                    with open(f"/proc/{pid}/cgroup") as file:
                        ours = f"/{group.name}\n" in file.read()
                    if ours:
                        pidfd.send_signal(signal.SIGKILL)
                except (FileNotFoundError, ProcessLookupError):
                    pass
        time.sleep(0.005)


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(stat.read().rpartition(b")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _make_room(group: ScratchGroup, config: StormConfig, charge: int) -> None:
    """Raises the useroom group's limit (v2: memory.max, then the wall) by
    the handler's own charge, and waits until the handler has adopted it
    (it reads a moved limit or wall at its next refresh, every 0.5 s)."""
    group.hold_wall(config.limit + charge, config.gap)
    time.sleep(1.5)  # two refreshes of the handler: it now holds the new limit


def run_variant(lab: Lab, guard: SignalGuard, config: StormConfig, mode: str, workdir: str,
                progress: IO[str] | None = None) -> dict[str, Any]:
    """One variant (``kernel`` or ``useroom``) of the storm in a fresh group; its raw figures.

    Says ``  MODE: storm running in PATH`` on *progress* once the storm has started.
    """
    from useroom import Group

    group = lab.create_group(f"storm-{mode}", limit=config.limit, kill_disable=False)
    if mode == "useroom":
        group.hold_wall(config.limit, config.gap)  # v2: memory.high, memory.max a gap above it
    raw: dict[str, Any] = {"mode": mode, "group": group.path, "limit": config.limit, "kernel_max": group.limit(),
                           "supervisor_deaths": [], "restarts": [], "handler_died_ns": None, "handler": None,
                           "handler_alive": None, "handler_rss_kb": None, "first_notified_ns": None}
    handler: _Handler | None = None
    oom: OomCounter | None = None
    probe: BadnessProbe | None = None
    driver: Child | None = None
    try:
        if mode == "useroom":
            handler = _start_handler(lab, group, workdir)
        spare = handler.pid if handler is not None else None
        probe = BadnessProbe(group.path, group.limit(), [handler.pid] if handler is not None else [])
        oom = Group.open(group.path).oom_counter()
        raw["usage_before_storm"] = group.usage()  # the handler process's charge (kernel: none)
        if handler is not None and config.room == "equal":
            _make_room(group, config, raw["usage_before_storm"])
            probe.close()
            probe = BadnessProbe(group.path, group.wall(), [handler.pid])
        # What the workload met: the kernel's limit, or the handler's wall (v1: the limit).
        raw["room_limit"] = group.limit() if mode == "kernel" else group.wall()
        started = time.monotonic_ns()
        driver = _start_driver(lab, group, config)
        if progress is not None:
            print(f"  {mode}: storm running in {group.path}", file=progress, flush=True)
        driver = _storm(config, group, oom, probe, driver, handler, raw, lab)
        ended = time.monotonic_ns()
        # The storm stops before the handler: without it the last OOMs would
        # meet the kernel killer (v1: the handler restores its setting).
        driver.kill()
        left = _kill_tasks(group, spare)
        driver.wait(10)
        raw["leftover_tasks"] = left
        raw["seconds"] = (ended - (raw["first_notified_ns"] or ended)) / 1e9
        raw["startup_s"] = ((raw["first_notified_ns"] or ended) - started) / 1e9
        raw["sampled_s"] = (ended - started) / 1e9
        raw["kernel_kills"] = group.oom_control().oom_kill
        if _readable(oom.fileno(), oom.poll_events):
            oom.update()
        raw["ooms"] = oom.count
        if handler is not None:
            raw["handler_alive"] = not handler.child.exited()
            raw["handler_rss_kb"] = _rss_kb(handler.pid) if raw["handler_alive"] else None
            raw["handler"] = _stop_handler(handler)
        raw["snapshots"] = len(probe.snapshots)
        raw["notified_snapshots"] = sum(snapshot.notified for snapshot in probe.snapshots)
        raw["snapshot_us_mean"] = probe.busy_ns / 1e3 / max(1, len(probe.snapshots))
        raw["sampling_cpu_share"] = probe.busy_ns / max(1, ended - started)
        raw["roles"] = {str(pid): _role(pid, probe.parents, raw["drivers"], config.driver)
                        for pid in probe.names}
        raw["names"] = {str(pid): name for pid, name in probe.names.items()}
        _judge(raw, probe, config)
    finally:
        with guard.shielded():
            for resource in (oom, probe):
                if resource is not None:
                    resource.close()
            if driver is not None:
                driver.kill()
            if handler is not None:
                if not handler.child.reaped:
                    handler.child.kill()
                raw["watchdog_ended_itself"] = _end_watchdog(handler)
            lab.rescue(group, [])  # killer on, limit lifted: nothing may sleep in the OOM wait now
            raw["left_after_kill"] = _kill_tasks(group)
            lab.release(group)
    return raw


def _rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            rss = _kb(status.read(), b"VmRSS:")
    except OSError:
        return None
    return rss if rss >= 0 else None


def _readable(fd: int, events: int) -> bool:
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(0))


def _start_driver(lab: Lab, group: ScratchGroup, config: StormConfig) -> Child:
    popen = subprocess.Popen(_driver_argv(config), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL,
                             preexec_fn=_enter_group(os.path.join(group.path, "cgroup.procs")))
    return lab.adopt(popen.pid, popen)


def _role(pid: int, parents: dict[int, int], drivers: list[int], driver: str) -> str:
    if pid in drivers:
        return "supervisor"
    if driver == "stress-ng" and parents.get(pid) in drivers:
        return "supervisor"  # stress-ng's per-worker parent, which respawns it
    return "worker"


def _storm(config: StormConfig, group: ScratchGroup, oom: OomCounter, probe: BadnessProbe, driver: Child,
           handler: _Handler | None, raw: dict[str, Any], lab: Lab) -> Child:
    """Sample the group until the time is up; restart the driver if its supervisor is killed.
    Returns the driver's process as it is at the end."""
    interval_ns = int(config.sample_ms * 1e6)
    poller = select.poll()
    oom_fd = oom.fileno()
    poller.register(oom_fd, oom.poll_events)
    handler_fd = handler.child.fileno() if handler is not None else None
    if handler_fd is not None:
        poller.register(handler_fd, select.POLLIN)
    # By the number of the pidfd: the pid and the pidfd, besides the driver's own process.
    supervisors: dict[int, tuple[int, Pidfd]] = {}
    raw["drivers"] = [driver.pid]
    driver_fd = driver.fileno()
    poller.register(driver_fd, select.POLLIN)
    # The round's storm time runs from its first OOM: the driver's start
    # (seconds in the emulated guest) is not storm. Without an OOM the round
    # ends once that time and the allowance for the start have passed.
    storm_ns = int(config.seconds / config.rounds * 1e9)
    ends = time.monotonic_ns() + storm_ns + int(_START_ALLOWANCE_S * 1e9)
    next_ns = 0
    try:
        while (now := time.monotonic_ns()) < ends:
            ready = poller.poll(max(0, math.ceil((next_ns - now) / 1e6)))
            notified = False
            for fd, _ in ready:
                if fd == oom_fd:
                    oom.update()
                    notified = True
                    if raw["first_notified_ns"] is None:
                        first = time.monotonic_ns()
                        raw["first_notified_ns"] = first
                        ends = first + storm_ns
                elif fd == handler_fd:
                    poller.unregister(fd)
                    raw["handler_died_ns"] = time.monotonic_ns()
                elif fd == driver_fd or fd in supervisors:
                    pid = driver.pid if fd == driver_fd else supervisors[fd][0]
                    raw["supervisor_deaths"].append({"pid": pid, "t_ns": time.monotonic_ns()})
                    for other in [driver_fd, *supervisors]:
                        poller.unregister(other)
                    _close_all(supervisors)
                    driver = _restart(lab, group, config, driver, handler, raw)
                    driver_fd = driver.fileno()
                    poller.register(driver_fd, select.POLLIN)
                    break
            if notified or time.monotonic_ns() >= next_ns:
                snapshot = probe.take(notified)
                cost_ns = snapshot.end_ns - snapshot.start_ns
                next_ns = snapshot.start_ns + max(interval_ns, int(cost_ns / config.sample_budget))
                if config.driver == "stress-ng":
                    _watch_supervisors(snapshot, probe, driver.pid, supervisors, poller)
    finally:
        _close_all(supervisors)
    return driver


def _watch_supervisors(snapshot: Snapshot, probe: BadnessProbe, top: int,
                       supervisors: dict[int, tuple[int, Pidfd]], poller: select.poll) -> None:
    """stress-ng: its per-worker parents are supervisors too: watch each by a pidfd."""
    from useroom.bench._sandbox import Pidfd

    watched = {pid for pid, _ in supervisors.values()}
    for pid, _, _ in snapshot.tasks:
        if probe.parents.get(pid) == top and pid not in watched:
            try:
                pidfd = Pidfd(pid)
            except ProcessLookupError:
                continue
            supervisors[pidfd.fileno()] = (pid, pidfd)
            poller.register(pidfd, select.POLLIN)


def _close_all(supervisors: dict[int, tuple[int, Pidfd]]) -> None:
    for _, pidfd in supervisors.values():
        pidfd.close()
    supervisors.clear()


def _restart(lab: Lab, group: ScratchGroup, config: StormConfig, driver: Child, handler: _Handler | None,
             raw: dict[str, Any]) -> Child:
    """The supervisor was killed: end what is left of the service, start it again."""
    began = time.monotonic_ns()
    driver.kill()
    _kill_tasks(group, handler.pid if handler is not None else None)
    driver.wait(10)
    lab.forget(driver)
    fresh = _start_driver(lab, group, config)
    raw["restarts"].append((began, time.monotonic_ns()))
    raw["drivers"].append(fresh.pid)
    return fresh


def _judge(raw: dict[str, Any], probe: BadnessProbe, config: StormConfig) -> None:
    """The victims of the variant, judged against the snapshots."""
    max_age_ns = int(config.max_age_ms * 1e6)
    if raw["mode"] == "kernel":
        kills = vanished(probe.snapshots, probe.names, raw["restarts"])
    else:
        record = raw["handler"] or {"events": []}
        kills = [Kill(victim["t_ns"], victim["pid"], victim["name"], victim["t_from"])
                 for event in record["events"] for victim in event["victims"]
                 if victim["signal"] == "SIGKILL" and victim["result"] == 0]
    for kill in kills:
        if str(kill.pid) not in raw["roles"]:
            raw["roles"][str(kill.pid)] = "unseen"
    rate = growth_rate(probe.snapshots)
    raw["growth_pages_per_ms"] = rate * 1e6
    raw["verdicts"] = judge(kills, probe.snapshots, max_age_ns, rate)


def schedule(variants: Iterable[str], rounds: int) -> list[str]:
    """The runs in order: the variants, then reversed, and so on (ABBA):
    a load that rises or falls steadily during the benchmark weighs alike on each."""
    order = list(variants)
    return [mode for number in range(rounds) for mode in (order if number % 2 == 0 else order[::-1])]


def _in_order(raw: dict[str, list[dict[str, Any]]], rounds: int) -> list[tuple[str, dict[str, Any]]]:
    """The runs that finished, in the order of :func:`schedule`."""
    taken = {mode: iter(runs) for mode, runs in raw.items()}
    runs = []
    for mode in schedule(raw, rounds):
        run = next(taken[mode], None)
        if run is not None:
            runs.append((mode, run))
    return runs


def merge(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's rounds as one: counts and times added, lists joined,
    the worst of each state kept. A round whose handler record was lost makes
    the handler's figures unknown."""
    handlers = [r.get("handler") for r in rounds]
    snapshots = sum(r["snapshots"] for r in rounds)
    useroom = rounds[0]["mode"] == "useroom"
    return {
        "mode": rounds[0]["mode"],
        "rounds": len(rounds),
        "seconds": sum(r["seconds"] for r in rounds),
        "sampled_s": sum(r["sampled_s"] for r in rounds),
        "kernel_kills": sum(r["kernel_kills"] for r in rounds),
        "ooms": sum(r["ooms"] for r in rounds),
        "snapshots": snapshots,
        "snapshot_us_mean": sum(r["snapshot_us_mean"] * r["snapshots"] for r in rounds) / max(1, snapshots),
        "sampling_cpu_share": max(r["sampling_cpu_share"] for r in rounds),
        "growth_pages_per_ms": max(r["growth_pages_per_ms"] for r in rounds),
        "supervisor_deaths": [d for r in rounds for d in r["supervisor_deaths"]],
        "verdicts": [v for r in rounds for v in r["verdicts"]],
        "roles": {pid: role for r in rounds for pid, role in r["roles"].items()},
        "left_after_kill": [pid for r in rounds for pid in r["left_after_kill"]],
        "handler_alive": all(r["handler_alive"] for r in rounds) if useroom else None,
        "handler_rss_kb": max((r["handler_rss_kb"] for r in rounds if r["handler_rss_kb"] is not None), default=None),
        "usage_before_storm": max(r["usage_before_storm"] for r in rounds),
        "handler": None if not useroom or any(h is None for h in handlers) else {
            "events": [e for h in handlers if h is not None for e in h["events"]],
            "errors": [e for h in handlers if h is not None for e in h["errors"]],
        },
    }


def summarize(raw: dict[str, Any], kernel: dict[str, Any] | None) -> dict[str, Any]:
    """One row of the table from a variant's :func:`merge` d rounds (*kernel*: the baseline's, for the ratio)."""
    from useroom.bench._report import percentile

    useroom = raw["mode"] == "useroom"
    record = raw["handler"]
    events = record["events"] if record is not None else []
    # A handler that died took its record with it: its episodes and kills are unknown, not 0.
    handler_kills = sum(1 for event in events for victim in event["victims"]
                        if victim["signal"] == "SIGKILL" and victim["result"] == 0) if record is not None else None
    verdicts = raw["verdicts"]
    measured = [v for v in verdicts if v["match"] is not None]
    matches = sum(1 for v in measured if v["match"])
    unmeasured: dict[str, int] = {}
    for verdict in verdicts:
        if verdict["reason"] is not None:
            unmeasured[verdict["reason"]] = unmeasured.get(verdict["reason"], 0) + 1
    ages = [v["age_ns"] for v in measured]
    seconds = raw["seconds"]
    kills = handler_kills if useroom else raw["kernel_kills"]
    rate = kills / seconds if kills is not None and seconds else None
    if useroom:
        kernel_rate = summarize(kernel, None)["kills_per_s"] if kernel is not None else None
    else:
        kernel_rate = rate  # the baseline itself
    return {
        "variant": raw["mode"],
        "rounds": raw["rounds"],
        "seconds": seconds,
        "notifications": raw["ooms"],
        "episodes": len(events) if record is not None else None,
        "handler_rss_kb": raw["handler_rss_kb"],
        "usage_before_storm": raw["usage_before_storm"],
        "handler_kills": handler_kills,
        "kernel_kills": raw["kernel_kills"],
        "supervisor_killed": len(raw["supervisor_deaths"]),
        "supervisor_victims": sum(1 for v in verdicts if raw["roles"].get(str(v["pid"])) == "supervisor"),
        "handler_alive": raw["handler_alive"],
        "takeovers": sum(1 for event in events if event["takeover"]) if record is not None else None,
        "handler_errors": len(record["errors"]) if record is not None else None,
        "kills_per_s": rate,
        "rate_ratio": rate / kernel_rate if rate is not None and kernel_rate else None,
        "victims": len(verdicts),
        "measured": len(measured),
        "matches": matches,
        "beaten_by_earlier_victim": sum(1 for v in measured if v.get("beaten_by_earlier_victim")),
        "mismatched": [v for v in measured if not v["match"]][:5],
        "agreement_pct": 100.0 * matches / len(measured) if measured else None,
        "unmeasured": unmeasured,
        "age_p50_ms": _ms(percentile(ages, 0.5)),
        "age_max_ms": _ms(max(ages) if ages else None),
        "growth_mib_per_ms": raw["growth_pages_per_ms"] * PAGE / MIB,
        "snapshots": raw["snapshots"],
        "snapshot_us_mean": raw["snapshot_us_mean"],
        "snapshot_interval_ms": 1e3 * raw["sampled_s"] / raw["snapshots"] if raw["snapshots"] else None,
        "sampling_cpu_share": raw["sampling_cpu_share"],
    }


def _ms(ns: int | None) -> float | None:
    return None if ns is None else ns / 1e6


def _fmt(value: Any, spec: str = "", suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def render(rows: list[dict[str, Any]], header: str, config: StormConfig, ooms_counted: str) -> str:
    """The table, and what its figures are; *ooms_counted*: what the OOM count is (the cgroup version's)."""
    from useroom._units import format_size

    columns = ("variant", "OOMs", "handler episodes", "handler kills", "kernel kills", "supervisor killed",
               "handler alive", "kills/s", "vs kernel", "agreement", "measured", "not measured",
               "snapshot age p50/max ms")
    lines = [columns]
    for r in rows:
        alive = None if r["handler_alive"] is None else ("yes" if r["handler_alive"] else "NO")
        lines.append((
            r["variant"], str(r["notifications"]), _fmt(r["episodes"]), _fmt(r["handler_kills"]),
            str(r["kernel_kills"]), str(r["supervisor_killed"]), _fmt(alive), _fmt(r["kills_per_s"], ".1f"),
            _fmt(r["rate_ratio"], ".2f", "x"),
            _fmt(r["agreement_pct"], ".1f", "%"), f"{r['measured']}/{r['victims']}",
            str(sum(r["unmeasured"].values())),
            f"{_fmt(r['age_p50_ms'], '.2f')} / {_fmt(r['age_max_ms'], '.2f')}",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    out = [header, ""]
    out += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    out.append("")
    out.append(f"OOMs: {ooms_counted}; handler episodes: the handler's own record of the OOMs it handled. Each run's "
               f"storm time starts at its first OOM notification (the driver's start before it is not storm): "
               f"kernel {_seconds(rows, 'kernel')}, useroom {_seconds(rows, 'useroom')} in all.")
    for r in rows:
        if r["variant"] == "useroom" and r["usage_before_storm"] is not None:
            charged = (f"The handler process is charged {r['usage_before_storm'] / MIB:.1f} MiB of the group "
                       f"before the storm ({(r['handler_rss_kb'] or 0) / 1024:.1f} MiB RSS at the end)")
            if config.room == "equal":
                out.append(charged + f": its limit was raised by that much above {format_size(config.limit)} "
                                     "(--room equal), so that the workload has the kernel variant's room.")
            else:
                out.append(charged + f" of its {format_size(config.limit)}: the workers have that much less room "
                                     "than in the kernel variant (--room shared), so each fills it sooner.")
    growth = ", ".join(f"{r['variant']} {r['growth_mib_per_ms']:.2f} MiB/ms" for r in rows)
    seen = "; ".join(f"{r['victims']} of its {r['kernel_kills']} kills seen" for r in rows if r["variant"] == "kernel")
    sampling = ", ".join(f"{r['variant']} every {_fmt(r['snapshot_interval_ms'], '.1f')} ms on average, "
                         f"{_fmt(r['snapshot_us_mean'], '.0f')} us each" for r in rows)
    out.append(f"agreement: each victim against the task with the highest oom_badness (RSS + swap + page tables, "
               f"oom_score_adj scaled to the limit) in this process's latest snapshot of the group before the "
               f"signal, with no kill in between. Snapshots: at each OOM notification and every "
               f"{config.sample_ms:g} ms, or less often so as to take at most {config.sample_budget:.0%} of a "
               f"CPU ({sampling}). A verdict that the tasks' growth since the snapshot could turn (at the "
               f"run's 99th-percentile growth: {growth}) is too close to call. The kernel row judges the "
               f"kernel's own victims (tasks gone between two snapshots: {seen}) against the same snapshots: the "
               f"accuracy of the measurement itself.")
    for r in rows:
        if r["variant"] == "useroom" and r["handler_kills"] is None:
            out.append("useroom: the handler's record was lost (it died before it was stopped): its episodes and "
                       "kills are unknown, and no kill could be judged")
        if r["beaten_by_earlier_victim"]:
            out.append(f"mismatches ({r['variant']}): {r['beaten_by_earlier_victim']} of the "
                       f"{r['measured'] - r['matches']} killed a task while an earlier victim, still exiting, held "
                       f"more memory (the kernel would have chosen it and waited for it)")
        for v in r.get("mismatched", ()):
            out.append(f"mismatch ({r['variant']}): killed {v['pid']} ({v['name'] or '?'}, "
                       f"{v['victim_pages'] * _PAGE_KIB} KiB) where oom_badness names {v['pick']} "
                       f"({v['pick_pages'] * _PAGE_KIB} KiB) in a snapshot {v['age_ns'] / 1e6:.1f} ms old "
                       f"(by {v['t_from']})")
        if r["unmeasured"]:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(r["unmeasured"].items()))
            out.append(f"not measured ({r['variant']}): {reasons}")
    return "\n".join(out)


_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

def _seconds(rows: list[dict[str, Any]], variant: str) -> str:
    return next((f"{r['seconds']:.1f} s" for r in rows if r["variant"] == variant), "-")


def below_goal(row: dict[str, Any]) -> list[str]:
    return [f"{name}: {_shown(row[key])} (goal {goal})" for name, key, test, goal in GOALS if not test(row[key])]


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return "-" if value is None else str(value)


def _parser() -> Any:
    import argparse


    defaults = StormConfig()

    from useroom.bench._sandbox import size_arg as size

    parser = argparse.ArgumentParser(prog="python -m useroom.bench storm", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=defaults.seconds,
                        help="storm time per variant, split over the rounds (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=defaults.rounds,
                        help="split each variant's time into this many runs, alternating kernel, useroom, useroom, "
                             "kernel, ... so that the machine's changing load falls on both (default %(default)s)")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="workers (default %(default)s)")
    parser.add_argument("--worker-size", type=size, default=defaults.worker_size,
                        help="memory each worker touches and keeps (default 200M)")
    parser.add_argument("--limit", type=size, default=defaults.limit,
                        help="the group's limit (v2: the useroom wall, memory.high; the kernel's memory.max) "
                             "(default 64M)")
    parser.add_argument("--driver", choices=DRIVERS, default=defaults.driver,
                        help="the storm: a small Python supervisor, or stress-ng --vm (default %(default)s)")
    parser.add_argument("--pages", choices=PAGES, default=defaults.pages,
                        help="the workers' pages: small, huge (transparent huge pages, through madvise), or any "
                             "(the system's setting, and stress-ng's random advice) (default %(default)s)")
    parser.add_argument("--sample-ms", type=float, default=defaults.sample_ms,
                        help="badness snapshots this often, besides one at each OOM notification "
                             "(default %(default)s)")
    parser.add_argument("--sample-budget", type=float, default=defaults.sample_budget,
                        help="the share of one CPU the periodic snapshots may take; the interval grows to fit "
                             "(default %(default)s)")
    parser.add_argument("--max-age-ms", type=float, default=defaults.max_age_ms,
                        help="an older snapshot does not measure a kill (default %(default)s)")
    parser.add_argument("--variants", type=_variants, default=VARIANTS, metavar="NAME[,NAME]",
                        help=f"which of {', '.join(VARIANTS)}, in this order (default: both; the useroom row's "
                             "ratio needs the kernel's)")
    parser.add_argument("--room", choices=("equal", "shared"), default=defaults.room,
                        help="equal: the useroom variant's limit is raised by the handler process's own charge, "
                             "so that the workload has the kernel variant's room; shared: the handler's charge "
                             "comes out of it (default %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="write every raw figure to PATH")
    return parser


def _variants(text: str) -> tuple[str, ...]:
    import argparse

    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"variants are {', '.join(VARIANTS)}, not {text!r}")
    return tuple(name for name in VARIANTS if name in names)


def main(argv: list[str], out: IO[str] | None = None) -> int:
    """``python -m useroom.bench storm``."""
    from useroom._units import format_size
    from useroom.bench._sandbox import BenchError, Interrupted, Lab, SignalGuard

    out = out or sys.stdout
    parser = _parser()
    args = parser.parse_args(argv)
    config = StormConfig(seconds=args.seconds, rounds=args.rounds, workers=args.workers,
                         worker_size=args.worker_size, limit=args.limit,
                         driver=args.driver, pages=args.pages, sample_ms=args.sample_ms, sample_budget=args.sample_budget,
                         max_age_ms=args.max_age_ms, room=args.room)
    if config.rounds < 1 or config.seconds / config.rounds <= 0.5 or config.workers < 1 or config.sample_ms <= 0 \
            or not 0 < config.sample_budget <= 1:
        parser.error("--rounds must be >= 1, --seconds / --rounds > 0.5, --workers >= 1, --sample-ms > 0, "
                     "0 < --sample-budget <= 1")
    if config.worker_size <= config.limit:
        parser.error("each worker must touch more than the limit: a storm needs every worker to be killed")
    if config.driver == "stress-ng" and shutil.which("stress-ng") is None:
        print("useroom.bench storm: --driver stress-ng needs stress-ng on PATH (apt-get install stress-ng)",
              file=sys.stderr)
        return 2
    raw: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.variants}
    problems: list[str] = []
    interrupted: int | None = None
    with SignalGuard() as guard, tempfile.TemporaryDirectory(prefix="useroom-storm-bench-") as workdir:
        try:
            lab = Lab.below_own_memcg()
        except BenchError as error:
            print(f"useroom.bench storm: {error}", file=sys.stderr)
            return 2
        emulated = " (EMULATED guest: times are not the host's)" if os.environ.get("VMRUN_GUEST") else ""
        kind = lab.kind
        header = (f"useroom storm benchmark: cgroup v{lab.version}, kernel {os.uname().release}, "
                  f"{os.cpu_count()} cores{emulated}\n"
                  f"driver {config.driver}: {config.workers} workers x {format_size(config.worker_size)} "
                  f"on {config.pages} pages, respawned at once, in a group of {format_size(config.limit)}"
                  + (f" (useroom: {kind.wall_file} {format_size(config.limit)}, {kind.limit_file} "
                     f"{format_size(kind.backstop(config.limit, config.gap))}; kernel: {kind.limit_file} "
                     f"{format_size(config.limit)})" if kind.wall_apart else "")
                  + f"; {config.seconds:g} s per variant, in {config.rounds} rounds (ABBA order)")
        print(header.replace("\n", "; ", 1), file=sys.stderr, flush=True)
        try:
            lab.sweep_stale()
            for mode in schedule(args.variants, config.rounds):
                figures = run_variant(lab, guard, config, mode, workdir, sys.stderr)
                raw[mode].append(figures)
                row = summarize(merge([figures]), None)
                print(f"  {mode} (round {len(raw[mode])} of {config.rounds}): {row['notifications']} OOMs, "
                      f"{_fmt(row['handler_kills'])} handler kills, {row['kernel_kills']} kernel kills, agreement "
                      f"{_fmt(row['agreement_pct'], '.1f', '%')} of {row['measured']}", file=sys.stderr, flush=True)
        except Interrupted as err:
            interrupted = err.signum
        except BenchError as error:
            problems.append(str(error))
        finally:
            try:
                with guard.shielded():
                    lab.close()
            except Interrupted as err:
                interrupted = interrupted or err.signum
            problems.extend(lab.problems)
    merged = {mode: merge(rounds) for mode, rounds in raw.items() if rounds}
    rows = [summarize(merged[mode], merged.get("kernel") if mode == "useroom" else None)
            for mode in VARIANTS if mode in merged]
    for mode, figures in merged.items():
        if figures["left_after_kill"]:
            problems.append(f"{mode}: tasks left in the group after the kill: {figures['left_after_kill']}")
    if rows:
        print(render(rows, header, config, lab.kind.ooms_counted), file=out)
        runs = [(mode, summarize(merge([r]), None)["kills_per_s"]) for mode, r in _in_order(raw, config.rounds)]
        print("kills/s by run, in the order run: "
              + " -> ".join(f"{mode} {_fmt(rate, '.1f')}" for mode, rate in runs), file=out)
    failing = below_goal(rows[-1]) if rows and rows[-1]["variant"] == "useroom" else []
    if failing:
        print(f"below the goal (useroom): {'; '.join(failing)}", file=out)
    if interrupted is not None:
        print(f"interrupted by {signal.Signals(interrupted).name}: the figures above are the variants that "
              "finished; every group and process was removed", file=out)
    if problems:
        print("problems:", *problems, sep="\n  ", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"config": config._asdict(), "cgroup_version": lab.version, "kernel": os.uname().release,
                       "emulated": bool(os.environ.get("VMRUN_GUEST")), "rows": rows, "below_goal": failing,
                       "problems": problems, "raw": raw, "interrupted": interrupted}, file, indent=1)
    out.flush()
    if interrupted is not None:
        return 128 + interrupted
    return 1 if problems else 0


def _script_main(argv: list[str]) -> int:
    if argv[:1] == ["supervise"] and len(argv) in (3, 4):
        supervise(int(argv[1]), int(argv[2]), *argv[3:])
    print(f"usage: python -I -S {_SCRIPT} supervise WORKERS SIZE [PAGES]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_script_main(sys.argv[1:]))
