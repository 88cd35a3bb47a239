"""The episode log: EventLog's lines, useroom events, and a handler's log on real OOMs."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import threading

import pytest

from helpers import until_resolved, wait_until
from useroom import EventLog, EventOutcome, Group, Handler, KillLargest, OomEvent, VictimRecord
from useroom.exceptions import OutputError, UseroomError
from useroom.handler.export import read_event_log


def _event(seq: int, pid: int = 42) -> OomEvent:
    return OomEvent(seq=seq, notified_ns=1_000, acted_ns=2_000, resolved_ns=3_000_000,
                    outcome=EventOutcome.RESOLVED, action=f"SIGKILL {pid}",
                    victims=(VictimRecord(pid, "hog", 1 << 20, "SIGKILL", 0, "plan"),), steps=(),
                    fallback=False, plan_id=1)


class TestEventLog:
    def test_one_json_line_per_event_with_the_group(self) -> None:
        out = io.StringIO()
        log = EventLog(out)
        log.open()
        log.write(_event(1), "/a")
        log.write(_event(2), "/a")
        log.close()
        lines = out.getvalue().splitlines()
        assert 2 == len(lines)
        first = json.loads(lines[0])
        assert ("/a", 1, "resolved", 42) == (first["group"], first["seq"], first["outcome"],
                                              first["victims"][0]["pid"])
        assert 3_000_000 - 1_000 == first["duration_ns"]
        assert not out.closed  # a file given stays the caller's

    def test_a_path_is_appended_and_closed_by_its_last_user(self, tmp_path) -> None:
        path = tmp_path / "oom.jsonl"
        path.write_text('{"seq": 0}\n')
        log = EventLog(path)
        log.open()
        log.open()  # a second handler shares it
        log.write(_event(1), "/a")
        log.close()
        log.write(_event(2), "/b")  # still open for the other
        log.close()
        log.write(_event(3), "/c")  # closed: dropped, never raises
        assert [0, 1, 2] == [e["seq"] for e in read_event_log(iter(path.read_text().splitlines()))]

    def test_a_path_that_cannot_be_written_is_refused_when_made(self, tmp_path) -> None:
        """A missing directory is an OutputError (an OSError) at once, naming the path."""
        with pytest.raises(OutputError, match="cannot write the event log to .*missing.*No such file") as info:
            EventLog(tmp_path / "missing" / "oom.jsonl")
        assert isinstance(info.value, OSError)

    def test_a_path_that_cannot_be_opened_fails_at_open(self, tmp_path) -> None:
        """A directory removed after the log was made fails its open()."""
        (tmp_path / "gone").mkdir()
        log = EventLog(tmp_path / "gone" / "oom.jsonl")
        (tmp_path / "gone").rmdir()
        with pytest.raises(OutputError, match="cannot open the event log"):
            log.open()

    def test_a_line_the_file_cannot_take_goes_to_stderr(self, capfd) -> None:
        """Writing fails (/dev/full: ENOSPC): the line goes to standard error, and the error is raised."""
        log = EventLog("/dev/full")
        log.open()
        with pytest.raises(OutputError, match="No space left") as info:
            log.write(_event(7), "/a")
        log.close()  # what it could not flush is not raised again
        assert errno.ENOSPC == info.value.errno
        [line] = capfd.readouterr().err.splitlines()
        assert (7, "/a") == (json.loads(line)["seq"], json.loads(line)["group"])

    def test_lines_never_interleave(self, tmp_path) -> None:
        path = tmp_path / "oom.jsonl"
        log = EventLog(path)
        log.open()
        big = "x" * 20_000  # longer than a write buffer
        event = _event(1)
        import attrs

        event = attrs.evolve(event, action=big)

        def writer() -> None:
            for _ in range(50):
                log.write(event, "/g")

        threads = [threading.Thread(target=writer) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        log.close()
        events = list(read_event_log(iter(path.read_text().splitlines())))
        assert 200 == len(events) and all(e["action"] == big for e in events)

    def test_a_line_that_is_not_an_object_is_named(self) -> None:
        with pytest.raises(UseroomError, match="line 2"):
            list(read_event_log(iter(['{"seq": 1}', "[1]"])))
        with pytest.raises(UseroomError, match="line 1 of the event log is not JSON"):
            list(read_event_log(iter(["{"])))


class TestEventsCommand:
    def test_a_log_as_a_table(self, tmp_path) -> None:
        path = tmp_path / "oom.jsonl"
        log = EventLog(path)
        log.open()
        log.write(_event(7, pid=4711), "/jobs/a")
        log.close()
        done = subprocess.run([sys.executable, "-m", "useroom", "events", str(path)], capture_output=True,
                              text=True, timeout=60)
        assert (0, "") == (done.returncode, done.stderr)
        header, row = done.stdout.splitlines()
        assert header.split()[:3] == ["group", "seq", "outcome"]
        assert row.split()[:3] == ["/jobs/a", "7", "resolved"] and row.endswith("4711")

    def test_standard_input_and_a_missing_file(self, tmp_path) -> None:
        line = json.dumps({"group": "/g", "seq": 3, "outcome": "relieved", "victims": []}) + "\n"
        done = subprocess.run([sys.executable, "-m", "useroom", "events", "-"], input=line, capture_output=True,
                              text=True, timeout=60)
        assert 0 == done.returncode and "relieved" in done.stdout
        missing = subprocess.run([sys.executable, "-m", "useroom", "events", str(tmp_path / "none.jsonl")],
                                 capture_output=True, text=True, timeout=60)
        assert 1 == missing.returncode and "cannot read the event log" in missing.stderr

    def test_follow_shows_episodes_appended_later(self, tmp_path) -> None:
        path = tmp_path / "oom.jsonl"
        path.write_text("")
        proc = subprocess.Popen([sys.executable, "-m", "useroom", "events", "-f", str(path)],
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().startswith("group")
            log = EventLog(path)
            log.open()
            log.write(_event(5), "/later")
            log.close()
            assert proc.stdout.readline().split()[:2] == ["/later", "5"]
        finally:
            proc.send_signal(signal.SIGINT)
            assert 0 == proc.wait(10)
            proc.stdout.close()  # type: ignore[union-attr]


@pytest.mark.kernel
@pytest.mark.timeout(90)
class TestHandlerLog:
    def test_every_episode_is_a_line(self, scratch_group: Group, spawn_hog, tmp_path) -> None:
        """Real OOMs: the log holds one line per event the handler recorded, with the same fields."""
        scratch_group.set_limit("64M")
        path = tmp_path / "oom.jsonl"
        big = spawn_hog(40, group=scratch_group)
        big.start()
        assert big.wait_touched(20)
        with Handler(scratch_group, KillLargest(), thresholds=(), event_log=path) as handler:
            grower = spawn_hog(40, group=scratch_group)
            grower.start()
            assert wait_until(lambda: -signal.SIGKILL in (big.returncode, grower.returncode), 20)
            until_resolved(handler)
        # Stopped: every episode it recorded (one may have begun after the
        # first ended, its victim's memory coming back) is in the log.
        events = handler.events
        logged = list(read_event_log(iter(path.read_text().splitlines())))
        assert [e.seq for e in events] == [e["seq"] for e in logged]
        assert {scratch_group.relpath} == {e["group"] for e in logged}
        assert [str(e.outcome) for e in events] == [e["outcome"] for e in logged]
        killed = [v["pid"] for e in logged for v in e["victims"] if v["signal"] == "SIGKILL" and v["result"] == 0]
        assert killed and set(killed) <= {big.pid, grower.pid}

    def test_a_bad_path_is_refused_when_the_handler_is_made(self, scratch_group: Group, tmp_path) -> None:
        """A path that cannot be written fails Handler(): nothing starts."""
        with pytest.raises(OutputError, match="cannot write the event log"):
            Handler(scratch_group, event_log=tmp_path / "missing" / "oom.jsonl")
        assert not os.path.exists(tmp_path / "missing")

    def test_a_bad_path_fails_the_start_and_leaves_the_group_alone(self, scratch_group: Group, tmp_path) -> None:
        """A directory removed between Handler() and start() fails the start, before the group is touched."""
        scratch_group.set_limit("64M")
        before = scratch_group.oom_control()
        (tmp_path / "gone").mkdir()
        handler = Handler(scratch_group, event_log=tmp_path / "gone" / "oom.jsonl")
        (tmp_path / "gone").rmdir()
        with pytest.raises(OutputError, match="cannot open the event log"):
            handler.start()
        assert not handler.running
        assert before == scratch_group.oom_control()
        assert not os.path.exists(tmp_path / "gone")


class TestMetricsFile:
    def test_counters_and_histograms_by_group(self) -> None:
        import attrs

        from useroom import MetricsFile

        slow = attrs.evolve(_event(2), resolved_ns=1_000 + 20_000_000)
        text = MetricsFile.render([("/a", [_event(1), slow]), ('/b"c', [])])
        lines = text.splitlines()
        assert 'useroom_episodes_total{group="/a",outcome="resolved"} 2' in lines
        assert 'useroom_kills_total{group="/a"} 2' in lines
        assert 'useroom_kills_total{group="/b\\"c"} 0' in lines  # a quote in a label is escaped
        # Buckets are cumulative: one episode of 3 ms, one of 20 ms.
        assert 'useroom_episode_seconds_bucket{group="/a",le="0.001"} 0' in lines
        assert 'useroom_episode_seconds_bucket{group="/a",le="0.003"} 1' in lines
        assert 'useroom_episode_seconds_bucket{group="/a",le="0.03"} 2' in lines
        assert 'useroom_episode_seconds_bucket{group="/a",le="+Inf"} 2' in lines
        # No signal step recorded: no notify -> kill figure.
        assert 'useroom_notify_to_kill_seconds_count{group="/a"} 0' in lines
        assert 'useroom_episode_seconds_count{group="/a"} 2' in lines
        assert "# TYPE useroom_episode_seconds histogram" in lines
        assert "# TYPE useroom_grants_total counter" in lines

    def test_written_atomically(self, tmp_path) -> None:
        from useroom import MetricsFile

        path = tmp_path / "useroom.prom"
        metrics = MetricsFile(path)
        metrics.write([("/a", [_event(1)])])
        metrics.write([("/a", [_event(1), _event(2)])])
        assert ["useroom.prom"] == os.listdir(tmp_path)  # no temporary file left
        assert 'useroom_episodes_total{group="/a",outcome="resolved"} 2' in path.read_text().splitlines()
        assert 0o644 == os.stat(path).st_mode & 0o777

    def test_a_directory_that_cannot_be_written_fails_at_once(self, tmp_path) -> None:
        from useroom import MetricsFile

        with pytest.raises(OutputError, match="cannot write the metrics file"):
            MetricsFile(tmp_path / "missing" / "useroom.prom")


@pytest.mark.kernel
@pytest.mark.timeout(120)
def test_demo_writes_the_log_and_the_metrics(tmp_path) -> None:
    """``useroom demo --events --metrics-textfile``: the standalone handler writes both as it runs."""
    events, metrics = tmp_path / "oom.jsonl", tmp_path / "useroom.prom"
    done = subprocess.run([sys.executable, "-m", "useroom", "demo", "--events", str(events),
                           "--metrics-textfile", str(metrics)], capture_output=True, text=True, timeout=110)
    assert 0 == done.returncode, done.stderr
    logged = list(read_event_log(iter(events.read_text().splitlines())))
    kills = sum(v["signal"] == "SIGKILL" and v["result"] == 0 for e in logged for v in e["victims"])
    assert kills >= 1
    [line] = [ln for ln in metrics.read_text().splitlines() if ln.startswith("useroom_kills_total{")]
    assert kills == int(line.split()[-1])
