"""What an OOM episode was, for people and programs: :class:`OomEvent`
and its parts, and the conversion of the watcher's record of an episode
into one (:func:`episode_event`, a pure function of the record, the plan
it ran and what the handler did meanwhile)."""

from __future__ import annotations

import enum
import signal
from collections.abc import Sequence
from typing import Any

import attrs

from useroom import native
from useroom._hooks import HookRecord, hooks_short_by
from useroom._units import UNLIMITED, format_size
from useroom._victims import Victim
from useroom.native import EventRecord
from useroom.policy import PICK_REASON, CompiledPlan, Phase, StepTag
from useroom.watchdog.protocol import Takeover

__all__ = [
    "EventOutcome",
    "OomEvent",
    "StepRecord",
    "VictimRecord",
    "episode_event",
    "episode_log",
    "grant_acted",
    "grant_left_open",
]


class EventOutcome(str, enum.Enum):
    """How an episode ended (a ``str``: compares equal to its value); see
    :class:`OomEvent`."""

    RESOLVED = "resolved"
    SUPERSEDED = "superseded"
    RELIEVED = "relieved"
    UNRESOLVED = "unresolved"
    NOT_NEEDED = "not_needed"
    GONE = "gone"
    NO_PLAN = "no_plan"
    ACTED = "acted"
    FORWARDED = "forwarded"

    def __str__(self) -> str:
        return self.value


#: The watcher's outcome of a record, as an event's.
_OUTCOMES: dict[native.Outcome, EventOutcome] = {
    native.Outcome.RESOLVED: EventOutcome.RESOLVED,
    native.Outcome.SUPERSEDED: EventOutcome.SUPERSEDED,
    native.Outcome.RELIEVED: EventOutcome.RELIEVED,
    native.Outcome.UNRESOLVED: EventOutcome.UNRESOLVED,
    native.Outcome.NOT_NEEDED: EventOutcome.NOT_NEEDED,
    native.Outcome.GONE: EventOutcome.GONE,
    native.Outcome.NO_PLAN: EventOutcome.NO_PLAN,
    native.Outcome.ACTED: EventOutcome.ACTED,
    native.Outcome.FORWARDED: EventOutcome.FORWARDED,
}


@attrs.frozen
class StepRecord:
    """One action the native plan ran during an episode: when it began
    (``started_ns``) and returned (``t_ns``), and its result (>= 0, or -errno)."""

    kind: str
    explanation: str
    #: None for a step of a plan no longer known (armed long before).
    phase: Phase | None
    result: int
    started_ns: int
    t_ns: int
    #: Whether the action opened a grant (raised the limit by the reserve)
    #: or restored the limit; ``StepTag.NONE`` for every other.
    tag: StepTag = StepTag.NONE
    #: The pid a signal step signalled (its target, or the pick); 0 if none.
    pid: int = 0

    @property
    def ok(self) -> bool:
        return self.result >= 0

    @property
    def settled(self) -> bool:
        """The hooks' wait, answered by a hook thread that closed the grant itself."""
        return self.kind == "AWAIT" and self.phase is Phase.HOOKS and self.result == native.SETTLED


@attrs.frozen
class VictimRecord:
    """A task signalled during an episode, and how the signal went."""

    pid: int
    name: str
    #: As of the refresh the plan was compiled from (0 for a task the pick
    #: found at the OOM); ``badness`` is the size at the OOM.
    rss: int
    signal: str
    result: int
    by: str  # "plan" (native) or "handler" (Python, during a grant)
    #: Picked at the OOM by badness (KillLargest): RSS + swap + page tables
    #: + the scaled oom_score_adj, in bytes, as read at that moment.
    badness: int | None = None
    #: Signalled by the grant's fallback for a refresh that failed for want
    #: of memory: from the group's task list, with no new table.
    unrefreshed: bool = False


