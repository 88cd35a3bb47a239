"""The scale benchmark's host: the variant under test, in a process of its own.

``python -m useroom.bench _scale_host SPEC_JSON`` runs :func:`host_main`:
one ``useroom.Supervisor`` for every group, or one ``useroom.Handler`` per
group, started on command and measured from the inside (:func:`footprint`).
The ``/proc`` readers here also serve the benchmark's side, which counts
the host's and its watchdogs' wake-ups from the outside.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from useroom import Group, Handler, OomEvent

__all__ = ["SETTLE_S", "children_of", "footprint", "host_main", "read_status", "supervisor_available",
           "task_switches"]

#: The host measures itself this long after the last start returned: the
#: start calls return once the threads run; what they allocate just after
#: belongs to the start too.
SETTLE_S: Final = 0.5


def supervisor_available() -> bool:
    """Whether this useroom has ``useroom.Supervisor``."""
    import useroom

    return hasattr(useroom, "Supervisor")


# -- /proc figures ------------------------------------------------------------------

_STATUS_FIELDS: Final = ("VmRSS", "VmLck", "Threads", "voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")


def read_status(path: str) -> dict[str, int]:
    """The numbers of ``PATH/status`` this benchmark uses (kB for the Vm* fields); {} if it is gone."""
    fields: dict[str, int] = {}
    try:
        with open(os.path.join(path, "status")) as file:
            for line in file:
                key, _, rest = line.partition(":")
                if key in _STATUS_FIELDS:
                    fields[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return fields


def children_of(pid: int | str) -> list[int]:
    """The children of process *pid*, over all its threads (each thread lists those it forked)."""
    found: list[int] = []
    task_dir = f"/proc/{pid}/task"
    for tid in os.listdir(task_dir):
        try:
            with open(f"{task_dir}/{tid}/children") as file:
                found.extend(int(child) for child in file.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return sorted(found)


def task_switches(pid: int, *, skip_main: bool) -> dict[str, int]:
    """Context switches (voluntary + involuntary) of each task of *pid*, by ``PID/TID``."""
    switches: dict[str, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return switches
    for tid in tids:
        if skip_main and int(tid) == pid:
            continue
        fields = read_status(f"/proc/{pid}/task/{tid}")
        if fields:
            switches[f"{pid}/{tid}"] = fields["voluntary_ctxt_switches"] + fields["nonvoluntary_ctxt_switches"]
    return switches


def footprint(watchdogs: Iterable[int]) -> dict[str, Any]:
    """This process's memory, threads and children, and its watchdogs' memory (kB)."""
    own = read_status("/proc/self")
    dogs = [read_status(f"/proc/{pid}") for pid in watchdogs]
    return {
        "rss_kb": own["VmRSS"],
        "locked_kb": own["VmLck"],
        "threads": own["Threads"],
        "children": children_of("self"),
        "watchdog_rss_kb": sum(dog.get("VmRSS", 0) for dog in dogs),
        "watchdog_locked_kb": sum(dog.get("VmLck", 0) for dog in dogs),
        "watchdogs_gone": sum(not dog for dog in dogs),
    }


# -- the host: the variant under test, in a process of its own --------------------------

class _Baseline:
    """One ``useroom.Handler`` per group, each with its own threads and watchdog."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.handlers: list[Handler] = []

    def add(self, group: Group) -> None:
        import useroom

        handler = useroom.Handler(group, policy=useroom.KillLargest(), delay=self.delay)
        handler.start()
        self.handlers.append(handler)

    def watchdogs(self) -> list[int]:
        return [pid for handler in self.handlers if handler.watchdog is not None
                and (pid := handler.watchdog.pid) is not None]

    def errors(self) -> list[str]:
        return [repr(err) for handler in self.handlers for err in handler.errors]

    def stop(self) -> None:
        for handler in self.handlers:
            handler.stop()


class _Supervised:
    """One ``useroom.Supervisor`` for every group: started with the first, the rest added while it runs."""

    def __init__(self, delay: float) -> None:
        import useroom

        supervisor: Any = useroom.Supervisor  # not in every useroom yet: see supervisor_available()
        self.supervisor = supervisor(delay=delay, watchdog=True)
        self.handlers: list[Handler] = []
        self._started = False

    def add(self, group: Group) -> None:
        import useroom

        self.handlers.append(self.supervisor.add(group, policy=useroom.KillLargest()))
        if not self._started:
            self.supervisor.start()
            self._started = True

    def watchdogs(self) -> list[int]:
        watchdog = self.supervisor.watchdog
        return [watchdog.pid] if watchdog is not None and watchdog.pid is not None else []

    def errors(self) -> list[str]:
        return [repr(err) for handler in self.handlers for err in handler.errors]

    def stop(self) -> None:
        self.supervisor.stop()


