"""The storm's useroom handler: its process inside the group, and this process's side of it.

``python -m useroom.bench _storm_handler SPEC_JSON`` runs :func:`handler_main`
in a small process inside the group: ``useroom.Handler(group,
useroom.KillLargest())``, which on stop writes every victim with the time
its signal was sent. The benchmark starts it with :func:`start_handler`,
stops it with :func:`stop_handler` and waits for its watchdog with
:func:`end_watchdog`.

The handler process imports this module, and what that process is charged
is a figure of the benchmark: the module-level imports are the standard
library's only, the package is imported inside the functions that need it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from typing import IO, TYPE_CHECKING, Any, Final, NamedTuple

if TYPE_CHECKING:
    from useroom import OomEvent
    from useroom.bench._sandbox import Child, Lab, Pidfd, ScratchGroup

__all__ = ["StormHandler", "end_watchdog", "handler_main", "start_handler", "stop_handler"]

#: How long the handler process may take to start (the emulated guest is 5-10x slower).
_HANDLER_START_TIMEOUT_S: Final = 120.0
_HANDLER_STOP_TIMEOUT_S: Final = 60.0


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
        except Exception as err:  # noqa: BLE001 - a start that fails is a figure of the run
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
            result["events_dropped"] = handler.history.dropped  # older than those, beyond keep_events
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


# -- this process's side of it ----------------------------------------------------

class StormHandler(NamedTuple):
    """The handler process, as this process holds it."""

    child: Child
    popen: subprocess.Popen[bytes]
    pid: int
    out: str
    #: A pidfd of the handler's watchdog, if it has one: a child of the
    #: handler, not of this process, which ends by itself once the handler is
    #: gone (on v1 outside the group, where no emptying of the group reaches it).
    watchdog: Pidfd | None


def start_handler(lab: Lab, group: ScratchGroup, workdir: str) -> StormHandler:
    """Start the handler process in *group*, registered with *lab*; return once it handles the group."""
    from useroom.bench._sandbox import BenchError, enter_group

    out = os.path.join(workdir, f"{group.name}.handler.json")
    popen = subprocess.Popen([sys.executable, "-m", "useroom.bench", "_storm_handler", json.dumps({"out": out})],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             preexec_fn=enter_group(os.path.join(group.path, "cgroup.procs")))
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
    return StormHandler(child, popen, popen.pid, out, _pidfd_of_child(watchdog, popen.pid) if watchdog else None)


def _pidfd_of_child(pid: int, parent: int) -> Pidfd | None:
    """A pidfd of *pid* if it is (still) a child of *parent*, else None."""
    from useroom.bench._badness import parent_of
    from useroom.bench._sandbox import Pidfd

    try:
        pidfd = Pidfd(pid)
    except ProcessLookupError:
        return None
    if parent_of(pid) != parent:  # checked after the pidfd pinned it
        pidfd.close()
        return None
    return pidfd


def end_watchdog(handler: StormHandler, timeout: float) -> bool:
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


def stop_handler(handler: StormHandler) -> dict[str, Any] | None:
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
