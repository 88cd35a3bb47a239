"""A respawning storm: the kernel OOM killer alone versus a useroom handler inside the group.

``python -m useroom.bench storm [--seconds 10] [--rounds 2] [--workers 2] [--worker-size 200M]
[--limit 64M] [--driver python|stress-ng] [--json PATH]``

Both variants run in the same benchmark, in rounds that alternate in ABBA
order (kernel, useroom, useroom, kernel) so that a load that drifts during
the run weighs alike on both.

The workload is a service that a kill does not end: a supervisor that does
not grow and ``workers`` processes that each touch ``worker-size`` bytes
(more than the whole group may hold) and keep them; when a worker dies the
supervisor starts another at once. The group is at its limit again a few
tens of milliseconds after every kill, for as long as the run lasts. The
``python`` driver's supervisor is :mod:`useroom.bench._storm_driver` run as a
script (``python -I -S``, about 16 MiB RSS: the size of a small daemon; the
package is not imported); its workers are forked from it, so a fresh worker starts with the
supervisor's pages mapped and is, for a moment, about as large (the kernel's
badness counts them too). ``stress-ng --vm N --vm-bytes SIZE --vm-keep``
respawns the vm workers the OOM killer takes (its main process and its
per-worker parents are the supervisor; it gives the workers
``oom_score_adj`` 1000). A supervisor that is killed is counted, and the
benchmark starts the driver again.

Each variant runs ``--seconds`` in a fresh group below the caller's memory
cgroup:

- ``kernel``: no handler; the kernel OOM killer meets the limit (v1
  ``memory.limit_in_bytes``, v2 ``memory.max``).
- ``useroom``: ``useroom.Handler(group, useroom.KillLargest())`` in a small
  process inside the group (``python -m useroom.bench _storm_handler``); the
  limit is its wall (v1: the kernel killer off; v2: ``memory.high``, with
  ``memory.max`` a gap above it as the kernel's backstop).

Victim agreement is measured outside the group, by this process: it
watches the group's OOM notification itself and, at each one and every
``--sample-ms`` in between (less often where a snapshot costs more than
``--sample-budget`` of a CPU allows), reads what the kernel's ``oom_badness()`` reads
for every task (``/proc/PID/status`` VmRSS + VmSwap + VmPTE, and
``oom_score_adj``). Each handler kill is judged against the latest snapshot
taken before its signal was sent, if no other kill came between the two.
The handler's native plan signals tens of microseconds after the
notification, before any reader of ``/proc`` could finish, which is why the
periodic samples exist: on cgroup v1 the group's tasks sleep in the OOM wait
from the moment it is declared, so a sample from just before still shows the
state the kernel would have judged. The same snapshots judge the kernel's
own victims in the ``kernel`` variant (tasks that vanished between two
snapshots): that figure is the accuracy of the measurement itself.

The parts: :mod:`~useroom.bench._storm_driver` (the drivers),
:mod:`~useroom.bench._storm_handler` (the handler's process),
:mod:`~useroom.bench._badness` (the snapshots and the judging),
:mod:`~useroom.bench._storm_report` (the configuration and the figures);
here, the run loop and the command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import IO, Any, Final

from useroom._units import format_size
from useroom.bench._badness import BadnessProbe, Kill, Snapshot, growth_rate, judge, parent_of, rss_kb, vanished
from useroom.bench._plot import check_plot
from useroom.bench._plot import write as write_plot
from useroom.bench._sandbox import (
    BenchError,
    Child,
    Interrupted,
    Lab,
    Pidfd,
    ScratchGroup,
    SignalGuard,
    enter_group,
    size_arg,
)
from useroom.bench._storm_driver import DRIVERS, PAGES, driver_argv
from useroom.bench._storm_handler import StormHandler, end_watchdog, start_handler, stop_handler
from useroom.bench._storm_report import (
    VARIANTS,
    StormConfig,
    below_goal,
    distributions,
    fmt,
    in_order,
    merge,
    render,
    schedule,
    summarize,
)
from useroom.cgroup import Group
from useroom.cgroup import OomCounter

__all__ = ["main", "run_variant"]

_EMPTY_TIMEOUT_S: Final = 10.0
#: How long a round waits for its first OOM (the storm's start) before it gives up.
_START_ALLOWANCE_S: Final = 60.0


def _kill_tasks(group: ScratchGroup, spare: int | None = None, timeout: float = _EMPTY_TIMEOUT_S) -> list[int]:
    """SIGKILL every task of *group* until none is left but *spare* and its
    children (the handler and, on v2, its watchdog); the pids still there
    after *timeout* seconds.

    Each pid is pinned with a pidfd and checked to be in the group after
    that (by its ``/proc/PID/cgroup``), so a pid reused meanwhile by another
    process is never signalled.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            left = [pid for pid in group.procs() if pid != spare and parent_of(pid) != spare]
        except FileNotFoundError:
            return []
        if not left or time.monotonic() > deadline:
            return left
        for pid in left:
            try:
                pidfd = Pidfd(pid)
            except ProcessLookupError:
                continue
            with pidfd:
                try:
                    with open(f"/proc/{pid}/cgroup") as file:
                        ours = f"/{group.name}\n" in file.read()
                    if ours:
                        pidfd.send_signal(signal.SIGKILL)
                except (FileNotFoundError, ProcessLookupError):
                    pass
        time.sleep(0.005)


