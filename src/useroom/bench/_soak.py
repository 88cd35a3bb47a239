"""The soak benchmark: mixed storms, hooks and start/stop cycles for N minutes.

``python -m useroom.bench soak [--minutes N | --seconds S] [--limit 64M] [--seed 1] [--json PATH]``

One process (this one, outside the groups it makes below its own memcg)
runs round after round, in turn:

- ``storm``: a fork storm in a group served by one long-lived
  :class:`~useroom.Supervisor` (KillLargest, a reserve): children started
  20 ms apart, each touching a random size up to 3/4 of the limit and
  holding it a moment, together far more than the limit;
- ``hooks``: a service in its own group, with its own in-group handler
  whose ``on_oom`` hook sheds half its cache, allocating until its hook has
  run three times; it must live through it;
- ``cycles``: ten ``Handler`` start/stop cycles on a group with a task in it.

Every round must end within ``--deadlock-after`` seconds (each child exited,
killed or done); one that does not is a *deadlock*, ended by the safety net
(kernel killer on, limit lifted, its tasks killed). The report counts the
episodes the handlers recorded, deadlocks, the watchdog's takeovers, the
plans' kernel fallbacks, the kernel's kills, hook services that died, and
this process's drift from the end of the first round of each kind to the
end of the last (open fds, threads, resident memory; the memory also over
the second half of the run, once what fills up once has), what it left behind
once the supervisor stopped (fds, threads against before it started), and
zombie children. The goal is 0 for all of them but the episodes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import IO, Any, Final

import attrs

from useroom import Group, Handler, KillLargest, Supervisor, parse_size
from useroom.handler.history import DEFAULT_KEEP, EpisodeCounts

__all__ = ["SoakConfig", "main", "run"]

MIB: Final = 1 << 20
KINDS: Final = ("storm", "hooks", "cycles")

#: A child of a storm: joins the group (argv[1], its procs file), touches argv[2] bytes, holds them a moment.
_CHILD: Final = """
import mmap, sys, time
with open(sys.argv[1], "w") as f:
    f.write("0")
size = int(sys.argv[2])
m = mmap.mmap(-1, size)
for off in range(0, size, mmap.PAGESIZE):
    m[off] = 1
time.sleep(0.2)
"""

#: The hooks round's service: in its group (argv[1]) with a handler of its own; prints one JSON line.
_SERVICE: Final = """
import json, mmap, sys, useroom
group = useroom.Group.open(sys.argv[1])
group.attach(__import__("os").getpid())
cache = [bytes([i % 251]) * (1 << 20) for i in range(int(sys.argv[2]))]
ran = []
handler = useroom.Handler(group, reserve="16M", thresholds=(), refresh_interval=0.2)

@handler.on_oom
def shed(ctx):
    ran.append(len(cache))
    del cache[: len(cache) // 2]
    return True

grown = []
with handler:
    while len(ran) < 3:
        m = mmap.mmap(-1, 4 << 20)
        for off in range(0, 4 << 20, mmap.PAGESIZE):
            m[off] = 1
        grown.append(m)
        cache.append(bytes(1 << 20))
    handler.wait_for_events(1, 5)
events = [e for e in handler.events if e.outcome != "not_needed"]
print(json.dumps({"hooks": len(ran), "episodes": len(events), "kills": sum(len(e.victims) for e in events)}))
"""


@attrs.frozen
class SoakConfig:
    seconds: float = 60.0
    limit: int = 64 * MIB
    deadlock_after: float = 30.0
    storm_children: int = 12
    seed: int = 1
    #: The storm handler's ``keep_events`` (None: the handler's default).
    keep_events: int | None = None


@attrs.define
class Tally:
    """What the rounds saw."""

    rounds: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(KINDS, 0))
    episodes: int = 0
    deadlocks: int = 0
    deadlocked: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(KINDS, 0))
    takeovers: int = 0
    fallbacks: int = 0
    kernel_kills: int = 0
    services_killed: int = 0
    errors: list[str] = attrs.field(factory=list)


def _process_figures() -> dict[str, int]:
    """This process's open fds, threads, resident kB and zombie children, now."""
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f)
    zombies = 0
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children") as f:
            for pid in f.read().split():
                try:
                    with open(f"/proc/{pid}/stat") as stat:
                        zombies += stat.read().rsplit(")", 1)[1].split()[0] == "Z"
                except FileNotFoundError:
                    pass
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": int(status["Threads"]),
            "rss_kb": int(status["VmRSS"].split()[0]), "zombies": zombies}


