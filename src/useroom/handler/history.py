"""What a handler remembers of its run, bounded: the newest records in
full, and counters over all of them, exact however many were dropped.

A handler in an OOM storm records an episode every few seconds, for as
long as it runs: each :class:`~useroom.OomEvent` (its steps, victims and
hook runs) takes about 1.5 KiB. Kept forever, that is a leak of its own
record. So a handler keeps the newest ``keep_events`` events
(:data:`DEFAULT_KEEP`), and beside them :class:`EpisodeCounts`: what the
metrics and the status need (episodes by outcome, kills, grants, hook
resolutions, kernel fallbacks and takeovers, the histograms), counted as
each episode is recorded, over the whole run. Nothing is dropped
silently: :attr:`Recent.dropped` says how many records made room for
newer ones, and whatever exports the records (``useroom handle
--events-out``) says so too. The lists of errors survived and the
watchdog's history are bounded the same way (:class:`Recent`).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Generic, TypeVar, overload

import attrs

from useroom.handler.events import EventOutcome, OomEvent
from useroom.policy import Phase, StepTag

__all__ = ["BUCKETS", "DEFAULT_KEEP", "ERRORS_KEPT", "EpisodeCounts", "EventHistory", "Histogram", "Recent"]

T = TypeVar("T")

#: Episodes a handler keeps in full unless told otherwise (``keep_events``).
DEFAULT_KEEP = 1000
#: Errors a handler (or a supervisor) keeps, and records of its watchdog's history.
ERRORS_KEPT = 100

#: Upper bounds (seconds) of the histograms' buckets: notify -> kill is
#: microseconds to milliseconds, an episode up to the watchdog's delay.
BUCKETS = (0.00001, 0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


class Recent(Sequence[T], Generic[T]):
    """The newest ``keep`` items appended, oldest first, and how many older
    ones were dropped to make room (:attr:`dropped`). A sequence (``len``,
    iteration over a copy, indexing, slicing) equal to a list or tuple of
    the same items; safe to append to from one thread while others read."""

    def __init__(self, keep: int, items: Iterable[T] = ()) -> None:
        self._keep = keep
        self._items: collections.deque[T] = collections.deque(maxlen=keep)
        self._lock = threading.Lock()
        self._dropped = 0
        for item in items:
            self.append(item)

    @property
    def keep(self) -> int:
        """How many items it keeps at most."""
        return self._keep

    @property
    def dropped(self) -> int:
        """Items appended and since dropped for newer ones."""
        return self._dropped

    @property
    def total(self) -> int:
        """Items ever appended: those kept plus those dropped."""
        with self._lock:
            return self._dropped + len(self._items)

    def append(self, item: T) -> None:
        with self._lock:
            if len(self._items) == self._keep:
                self._dropped += 1
            if self._keep:
                self._items.append(item)

    def copy(self) -> list[T]:
        """The items kept, oldest first, as a new list."""
        with self._lock:
            return list(self._items)

    def since(self, total: int) -> list[T]:
        """The items appended after the first ``total`` (as :attr:`total`
        was then) that are still kept: fewer than were appended if some
        were dropped since."""
        with self._lock:
            kept = len(self._items)
            skip = max(0, total - self._dropped)
            return list(self._items)[skip:] if skip < kept else []

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(self.copy())

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index: int | slice) -> T | list[T]:
        return self.copy()[index]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (Recent, list, tuple)):
            return self.copy() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        dropped = f", {self._dropped} dropped" if self._dropped else ""
        return f"<Recent {self.copy()!r}{dropped}>"


@attrs.frozen
class Histogram:
    """A Prometheus histogram of durations: ``counts[i]`` of them at most
    ``BUCKETS[i]`` seconds (cumulative), ``count`` in all, ``sum_ns`` their sum."""

    counts: tuple[int, ...] = (0,) * len(BUCKETS)
    count: int = 0
    sum_ns: int = 0

    def observe(self, ns: int | None) -> Histogram:
        """This histogram with one more duration (unchanged for None)."""
        if ns is None:
            return self
        seconds = ns / 1e9
        counts = tuple(c + (seconds <= bound) for c, bound in zip(self.counts, BUCKETS, strict=True))
        return Histogram(counts, self.count + 1, self.sum_ns + ns)

    def to_dict(self) -> dict[str, Any]:
        return {"buckets": dict(zip([f"{b:g}" for b in BUCKETS], self.counts, strict=True)),
                "count": self.count, "sum_ns": self.sum_ns}


@attrs.frozen
class EpisodeCounts:
    """Counters over every episode a handler recorded, dropped ones
    included: what its metrics and its status line are made of.

    ``episodes`` counts every event (``not_needed`` ones too), ``outcomes``
    them by :class:`~useroom.EventOutcome`; ``kills`` the tasks sent
    SIGKILL successfully; ``hook_resolutions`` the episodes the ``on_oom``
    hooks resolved; ``grants`` the headroom grants opened;
    ``kernel_fallbacks`` the episodes that reached the kernel OOM killer
    (the plan's last step, or the watchdog), of which ``takeovers`` the
    watchdog's; ``notify_to_kill`` and ``duration`` the histograms of
    :attr:`~useroom.OomEvent.notify_to_signal_ns` and
    :attr:`~useroom.OomEvent.duration_ns`.
    """

    episodes: int = 0
    outcomes: Mapping[EventOutcome, int] = attrs.field(factory=dict)
    kills: int = 0
    hook_resolutions: int = 0
    grants: int = 0
    kernel_fallbacks: int = 0
    takeovers: int = 0
    notify_to_kill: Histogram = Histogram()
    duration: Histogram = Histogram()

    @classmethod
    def of(cls, events: Iterable[OomEvent]) -> EpisodeCounts:
        """The counts of ``events``."""
        counts = cls()
        for event in events:
            counts = counts.plus(event)
        return counts

    @property
    def acted(self) -> int:
        """Episodes that were not ``not_needed``."""
        return self.episodes - self.outcomes.get(EventOutcome.NOT_NEEDED, 0)

    def plus(self, event: OomEvent) -> EpisodeCounts:
        """These counts with ``event`` counted."""
        outcomes = dict(self.outcomes)
        outcomes[event.outcome] = outcomes.get(event.outcome, 0) + 1
        return EpisodeCounts(
            episodes=self.episodes + 1,
            outcomes=outcomes,
            kills=self.kills + sum(v.signal == "SIGKILL" and v.result == 0 for v in event.victims),
            hook_resolutions=self.hook_resolutions + (event.resolved_by is Phase.HOOKS),
            grants=self.grants + sum(s.ok and s.tag is StepTag.GRANT for s in event.steps),
            kernel_fallbacks=self.kernel_fallbacks + (event.fallback or event.takeover is not None),
            takeovers=self.takeovers + (event.takeover is not None),
            notify_to_kill=self.notify_to_kill.observe(event.notify_to_signal_ns),
            duration=self.duration.observe(event.duration_ns),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"episodes": self.episodes, "outcomes": {str(k): v for k, v in self.outcomes.items()},
                "kills": self.kills, "hook_resolutions": self.hook_resolutions, "grants": self.grants,
                "kernel_fallbacks": self.kernel_fallbacks, "takeovers": self.takeovers,
                "notify_to_kill": self.notify_to_kill.to_dict(), "duration": self.duration.to_dict()}


class EventHistory:
    """A handler's episodes: the newest ``keep`` events in full
    (:attr:`events`, :attr:`dropped`) and :class:`EpisodeCounts` over
    every one (:attr:`counts`). The manager thread records; any thread
    reads or waits."""

    def __init__(self, keep: int = DEFAULT_KEEP) -> None:
        self._events: Recent[OomEvent] = Recent(keep)
        self._counts = EpisodeCounts()
        self._cond = threading.Condition()

    @property
    def keep(self) -> int:
        """How many events it keeps in full."""
        return self._events.keep

    @property
    def events(self) -> list[OomEvent]:
        """The newest events, oldest first (a copy)."""
        return self._events.copy()

    @property
    def dropped(self) -> int:
        """Events recorded and since dropped for newer ones (still counted in :attr:`counts`)."""
        return self._events.dropped

    @property
    def total(self) -> int:
        """Events ever recorded: ``counts.episodes``."""
        return self._counts.episodes

    @property
    def counts(self) -> EpisodeCounts:
        """The counters over every event recorded (a value: read it once for figures that agree)."""
        return self._counts

    def follow(self, seen: int) -> tuple[list[OomEvent], int]:
        """The events recorded after the first ``seen`` that are still kept
        (fewer than were recorded if some were dropped since), and how
        many were recorded in all, at the same moment: to follow them,
        ``new, seen = history.follow(seen)``."""
        with self._cond:
            return self._events.since(seen), self._counts.episodes

    def record(self, event: OomEvent) -> None:
        with self._cond:
            self._events.append(event)
            self._counts = self._counts.plus(event)
            self._cond.notify_all()

    def wait(self, count: int, timeout: float | None = None) -> list[OomEvent]:
        """Blocks until at least ``count`` events were ever recorded or
        ``timeout`` passes; returns the events kept."""
        with self._cond:
            self._cond.wait_for(lambda: self._counts.episodes >= count, timeout)
            return self._events.copy()
