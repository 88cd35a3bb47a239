"""The scale benchmark: what each handled group costs, one Supervisor against one Handler per group.

``python -m useroom.bench scale [--groups 1,10,100,1000] [--baseline-max 10] [--idle-seconds 60]
[--limit 16M] [--hog-size 32M] [--ooming 100] [--oom-rounds 3] [--oom-timeout 30] [--delay 2s]
[--variants supervisor,baseline] [--json PATH]``

For each N of ``--groups`` and each variant, in the same run:

- ``supervisor``: one ``useroom.Supervisor`` serving the N groups (one
  native watcher thread, one manager thread, one watchdog process), when
  the installed useroom has it;
- ``baseline``: one ``useroom.Handler`` per group, each started (each with
  its own watcher thread, manager thread and watchdog process); only up to
  ``--baseline-max`` groups, as each watchdog is a Python process of about
  23 MiB.

Each variant runs in a fresh *host* process (``python -m useroom.bench
_scale_host``) on N fresh groups made below this process's memcg (limit
``--limit``, the kernel OOM killer left on until the handlers turn it off).
The host stays outside the groups. It adds and starts the first group,
measures itself, adds and starts the rest (the supervisor's while it runs),
and measures itself again, each time 0.5 s after the last start returned:

- start time: the add+start calls, in total and per group (opening the
  ``Group`` handles is not timed);
- memory per added group: the host's VmRSS plus its watchdogs' VmRSS, and
  the same for VmLck, after the N starts minus before the first, over N;
  "marginal" is the same from after the first start, over N - 1;
- threads the host gained (``Threads:``), and processes it started
  (``/proc/HOST/task/*/children``; the watchdogs);
- idle wake-ups: the context switches (voluntary + involuntary) of every
  task of the host but its main thread (blocked reading its commands) and
  of every task of the watchdogs, over ``--idle-seconds``, read from
  ``/proc`` by this process;
- notify -> kill latency (``OomEvent.notify_to_signal_ns``) with 1 group
  OOMing, then with min(``--ooming``, N) groups OOMing at once, each
  ``--oom-rounds`` times (the single OOM in a different group each round).

An OOM: a *hog*, forked from this process, moves itself into the group,
touches 40% of the limit (the handlers' 25% threshold refreshes their
victim table), and says it is ready; once the host reports that every
hog of the round is in its handler's victim table, one closed pipe lets all
of them go at once, and each touches ``--hog-size`` (more than the limit).
The round ends when every hog has exited and every group has a new event
with outcome ``resolved``, or after ``--oom-timeout`` seconds: a group still
``under_oom`` then is a *deadlock*; the safety net kills its hog, re-enables
the kernel killer and lifts the limit. Kernel kills are counted from
``memory.oom_control``'s ``oom_kill``.

On cgroup v1 the handlers switch the kernel OOM killer off
(``oom_kill_disable``): a missed OOM never ends. On cgroup v2 there is no
such switch: each group gets ``memory.max = --limit + V2_GAP`` and the
handlers hold ``memory.high`` (= ``--limit``) as their wall, where the
kernel throttles the hog instead of killing it. A deadlock there is a hog
still alive with ``memory.current`` at or above the wall after
``--oom-timeout``; kernel kills are ``memory.events``' ``oom_kill``; the
safety net kills the hog and sets ``memory.high`` and ``memory.max`` to max.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import IO, TYPE_CHECKING, Any, Final, NoReturn

import attrs

if TYPE_CHECKING:
    from useroom import Group, Handler, OomEvent
    from useroom.bench._sandbox import Child, Lab, Pidfd, ScratchGroup, SignalGuard

__all__ = ["GOALS", "ScaleConfig", "below_goal", "host_main", "main", "render", "summarize"]

KIB: Final = 1 << 10
MIB: Final = 1 << 20
PAGE: Final = mmap.PAGESIZE
#: The order of the rows of each N.
VARIANTS: Final = ("supervisor", "baseline")
#: How far a hog fills its group before it says it is ready (the handlers
#: refresh their victim table at 25% of the limit by default).
WARM_FRACTION: Final = 0.4
#: A hog's exit code when something other than the allocation failed.
HOG_ERROR: Final = 70
#: The host measures itself this long after the last start returned: the
#: start calls return once the threads run; what they allocate just after
#: belongs to the start too.
SETTLE_S: Final = 0.5
_HOST_READY_TIMEOUT_S: Final = 60.0
#: Per group, on top of the above, to add and start (baseline: a watchdog process each).
_PER_GROUP_TIMEOUT_S: Final = 2.0
_HOG_READY_TIMEOUT_S: Final = 10.0
#: How long the host waits for a round's hogs to appear in their handlers' victim tables.
_LISTED_TIMEOUT_S: Final = 5.0
_WATCHDOG_EXIT_TIMEOUT_S: Final = 10.0

#: The product goals of the supervisor, as data: (figure, key of the row, test, shown).
GOALS: Final[tuple[tuple[str, str, Callable[[Any], bool], str], ...]] = (
    # What one more group costs: the marginal figures (from after the first
    # start, whose hardening and watchdog are paid once); none with one group.
    ("RSS per added group", "marginal_rss_per_group", lambda v: v is None or v <= 64 * KIB, "<= 64 KiB"),
    ("locked per added group", "marginal_locked_per_group", lambda v: v is None or v <= 16 * KIB, "<= 16 KiB"),
    ("threads added", "threads_added", lambda v: v is not None and v <= 2, "<= 2"),
    ("processes started", "processes_started", lambda v: v is not None and v <= 1, "<= 1"),
    ("idle wake-ups", "idle_wakeups", lambda v: v == 0, "0"),
    ("deadlocks", "deadlocks", lambda v: v == 0, "0"),
    ("OOMs resolved", "all_resolved", lambda v: v is True, "all"),
)


@attrs.frozen
class ScaleConfig:
    groups: tuple[int, ...] = (1, 10, 100, 1000)
    baseline_max: int = 10
    variants: tuple[str, ...] = VARIANTS
    idle_seconds: float = 60.0
    limit: int = 16 * MIB
    hog_size: int = 32 * MIB
    #: At most this many groups OOM at once (the second scenario: min(ooming, N)).
    ooming: int = 100
    oom_rounds: int = 3
    oom_timeout: float = 30.0
    delay: float = 2.0

    def variants_for(self, n: int) -> list[str]:
        return [variant for variant in self.variants if variant != "baseline" or n <= self.baseline_max]

    def scenarios(self, n: int) -> list[int]:
        """How many groups OOM at once in each scenario: 1, then min(ooming, N)."""
        return [1, min(self.ooming, n)]


def supervisor_available() -> bool:
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


def _children(pid: int | str) -> list[int]:
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
        "children": _children("self"),
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

        supervisor: Any = getattr(useroom, "Supervisor")  # not in every useroom yet: see supervisor_available()
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
    except Exception as err:
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
        new = {index: served.handlers[index].events[count:] for index, count in seen.items()}
        if all(any(event.outcome == "resolved" for event in events) for events in new.values()) \
                or time.monotonic() > deadline:
            return {"events": {index: [_event_record(event) for event in events] for index, events in new.items()}}
        time.sleep(0.01)


# -- this process's side of a host ------------------------------------------------------

@attrs.define(eq=False)
class _Host:
    """A host process and the pidfds of its watchdogs (its children, not ours), by pid."""

    child: Child
    popen: subprocess.Popen[bytes]
    stderr: IO[bytes]
    watchdogs: dict[int, Pidfd] = attrs.field(factory=dict)
    _buffer: bytes = b""

    @property
    def pid(self) -> int:
        return self.child.pid

    def read(self, timeout: float) -> dict[str, Any]:
        """The host's next message; BenchError if none comes in time, or an error does."""
        from useroom.bench._sandbox import BenchError

        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise BenchError(f"the {self._what()} said nothing within {timeout:g} s{self._stderr()}")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise BenchError(f"the {self._what()} ended{self._stderr()}")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        message: dict[str, Any] = json.loads(line)
        if "error" in message:
            raise BenchError(f"the {self._what()} failed: {message['error']}{self._stderr()}")
        return message

    def request(self, command: str, argument: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        assert self.popen.stdin is not None
        line = command if argument is None else f"{command} {json.dumps(argument)}"
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()
        return self.read(timeout)

    def adopt_watchdogs(self, pids: Iterable[int]) -> None:
        """Pin each watchdog with a pidfd, if it is still the host's child once pinned."""
        from useroom.bench._sandbox import Pidfd

        for pid in pids:
            try:
                pidfd = Pidfd(pid)
            except ProcessLookupError:
                continue
            if pid in _children(self.pid):
                self.watchdogs[pid] = pidfd
            else:
                pidfd.close()

    def close(self, timeout: float) -> tuple[dict[str, Any] | None, list[str]]:
        """Stop the host (SIGKILL after *timeout*), then wait for its watchdogs (SIGKILL after a while).

        Returns the host's stop message (None if it gave none) and the problems met.
        """
        problems: list[str] = []
        stopped: dict[str, Any] | None = None
        if not self.child.exited():
            try:
                stopped = self.request("stop", None, timeout)
            except Exception as err:  # BenchError, a broken pipe, bad JSON: it is killed below
                problems.append(f"the {self._what()} did not stop: {err}")
        if not self.child.wait(timeout):
            problems.append(f"the {self._what()} did not exit within {timeout:g} s of stop: killed")
            self.child.kill()
            self.child.wait(10)
        for stream in (self.popen.stdin, self.popen.stdout, self.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass  # a broken pipe's flush
        for pid, pidfd in list(self.watchdogs.items()):
            try:
                if not pidfd.exited(_WATCHDOG_EXIT_TIMEOUT_S):
                    problems.append(f"watchdog {pid} was alive {_WATCHDOG_EXIT_TIMEOUT_S:g} s after its host "
                                    "stopped: killed")
                    pidfd.send_signal(signal.SIGKILL)
                    pidfd.exited(_WATCHDOG_EXIT_TIMEOUT_S)
            except ProcessLookupError:
                pass
            finally:
                del self.watchdogs[pid]
                pidfd.close()
        return stopped, problems

    def _what(self) -> str:
        return f"host process {self.pid}"

    def _stderr(self) -> str:
        try:
            self.stderr.seek(0)
            text = self.stderr.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        return f"; its stderr:\n{text[-2000:]}" if text else ""


def _start_host(lab: Lab, variant: str, groups: Sequence[ScratchGroup], config: ScaleConfig) -> _Host:
    from useroom.bench._sandbox import die_with_parent

    spec = {"variant": variant, "paths": [group.path for group in groups], "delay": config.delay}
    stderr = tempfile.TemporaryFile(prefix="useroom-scale-host-")
    # Its own session: a Ctrl-C at the terminal is this process's to handle,
    # and the host is stopped in order (then its handlers stop theirs).
    popen = subprocess.Popen([sys.executable, "-m", "useroom.bench", "_scale_host", json.dumps(spec)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                             preexec_fn=die_with_parent, start_new_session=True)
    return _Host(lab.adopt(popen.pid, popen), popen, stderr)


# -- the hogs -------------------------------------------------------------------------

def _spawn_hog(lab: Lab, guard: SignalGuard, group: ScratchGroup, go_r: int, warm: int, size: int) -> Child:
    """Fork a hog that joins *group*, touches *warm* bytes, and waits for EOF on *go_r*; it is ready then."""
    from useroom.bench._sandbox import BenchError

    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    procs = os.path.join(group.path, "cgroup.procs")
    parent = os.getpid()
    try:
        # Signals stay blocked across fork so that no handler of this
        # process runs in the child; the child resets them first.
        signal.pthread_sigmask(signal.SIG_BLOCK, guard.SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                _hog_main(parent, procs, ready_w, go_r, warm, size, guard.SIGNALS)
            child = lab.adopt(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, guard.SIGNALS)
        os.close(ready_w)
        ready_w = -1
        if not select.select([ready_r], [], [], _HOG_READY_TIMEOUT_S)[0] or os.read(ready_r, 1) != b"r":
            raise BenchError(f"hog {pid} in {group.path} was not ready within {_HOG_READY_TIMEOUT_S:g} s")
        return child
    finally:
        if ready_w >= 0:
            os.close(ready_w)
        os.close(ready_r)


def _hog_main(parent: int, procs: str, ready_w: int, go_r: int, warm: int, size: int,
              signals: tuple[signal.Signals, ...]) -> NoReturn:
    """The forked hog: never returns into the benchmark's code."""
    from useroom.bench._sandbox import settle_child

    try:
        if not settle_child(parent, (ready_w, go_r), signals):
            os._exit(HOG_ERROR)
        fd = os.open(procs, os.O_WRONLY | os.O_CLOEXEC)
        os.write(fd, b"0")  # "0": the writer; what it touches from now on is charged to the group
        os.close(fd)
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for offset in range(0, warm, PAGE):
            memory[offset] = 1
        os.write(ready_w, b"r")
        os.read(go_r, 1)  # blocks until EOF: the round began
        for offset in range(warm, size, PAGE):
            memory[offset] = 1
        os._exit(0)  # reached only if the limit did not stop it
    except BaseException:
        os._exit(HOG_ERROR)


def _wait_exited(hogs: Sequence[Child], deadline: float) -> None:
    """Reap the hogs as they exit until all have or *deadline* (monotonic s) passes."""
    poller = select.poll()
    pending = {hog.fileno(): hog for hog in hogs if not hog.reaped}
    for fd in pending:
        poller.register(fd, select.POLLIN)
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        for fd, _ in poller.poll(math.ceil(left * 1000)):
            poller.unregister(fd)
            pending.pop(fd).reap()


# -- a variant at one N ---------------------------------------------------------------

def run_variant(lab: Lab, guard: SignalGuard, config: ScaleConfig, variant: str, n: int,
                progress: IO[str] | None = None) -> dict[str, Any]:
    """*variant* serving *n* fresh groups: its start, memory, idle and OOM figures (raw)."""
    from useroom._handler import V2_GAP

    raw: dict[str, Any] = {"variant": variant, "groups": n, "rounds": [], "problems": [],
                           "cgroup_version": lab.version}
    groups: list[ScratchGroup] = []
    host: _Host | None = None
    try:
        # The hard limit that puts each handler's wall at the limit: v1 the
        # limit itself; v2 memory.max, as the handler holds memory.high at
        # memory.max - V2_GAP when only memory.max is set.
        backstop = lab.kind.backstop(config.limit, V2_GAP)
        for _ in range(n):
            groups.append(lab.create_group(f"scale-{variant}", limit=backstop, kill_disable=False))
        host = _start_host(lab, variant, groups, config)
        ready = host.read(_HOST_READY_TIMEOUT_S)
        raw["before"] = ready["before"]
        started = host.request("start", None, _HOST_READY_TIMEOUT_S + _PER_GROUP_TIMEOUT_S * n)
        host.adopt_watchdogs(started["watchdogs"])
        raw.update(first_ns=started["first_ns"], rest_ns=started["rest_ns"], after_first=started["after_first"],
                   after=started["after"], watchdogs=started["watchdogs"])
        # The groups whose handler holds the kernel killer off: v1's switch, v2's wall (memory.high).
        raw["kill_disabled"] = sum(group.killer_held_off() for group in groups)
        if progress is not None:
            print(f"  {variant}, {_groups(n)}: started in {(started['first_ns'] + started['rest_ns']) / 1e6:.0f} ms; "
                  f"idle for {config.idle_seconds:g} s", file=progress, flush=True)
        raw["idle"] = _idle(host, config.idle_seconds)
        seen = [0] * n
        for scenario, at_once in zip(("one", "many"), config.scenarios(n)):
            for number in range(config.oom_rounds):
                indices = [(number * at_once + j) % n for j in range(at_once)]
                raw["rounds"].append({"scenario": scenario}
                                     | _oom_round(lab, guard, host, groups, indices, seen, config))
        if progress is not None:
            summary = summarize(raw)
            print(f"  {variant}, {_groups(n)}: {summary['resolved']}/{summary['ooms']} OOMs resolved, "
                  f"{summary['deadlocks']} deadlocks", file=progress, flush=True)
    finally:
        with guard.shielded():
            if host is not None:
                stopped, problems = host.close(_HOST_READY_TIMEOUT_S + _PER_GROUP_TIMEOUT_S * n)
                raw["problems"].extend(problems)
                if stopped is not None:
                    raw.update(stop_ns=stopped["stop_ns"], handler_errors=stopped["errors"])
                lab.forget(host.child)
            for group in groups:
                lab.release(group)
    return raw


def _idle(host: _Host, seconds: float) -> dict[str, Any]:
    """Context switches of the host's threads (not its main thread) and of its watchdogs over *seconds*."""
    def sample() -> dict[str, int]:
        switches = task_switches(host.pid, skip_main=True)
        for pid in host.watchdogs:
            switches.update(task_switches(pid, skip_main=False))
        return switches

    before = sample()
    started = time.monotonic()
    time.sleep(seconds)
    after = sample()
    measured = time.monotonic() - started
    both = sorted(set(before) & set(after))
    dogs = {str(pid) for pid in host.watchdogs}
    per_task = {task: after[task] - before[task] for task in both}
    return {
        "seconds": measured,
        "wakeups": sum(per_task.values()),
        "host_wakeups": sum(count for task, count in per_task.items() if task.split("/")[0] not in dogs),
        "watchdog_wakeups": sum(count for task, count in per_task.items() if task.split("/")[0] in dogs),
        "tasks": len(both),
        "tasks_changed": sorted(set(before) ^ set(after)),
        "per_task": per_task,
    }


def _oom_round(lab: Lab, guard: SignalGuard, host: _Host, groups: Sequence[ScratchGroup], indices: Sequence[int],
               seen: list[int], config: ScaleConfig) -> dict[str, Any]:
    """OOM the groups of *indices* at once; what became of each."""
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    hogs: dict[int, Child] = {}
    outcome: dict[int, dict[str, Any]] = {}
    try:
        warm = int(config.limit * WARM_FRACTION) // PAGE * PAGE
        for index in indices:
            hogs[index] = _spawn_hog(lab, guard, groups[index], go_r, warm, config.hog_size)
        kills_before = {index: groups[index].oom_control().oom_kill for index in indices}
        listed = host.request("listed", {"pids": {index: hog.pid for index, hog in hogs.items()},
                                         "timeout": _LISTED_TIMEOUT_S}, _LISTED_TIMEOUT_S + 30)["listed"]
        released = time.monotonic()
        os.close(go_w)  # EOF: every hog of the round goes at once
        go_w = -1
        deadline = released + config.oom_timeout
        _wait_exited(list(hogs.values()), deadline)
        events = host.request("events", {"seen": {index: seen[index] for index in indices},
                                         "timeout": max(deadline - time.monotonic(), 1.0)},
                              max(deadline - time.monotonic(), 1.0) + 30)["events"]
        for index in indices:
            group, hog = groups[index], hogs[index]
            new = events[str(index)]
            seen[index] += len(new)
            control = group.oom_control()
            latency = next((event["notify_to_signal_ns"] for event in new
                            if event["notify_to_signal_ns"] is not None), None)
            resolved = any(event["outcome"] == "resolved" for event in new)
            # v2's "under OOM" is the usage held at the wall: a deadlock only
            # while the hog is alive there (a dead hog's pages may linger).
            if control.under_oom and (not group.under_oom_from_usage or not hog.reaped):
                verdict = "deadlock"
            elif resolved and hog.reaped and hog.killed_by == signal.SIGKILL:
                verdict = "resolved"
            else:
                verdict = "unresolved"
            outcome[index] = {
                "index": index, "hog": hog.pid, "listed": listed[str(index)], "verdict": verdict,
                "killed_by": hog.killed_by, "exit_code": hog.exit_code,
                "by_handler": any(hog.pid in event["victims"] for event in new),
                "kernel_kills": control.oom_kill - kills_before[index], "latency_ns": latency, "events": new,
            }
    finally:
        with guard.shielded():
            for fd in (go_r, go_w):
                if fd >= 0:
                    os.close(fd)
            for index, hog in hogs.items():
                if not hog.reaped:
                    # Stuck (a deadlock) or cut short: the safety net, kernel
                    # killer on and limit lifted; the handler is not to be trusted here.
                    lab.rescue(groups[index], [hog])
                lab.forget(hog)
    return {"at_once": len(indices), "groups": [outcome[index] for index in indices if index in outcome]}


# -- figures ------------------------------------------------------------------------

def percentile(values: Sequence[int], fraction: float) -> int | None:
    """Nearest rank: the smallest value with at least *fraction* of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """One row of the table from a variant's raw figures (None where a figure is missing)."""
    n = raw["groups"]
    row: dict[str, Any] = {"variant": raw["variant"], "groups": n}
    if "after" in raw:
        before, first, after = raw["before"], raw["after_first"], raw["after"]

        def total(sample: dict[str, Any], key: str) -> int:
            return int((sample[f"{key}_kb"] + sample[f"watchdog_{key}_kb"]) * KIB)

        start_ns = raw["first_ns"] + raw["rest_ns"]
        row.update(
            start_ns=start_ns,
            start_per_group_ns=start_ns / n,
            rss_per_group=(total(after, "rss") - total(before, "rss")) / n,
            locked_per_group=(total(after, "locked") - total(before, "locked")) / n,
            host_rss_per_group=(after["rss_kb"] - before["rss_kb"]) * KIB / n,
            watchdog_rss_per_group=after["watchdog_rss_kb"] * KIB / n,
            marginal_rss_per_group=(total(after, "rss") - total(first, "rss")) / (n - 1) if n > 1 else None,
            marginal_locked_per_group=(total(after, "locked") - total(first, "locked")) / (n - 1) if n > 1 else None,
            host_rss_before=before["rss_kb"] * KIB,
            threads_added=after["threads"] - before["threads"],
            processes_started=len(set(after["children"]) - set(before["children"])),
            watchdogs=len(raw["watchdogs"]),
            kill_disabled=raw["kill_disabled"],
        )
    else:
        row.update(start_ns=None, start_per_group_ns=None, rss_per_group=None, locked_per_group=None,
                   host_rss_per_group=None, watchdog_rss_per_group=None, marginal_rss_per_group=None, marginal_locked_per_group=None, host_rss_before=None,
                   threads_added=None, processes_started=None, watchdogs=None, kill_disabled=None)
    idle = raw.get("idle")
    row["idle_seconds"] = idle["seconds"] if idle else None
    row["idle_wakeups"] = idle["wakeups"] if idle else None
    row["idle_wakeups_per_s"] = idle["wakeups"] / idle["seconds"] if idle else None
    groups = [group for r in raw["rounds"] for group in r["groups"]]
    for name in ("one", "many"):
        rounds = [r for r in raw["rounds"] if r["scenario"] == name]
        latencies = [g["latency_ns"] for r in rounds for g in r["groups"] if g["latency_ns"] is not None]
        row[f"{name}_at_once"] = max((r["at_once"] for r in rounds), default=None)
        row[f"{name}_samples"] = len(latencies)
        row[f"{name}_p50_ns"] = percentile(latencies, 0.5)
        row[f"{name}_p99_ns"] = percentile(latencies, 0.99)
    row.update(
        ooms=len(groups),
        resolved=sum(g["verdict"] == "resolved" for g in groups),
        deadlocks=sum(g["verdict"] == "deadlock" for g in groups),
        unresolved=sum(g["verdict"] == "unresolved" for g in groups),
        kernel_kills=sum(g["kernel_kills"] for g in groups),
        by_handler=sum(g["by_handler"] for g in groups),
        not_listed=sum(not g["listed"] for g in groups),
        stop_ns=raw.get("stop_ns"),
        handler_errors=len(raw.get("handler_errors", [])),
        problems=list(raw["problems"]),
    )
    row["all_resolved"] = row["ooms"] > 0 and row["resolved"] == row["ooms"]
    return row


def below_goal(row: dict[str, Any]) -> list[str]:
    """The supervisor goals a row misses, as text."""
    return [f"{name}: {_shown(row[key])} (goal {goal})" for name, key, test, goal in GOALS if not test(row[key])]


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return _size(value)
    return "-" if value is None else str(value)


def _size(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= MIB:
        return f"{value / MIB:.1f} MiB"
    return f"{value / KIB:.1f} KiB"


def _ms(value: float | None, decimals: int = 0) -> str:
    return "-" if value is None else f"{value / 1e6:.{decimals}f}"


def _groups(n: int) -> str:
    return f"{n} group" if n == 1 else f"{n} groups"


def _us_pair(p50: int | None, p99: int | None) -> str:
    return "-" if p50 is None or p99 is None else f"{p50 / 1e3:.0f} / {p99 / 1e3:.0f}"


def render(rows: Sequence[dict[str, Any]], header: str) -> str:
    """The table: one line per N and variant, then what the columns mean."""
    titles = ("groups", "variant", "start ms", "ms/group", "RSS/group", "locked/group", "+threads", "+procs",
              "idle wake-ups", "1 OOM us p50/p99", "at once", "us p50/p99", "resolved", "deadlocks",
              "kernel kills")
    table = [titles]
    for row in rows:
        table.append((
            str(row["groups"]), row["variant"], _ms(row["start_ns"]), _ms(row["start_per_group_ns"], 1),
            _size(row["rss_per_group"]), _size(row["locked_per_group"]), _shown(row["threads_added"]),
            _shown(row["processes_started"]),
            "-" if row["idle_wakeups"] is None else f"{row['idle_wakeups']} ({row['idle_wakeups_per_s']:.1f}/s)",
            _us_pair(row["one_p50_ns"], row["one_p99_ns"]), _shown(row["many_at_once"]),
            _us_pair(row["many_p50_ns"], row["many_p99_ns"]), f"{row['resolved']}/{row['ooms']}",
            str(row["deadlocks"]), str(row["kernel_kills"]),
        ))
    widths = [max(len(line[i]) for line in table) for i in range(len(titles))]
    lines = [header, ""]
    for number, cells in enumerate(table):
        lines.append("  ".join(cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i])
                               for i, cell in enumerate(cells)).rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    lines.append("")
    lines.append("start: add+start of every group (ms/group: over N); RSS and locked per group: (host + its "
                 "watchdogs) after the N starts minus before, over N; +threads, +procs: what the host gained; "
                 "idle wake-ups: context switches of the handler threads and watchdogs over the idle window; "
                 "latency: notify -> first signal (OomEvent.notify_to_signal_ns), nearest rank")
    for row in rows:
        if row["rss_per_group"] is None:
            continue
        marginal = "" if row["marginal_rss_per_group"] is None else (
            f"; marginal (from after the first start) {_size(row['marginal_rss_per_group'])} RSS, "
            f"{_size(row['marginal_locked_per_group'])} locked")
        lines.append(f"{row['variant']}, {_groups(row['groups'])}: RSS per group {_size(row['host_rss_per_group'])} "
                     f"host + {_size(row['watchdog_rss_per_group'])} watchdogs{marginal}; stop "
                     f"{_ms(row['stop_ns'])} ms")
    for row in rows:
        if row["unresolved"] or row["not_listed"] or row["handler_errors"]:
            lines.append(f"{row['variant']}, {_groups(row['groups'])}: {row['unresolved']} OOMs unresolved, "
                         f"{row['not_listed']} hogs not in the victim table when let go, "
                         f"{row['handler_errors']} handler errors")
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------------

def _counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(part) for part in text.split(",") if part)
    except ValueError:
        counts = ()
    if not counts or any(count < 1 for count in counts):
        raise argparse.ArgumentTypeError(f"a list of group counts >= 1 such as 1,10,100, not {text!r}")
    return tuple(sorted(set(counts)))


def _variants(text: str) -> tuple[str, ...]:
    names = [name for name in text.split(",") if name]
    if not names or any(name not in VARIANTS for name in names):
        raise argparse.ArgumentTypeError(f"variants are {', '.join(VARIANTS)}, not {text!r}")
    return tuple(name for name in VARIANTS if name in names)


def _parser() -> argparse.ArgumentParser:
    from useroom._units import parse_duration
    from useroom.bench._sandbox import size_arg as size

    def duration(text: str) -> float:
        try:
            return parse_duration(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error

    defaults = ScaleConfig()
    parser = argparse.ArgumentParser(prog="python -m useroom.bench scale", description=__doc__.split("\n")[0])
    parser.add_argument("--groups", type=_counts, default=defaults.groups, metavar="N[,N...]",
                        help="group counts to measure (default 1,10,100,1000)")
    parser.add_argument("--baseline-max", type=int, default=defaults.baseline_max, metavar="N",
                        help="the baseline (a Handler and a watchdog process per group) only up to N groups "
                             "(default %(default)s)")
    parser.add_argument("--variants", type=_variants, default=None, metavar="NAME[,NAME]",
                        help=f"which of {', '.join(VARIANTS)} (default: both; the supervisor where useroom has it)")
    parser.add_argument("--idle-seconds", type=float, default=defaults.idle_seconds, metavar="S",
                        help="the idle window wake-ups are counted over (default %(default)s)")
    parser.add_argument("--limit", type=size, default=defaults.limit, help="each group's limit (default 16M)")
    parser.add_argument("--hog-size", type=size, default=defaults.hog_size,
                        help="what each hog touches, more than the limit (default 32M)")
    parser.add_argument("--ooming", type=int, default=defaults.ooming, metavar="K",
                        help="the second scenario OOMs min(K, N) groups at once (default %(default)s)")
    parser.add_argument("--oom-rounds", type=int, default=defaults.oom_rounds, metavar="R",
                        help="rounds of each OOM scenario (default %(default)s)")
    parser.add_argument("--oom-timeout", type=float, default=defaults.oom_timeout, metavar="S",
                        help="a round's OOMs must be resolved within this long; a group still under OOM then is a "
                             "deadlock (default %(default)s)")
    parser.add_argument("--delay", type=duration, default=defaults.delay,
                        help="the watchdog's delay, for both variants (default 2s)")
    parser.add_argument("--json", metavar="PATH", help="write every raw figure to PATH")
    return parser


def main(argv: list[str], out: IO[str] | None = None) -> int:
    """``python -m useroom.bench scale``."""
    from useroom._units import format_size
    from useroom.bench._sandbox import BenchError, Interrupted, Lab, SignalGuard

    out = out or sys.stdout
    parser = _parser()
    args = parser.parse_args(argv)
    available = supervisor_available()
    if args.variants is not None and "supervisor" in args.variants and not available:
        print("useroom.bench scale: this useroom has no useroom.Supervisor; run --variants baseline",
              file=sys.stderr)
        return 2
    variants = args.variants or tuple(v for v in VARIANTS if v != "supervisor" or available)
    config = ScaleConfig(groups=args.groups, baseline_max=args.baseline_max, variants=variants,
                         idle_seconds=args.idle_seconds, limit=args.limit, hog_size=args.hog_size,
                         ooming=args.ooming, oom_rounds=args.oom_rounds, oom_timeout=args.oom_timeout,
                         delay=args.delay)
    if config.hog_size <= config.limit:
        parser.error("--hog-size must exceed --limit: every hog must meet the limit")
    if config.ooming < 1 or config.oom_rounds < 1 or config.idle_seconds < 0 or config.oom_timeout <= 0:
        parser.error("--ooming and --oom-rounds must be >= 1, --idle-seconds >= 0, --oom-timeout > 0")
    raw: list[dict[str, Any]] = []
    problems: list[str] = []
    interrupted: int | None = None
    with SignalGuard() as guard:
        try:
            lab = Lab.below_own_memcg()
        except BenchError as error:
            print(f"useroom.bench scale: {error}", file=sys.stderr)
            return 2
        header = _header(config, available, format_size, lab.kind)
        print(header.replace("\n", "; "), file=sys.stderr, flush=True)
        try:
            lab.sweep_stale()
            for n in config.groups:
                for variant in config.variants_for(n):
                    try:
                        figures = run_variant(lab, guard, config, variant, n, sys.stderr)
                    except BenchError as error:  # this run's groups and processes are gone: go on
                        problems.append(f"{variant}, {_groups(n)}: {error}")
                        continue
                    raw.append(figures)
                    problems.extend(f"{variant}, {_groups(n)}: {problem}" for problem in figures["problems"])
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
    rows = [summarize(figures) for figures in raw]
    if rows:
        print(render(rows, header), file=out)
    skipped = [n for n in config.groups if "baseline" in config.variants and n > config.baseline_max]
    if skipped:
        print(f"baseline not run at {', '.join(map(str, skipped))} groups (--baseline-max {config.baseline_max}: "
              "a watchdog process of about 23 MiB per group)", file=out)
    failing = {_groups(row["groups"]): below_goal(row) for row in rows if row["variant"] == "supervisor"}
    for where, misses in failing.items():
        if misses:
            print(f"below the goal (supervisor, {where}): {'; '.join(misses)}", file=out)
    failed = [f"{row['variant']}, {_groups(row['groups'])}: {row['deadlocks']} deadlocks, {row['unresolved']} "
              f"unresolved of {row['ooms']} OOMs" for row in rows if not row["all_resolved"]]
    problems.extend(failed)
    if interrupted is not None:
        print(f"interrupted by {signal.Signals(interrupted).name}: the figures above are the runs that finished; "
              "every group and process was removed", file=out)
    if problems:
        print("problems:", *problems, sep="\n  ", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"config": attrs.asdict(config), "machine": _machine(), "supervisor_available": available,
                       "rows": rows, "below_goal": failing, "problems": problems, "raw": raw,
                       "interrupted": interrupted}, file, indent=1)
    out.flush()
    if interrupted is not None:
        return 128 + interrupted
    return 1 if problems else 0


def _header(config: ScaleConfig, available: bool, format_size: Callable[[int], str],
            kind: type[ScratchGroup]) -> str:
    machine = _machine()
    supervisor = "" if available else " (useroom.Supervisor not in this useroom: baseline only)"
    wall = f" ({kind.wall_file}; {kind.limit_file} = limit + V2_GAP)" if kind.wall_apart else ""
    return (f"useroom scale benchmark: cgroup v{kind.version}, kernel {machine['kernel']}, {machine['cores']} cores, "
            f"Python {machine['python']}\n"
            f"variants {', '.join(config.variants)}{supervisor}; groups {','.join(map(str, config.groups))} "
            f"(baseline up to {config.baseline_max}); limit {format_size(config.limit)}{wall}, hogs touch "
            f"{format_size(config.hog_size)}; idle {config.idle_seconds:g} s; OOMs: 1 and min({config.ooming}, N) "
            f"at once, {config.oom_rounds} rounds each; watchdog delay {config.delay:g} s")


def _machine() -> dict[str, Any]:
    import platform
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return {"kernel": platform.release(), "cores": os.cpu_count(), "python": platform.python_version(),
            "memlock_limit": -1 if soft == resource.RLIM_INFINITY else soft, "uid": os.geteuid(),
            "emulated": os.environ.get("VMRUN_GUEST") == "1"}