def _make_room(group: ScratchGroup, config: StormConfig, charge: int) -> None:
    """Raises the useroom group's limit (v2: memory.max, then the wall) by
    the handler's own charge, and waits until the handler has adopted it
    (it reads a moved limit or wall at its next refresh, every 0.5 s)."""
    group.hold_wall(config.limit + charge, config.gap)
    time.sleep(1.5)  # two refreshes of the handler: it now holds the new limit


def run_variant(lab: Lab, guard: SignalGuard, config: StormConfig, mode: str, workdir: str,
                progress: IO[str] | None = None) -> dict[str, Any]:
    """One variant (``kernel`` or ``useroom``) of the storm in a fresh group; its raw figures.

    Says ``  MODE: storm running in PATH`` on *progress* once the storm has started.
    """
    group = lab.create_group(f"storm-{mode}", limit=config.limit, kill_disable=False)
    if mode == "useroom":
        group.hold_wall(config.limit, config.gap)  # v2: memory.high, memory.max a gap above it
    raw: dict[str, Any] = {"mode": mode, "group": group.path, "limit": config.limit, "kernel_max": group.limit(),
                           "supervisor_deaths": [], "restarts": [], "handler_died_ns": None, "handler": None,
                           "handler_alive": None, "handler_rss_kb": None, "first_notified_ns": None}
    handler: StormHandler | None = None
    oom: OomCounter | None = None
    probe: BadnessProbe | None = None
    driver: Child | None = None
    try:
        if mode == "useroom":
            handler = start_handler(lab, group, workdir)
        spare = handler.pid if handler is not None else None
        probe = BadnessProbe(group.path, group.limit(), [handler.pid] if handler is not None else [])
        oom = Group.open(group.path).oom_counter()
        raw["usage_before_storm"] = group.usage()  # the handler process's charge (kernel: none)
        if handler is not None and config.room == "equal":
            _make_room(group, config, raw["usage_before_storm"])
            probe.close()
            probe = BadnessProbe(group.path, group.wall(), [handler.pid])
        # What the workload met: the kernel's limit, or the handler's wall (v1: the limit).
        raw["room_limit"] = group.limit() if mode == "kernel" else group.wall()
        started = time.monotonic_ns()
        driver = _start_driver(lab, group, config)
        if progress is not None:
            print(f"  {mode}: storm running in {group.path}", file=progress, flush=True)
        driver = _storm(config, group, oom, probe, driver, handler, raw, lab)
        ended = time.monotonic_ns()
        # The storm stops before the handler: without it the last OOMs would
        # meet the kernel killer (v1: the handler restores its setting).
        driver.kill()
        left = _kill_tasks(group, spare)
        driver.wait(10)
        raw["leftover_tasks"] = left
        raw["seconds"] = (ended - (raw["first_notified_ns"] or ended)) / 1e9
        raw["startup_s"] = ((raw["first_notified_ns"] or ended) - started) / 1e9
        raw["sampled_s"] = (ended - started) / 1e9
        raw["kernel_kills"] = group.oom_control().oom_kill
        if _readable(oom.fileno(), oom.poll_events):
            oom.update()
        raw["ooms"] = oom.count
        if handler is not None:
            raw["handler_alive"] = not handler.child.exited()
            raw["handler_rss_kb"] = rss_kb(handler.pid) if raw["handler_alive"] else None
            raw["handler"] = stop_handler(handler)
        raw["snapshots"] = len(probe.snapshots)
        raw["notified_snapshots"] = sum(snapshot.notified for snapshot in probe.snapshots)
        raw["snapshot_us_mean"] = probe.busy_ns / 1e3 / max(1, len(probe.snapshots))
        raw["sampling_cpu_share"] = probe.busy_ns / max(1, ended - started)
        raw["roles"] = {str(pid): _role(pid, probe.parents, raw["drivers"], config.driver)
                        for pid in probe.names}
        raw["names"] = {str(pid): name for pid, name in probe.names.items()}
        _judge(raw, probe, config)
    finally:
        with guard.shielded():
            for resource in (oom, probe):
                if resource is not None:
                    resource.close()
            if driver is not None:
                driver.kill()
            if handler is not None:
                if not handler.child.reaped:
                    handler.child.kill()
                raw["watchdog_ended_itself"] = end_watchdog(handler, _EMPTY_TIMEOUT_S)
            lab.rescue(group, [])  # killer on, limit lifted: nothing may sleep in the OOM wait now
            raw["left_after_kill"] = _kill_tasks(group)
            lab.release(group)
    return raw