@attrs.frozen
class OomEvent:
    """One OOM episode of a handled group.

    Times are CLOCK_MONOTONIC nanoseconds (``time.monotonic_ns()``):
    ``notified_ns`` when the watcher read the notification, ``acted_ns`` when
    the first action began, ``resolved_ns`` when the watcher saw ``under_oom``
    clear (None if it did not). ``outcome`` is one of ``resolved``,
    ``superseded`` (the action took effect and the group ran out again
    before the check saw it clear: the next episode follows at once),
    ``relieved`` (no task waits, but the limit is still raised by at most
    the reserve; the handler restores it as soon as usage allows),
    ``unresolved``, ``not_needed`` (a notification with nothing to do),
    ``gone`` (the group was removed), ``no_plan``, ``acted``. ``resolved_by``
    names the phase that ended it: ``hooks`` (the ``on_oom`` hooks freed
    enough), ``kill`` (a victim of the plan), ``raise``, ``grant`` (the
    handler acted with headroom granted) or ``kernel``. ``fallback`` is True
    when the hooks and the planned victims were not enough and the headroom
    grant or the kernel OOM killer was used. ``hooks`` records each hook run;
    ``would``, under a :class:`DryRun` policy, what the policy would have done;
    ``moved``, under :class:`MoveToOverflow`, the pids moved out of the group.

    An episode the watchdog handed to the kernel is an event of its own with
    ``takeover`` set (its reason and timings), ``resolved_by == "watchdog"``
    and no steps.
    """

    seq: int
    notified_ns: int
    acted_ns: int | None
    resolved_ns: int | None
    outcome: EventOutcome
    action: str
    victims: tuple[VictimRecord, ...]
    steps: tuple[StepRecord, ...]
    fallback: bool
    plan_id: int
    resolved_by: Phase | None = None
    hooks: tuple[HookRecord, ...] = ()
    would: tuple[str, ...] = ()
    moved: tuple[int, ...] = ()
    takeover: Takeover | None = None
    #: The limit (v1) or wall (v2) the episode was about, in bytes; 0 if unknown.
    limit: int = 0

    @property
    def released(self) -> int:
        """Bytes the ``on_oom`` hooks gave back to the kernel in this episode
        (the usage's fall across each hook and the trim after it)."""
        return sum(h.released for h in self.hooks)

    @property
    def hooks_short_by(self) -> int | None:
        """After the hooks' last round, how many bytes the usage still
        exceeded the limit by (0 if it fitted); None if no hook ran."""
        return hooks_short_by(self.hooks, self.limit)

    @classmethod
    def from_takeover(cls, takeover: Takeover) -> OomEvent:
        ms = takeover.takeover_ns / 1e6
        return cls(
            seq=-1,
            notified_ns=takeover.notified_ns,
            acted_ns=takeover.acted_ns,
            resolved_ns=takeover.resolved_ns,
            outcome=EventOutcome.RESOLVED if takeover.resolved_ns is not None else EventOutcome.GONE,
            action=f"watchdog ({takeover.reason}): kernel OOM killer enabled {ms:.1f} ms after the notification",
            victims=(),
            steps=(),
            fallback=True,
            plan_id=-1,
            resolved_by=Phase.WATCHDOG,
            takeover=takeover,
        )

    @property
    def notify_to_hook_ns(self) -> int | None:
        """From the notification to the first hook starting."""
        return self.hooks[0].started_ns - self.notified_ns if self.hooks else None

    @property
    def notify_to_signal_ns(self) -> int | None:
        """From the notification to the first signal being sent (the system
        call's entry: its return can come after the woken victim has run)."""
        for step in self.steps:
            if step.kind in ("SIGNAL_PIDFD", "SIGNAL_PID", "SIGNAL_BEST") and step.ok:
                return step.started_ns - self.notified_ns
        return None

    @property
    def duration_ns(self) -> int | None:
        """From the notification to the OOM being over."""
        return None if self.resolved_ns is None else self.resolved_ns - self.notified_ns

    def to_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["notify_to_signal_ns"] = self.notify_to_signal_ns
        out["notify_to_hook_ns"] = self.notify_to_hook_ns
        out["duration_ns"] = self.duration_ns
        out["released"] = self.released
        out["hooks_short_by"] = self.hooks_short_by
        for hook, record in zip(out["hooks"], self.hooks, strict=True):
            hook["released"] = record.released
        return out



