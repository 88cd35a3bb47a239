"""Events for collectors: an episode log in JSON lines, and metrics in
Prometheus's text format for the node exporter's textfile collector.

One JSON object per episode, one per line, written by the manager thread
when the episode's record becomes its :class:`~useroom.OomEvent` (after the
episode, never during one): the group's path in the memory hierarchy
(``group``) and the fields of :meth:`OomEvent.to_dict` (``outcome``,
``action``, ``victims``, ``steps``, the timings in ns ...). A line is
written whole and flushed at once, so a reader following the file
(``useroom events -f``, a log shipper) never sees half of one.

A slow file holds up the manager thread (its plans are not refreshed
meanwhile): give it a local file or a pipe that is read.

Nothing collected is lost to a file that cannot be written: a path is
checked when the log or the metrics file is made (:class:`OutputError`),
and a line the log cannot take later (a full disk, a directory removed)
goes to standard error instead, with an error in ``Handler.errors``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from typing import IO, Any

from useroom.exceptions import OutputError, UseroomError
from useroom.handler import validate
from useroom.handler.events import EventOutcome, OomEvent
from useroom.handler.history import BUCKETS, EpisodeCounts

__all__ = ["BUCKETS", "EventLog", "MetricsFile", "read_event_log"]

logger = logging.getLogger(__name__)


class EventLog:
    """Where a handler's episodes go, one JSON line each.

    ``target`` is a path (checked now: :class:`OutputError` if it cannot
    be written; opened for appending when the handler starts, closed when
    it stops; ``"-"`` is standard output) or an open text file, which
    stays the caller's. One log may serve many handlers (give each the
    same :class:`EventLog`): its lines never interleave.
    """

    def __init__(self, target: str | os.PathLike[str] | IO[str]) -> None:
        self._path: str | None = None
        self._given: IO[str] | None = None
        if isinstance(target, (str, os.PathLike)):
            self._path = target if target == "-" else validate.writable_path(target, "the event log")
        elif hasattr(target, "write"):
            self._given = target
        else:
            raise TypeError(f"an event log (event_log=) is a path, '-', an open text file or an EventLog, "
                            f"not {type(target).__name__}")
        self._file: IO[str] | None = None
        self._users = 0
        self._lock = threading.Lock()
        #: Lines the file could not take, written to standard error instead.
        self.diverted = 0

    def __repr__(self) -> str:
        return f"<EventLog {self._path or self._given!r}>"

    def open(self) -> None:
        """Opens the file for one more handler (the first opens it); raises
        OutputError naming the path if it cannot be opened."""
        with self._lock:
            if self._users == 0:
                if self._path is None or self._path == "-":
                    self._file = self._given if self._path is None else sys.stdout
                else:
                    try:
                        self._file = open(self._path, "a", encoding="utf-8")  # closed by close()
                    except OSError as err:
                        raise OutputError(err.errno, f"cannot open the event log {self._path}: {err.strerror}",
                                          self._path) from err
            self._users += 1

    def write(self, event: OomEvent, group: str) -> None:
        """One line for ``event`` of ``group``. If the file cannot take it,
        the line goes to standard error instead and :class:`OutputError`
        is raised (a handler keeps it in its ``errors``)."""
        line = json.dumps({"group": group, **event.to_dict()}, default=str) + "\n"
        with self._lock:
            if self._file is None:
                return
            where = self._path or repr(self._given)
            try:
                self._file.write(line)
                self._file.flush()
                return
            except OSError as err:
                failure = OutputError(err.errno or errno.EIO, f"cannot write to the event log {where}: "
                                      f"{err.strerror}; the episode's line went to standard error", where)
            except ValueError as err:  # the caller closed the file it gave
                failure = OutputError(errno.EBADF, f"cannot write to the event log {where}: {err}; the "
                                      "episode's line went to standard error", where)
            self.diverted += 1
        logger.error("%s", failure, extra={"cause": "event_log"})
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.write(line)
            sys.stderr.flush()
        raise failure

    def close(self) -> None:
        """One handler is done with it; the last closes a file it opened."""
        with self._lock:
            self._users = max(0, self._users - 1)
            if self._users == 0:
                file, self._file = self._file, None
                if file is not None and self._path not in (None, "-"):
                    with contextlib.suppress(OSError):  # what it could not flush went to stderr already
                        file.close()


def read_event_log(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """The episodes of a log's lines (blank lines skipped); raises
    UseroomError naming the line that is not a JSON object."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError as err:
            raise UseroomError(f"line {number} of the event log is not JSON: {err.msg}") from err
        if not isinstance(event, dict):
            raise UseroomError(f"line {number} of the event log is not a JSON object")
        yield event