def _readable(fd: int, events: int) -> bool:
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(0))


def _start_driver(lab: Lab, group: ScratchGroup, config: StormConfig) -> Child:
    popen = subprocess.Popen(driver_argv(config), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL,
                             preexec_fn=enter_group(os.path.join(group.path, "cgroup.procs")))
    return lab.adopt(popen.pid, popen)


def _role(pid: int, parents: dict[int, int], drivers: list[int], driver: str) -> str:
    if pid in drivers:
        return "supervisor"
    if driver == "stress-ng" and parents.get(pid) in drivers:
        return "supervisor"  # stress-ng's per-worker parent, which respawns it
    return "worker"


def _storm(config: StormConfig, group: ScratchGroup, oom: OomCounter, probe: BadnessProbe, driver: Child,
           handler: StormHandler | None, raw: dict[str, Any], lab: Lab) -> Child:
    """Sample the group until the time is up; restart the driver if its supervisor is killed.
    Returns the driver's process as it is at the end."""
    interval_ns = int(config.sample_ms * 1e6)
    poller = select.poll()
    oom_fd = oom.fileno()
    poller.register(oom_fd, oom.poll_events)
    handler_fd = handler.child.fileno() if handler is not None else None
    if handler_fd is not None:
        poller.register(handler_fd, select.POLLIN)
    # By the number of the pidfd: the pid and the pidfd, besides the driver's own process.
    supervisors: dict[int, tuple[int, Pidfd]] = {}
    raw["drivers"] = [driver.pid]
    driver_fd = driver.fileno()
    poller.register(driver_fd, select.POLLIN)
    # The round's storm time runs from its first OOM: the driver's start
    # (seconds in the emulated guest) is not storm. Without an OOM the round
    # ends once that time and the allowance for the start have passed.
    storm_ns = int(config.seconds / config.rounds * 1e9)
    ends = time.monotonic_ns() + storm_ns + int(_START_ALLOWANCE_S * 1e9)
    next_ns = 0
    try:
        while (now := time.monotonic_ns()) < ends:
            ready = poller.poll(max(0, math.ceil((next_ns - now) / 1e6)))
            notified = False
            for fd, _ in ready:
                if fd == oom_fd:
                    oom.update()
                    notified = True
                    if raw["first_notified_ns"] is None:
                        first = time.monotonic_ns()
                        raw["first_notified_ns"] = first
                        ends = first + storm_ns
                elif fd == handler_fd:
                    poller.unregister(fd)
                    raw["handler_died_ns"] = time.monotonic_ns()
                elif fd == driver_fd or fd in supervisors:
                    pid = driver.pid if fd == driver_fd else supervisors[fd][0]
                    raw["supervisor_deaths"].append({"pid": pid, "t_ns": time.monotonic_ns()})
                    for other in [driver_fd, *supervisors]:
                        poller.unregister(other)
                    _close_all(supervisors)
                    driver = _restart(lab, group, config, driver, handler, raw)
                    driver_fd = driver.fileno()
                    poller.register(driver_fd, select.POLLIN)
                    break
            if notified or time.monotonic_ns() >= next_ns:
                snapshot = probe.take(notified)
                cost_ns = snapshot.end_ns - snapshot.start_ns
                next_ns = snapshot.start_ns + max(interval_ns, int(cost_ns / config.sample_budget))
                if config.driver == "stress-ng":
                    _watch_supervisors(snapshot, probe, driver.pid, supervisors, poller)
    finally:
        _close_all(supervisors)
    return driver


