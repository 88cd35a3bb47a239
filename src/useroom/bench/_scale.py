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

The parts: :mod:`~useroom.bench._scale_host` (the host process),
:mod:`~useroom.bench._scale_report` (the configuration and the figures);
here, this process's side of a host, the hogs, the run of a variant and
the command.
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
from collections.abc import Iterable, Sequence
from typing import IO, Any, Final, NoReturn

import attrs

from useroom._units import parse_duration
from useroom.bench._sandbox import (
    BenchError,
    Child,
    Interrupted,
    Lab,
    Pidfd,
    ScratchGroup,
    SignalGuard,
    die_with_parent,
    settle_child,
    size_arg,
)
from useroom.bench._scale_host import children_of, supervisor_available, task_switches
from useroom.bench._scale_report import (
    VARIANTS,
    ScaleConfig,
    below_goal,
    header_text,
    machine,
    n_groups,
    render,
    summarize,
)

__all__ = ["main", "run_variant"]

PAGE: Final = mmap.PAGESIZE
#: How far a hog fills its group before it says it is ready (the handlers
#: refresh their victim table at 25% of the limit by default).
WARM_FRACTION: Final = 0.4
#: A hog's exit code when something other than the allocation failed.
HOG_ERROR: Final = 70
_HOST_READY_TIMEOUT_S: Final = 60.0
#: Per group, on top of the above, to add and start (baseline: a watchdog process each).
_PER_GROUP_TIMEOUT_S: Final = 2.0
_HOG_READY_TIMEOUT_S: Final = 10.0
#: How long the host waits for a round's hogs to appear in their handlers' victim tables.
_LISTED_TIMEOUT_S: Final = 5.0
_WATCHDOG_EXIT_TIMEOUT_S: Final = 10.0


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
        for pid in pids:
            try:
                pidfd = Pidfd(pid)
            except ProcessLookupError:
                continue
            if pid in children_of(self.pid):
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
            except Exception as err:  # noqa: BLE001 - a bench error, a broken pipe, bad JSON: killed below
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
    except BaseException:  # noqa: BLE001 - a forked hog: any failure is its exit status
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
    from useroom.handler.arming import V2_GAP

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
            print(f"  {variant}, {n_groups(n)}: started in {(started['first_ns'] + started['rest_ns']) / 1e6:.0f} ms; "
                  f"idle for {config.idle_seconds:g} s", file=progress, flush=True)
        raw["idle"] = _idle(host, config.idle_seconds)
        seen = [0] * n
        for scenario, at_once in zip(("one", "many"), config.scenarios(n), strict=False):
            for number in range(config.oom_rounds):
                indices = [(number * at_once + j) % n for j in range(at_once)]
                raw["rounds"].append({"scenario": scenario}
                                     | _oom_round(lab, guard, host, groups, indices, seen, config))
        if progress is not None:
            summary = summarize(raw)
            print(f"  {variant}, {n_groups(n)}: {summary['resolved']}/{summary['ooms']} OOMs resolved, "
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
    parser.add_argument("--limit", type=size_arg, default=defaults.limit, help="each group's limit (default 16M)")
    parser.add_argument("--hog-size", type=size_arg, default=defaults.hog_size,
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
        header = header_text(config, available, lab.kind)
        print(header.replace("\n", "; "), file=sys.stderr, flush=True)
        try:
            lab.sweep_stale()
            for n in config.groups:
                for variant in config.variants_for(n):
                    try:
                        figures = run_variant(lab, guard, config, variant, n, sys.stderr)
                    except BenchError as error:  # this run's groups and processes are gone: go on
                        problems.append(f"{variant}, {n_groups(n)}: {error}")
                        continue
                    raw.append(figures)
                    problems.extend(f"{variant}, {n_groups(n)}: {problem}" for problem in figures["problems"])
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
    failing = {n_groups(row["groups"]): below_goal(row) for row in rows if row["variant"] == "supervisor"}
    for where, misses in failing.items():
        if misses:
            print(f"below the goal (supervisor, {where}): {'; '.join(misses)}", file=out)
    failed = [f"{row['variant']}, {n_groups(row['groups'])}: {row['deadlocks']} deadlocks, {row['unresolved']} "
              f"unresolved of {row['ooms']} OOMs" for row in rows if not row["all_resolved"]]
    problems.extend(failed)
    if interrupted is not None:
        print(f"interrupted by {signal.Signals(interrupted).name}: the figures above are the runs that finished; "
              "every group and process was removed", file=out)
    if problems:
        print("problems:", *problems, sep="\n  ", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"config": attrs.asdict(config), "machine": machine(), "supervisor_available": available,
                       "rows": rows, "below_goal": failing, "problems": problems, "raw": raw,
                       "interrupted": interrupted}, file, indent=1)
    out.flush()
    if interrupted is not None:
        return 128 + interrupted
    return 1 if problems else 0