def episode_event(
    record: EventRecord,
    plan: CompiledPlan | None,
    hooks: tuple[HookRecord, ...],
    grant_actions: Sequence[VictimRecord],
    limit: int,
) -> OomEvent:
    """The event of one episode: the watcher's ``record`` of it, read
    against the ``plan`` it ran (its explanations, phases, tags and targets
    by action index; None for a plan no longer known), with the ``hooks``
    that ran in it, what the handler did with headroom granted
    (``grant_actions``: pass them where :func:`grant_acted`), and the
    ``limit`` (v1) or wall (v2) it was about (``UNLIMITED``: unknown)."""
    steps = []
    victims = []
    for step in record.steps:
        i = step.index
        why = plan.explanations[i] if plan is not None else ""
        phase = plan.phases[i] if plan is not None else None
        tag = plan.tags[i] if plan is not None else StepTag.NONE
        target = plan.targets[i] if plan is not None else None
        badness = None
        if step.kind == native.ActionKind.SIGNAL_BEST and step.pid == 0 and step.result == native.WAITED:
            why = "waited for the last victim to exit before picking another"
        if plan is not None and step.kind == native.ActionKind.SIGNAL_BEST and step.pid > 0:
            # A candidate, or a task started since the refresh that the
            # pick found through cgroup.procs (no name known).
            badness = step.points * 1024
            target = plan.candidates[step.pick] if step.pick >= 0 else Victim(step.pid, "", 0, 0.0, -1)
            sig_name = signal.Signals(plan.plan.actions[i].sig).name
            who = f"{target.name}, " if target.name else "new since the refresh, "
            why = f"{sig_name} {target.pid} ({who}{format_size(badness)}): {PICK_REASON}"
        signalled = target.pid if target is not None and step.kind.name.startswith("SIGNAL") else 0
        steps.append(StepRecord(step.kind.name, why, phase, step.result, step.t0_ns, step.t_ns, tag, signalled))
        if plan is not None and target is not None and step.kind.name.startswith("SIGNAL"):
            sig = signal.Signals(plan.plan.actions[i].sig).name
            victims.append(VictimRecord(target.pid, target.name, target.rss, sig, step.result, "plan", badness))
    fallback = any(s.phase in (Phase.GRANT, Phase.KERNEL) for s in steps)
    resolved_by = None
    if record.outcome in (native.Outcome.RESOLVED, native.Outcome.SUPERSEDED) and steps:
        resolved_by = steps[-1].phase
        for s_ in steps:
            if s_.t_ns >= record.resolved_ns:
                resolved_by = s_.phase
                break
    victims.extend(grant_actions)
    moved = []
    if plan is not None:
        for st in record.steps:
            mover = plan.targets[st.index]
            if st.result >= 0 and plan.phases[st.index] is Phase.MOVE and mover is not None:
                moved.append(mover.pid)
    taken = [s.explanation for s in steps if s.ok and s.kind != "CHECK" and s.explanation]
    action = "; ".join(taken) if taken else "nothing"
    return OomEvent(
        seq=record.episode,
        notified_ns=record.notified_ns,
        acted_ns=record.acted_ns or None,
        resolved_ns=record.resolved_ns or None,
        outcome=_OUTCOMES[record.outcome],
        action=action,
        victims=tuple(victims),
        steps=tuple(steps),
        fallback=fallback,
        plan_id=record.plan_id,
        resolved_by=resolved_by,
        hooks=hooks,
        would=plan.would if plan is not None else (),
        moved=tuple(moved),
        limit=0 if limit == UNLIMITED else limit,
    )


def grant_acted(record: EventRecord, plan: CompiledPlan | None) -> bool:
    """Whether the episode reached a phase in which the handler acts from
    Python (a headroom grant, or a frozen group's decision): its actions
    then belong to this episode's event."""
    return plan is not None and any(plan.phases[s.index] in (Phase.GRANT, Phase.FREEZE) for s in record.steps)


def grant_left_open(event: OomEvent) -> bool:
    """True if the episode raised the limit and no restore succeeded after it."""
    open_ = False
    for step in event.steps:
        if step.ok and step.tag is StepTag.GRANT:
            open_ = True
        elif step.ok and step.tag is StepTag.RESTORE:
            open_ = False
        elif step.settled:
            open_ = False  # the hook thread restored it
    return open_


def episode_log(event: OomEvent, group: str) -> tuple[str, dict[str, Any]]:
    """An episode's log line and its fields for programs (the ``extra`` of
    its INFO record: see docs/handler.md, Logging)."""
    kills = [v.pid for v in event.victims if v.signal == "SIGKILL" and v.result == 0]
    fields = {
        "group": group,
        "episode": event.seq,
        "outcome": event.outcome.value,
        "resolved_by": None if event.resolved_by is None else event.resolved_by.value,
        "victims": [v.pid for v in event.victims],
        "kills": len(kills),
        "notify_to_kill_ns": event.notify_to_signal_ns,
        "duration_ns": event.duration_ns,
        "fallback": event.fallback,
    }
    how = f" by {event.resolved_by.value}" if event.resolved_by is not None else ""
    killed = f", killed {', '.join(map(str, kills))}" if kills else ""
    took = f" in {event.duration_ns / 1e6:.1f} ms" if event.duration_ns is not None else ""
    fallback = " (fallback)" if event.fallback else ""
    return f"{group}: episode {event.seq} {event.outcome.value}{how}{killed}{took}{fallback}", fields
