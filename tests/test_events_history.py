"""A handler's bounded record: the newest events in full, counters over
every episode, and what was dropped said; and on real OOMs, more episodes
than the bound."""

from __future__ import annotations

import json
import signal
import threading
import time

import attrs
import pytest

from helpers import wait_until
from useroom import EventOutcome, Group, Handler, KillLargest, MetricsFile, OomEvent, VictimRecord
from useroom._cli import _handler_report, build_parser
from useroom.handler import validate
from useroom.handler.history import BUCKETS, DEFAULT_KEEP, EpisodeCounts, EventHistory, Recent
from useroom.policy import Phase, StepTag
from useroom.handler.events import StepRecord
from useroom.watchdog.protocol import Takeover


def _event(seq: int, *, outcome: EventOutcome = EventOutcome.RESOLVED, kills: int = 1,
           duration_ns: int = 3_000_000, **fields: object) -> OomEvent:
    """An episode of ``kills`` successful SIGKILLs (one failed SIGTERM beside them), signalled 5 µs in."""
    victims = tuple(VictimRecord(100 + i, "hog", 1 << 20, "SIGKILL", 0, "plan") for i in range(kills))
    victims += (VictimRecord(99, "gone", 0, "SIGTERM", -3, "plan"),)
    steps = (StepRecord("SIGNAL_PIDFD", "kill", Phase.KILL, 0, 1_000 + 5_000, 1_000 + 6_000),) if kills else ()
    base = dict(seq=seq, notified_ns=1_000, acted_ns=2_000, resolved_ns=1_000 + duration_ns, outcome=outcome,
                action="SIGKILL", victims=victims, steps=steps, fallback=False, plan_id=1)
    base.update(fields)
    return OomEvent(**base)  # type: ignore[arg-type]


def _mixed() -> list[OomEvent]:
    """Ten episodes of every kind the counters tell apart."""
    grant = StepRecord("RAISE_LIMIT", "grant", Phase.GRANT, 0, 10_000, 11_000, StepTag.GRANT)
    takeover = Takeover(group="/a", reason="delay", notified_ns=1_000, acted_ns=2_000, resolved_ns=9_000,
                        delay=2.0, handler_pid=None, restored=1)
    return [
        _event(1), _event(2, kills=2), _event(3, outcome=EventOutcome.NOT_NEEDED, kills=0, resolved_ns=None),
        _event(4, kills=0, resolved_by=Phase.HOOKS), _event(5, steps=(grant,), fallback=True),
        OomEvent.from_takeover(takeover), _event(7, outcome=EventOutcome.SUPERSEDED, duration_ns=20_000_000),
        _event(8), _event(9, kills=3), _event(10, outcome=EventOutcome.UNRESOLVED, kills=0, resolved_ns=None),
    ]


class TestRecent:
    def test_keeps_the_newest_and_counts_the_dropped(self) -> None:
        """Past its bound, each append drops the oldest item and counts it."""
        recent: Recent[int] = Recent(3)
        for i in range(7):
            recent.append(i)
        assert ([4, 5, 6], 4, 7) == (list(recent), recent.dropped, recent.total)

    def test_a_sequence_equal_to_a_list(self) -> None:
        """It compares equal to a list or tuple of its items, indexes, slices and is false when empty."""
        recent: Recent[str] = Recent(2, ["a", "b", "c"])
        assert ["b", "c"] == recent
        assert recent == ("b", "c")
        assert ("c", ["b"], 1) == (recent[-1], recent[:1], recent.dropped)
        assert not Recent(2)
        assert [] == Recent(2)

    def test_since_a_total(self) -> None:
        """since(n) gives the items appended after the first n that are still kept."""
        recent: Recent[int] = Recent(3, range(5))  # keeps 2, 3, 4
        assert ([3, 4], [2, 3, 4], [], [2, 3, 4]) == (recent.since(3), recent.since(1), recent.since(5),
                                                      recent.since(0))

    def test_zero_keeps_nothing_and_counts_all(self) -> None:
        """A bound of 0 keeps no item; every one is counted as dropped."""
        recent: Recent[int] = Recent(0, range(4))
        assert ([], 4) == (list(recent), recent.dropped)


class TestEpisodeCounts:
    def test_counts_every_kind(self) -> None:
        """Episodes by outcome, kills (successful SIGKILLs), hook resolutions, grants, kernel
        fallbacks and the watchdog's takeovers among them, and the histograms' counts."""
        counts = EpisodeCounts.of(_mixed())
        assert {EventOutcome.RESOLVED: 7, EventOutcome.NOT_NEEDED: 1, EventOutcome.SUPERSEDED: 1,
                EventOutcome.UNRESOLVED: 1} == counts.outcomes
        assert (10, 9, 9, 1, 1, 2, 1) == (counts.episodes, counts.acted, counts.kills, counts.hook_resolutions,
                                          counts.grants, counts.kernel_fallbacks, counts.takeovers)
        # Five episodes signalled (the grant's has no signal step), eight ended.
        assert (5, 8) == (counts.notify_to_kill.count, counts.duration.count)
        assert (7, 8) == (counts.duration.counts[BUCKETS.index(0.003)], counts.duration.counts[BUCKETS.index(0.03)])

    def test_metrics_of_counts_are_those_of_the_events(self) -> None:
        """The metrics rendered from the counters are, line for line, those counted from the events."""
        events = _mixed()
        assert MetricsFile.render([("/a", events)]) == MetricsFile.render([("/a", EpisodeCounts.of(events))])