def _event_record(event: OomEvent) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "outcome": event.outcome,
        "resolved_by": event.resolved_by,
        "notify_to_signal_ns": event.notify_to_signal_ns,
        "duration_ns": event.duration_ns,
        "victims": [victim.pid for victim in event.victims],
        "takeover": event.takeover.reason if event.takeover is not None else None,
    }


def _say(message: dict[str, Any]) -> None:
    sys.stdout.buffer.write(json.dumps(message).encode() + b"\n")
    sys.stdout.buffer.flush()


def host_main(argv: list[str]) -> int:
    """``python -m useroom.bench _scale_host SPEC_JSON``: serve the spec's groups with one variant, on command.

    The spec: ``{"variant": "baseline"|"supervisor", "paths": [...], "delay": SECONDS}``. One JSON
    line on stdout for each step: ``{"ready", "before"}`` at once; then for each line on stdin:

    - ``start``: add and start every group; ``{"first_ns", "rest_ns", "after_first", "after", "watchdogs"}``;
    - ``listed {"pids": {INDEX: PID}, "timeout": S}``: wait until each pid is in the victim table
      of group INDEX's handler; ``{"listed": {INDEX: bool}}``;
    - ``events {"seen": {INDEX: COUNT}, "timeout": S}``: wait until group INDEX has an event with
      outcome ``resolved`` past its first COUNT; ``{"events": {INDEX: [every event past COUNT]}}``;
    - ``stop`` or EOF: stop; ``{"stopped", "stop_ns", "errors"}``, then exit.

    A failure is ``{"error": ...}``, then the stop.
    """
    from useroom import Group

    spec = json.loads(argv[0])
    groups = [Group.open(path) for path in spec["paths"]]
    kind = _Supervised if spec["variant"] == "supervisor" else _Baseline
    served: _Baseline | _Supervised | None = None  # made by "start": what it costs is the start's
    _say({"ready": os.getpid(), "before": footprint([])})
    try:
        for line in sys.stdin.buffer:
            command, _, argument = line.decode().strip().partition(" ")
            if command == "start":
                started = time.monotonic_ns()
                served = kind(spec["delay"])
                _say(_host_start(served, groups, started))
            elif command in ("listed", "events") and served is not None:
                _say((_host_listed if command == "listed" else _host_events)(served, json.loads(argument)))
            else:
                break
    except Exception as err:  # noqa: BLE001 - reported to the bench, which stops the host
        _say({"error": repr(err)})
    finally:
        started = time.monotonic_ns()
        if served is not None:
            served.stop()
        stop_ns = time.monotonic_ns() - started
        _say({"stopped": True, "stop_ns": stop_ns, "errors": served.errors()[-20:] if served is not None else []})
    return 0


def _host_start(served: _Baseline | _Supervised, groups: Sequence[Group], started: int) -> dict[str, Any]:
    """Add and start every group, *served* made at *started* (monotonic ns); the figures."""
    served.add(groups[0])
    first_ns = time.monotonic_ns() - started
    time.sleep(SETTLE_S)
    after_first = footprint(served.watchdogs())
    started = time.monotonic_ns()
    for group in groups[1:]:
        served.add(group)
    rest_ns = time.monotonic_ns() - started
    time.sleep(SETTLE_S)
    return {"first_ns": first_ns, "rest_ns": rest_ns, "after_first": after_first,
            "after": footprint(served.watchdogs()), "watchdogs": served.watchdogs()}


def _host_listed(served: _Baseline | _Supervised, request: dict[str, Any]) -> dict[str, Any]:
    pids = {int(index): pid for index, pid in request["pids"].items()}
    deadline = time.monotonic() + request["timeout"]
    while True:
        listed = {index: any(victim.pid == pid for victim in served.handlers[index].victims)
                  for index, pid in pids.items()}
        if all(listed.values()) or time.monotonic() > deadline:
            return {"listed": listed}
        time.sleep(0.005)


def _host_events(served: _Baseline | _Supervised, request: dict[str, Any]) -> dict[str, Any]:
    seen = {int(index): count for index, count in request["seen"].items()}
    deadline = time.monotonic() + request["timeout"]
    while True:
        new = {index: served.handlers[index].history.follow(count)[0] for index, count in seen.items()}
        if all(any(event.outcome == "resolved" for event in events) for events in new.values()) \
                or time.monotonic() > deadline:
            return {"events": {index: [_event_record(event) for event in events] for index, events in new.items()}}
        time.sleep(0.01)