def _watch_supervisors(snapshot: Snapshot, probe: BadnessProbe, top: int,
                       supervisors: dict[int, tuple[int, Pidfd]], poller: select.poll) -> None:
    """stress-ng: its per-worker parents are supervisors too: watch each by a pidfd."""
    watched = {pid for pid, _ in supervisors.values()}
    for pid, _, _ in snapshot.tasks:
        if probe.parents.get(pid) == top and pid not in watched:
            try:
                pidfd = Pidfd(pid)
            except ProcessLookupError:
                continue
            supervisors[pidfd.fileno()] = (pid, pidfd)
            poller.register(pidfd, select.POLLIN)


def _close_all(supervisors: dict[int, tuple[int, Pidfd]]) -> None:
    for _, pidfd in supervisors.values():
        pidfd.close()
    supervisors.clear()


def _restart(lab: Lab, group: ScratchGroup, config: StormConfig, driver: Child, handler: StormHandler | None,
             raw: dict[str, Any]) -> Child:
    """The supervisor was killed: end what is left of the service, start it again."""
    began = time.monotonic_ns()
    driver.kill()
    _kill_tasks(group, handler.pid if handler is not None else None)
    driver.wait(10)
    lab.forget(driver)
    fresh = _start_driver(lab, group, config)
    raw["restarts"].append((began, time.monotonic_ns()))
    raw["drivers"].append(fresh.pid)
    return fresh


def _judge(raw: dict[str, Any], probe: BadnessProbe, config: StormConfig) -> None:
    """The victims of the variant, judged against the snapshots."""
    max_age_ns = int(config.max_age_ms * 1e6)
    if raw["mode"] == "kernel":
        kills = vanished(probe.snapshots, probe.names, raw["restarts"])
    else:
        record = raw["handler"] or {"events": []}
        kills = [Kill(victim["t_ns"], victim["pid"], victim["name"], victim["t_from"])
                 for event in record["events"] for victim in event["victims"]
                 if victim["signal"] == "SIGKILL" and victim["result"] == 0]
    for kill in kills:
        if str(kill.pid) not in raw["roles"]:
            raw["roles"][str(kill.pid)] = "unseen"
    rate = growth_rate(probe.snapshots)
    raw["growth_pages_per_ms"] = rate * 1e6
    raw["verdicts"] = judge(kills, probe.snapshots, max_age_ns, rate)