class TestEventHistory:
    def test_drops_the_oldest_and_keeps_the_counters_exact(self) -> None:
        """With 3 kept, ten episodes leave the newest three in full, seven dropped, and
        counters over all ten; the metrics say ten."""
        history = EventHistory(3)
        for event in _mixed():
            history.record(event)
        assert ([8, 9, 10], 7, 10) == ([e.seq for e in history.events], history.dropped, history.total)
        assert EpisodeCounts.of(_mixed()) == history.counts
        lines = MetricsFile.render([("/a", history.counts)]).splitlines()
        assert 'useroom_kills_total{group="/a"} 9' in lines
        assert 'useroom_episodes_total{group="/a",outcome="resolved"} 7' in lines

    def test_follow_by_the_total(self) -> None:
        """follow(seen) gives the events after the first seen still kept, and the new total."""
        history = EventHistory(2)
        for event in _mixed()[:3]:
            history.record(event)
        new, seen = history.follow(1)
        assert ([2, 3], 3) == ([e.seq for e in new], seen)
        for event in _mixed()[3:6]:
            history.record(event)
        new, seen = history.follow(seen)  # three more, two kept: episode 5 and a takeover (no seq: -1)
        assert ([5, -1], 6) == ([e.seq for e in new], seen)
        assert ([], 6) == history.follow(seen)

    def test_wait_counts_every_episode(self) -> None:
        """wait(n) returns once n episodes were ever recorded, though fewer are kept."""
        history = EventHistory(2)
        recorder = threading.Thread(target=lambda: [history.record(e) for e in _mixed()[:5]])
        recorder.start()
        events = history.wait(5, timeout=10)
        recorder.join()
        assert ([4, 5], 5) == ([e.seq for e in events], history.total)

    def test_the_default_bound(self) -> None:
        """A history keeps 1000 episodes unless told otherwise."""
        assert (1000, 1000) == (DEFAULT_KEEP, EventHistory().keep)


class TestKeepEventsOption:
    @pytest.mark.parametrize("value", [0, 1, 1000, 10**6])
    def test_whole_numbers_from_zero(self, value: int) -> None:
        """0 and any positive whole number are taken as given."""
        assert value == validate.keep_events(value)

    @pytest.mark.parametrize("value", [-1, -1000])
    def test_a_negative_number_is_refused(self, value: int) -> None:
        """A negative bound raises ValueError naming the option."""
        with pytest.raises(ValueError, match=f"keep_events={value} is negative"):
            validate.keep_events(value)

    @pytest.mark.parametrize("value", [1.5, "100", None, True])
    def test_another_type_is_refused(self, value: object) -> None:
        """A float, a string, None or a bool raises TypeError naming the option and the type."""
        with pytest.raises(TypeError, match=f"keep_events= is how many .* not {type(value).__name__}"):
            validate.keep_events(value)

    @pytest.mark.parametrize(("given", "message"), [("-5", "--keep-events -5 is negative"),
                                                    ("ten", "not a whole number: 'ten'")])
    def test_the_command_refuses_a_bad_value(self, given: str, message: str, capsys) -> None:
        """useroom handle --keep-events with a bad value exits 2 naming the option, before anything starts."""
        with pytest.raises(SystemExit) as exit_:
            build_parser().parse_args(["handle", "/g", "--keep-events", given])
        assert 2 == exit_.value.code
        assert message in capsys.readouterr().err

    def test_the_command_default(self) -> None:
        """useroom handle keeps the handler's default unless told otherwise."""
        assert (DEFAULT_KEEP, 7) == (build_parser().parse_args(["handle", "/g"]).keep_events,
                                     build_parser().parse_args(["handle", "/g", "--keep-events", "7"]).keep_events)


@pytest.mark.kernel
@pytest.mark.timeout(120)
class TestOnTheKernel:
    @pytest.mark.parametrize("value", [-1, "5"])
    def test_a_handler_refuses_a_bad_bound(self, scratch_group: Group, value: object) -> None:
        """Handler(keep_events=...) refuses a bad value when it is made, before anything starts."""
        scratch_group.set_limit("64M")
        before = scratch_group.oom_control()
        with pytest.raises((ValueError, TypeError), match="keep_events="):
            Handler(scratch_group, keep_events=value)  # type: ignore[arg-type]
        assert before == scratch_group.oom_control()

    def test_more_episodes_than_the_bound(self, scratch_group: Group, spawn_hog) -> None:
        """Five OOMs, each ended by killing its hog, with keep_events=2: the handler keeps the
        newest two events (the last hog's among them), says how many it dropped, and its
        counters, its metrics and its report count all five kills."""
        scratch_group.set_limit("64M")
        rounds = 5
        with Handler(scratch_group, KillLargest(), thresholds=(), keep_events=2) as handler:
            hogs = []
            for _ in range(rounds):
                hog = spawn_hog(80, group=scratch_group)
                hogs.append(hog)
                hog.start()
                assert -signal.SIGKILL == hog.popen.wait(20)
            assert wait_until(lambda: handler.history.counts.kills >= rounds, 10), handler.history.counts
            time.sleep(0.2)  # a not_needed notification still on its way is counted too, or not at all
            history = handler.history
            events, counts, dropped = history.events, history.counts, history.dropped
        assert 2 == len(events)
        assert (counts.episodes - 2, rounds) == (dropped, counts.kills)
        assert counts.episodes >= rounds
        assert hogs[-1].pid in {v.pid for e in events for v in e.victims}
        assert f'useroom_kills_total{{group="{scratch_group.relpath}"}} {rounds}' in \
            MetricsFile.render([(scratch_group.relpath, counts)]).splitlines()
        report = json.loads(json.dumps(_handler_report(handler)))
        assert (2, dropped, rounds) == (len(report["events"]), report["events_dropped"], report["counts"]["kills"])
        assert attrs.asdict(counts.duration) == attrs.asdict(handler.history.counts.duration)