def _quiet_figures(supervisor: Supervisor) -> dict[str, int]:
    """:func:`_process_figures` once the storm group's victim table is empty (a victim's pidfd,
    status and oom_score_adj fds are the table's until the refresh after it exited)."""
    deadline = time.monotonic() + 5
    while supervisor.handlers[0].victims and time.monotonic() < deadline:
        time.sleep(0.05)
    return _process_figures()


def _count(tally: Tally, group: Group, before: EpisodeCounts, after: EpisodeCounts, kills_before: int) -> None:
    """A storm round's figures: the handler's counters (exact, whatever its events keep) after minus before."""
    tally.episodes += after.acted - before.acted
    tally.takeovers += after.takeovers - before.takeovers
    # A takeover is a kernel fallback of its own (the watchdog's): counted once, above.
    tally.fallbacks += (after.kernel_fallbacks - after.takeovers) - (before.kernel_fallbacks - before.takeovers)
    tally.kernel_kills += group.oom_control().oom_kill - kills_before


def _settle(children: list[subprocess.Popen[bytes]], deadline: float) -> bool:
    """Waits for every child until *deadline*; True if all ended."""
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return False
    return True


def _rescue(group: Group, children: list[subprocess.Popen[bytes]]) -> None:
    """The safety net of a round that did not end: the kernel killer on, the limit lifted, all killed."""
    if group.hierarchy.version == 1:
        group.set_oom_kill(True)
    group.set_limit("max")
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait()