def _parser() -> argparse.ArgumentParser:
    defaults = StormConfig()
    parser = argparse.ArgumentParser(prog="python -m useroom.bench storm", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=defaults.seconds,
                        help="storm time per variant, split over the rounds (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=defaults.rounds,
                        help="split each variant's time into this many runs, alternating kernel, useroom, useroom, "
                             "kernel, ... so that the machine's changing load falls on both (default %(default)s)")
    parser.add_argument("--workers", type=int, default=defaults.workers, help="workers (default %(default)s)")
    parser.add_argument("--worker-size", type=size_arg, default=defaults.worker_size,
                        help="memory each worker touches and keeps (default 200M)")
    parser.add_argument("--limit", type=size_arg, default=defaults.limit,
                        help="the group's limit (v2: the useroom wall, memory.high; the kernel's memory.max) "
                             "(default 64M)")
    parser.add_argument("--driver", choices=DRIVERS, default=defaults.driver,
                        help="the storm: a small Python supervisor, or stress-ng --vm (default %(default)s)")
    parser.add_argument("--pages", choices=PAGES, default=defaults.pages,
                        help="the workers' pages: small, huge (transparent huge pages, through madvise), or any "
                             "(the system's setting, and stress-ng's random advice) (default %(default)s)")
    parser.add_argument("--sample-ms", type=float, default=defaults.sample_ms,
                        help="badness snapshots this often, besides one at each OOM notification "
                             "(default %(default)s)")
    parser.add_argument("--sample-budget", type=float, default=defaults.sample_budget,
                        help="the share of one CPU the periodic snapshots may take; the interval grows to fit "
                             "(default %(default)s)")
    parser.add_argument("--max-age-ms", type=float, default=defaults.max_age_ms,
                        help="an older snapshot does not measure a kill (default %(default)s)")
    parser.add_argument("--variants", type=_variants, default=VARIANTS, metavar="NAME[,NAME]",
                        help=f"which of {', '.join(VARIANTS)}, in this order (default: both; the useroom row's "
                             "ratio needs the kernel's)")
    parser.add_argument("--room", choices=("equal", "shared"), default=defaults.room,
                        help="equal: the useroom variant's limit is raised by the handler process's own charge, "
                             "so that the workload has the kernel variant's room; shared: the handler's charge "
                             "comes out of it (default %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="write every raw figure to PATH")
    parser.add_argument("--plot", metavar="PATH",
                        help="draw each variant's times between kills side by side into PATH (.svg or .png); "
                             "needs matplotlib: pip install 'useroom[plot]'")
    return parser


def _variants(text: str) -> tuple[str, ...]:
    names = [name for name in text.split(",") if name]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"variants are {', '.join(VARIANTS)}, not {text!r}")
    return tuple(name for name in VARIANTS if name in names)