class MetricsFile:
    """Prometheus text format for the node exporter's textfile collector:
    :meth:`write` renders the episodes of some handlers and replaces the
    file atomically (a temporary file in the same directory, renamed).

    Counters, labelled by ``group``: ``useroom_episodes_total`` (and by
    ``outcome``), ``useroom_kills_total``, ``useroom_hook_resolutions_total``,
    ``useroom_grants_total``, ``useroom_kernel_fallbacks_total``; histograms:
    ``useroom_notify_to_kill_seconds`` and ``useroom_episode_seconds``.
    Give each group's ``handler.history.counts``
    (:class:`~useroom.handler.history.EpisodeCounts`): counted as each
    episode is recorded, over the whole run, they stay exact when
    ``handler.events`` keeps only the newest episodes. A list of events is
    counted at each write (the figures of those events only).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        #: Raises OutputError now if the file cannot be written there.
        self.path = validate.writable_path(path, "the metrics file")

    def write(self, groups: Iterable[tuple[str, EpisodeCounts | Iterable[OomEvent]]]) -> None:
        """Replaces the file with the metrics of ``groups``: (group, its
        counts or its events) pairs; raises :class:`OutputError` if it cannot (the
        previous file, if any, stays whole)."""
        text = self.render(groups)
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            fd, tmp = tempfile.mkstemp(prefix=".useroom-", suffix=".prom.tmp", dir=directory)
        except OSError as err:
            raise OutputError(err.errno, f"cannot write the metrics file {self.path}: {err.strerror}",
                              self.path) from err
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.path)
        except BaseException as err:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(err, OSError):
                raise OutputError(err.errno, f"cannot write the metrics file {self.path}: {err.strerror}",
                                  self.path) from err
            raise

    @staticmethod
    def render(groups: Iterable[tuple[str, EpisodeCounts | Iterable[OomEvent]]]) -> str:
        """The text of the metrics of ``groups``: (group, its counts or its events) pairs."""
        counters: dict[str, list[str]] = {name: [] for name in (
            "episodes", "kills", "hook_resolutions", "grants", "kernel_fallbacks")}
        histograms: dict[str, list[str]] = {"notify_to_kill_seconds": [], "episode_seconds": []}
        for group, given in groups:
            counts = given if isinstance(given, EpisodeCounts) else EpisodeCounts.of(given)
            label = 'group="' + group.replace("\\", "\\\\").replace('"', '\\"') + '"'
            for outcome in EventOutcome:
                count = counts.outcomes.get(outcome, 0)
                if count:
                    counters["episodes"].append(f'useroom_episodes_total{{{label},outcome="{outcome.value}"}} {count}')
            counters["kills"].append(f"useroom_kills_total{{{label}}} {counts.kills}")
            counters["hook_resolutions"].append(f"useroom_hook_resolutions_total{{{label}}} {counts.hook_resolutions}")
            counters["grants"].append(f"useroom_grants_total{{{label}}} {counts.grants}")
            counters["kernel_fallbacks"].append(f"useroom_kernel_fallbacks_total{{{label}}} {counts.kernel_fallbacks}")
            for name, histogram in (("notify_to_kill_seconds", counts.notify_to_kill),
                                    ("episode_seconds", counts.duration)):
                for bound, count in zip(BUCKETS, histogram.counts, strict=True):
                    histograms[name].append(f'useroom_{name}_bucket{{{label},le="{bound:g}"}} {count}')
                histograms[name].append(f'useroom_{name}_bucket{{{label},le="+Inf"}} {histogram.count}')
                histograms[name].append(f"useroom_{name}_sum{{{label}}} {histogram.sum_ns / 1e9:.9f}")
                histograms[name].append(f"useroom_{name}_count{{{label}}} {histogram.count}")
        helps = {
            "episodes": "Episodes (OOM notifications handled), by outcome.",
            "kills": "Tasks killed by the handler (SIGKILL sent).",
            "hook_resolutions": "Episodes the on_oom hooks resolved without a kill.",
            "grants": "Headroom grants opened.",
            "kernel_fallbacks": "Episodes that reached the kernel OOM killer (the plan's last step or the watchdog).",
            "notify_to_kill_seconds": "From the OOM notification to the first signal sent.",
            "episode_seconds": "From the OOM notification to the end of the episode.",
        }
        out = []
        for name, lines in counters.items():
            out += [f"# HELP useroom_{name}_total {helps[name]}", f"# TYPE useroom_{name}_total counter", *lines]
        for name, lines in histograms.items():
            out += [f"# HELP useroom_{name} {helps[name]}", f"# TYPE useroom_{name} histogram", *lines]
        return "\n".join(out) + "\n"