def _storm(config: SoakConfig, group: Group, supervisor: Supervisor, tally: Tally, rng: random.Random) -> None:
    handler = supervisor.handlers[0]
    before, kills_before = handler.history.counts, group.oom_control().oom_kill
    procs = os.path.join(group.path, group.procs_file)
    children = []
    for _ in range(config.storm_children):
        size = rng.randrange(config.limit // 16, config.limit * 3 // 4, 1 << 20)
        children.append(subprocess.Popen([sys.executable, "-c", _CHILD, procs, str(size)],
                                         stderr=subprocess.DEVNULL))
        time.sleep(0.02)
    if not _settle(children, time.monotonic() + config.deadlock_after):
        tally.deadlocks += 1
        tally.deadlocked["storm"] += 1
        _rescue(group, children)
        group.set_limit(config.limit)
    time.sleep(0.2)  # the last episode's event
    _count(tally, group, before, handler.history.counts, kills_before)


def _hooks(config: SoakConfig, home: Group, tally: Tally, n: int) -> None:
    group = home.create_child(f"soak-hooks-{n}", config.limit * 2)
    try:
        service = subprocess.Popen([sys.executable, "-c", _SERVICE, group.path, str(config.limit * 3 // 4 // MIB)],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = service.communicate(timeout=config.deadlock_after)
        except subprocess.TimeoutExpired:
            tally.deadlocks += 1
            tally.deadlocked["hooks"] += 1
            _rescue(group, [service])
            out, err = service.communicate()
        if service.returncode == -signal.SIGKILL:
            tally.services_killed += 1
        elif service.returncode != 0:
            tally.errors.append(f"hooks service exited {service.returncode}: {err.decode()[-300:]}")
        else:
            report = json.loads(out.decode().strip().splitlines()[-1])
            tally.episodes += report["episodes"]
        tally.kernel_kills += group.oom_control().oom_kill
    finally:
        group.remove(force=True)


def _cycles(config: SoakConfig, group: Group, tally: Tally) -> None:
    sleeper = subprocess.Popen(["/bin/sh", "-c", 'echo $$ > "$0" && exec sleep 60',
                                os.path.join(group.path, group.procs_file)])
    try:
        for _ in range(10):
            with Handler(group, KillLargest(), thresholds=()) as handler:
                pass
            tally.errors.extend(repr(e) for e in handler.errors)
    finally:
        sleeper.kill()
        sleeper.wait()


def run(config: SoakConfig, progress: IO[str] | None = None) -> dict[str, Any]:
    """Runs the soak for ``config.seconds``; returns its figures."""
    rng = random.Random(config.seed)
    tally = Tally()
    home = Group.current()
    with home.room_for_children("soak-runner"):
        storm = home.create_child(f"soak-storm-{os.getpid()}", config.limit)
        cycles = home.create_child(f"soak-cycles-{os.getpid()}", config.limit)
        supervisor = Supervisor()
        keep = {} if config.keep_events is None else {"keep_events": config.keep_events}
        storm_handler = supervisor.add(storm, KillLargest(), reserve="8M", thresholds=(0.5,), **keep)
        before = _process_figures()
        start = time.monotonic()
        baseline: dict[str, int] | None = None
        last: dict[str, int] | None = None
        turns: list[tuple[float, int]] = []  # (seconds, RSS kB) at the end of each turn
        try:
            with supervisor:
                for n, kind in enumerate(_kinds()):
                    if kind == KINDS[0] and n >= len(KINDS) and time.monotonic() - start >= config.seconds:
                        break  # whole turns only: the figures compare the ends of two turns
                    if kind == "storm":
                        _storm(config, storm, supervisor, tally, rng)
                    elif kind == "hooks":
                        _hooks(config, home, tally, n)
                    else:
                        _cycles(config, cycles, tally)
                    tally.rounds[kind] += 1
                    if kind == KINDS[-1]:
                        figures = _quiet_figures(supervisor)
                        turns.append((time.monotonic() - start, figures["rss_kb"]))
                        if baseline is None:
                            baseline = figures  # after the first round of each kind: warmed up
                        last = figures  # after the last turn, in the end
                    if progress is not None:
                        print(f"soak: round {n + 1} ({kind}) at {time.monotonic() - start:.0f} s: "
                              f"{tally.episodes} episodes, {tally.deadlocks} deadlocks", file=progress, flush=True)
            tally.errors.extend(repr(e) for e in supervisor.errors)
        finally:
            for group in (storm, cycles):
                group.remove(force=True)
    time.sleep(0.5)  # the watchdog's exit
    after = _process_figures()
    assert baseline is not None and last is not None
    # From the first turn that ended past half the run: whatever fills up
    # once (the storm handler's kept events, pymalloc's arenas) has filled.
    half = next(rss for at, rss in turns if at >= turns[-1][0] / 2)
    return {
        "seconds": round(time.monotonic() - start, 1), "cgroup": home.hierarchy.version, "rounds": tally.rounds,
        "episodes": tally.episodes, "deadlocks": tally.deadlocks, "deadlocked": tally.deadlocked,
        "takeovers": tally.takeovers,
        "fallbacks": tally.fallbacks, "kernel_kills": tally.kernel_kills,
        "services_killed": tally.services_killed,
        # The storm handler's record: the events it keeps in full, and those it dropped for newer ones.
        "events_kept": len(storm_handler.events), "events_dropped": storm_handler.history.dropped,
        "keep_events": storm_handler.keep_events,
        # While it ran: from the end of the first round of each kind to the end of the last.
        "drift": {key: last[key] - baseline[key] for key in ("fds", "threads", "rss_kb")},
        "rss_kb_second_half": last["rss_kb"] - half,
        "rss_kb_turns": [[round(at, 1), rss] for at, rss in turns],
        # And once the supervisor stopped and the groups went: what it left behind.
        "left": {key: after[key] - before[key] for key in ("fds", "threads")},
        "zombies": after["zombies"], "errors": tally.errors[:20],
    }


def _kinds() -> Iterator[str]:
    while True:
        yield from KINDS


def render(result: dict[str, Any]) -> str:
    rounds = ", ".join(f"{count} {kind}" for kind, count in result["rounds"].items())
    drift = result["drift"]
    rows = [
        ("episodes", result["episodes"], "(the handlers recorded)"),
        ("storm events kept", result["events_kept"],
         f"(keep_events={result['keep_events']}; {result['events_dropped']} older dropped, still counted)"),
        ("deadlocks", result["deadlocks"],
         "goal 0" + ("" if not result["deadlocks"] else " (" + ", ".join(
             f"{n} {kind}" for kind, n in result["deadlocked"].items() if n) + ")")),
        ("watchdog takeovers", result["takeovers"], "goal 0"),
        ("plan kernel fallbacks", result["fallbacks"], "goal 0"),
        ("kernel kills", result["kernel_kills"], "goal 0"),
        ("hook services killed", result["services_killed"], "goal 0"),
        ("fd drift", f"{drift['fds']:+d}", "goal ~0 (the two plans armed keep the pidfds they name)"),
        ("thread drift", f"{drift['threads']:+d}", "goal 0"),
        ("RSS drift", f"{drift['rss_kb']:+d} KiB", "goal ~0 (the kept events fill up first)"),
        ("RSS drift, 2nd half", f"{result['rss_kb_second_half']:+d} KiB", "goal ~0"),
        ("fds left after stop", f"{result['left']['fds']:+d}", "goal 0"),
        ("threads left after stop", f"{result['left']['threads']:+d}", "goal 0"),
        ("zombies", result["zombies"], "goal 0"),
    ]
    lines = [f"soak: {result['seconds'] / 60:.1f} min on cgroup v{result['cgroup']}, rounds: {rounds}"]
    lines += [f"  {name:<22} {value!s:>12}   {note}" for name, value, note in rows]
    if result["errors"]:
        lines.append(f"  errors ({len(result['errors'])} shown): " + "; ".join(result["errors"][:5]))
    return "\n".join(lines)


def main(argv: list[str], out: IO[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m useroom.bench soak", description=__doc__.split("\n")[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=None, help="how long (default 1)")
    length.add_argument("--seconds", type=float, default=None, help="how long, in seconds")
    parser.add_argument("--limit", type=parse_size, default=64 * MIB, help="each group's limit (default 64M)")
    parser.add_argument("--seed", type=int, default=1, help="the storms' sizes (default 1)")
    parser.add_argument("--storm-children", type=int, default=12, metavar="N",
                        help="children per storm (default %(default)s)")
    parser.add_argument("--deadlock-after", type=float, default=30.0, metavar="SECONDS",
                        help="a round not over this long after it began is a deadlock (default 30; a slow "
                             "machine, such as an emulated guest, needs more)")
    parser.add_argument("--keep-events", type=int, default=None, metavar="N",
                        help="the storm handler keeps the newest N episodes in full (default: the handler's, "
                             f"{DEFAULT_KEEP}); a small N shows the drift once the bound is reached")
    parser.add_argument("--json", metavar="PATH", help="write the figures to PATH")
    parser.add_argument("--quiet", action="store_true", help="no progress line per round")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else 60.0 * (args.minutes if args.minutes is not None else 1)
    out = out or sys.stdout
    result = run(SoakConfig(seconds=seconds, limit=args.limit, seed=args.seed, deadlock_after=args.deadlock_after,
                            storm_children=args.storm_children, keep_events=args.keep_events),
                 progress=None if args.quiet else sys.stderr)
    print(render(result), file=out, flush=True)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
    bad = result["deadlocks"] or result["zombies"] or result["services_killed"] or result["drift"]["threads"] \
        or result["left"]["fds"] or result["left"]["threads"]
    return 1 if bad else 0