def main(argv: list[str], out: IO[str] | None = None) -> int:
    """``python -m useroom.bench storm``."""
    out = out or sys.stdout
    parser = _parser()
    args = parser.parse_args(argv)
    config = StormConfig(seconds=args.seconds, rounds=args.rounds, workers=args.workers,
                         worker_size=args.worker_size, limit=args.limit,
                         driver=args.driver, pages=args.pages, sample_ms=args.sample_ms,
                         sample_budget=args.sample_budget,
                         max_age_ms=args.max_age_ms, room=args.room)
    if config.rounds < 1 or config.seconds / config.rounds <= 0.5 or config.workers < 1 or config.sample_ms <= 0 \
            or not 0 < config.sample_budget <= 1:
        parser.error("--rounds must be >= 1, --seconds / --rounds > 0.5, --workers >= 1, --sample-ms > 0, "
                     "0 < --sample-budget <= 1")
    if config.worker_size <= config.limit:
        parser.error("each worker must touch more than the limit: a storm needs every worker to be killed")
    if args.plot:
        try:
            check_plot(args.plot)
        except BenchError as error:
            print(f"useroom.bench storm: {error}", file=sys.stderr)
            return 2
    if config.driver == "stress-ng" and shutil.which("stress-ng") is None:
        print("useroom.bench storm: --driver stress-ng needs stress-ng on PATH (apt-get install stress-ng)",
              file=sys.stderr)
        return 2
    raw: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.variants}
    problems: list[str] = []
    interrupted: int | None = None
    with SignalGuard() as guard, tempfile.TemporaryDirectory(prefix="useroom-storm-bench-") as workdir:
        try:
            lab = Lab.below_own_memcg()
        except BenchError as error:
            print(f"useroom.bench storm: {error}", file=sys.stderr)
            return 2
        emulated = " (EMULATED guest: times are not the host's)" if os.environ.get("VMRUN_GUEST") else ""
        kind = lab.kind
        header = (f"useroom storm benchmark: cgroup v{lab.version}, kernel {os.uname().release}, "
                  f"{os.cpu_count()} cores{emulated}\n"
                  f"driver {config.driver}: {config.workers} workers x {format_size(config.worker_size)} "
                  f"on {config.pages} pages, respawned at once, in a group of {format_size(config.limit)}"
                  + (f" (useroom: {kind.wall_file} {format_size(config.limit)}, {kind.limit_file} "
                     f"{format_size(kind.backstop(config.limit, config.gap))}; kernel: {kind.limit_file} "
                     f"{format_size(config.limit)})" if kind.wall_apart else "")
                  + f"; {config.seconds:g} s per variant, in {config.rounds} rounds (ABBA order)")
        print(header.replace("\n", "; ", 1), file=sys.stderr, flush=True)
        try:
            lab.sweep_stale()
            for mode in schedule(args.variants, config.rounds):
                figures = run_variant(lab, guard, config, mode, workdir, sys.stderr)
                raw[mode].append(figures)
                row = summarize(merge([figures]), None)
                print(f"  {mode} (round {len(raw[mode])} of {config.rounds}): {row['notifications']} OOMs, "
                      f"{fmt(row['handler_kills'])} handler kills, {row['kernel_kills']} kernel kills, agreement "
                      f"{fmt(row['agreement_pct'], '.1f', '%')} of {row['measured']}", file=sys.stderr, flush=True)
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
    merged = {mode: merge(rounds) for mode, rounds in raw.items() if rounds}
    rows = [summarize(merged[mode], merged.get("kernel") if mode == "useroom" else None)
            for mode in VARIANTS if mode in merged]
    for mode, figures in merged.items():
        if figures["left_after_kill"]:
            problems.append(f"{mode}: tasks left in the group after the kill: {figures['left_after_kill']}")
    if rows:
        print(render(rows, header, config, lab.kind.ooms_counted), file=out)
        runs = [(mode, summarize(merge([r]), None)["kills_per_s"]) for mode, r in in_order(raw, config.rounds)]
        print("kills/s by run, in the order run: "
              + " -> ".join(f"{mode} {fmt(rate, '.1f')}" for mode, rate in runs), file=out)
    failing = below_goal(rows[-1]) if rows and rows[-1]["variant"] == "useroom" else []
    if failing:
        print(f"below the goal (useroom): {'; '.join(failing)}", file=out)
    if interrupted is not None:
        print(f"interrupted by {signal.Signals(interrupted).name}: the figures above are the variants that "
              "finished; every group and process was removed", file=out)
    if problems:
        print("problems:", *problems, sep="\n  ", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"config": config._asdict(), "cgroup_version": lab.version, "kernel": os.uname().release,
                       "emulated": bool(os.environ.get("VMRUN_GUEST")), "rows": rows, "below_goal": failing,
                       "problems": problems, "raw": raw, "interrupted": interrupted}, file, indent=1)
    if args.plot and rows:
        machine = f"kernel {os.uname().release}, cgroup v{lab.version}, {os.cpu_count()} cores" + (
            ", EMULATED guest" if os.environ.get("VMRUN_GUEST") else "")
        try:
            write_plot(distributions(raw, rows, config, machine), args.plot)
        except OSError as error:
            problems.append(f"cannot write the plot: {error}")
            print(f"useroom.bench storm: cannot write the plot: {error}", file=sys.stderr)
    out.flush()
    if interrupted is not None:
        return 128 + interrupted
    return 1 if problems else 0
