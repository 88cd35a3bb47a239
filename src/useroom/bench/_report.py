"""Figures of a run: machine facts, per-variant summaries, the table, the raw JSON."""

from __future__ import annotations

import math
import os
import platform
import pwd
import resource
import signal
import statistics
from typing import TYPE_CHECKING, Any, Final

import attrs

from useroom._units import format_size
from useroom.bench._deadlock import VARIANTS, Config, Run
from useroom.bench._sandbox import cgroup_version, scratch_kind

if TYPE_CHECKING:
    from useroom.bench._plot import Distributions

__all__ = ["Summary", "distributions", "machine_facts", "percentile", "render", "summarize", "to_json"]

_MS: Final = 1e6
_US: Final = 1e3


def percentile(values: list[int], fraction: float) -> int | None:
    """Nearest-rank percentile: the smallest value with at least *fraction* of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(math.ceil(fraction * len(ordered)) - 1, 0)]


def median(values: list[int]) -> float | None:
    return statistics.median(values) if values else None


@attrs.frozen
class Summary:
    """One row of the table."""

    variant: str
    episodes: int
    resolved: int
    deadlocks: int
    stalled: int
    median_ns: float | None
    p99_ns: int | None
    #: Median episode time over the kernel variant's (None without both).
    ratio: float | None
    kernel_kills: int
    #: Episodes that ended without rescue and whose handler events say it resolved them (handler variants).
    handler_resolved: int | None
    handler_events: int | None
    notify_to_signal_p50_ns: int | None
    notify_to_signal_p99_ns: int | None
    locked_bytes: int | None
    #: Workers that ended other than by SIGKILL (exited, or another signal): a workload problem.
    odd_workers: int
    naive: dict[str, Any] | None


def summarize(result: Run) -> list[Summary]:
    rows = []
    kernel_median: float | None = None
    for name in result.config.variants:
        episodes = result.episodes(name)
        blocks = [block for block in result.blocks if block.variant == name]
        durations = [d for e in episodes if (d := e.duration_ns) is not None]
        med = median(durations)
        if name == "kernel":
            kernel_median = med
        handler = VARIANTS[name].handler
        latencies = [n for e in episodes for n in e.notify_to_signal_ns]
        reports = [block.report for block in blocks if block.report is not None]
        locked = [r.locked_bytes for r in reports if r.locked_bytes is not None]
        naive = None
        if handler == "naive":
            summaries = [r.summary for r in reports if r.summary is not None]
            naive = {key: sum(s.get(key, 0) for s in summaries) for key in ("wakeups", "kills", "failures")}
            errors: dict[str, int] = {}
            for s in summaries:
                for what, count in (s.get("errors") or {}).items():
                    errors[what] = errors.get(what, 0) + count
            naive["errors"] = errors
            naive["reports"] = len(summaries)
            naive["workers_killed_before_rescue"] = sum(e.gone_before_rescue for e in episodes if e.rescued)
            naive["workers_of_rescued_episodes"] = sum(len(e.worker_signals) for e in episodes if e.rescued)
        useroom = handler in ("standalone", "inprocess")
        rows.append(Summary(
            variant=name,
            episodes=len(episodes),
            resolved=sum(e.outcome == "resolved" for e in episodes),
            deadlocks=sum(e.outcome == "deadlock" for e in episodes),
            stalled=sum(e.outcome == "stalled" for e in episodes),
            median_ns=med,
            p99_ns=percentile(durations, 0.99),
            ratio=None,
            kernel_kills=sum(e.kernel_kills for e in episodes),
            handler_resolved=sum(e.handler_resolved for e in episodes) if useroom else None,
            handler_events=sum(e.handler_events for e in episodes) if useroom else None,
            notify_to_signal_p50_ns=percentile(latencies, 0.5),
            notify_to_signal_p99_ns=percentile(latencies, 0.99),
            locked_bytes=max(locked) if locked else None,
            odd_workers=sum(1 for e in episodes for s in e.worker_signals if s != signal.SIGKILL and not e.rescued),
            naive=naive,
        ))
    return [attrs.evolve(row, ratio=row.median_ns / kernel_median)
            if row.median_ns is not None and kernel_median else row for row in rows]


def machine_facts(config: Config, memcg: str) -> dict[str, Any]:
    meminfo = _meminfo()
    return {
        "kernel": platform.release(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "cpu": _cpu_model(),
        "memory_bytes": meminfo.get("MemTotal"),
        "swap_bytes": meminfo.get("SwapTotal"),
        "transparent_hugepage": _chosen(_read_first("/sys/kernel/mm/transparent_hugepage/enabled")),
        "python": platform.python_version(),
        "memcg": memcg,
        "cgroup_version": cgroup_version(),
        # A QEMU guest under software emulation (tools/vm-run): its times are not the host's.
        "emulated": os.environ.get("VMRUN_GUEST") == "1",
        # Who ran it: the figures of an unprivileged run are an ordinary user's.
        "uid": os.geteuid(),
        "user": _user_name(os.geteuid()),
        "memlock_limit": _memlock_limit(),
        "cap_ipc_lock": _has_capability(_CAP_IPC_LOCK),
        "cap_sys_resource": _has_capability(_CAP_SYS_RESOURCE),
        "limit_bytes": config.limit,
        "workers": config.workers,
        "worker_size_bytes": config.worker_size,
        "deadlock_after_s": config.deadlock_after,
    }


def render(result: Run, rows: list[Summary]) -> str:
    config, machine = result.config, result.machine
    lines = [
        "useroom deadlock benchmark: the OOM handled from inside the group",
        f"kernel {machine['kernel']}, {machine['cores']} cores ({machine['cpu'] or 'cpu unknown'}), "
        f"{_size(machine['memory_bytes'])} RAM, {_swap(machine['swap_bytes'])}, "
        f"THP {machine['transparent_hugepage'] or '?'}, Python {machine['python']}",
        f"group: cgroup v{machine.get('cgroup_version', 1)} memcg below {machine['memcg']}, limit "
        f"{format_size(config.limit)}; {config.workers} workers x {format_size(config.worker_size)} touched each "
        "(each alone exceeds the limit)",
        f"deadlock: a worker alive and the group under OOM {config.deadlock_after:g} s after the workers start; "
        f"blocks of {config.block} episodes per group and handler",
    ]
    note = scratch_kind(machine.get("cgroup_version", 1)).figures_note
    if note:
        lines.append(note)
    if machine.get("emulated"):
        lines.append("EMULATED: run in a QEMU guest under software emulation (tools/vm-run); "
                     "times are the guest's, several times the host's")
    if "uid" in machine:
        lines.append(_who(machine))
    few = [name for name in ("naive", "no-handler") if name in config.variants]
    if few and config.naive_episodes < config.episodes:
        lines.append(f"{' and '.join(few)} run {config.naive_episodes} episodes, not {config.episodes}: "
                     f"each deadlock costs the full {config.deadlock_after:g} s (--naive-episodes)")
    lines.append("")
    header = ("variant", "episodes", "deadlocks", "median ms", "p99 ms", "x kernel", "kernel kills",
              "by handler", "notify>kill p50 us", "p99 us", "locked")
    table = [header] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for number, cells in enumerate(table):
        lines.append("  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                               for i, cell in enumerate(cells)).rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    lines.append("")
    lines.append("episode time: workers start -> every worker gone and under_oom 0; median and p99 "
                 "(nearest rank) over the episodes that ended without rescue")
    locked = [row.locked_bytes for row in rows if row.locked_bytes is not None]
    if locked:
        limit = machine.get("memlock_limit")
        fits = "fits" if limit is not None and max(locked) <= limit else "OVER"
        within = "" if limit is None else (" (RLIMIT_MEMLOCK unlimited)" if limit < 0 else
                                           f" of RLIMIT_MEMLOCK {_size(limit)} ({fits})")
        lines.append(f"memory locked by a handler: {max(locked)} bytes ({_size(max(locked))}, the largest "
                     f"VmLck a handler reported){within}")
    notes = _notes(result, rows)
    lines.extend(notes)
    return "\n".join(lines)


def distributions(result: Run) -> Distributions:
    """Each variant's episode times, for ``--plot``: the kernel's first; a
    variant's deadlocks and stalls, which have no episode time, in its note
    and counted as unfinished."""
    from useroom.bench._plot import Distributions, Series

    config, machine = result.config, result.machine
    series = []
    for name in sorted(config.variants, key=lambda name: name != "kernel"):
        episodes = result.episodes(name)
        durations = [d / _MS for e in episodes if (d := e.duration_ns) is not None]
        deadlocks = sum(e.outcome == "deadlock" for e in episodes)
        stalled = sum(e.outcome == "stalled" for e in episodes)
        stuck = ([f"{deadlocks} {'deadlock' if deadlocks == 1 else 'deadlocks'}"] if deadlocks else []) \
            + ([f"{stalled} stalled"] if stalled else [])
        note = f"{' and '.join(stuck)} in {len(episodes)} episodes" if stuck else ""
        series.append(Series(name, durations, note, unfinished=len(episodes) - len(durations)))
    emulated = ", EMULATED guest" if machine.get("emulated") else ""
    return Distributions(
        title="useroom deadlock benchmark: episode time, the kernel OOM killer and the handlers side by side",
        subtitle=f"kernel {machine['kernel']}, cgroup v{machine.get('cgroup_version', 1)}, {machine['cores']} "
                 f"cores{emulated}; limit {format_size(config.limit)}, {config.workers} workers x "
                 f"{format_size(config.worker_size)} each",
        quantity="episode time (ms)",
        series=series,
        footnote="episode time: workers start -> every worker gone and the group out of OOM, over the "
                 "episodes that ended without rescue",
    )


def _cells(row: Summary) -> tuple[str, ...]:
    handler = VARIANTS[row.variant].handler
    useroom = handler in ("standalone", "inprocess")
    return (
        row.variant,
        str(row.episodes),
        str(row.deadlocks) + (f" (+{row.stalled} stalled)" if row.stalled else ""),
        _num(row.median_ns, _MS),
        _num(row.p99_ns, _MS),
        f"{row.ratio:.2f}" if row.ratio is not None else "-",
        str(row.kernel_kills),
        f"{row.handler_resolved}/{row.episodes}" if useroom and row.handler_resolved is not None else "-",
        _num(row.notify_to_signal_p50_ns, _US, 0) if useroom else "-",
        _num(row.notify_to_signal_p99_ns, _US, 0) if useroom else "-",
        _size(row.locked_bytes) or "-",
    )


def _notes(result: Run, rows: list[Summary]) -> list[str]:
    notes = []
    for row in rows:
        if row.naive is not None and row.naive.get("reports"):
            naive = row.naive
            errors = ", ".join(f"{what} x{count}" for what, count in naive["errors"].items())
            notes.append(f"naive handler: woke {naive['wakeups']} times, killed {_count(naive['kills'], 'process')} "
                         f"(counting after rescues), {_count(naive['failures'], 'failed attempt')}"
                         + (f" ({errors})" if errors else ""))
            if naive["workers_of_rescued_episodes"]:
                notes.append(f"naive: in its deadlocked episodes, {naive['workers_killed_before_rescue']} of "
                             f"{naive['workers_of_rescued_episodes']} workers were gone before the rescue")
        if row.odd_workers:
            notes.append(f"{row.variant}: {row.odd_workers} workers of unrescued episodes ended other than "
                         "by SIGKILL (the limit did not stop them?)")
        if row.handler_events is not None:
            notes.append(f"{row.variant}: {row.handler_events} handler events in episode windows")
    for block in result.blocks:
        if block.problem:
            notes.append(f"block {block.index} ({block.variant}): {block.problem}")
        if block.stray_events:
            notes.append(f"block {block.index} ({block.variant}): {block.stray_events} events outside any episode")
    for problem in result.problems:
        notes.append(f"problem: {problem}")
    if result.interrupted is not None:
        notes.append(f"interrupted by signal {result.interrupted}: partial figures")
    return notes


def to_json(result: Run, rows: list[Summary]) -> dict[str, Any]:
    """Every raw figure of the run, as JSON-ready data."""
    return {
        "machine": result.machine,
        "config": attrs.asdict(result.config),
        "summary": {row.variant: attrs.asdict(row) for row in rows},
        "blocks": [
            {
                "variant": block.variant,
                "index": block.index,
                "group": block.group,
                "handler_pid": block.handler_pid,
                "handler_ready_ns": block.handler_ready_ns,
                "problem": block.problem,
                "stray_events": block.stray_events,
                "report": attrs.asdict(block.report) if block.report is not None else None,
                "episodes": [attrs.asdict(episode) | {"duration_ns": episode.duration_ns}
                             for episode in block.episodes],
            }
            for block in result.blocks
        ],
        "interrupted": result.interrupted,
        "problems": result.problems,
    }


_CAP_IPC_LOCK: Final = 14
_CAP_SYS_RESOURCE: Final = 24


def _who(machine: dict[str, Any]) -> str:
    caps = [name for name, key in (("CAP_IPC_LOCK", "cap_ipc_lock"), ("CAP_SYS_RESOURCE", "cap_sys_resource"))
            if machine.get(key)]
    limit = machine.get("memlock_limit")
    shown = "unlimited" if limit is None or limit < 0 else _size(limit)
    return (f"run as uid {machine['uid']} ({machine.get('user')}), RLIMIT_MEMLOCK {shown}, "
            f"{'with ' + ' and '.join(caps) if caps else 'without CAP_IPC_LOCK or CAP_SYS_RESOURCE'}")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _memlock_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return -1 if soft == resource.RLIM_INFINITY else soft


def _has_capability(bit: int) -> bool:
    """Whether the effective capability set has *bit* (from /proc/self/status)."""
    try:
        with open("/proc/self/status") as file:
            for line in file:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> bit & 1)
    except (OSError, ValueError):
        pass
    return False


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "es" if noun.endswith("s") else "s")


def _num(value: float | None, unit: float, decimals: int = 1) -> str:
    return "-" if value is None else f"{value / unit:.{decimals}f}"


def _size(value: int | None) -> str:
    if value is None:
        return ""
    if value == 0:
        return "0"
    mib = value / (1 << 20)
    return f"{mib:.1f} MiB" if mib >= 1 else f"{value / 1024:.0f} KiB"


def _swap(value: int | None) -> str:
    if value is None:
        return "swap unknown"
    return f"swap {_size(value)}" if value else "no swap"


def _meminfo() -> dict[str, int]:
    facts = {}
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    facts[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return facts


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return None


def _chosen(choices: str | None) -> str | None:
    """The bracketed choice of a sysfs list ("always [madvise] never" -> "madvise")."""
    if choices is None or "[" not in choices:
        return choices
    return choices.partition("[")[2].partition("]")[0]


def _read_first(path: str) -> str | None:
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return None
