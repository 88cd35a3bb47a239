"""A plan: what the watcher does on a notification, decided ahead of time,
and the records of what it did.

Pure values (frozen attrs classes and enums); :mod:`useroom.native.watcher`
writes a plan into locked memory and reads the records back.
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Iterable

import attrs

from useroom.native._lib import lib, valid_fd

__all__ = [
    "CANDS_MAX",
    "DATA_MAX",
    "MEMBER_MAX",
    "NEEDLE_MAX",
    "NOT_MEMBER",
    "PLAN_MAX",
    "SETTLED",
    "WAITED",
    "Action",
    "ActionFlag",
    "ActionKind",
    "Candidate",
    "EventRecord",
    "Outcome",
    "Plan",
    "SourceKind",
    "Step",
    "Wake",
]

PLAN_MAX: int = lib.URO_PLAN_MAX
DATA_MAX: int = lib.URO_DATA_MAX
NEEDLE_MAX: int = lib.URO_NEEDLE_MAX
CANDS_MAX: int = lib.URO_CANDS_MAX
MEMBER_MAX: int = lib.URO_MEMBER_MAX
#: A signal's result when its task was no longer in the plan's group (see
#: :attr:`Plan.member`): the signal was not sent.
NOT_MEMBER: int = -errno.EXDEV
#: SIGNAL_BEST's result when it waited for an earlier victim to exit.
WAITED: int = lib.URO_WAITED
#: What a thread that settled an episode writes to the plan's reply eventfd.
SETTLED: int = lib.URO_SETTLED


class ActionKind(enum.IntEnum):
    SIGNAL_PIDFD = lib.URO_ACT_SIGNAL_PIDFD
    SIGNAL_PID = lib.URO_ACT_SIGNAL_PID
    WRITE = lib.URO_ACT_WRITE
    MRELEASE = lib.URO_ACT_MRELEASE
    WAKE = lib.URO_ACT_WAKE
    AWAIT = lib.URO_ACT_AWAIT
    CHECK = lib.URO_ACT_CHECK
    SIGNAL_BEST = lib.URO_ACT_SIGNAL_BEST


class SourceKind(enum.IntEnum):
    OOM = lib.URO_SRC_OOM
    FORWARD = lib.URO_SRC_FORWARD


class Wake(enum.IntEnum):
    """How a source's fd signals: an eventfd (v1 notifications, the stop fd)
    is readable and its counter is read; a cgroup v2 file (``memory.events``)
    polls ``EPOLLPRI`` on a change and is read again to re-arm; a PSI trigger
    polls ``EPOLLPRI`` (the poll consumes the event)."""

    EVENTFD = 0
    FILE = lib.URO_SRC_PRI | lib.URO_SRC_REREAD
    TRIGGER = lib.URO_SRC_PRI


class Outcome(enum.IntEnum):
    RESOLVED = lib.URO_OUT_RESOLVED
    UNRESOLVED = lib.URO_OUT_UNRESOLVED
    NOT_NEEDED = lib.URO_OUT_NOT_NEEDED
    GONE = lib.URO_OUT_GONE
    NO_PLAN = lib.URO_OUT_NO_PLAN
    ACTED = lib.URO_OUT_ACTED
    FORWARDED = lib.URO_OUT_FORWARDED
    RELIEVED = lib.URO_OUT_RELIEVED
    SUPERSEDED = lib.URO_OUT_SUPERSEDED


class ActionFlag(enum.IntFlag):
    """The bits of :attr:`Action.flags`; the :class:`Action` methods set them."""

    READ = lib.URO_F_READ
    ALWAYS = lib.URO_F_ALWAYS
    RESOLVES = lib.URO_F_RESOLVES
    OPENS = lib.URO_F_OPENS
    IF_CLEAR = lib.URO_F_IF_CLEAR
    SUPERSEDE = lib.URO_F_SUPERSEDE
    SETTLES = lib.URO_F_SETTLES
    PICKED = lib.URO_F_PICKED
    EXIT = lib.URO_F_EXIT
    GATE = lib.URO_F_GATE


def _timeout_ns(seconds: float) -> int:
    if not seconds >= 0:
        raise ValueError(f"timeout must be >= 0 seconds, not {seconds!r}")
    return int(seconds * 1e9)


@attrs.frozen
class Action:
    """One step of a native plan. Build with the named constructors.

    The fds an action names belong to the caller, who keeps them open while
    a plan that uses them is armed.
    """

    kind: ActionKind
    fd: int = -1
    pid: int = 0
    sig: int = 0
    data: bytes = b""
    timeout_ns: int = 0
    #: :class:`ActionFlag` bits, set by the methods below.
    flags: int = attrs.field(default=0, converter=int)
    guard: int = -1
    #: SIGNAL_PIDFD: the task's ``/proc/<pid>/cgroup``, opened and read once
    #: ahead, through which the watcher checks that it is still in the
    #: group just before the signal (see :attr:`Plan.member`); -1: the file
    #: of ``pid`` is opened then.
    member_fd: int = -1

    def after(self, index: int) -> Action:
        """This action, run only if the action at ``index`` of the plan ran
        and succeeded (a restore runs only if what it undoes was done)."""
        if not 0 <= index < PLAN_MAX:
            raise ValueError(f"after must index a plan action, not {index!r}")
        return attrs.evolve(self, guard=index)

    def always(self) -> Action:
        """This action, run even after the episode was resolved (a restore)."""
        return attrs.evolve(self, flags=self.flags | ActionFlag.ALWAYS)

    def resolving(self) -> Action:
        """This action's success resolves the episode and closes an open
        grant (a limit restored: usage fits again)."""
        return attrs.evolve(self, flags=self.flags | ActionFlag.RESOLVES)

    def opening(self) -> Action:
        """This action's success opens a grant (the limit raised): until a
        resolving action succeeds, a check can relieve but not resolve."""
        return attrs.evolve(self, flags=self.flags | ActionFlag.OPENS)

    def settling(self) -> Action:
        """An AWAIT that reads its eventfd: a counter of :data:`SETTLED`
        means the thread it waited for restored the limit itself, with the
        usage fitting; the grant is closed and the episode resolved."""
        if self.kind != ActionKind.AWAIT or not self.flags & ActionFlag.READ:
            raise ValueError("only an AWAIT that reads its eventfd can settle")
        return attrs.evolve(self, flags=self.flags | ActionFlag.SETTLES)

    def if_clear(self) -> Action:
        """This action runs only if the check says the OOM is over now."""
        return attrs.evolve(self, flags=self.flags | ActionFlag.IF_CLEAR)

    def on_pick(self) -> Action:
        """This MRELEASE or AWAIT, on the pidfd of the episode's last
        :meth:`signal_best` pick instead of its own fd (-ESRCH if it picked
        nobody)."""
        if self.kind not in (ActionKind.MRELEASE, ActionKind.AWAIT) and \
                not (self.kind is ActionKind.CHECK and self.flags & ActionFlag.EXIT):
            raise ValueError("only MRELEASE, AWAIT and a CHECK until_exit() can act on the pick")
        return attrs.evolve(self, fd=-1, flags=self.flags | ActionFlag.PICKED)

    def until_exit(self, pidfd: int = -1) -> Action:
        """This CHECK also ends once the process of ``pidfd`` has exited (or
        the pick's, with :meth:`on_pick` after this), after one last check:
        its memory is back, and if the check still fails, the group is out
        of memory again and the next action follows at once (cgroup v2,
        where no task waits for the check to wake it)."""
        if self.kind is not ActionKind.CHECK:
            raise ValueError("only a CHECK ends at an exit")
        return attrs.evolve(self, fd=pidfd, flags=self.flags | ActionFlag.EXIT)

    @classmethod
    def signal_best(cls, sig: int, wait: float = 0.25) -> Action:
        """Pick the plan's candidate with the highest badness at this moment
        (see :class:`Candidate`) and signal it through its pidfd; fails with
        ESRCH if no live candidate is left. The step records the pick.

        If a task an earlier pick killed has not exited yet, it waits up to
        ``wait`` seconds for it instead, as the kernel waits for its own
        victim, and once it is gone returns :data:`WAITED` without picking."""
        return cls(ActionKind.SIGNAL_BEST, sig=sig, timeout_ns=_timeout_ns(wait))

    @classmethod
    def signal_pidfd(cls, pidfd: int, sig: int, *, pid: int = 0, member_fd: int = -1) -> Action:
        """Signal a process through its pidfd; fails with ESRCH if it exited.

        In a plan with a :attr:`Plan.member` line, the signal goes out only
        if the process is still in the group (else :data:`NOT_MEMBER`), as
        its ``/proc/<pid>/cgroup`` says: ``member_fd``, that file opened and
        read once ahead, or the file of ``pid``. SIGCONT is always sent."""
        if pid < 0:
            raise ValueError(f"pid must be positive, not {pid}")
        return cls(ActionKind.SIGNAL_PIDFD, fd=valid_fd(pidfd), sig=sig, pid=pid,
                   member_fd=-1 if member_fd < 0 else valid_fd(member_fd))

    @classmethod
    def signal_pid(cls, pid: int, sig: int) -> Action:
        """Signal a pid (prefer pidfds: a pid can be reused). In a plan with
        a :attr:`Plan.member` line, only if ``/proc/<pid>/cgroup``, read just
        before, says it is in the group."""
        if pid <= 0:
            raise ValueError(f"pid must be positive, not {pid}")
        return cls(ActionKind.SIGNAL_PID, pid=pid, sig=sig)

    @classmethod
    def write(cls, fd: int, data: bytes) -> Action:
        """Write preformatted bytes at offset 0 of a preopened file."""
        if not 0 < len(data) <= DATA_MAX:
            raise ValueError(f"write payload must be 1..{DATA_MAX} bytes, not {len(data)}")
        return cls(ActionKind.WRITE, fd=valid_fd(fd), data=bytes(data))

    @classmethod
    def mrelease(cls, pidfd: int) -> Action:
        """Reap a killed process's memory now (process_mrelease, Linux 5.15)."""
        return cls(ActionKind.MRELEASE, fd=valid_fd(pidfd))

    @classmethod
    def wake(cls, eventfd: int) -> Action:
        """Add 1 to an eventfd (to wake a Python thread)."""
        return cls(ActionKind.WAKE, fd=valid_fd(eventfd))

    @classmethod
    def await_readable(cls, fd: int, timeout: float, *, read: bool = False) -> Action:
        """Wait until fd is readable (a pidfd: the process exited; an eventfd:
        Python replied), at most ``timeout`` seconds; ``read`` resets an eventfd."""
        return cls(
            ActionKind.AWAIT, fd=valid_fd(fd), timeout_ns=_timeout_ns(timeout),
            flags=ActionFlag.READ if read else 0,
        )

    @classmethod
    def check(cls, timeout: float, *, supersede: bool = False) -> Action:
        """Wait up to ``timeout`` seconds for the plan's check to say the OOM
        is over; the episode ends there if it is. Skipped when no action since
        the previous check took effect. With ``supersede``, a new notification
        of the episode's source (the group ran out again: the action took
        effect) also ends it, and the next episode starts at once."""
        return cls(ActionKind.CHECK, timeout_ns=_timeout_ns(timeout),
                   flags=ActionFlag.SUPERSEDE if supersede else 0)

    @classmethod
    def gate(cls, timeout: float) -> Action:
        """The wait before the kills, as the kernel's killer waits: while a
        task a SIGKILL of the watcher went to still exits (its memory is on
        its way back), or while the group has room for a page under its
        limit (``Plan.room_fd``: the tasks woken in the OOM have not run
        yet), up to ``timeout`` seconds, ending the episode if the check
        says the OOM is over; otherwise it returns at once."""
        return cls(ActionKind.CHECK, timeout_ns=_timeout_ns(timeout), flags=ActionFlag.GATE)


def _actions(value: Iterable[Action]) -> tuple[Action, ...]:
    return tuple(value)


@attrs.frozen
class Candidate:
    """A task :meth:`Action.signal_best` may pick, by the fds the caller
    keeps open while the plan is armed: its pidfd, and ``/proc/<pid>/status``
    opened and read once ahead. Its badness at the pick is VmRSS + VmSwap +
    VmPTE (kB), as the kernel's ``oom_badness()`` counts, plus its
    ``oom_score_adj`` scaled to the group's limit (adj x limit / 1000): read
    at the pick through ``adj_fd`` (``/proc/<pid>/oom_score_adj`` opened
    ahead), or ``adj_kb``, already scaled, without one or if it fails.
    A candidate is picked only while it is in the plan's group."""

    pidfd: int = attrs.field(converter=valid_fd)
    status_fd: int = attrs.field(converter=valid_fd)
    pid: int
    adj_kb: int = 0
    adj_fd: int = -1
    #: ``/proc/<pid>/cgroup`` opened and read ahead: the pick passes over a
    #: task no longer in the group (see :attr:`Plan.member`); -1: the file
    #: of ``pid`` is opened at the pick.
    cgroup_fd: int = -1


def _candidates(value: Iterable[Candidate]) -> tuple[Candidate, ...]:
    return tuple(value)


def _pids(value: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(pid) for pid in value)


@attrs.frozen
class Plan:
    """What the watcher does on an OOM notification, decided ahead of time.

    ``check_fd`` is a preopened file (v1: ``memory.oom_control``) that says
    the OOM is over when it contains ``resolved_needle``, or (v2:
    ``memory.current``) when the number it holds is below ``resolved_below``;
    the watcher reads it before acting (to ignore a notification that needs
    nothing) and at each ``Action.check``.
    """

    actions: tuple[Action, ...] = attrs.field(converter=_actions)
    check_fd: int = -1
    resolved_needle: bytes = attrs.field(default=b"")
    poll_interval: float = 0.0005
    resolved_below: int = attrs.field(default=0, kw_only=True)
    #: What :meth:`Action.signal_best` picks from, in the order ties go to
    #: the later one (the kernel scans the oldest task first).
    candidates: tuple[Candidate, ...] = attrs.field(default=(), kw_only=True, converter=_candidates)
    #: The group's ``cgroup.procs``, through which :meth:`Action.signal_best`
    #: also finds tasks that are not candidates (-1: it does not look).
    procs_fd: int = attrs.field(default=-1, kw_only=True)
    #: Read ``procs_fd`` through a new open file at each pick (cgroup v1,
    #: where an open file lists what its first read listed).
    procs_reopen: bool = attrs.field(default=False, kw_only=True)
    #: Pids never picked through ``procs_fd`` (at most 32).
    protect: tuple[int, ...] = attrs.field(default=(), kw_only=True, converter=_pids)
    #: What such a task's oom_score_adj is scaled by (kB, adj x limit / 1000).
    limit_kb: int = attrs.field(default=0, kw_only=True)
    #: The group's line of ``/proc/<pid>/cgroup`` (``b"7:memory:/a\\n"``,
    #: ``b"0::/a\\n"``): every signal to a task (SIGCONT aside) and every
    #: pick is checked against it at the OOM, since a pidfd pins a process,
    #: not its group. Empty: no check.
    member: bytes = attrs.field(default=b"", kw_only=True)
    #: cgroup v1: the group's usage file, opened and read ahead, and the
    #: usage below which the group has room for a page under its limit
    #: (-1, 0: not looked at). :meth:`Action.gate` waits while the group
    #: has that room: tasks a victim's exit woke have not run yet. The
    #: kernel's killer, too, kills nobody while there is room for the charge.
    room_fd: int = attrs.field(default=-1, kw_only=True)
    room_below: int = attrs.field(default=0, kw_only=True)

    @protect.validator
    def _validate_protect(self, _: object, value: tuple[int, ...]) -> None:
        if len(value) > 32:
            raise ValueError(f"a plan protects at most 32 pids, not {len(value)}")

    @candidates.validator
    def _validate_candidates(self, _: object, value: tuple[Candidate, ...]) -> None:
        if len(value) > CANDS_MAX:
            raise ValueError(f"a plan holds at most {CANDS_MAX} candidates, not {len(value)}")

    @actions.validator
    def _validate_actions(self, _: object, value: tuple[Action, ...]) -> None:
        if len(value) > PLAN_MAX:
            raise ValueError(f"a plan holds at most {PLAN_MAX} actions, not {len(value)}")

    @member.validator
    def _validate_member(self, _: object, value: bytes) -> None:
        if len(value) > MEMBER_MAX:
            raise ValueError(f"the membership line holds at most {MEMBER_MAX} bytes, not {len(value)}")
        if value and not value.endswith(b"\n"):
            raise ValueError("the membership line ends with a newline")

    @resolved_needle.validator
    def _validate_needle(self, _: object, value: bytes) -> None:
        if len(value) > NEEDLE_MAX:
            raise ValueError(f"the needle holds at most {NEEDLE_MAX} bytes")
        if self.check_fd >= 0 and not value and self.resolved_below <= 0:
            raise ValueError("a plan with a check_fd needs a resolved_needle or a resolved_below")


@attrs.frozen
class Step:
    """One executed action: its index in the plan, its kind, its result
    (>= 0 or -errno), when it began and when it returned."""

    index: int
    kind: ActionKind
    result: int
    t0_ns: int
    t_ns: int
    #: SIGNAL_BEST: the index of the candidate picked (-1: none), and its
    #: badness (kB) at that moment.
    pick: int = -1
    points: int = 0
    #: SIGNAL_BEST: the pid picked (a candidate's, or a task found through
    #: the plan's ``procs_fd``, with ``pick`` -1); 0 if none.
    pid: int = 0

    @property
    def ok(self) -> bool:
        return self.result >= 0


@attrs.frozen
class EventRecord:
    """One record of the watcher's ring, copied out of locked memory."""

    seq: int
    #: The :attr:`WatchedGroup.index` of the group, and its episode number
    #: (1, 2, ... per group; 0 for a record of no episode: a forward, a
    #: source gone).
    group: int
    episode: int
    source: int
    outcome: Outcome
    count: int
    notified_ns: int
    acted_ns: int
    resolved_ns: int
    plan_id: int
    plan_slot: int
    steps: tuple[Step, ...]

    @property
    def notify_to_act_ns(self) -> int | None:
        return self.acted_ns - self.notified_ns if self.acted_ns else None

    @property
    def notify_to_resolved_ns(self) -> int | None:
        return self.resolved_ns - self.notified_ns if self.resolved_ns else None
