"""The scale benchmark's configuration and its figures: the rows, the goals, the table."""

from __future__ import annotations

import math
import os
import platform
import resource
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs

from useroom._units import format_size

if TYPE_CHECKING:
    from useroom.bench._sandbox import ScratchGroup

__all__ = ["GOALS", "KIB", "MIB", "VARIANTS", "ScaleConfig", "below_goal", "header_text", "machine", "n_groups",
           "percentile", "render", "summarize"]

KIB: Final = 1 << 10
MIB: Final = 1 << 20
#: The order of the rows of each N.
VARIANTS: Final = ("supervisor", "baseline")

#: The product goals of the supervisor, as data: (figure, key of the row, test, shown).
GOALS: Final[tuple[tuple[str, str, Callable[[Any], bool], str], ...]] = (
    # What one more group costs: the marginal figures (from after the first
    # start, whose hardening and watchdog are paid once); none with one group.
    ("RSS per added group", "marginal_rss_per_group", lambda v: v is None or v <= 64 * KIB, "<= 64 KiB"),
    ("locked per added group", "marginal_locked_per_group", lambda v: v is None or v <= 16 * KIB, "<= 16 KiB"),
    # The native watcher, the manager, and the watchdog's stop sentry.
    ("threads added", "threads_added", lambda v: v is not None and v <= 3, "<= 3"),
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
                   host_rss_per_group=None, watchdog_rss_per_group=None, marginal_rss_per_group=None,
                   marginal_locked_per_group=None, host_rss_before=None,
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


def n_groups(n: int) -> str:
    """"1 group", "N groups"."""
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
        lines.append(f"{row['variant']}, {n_groups(row['groups'])}: RSS per group {_size(row['host_rss_per_group'])} "
                     f"host + {_size(row['watchdog_rss_per_group'])} watchdogs{marginal}; stop "
                     f"{_ms(row['stop_ns'])} ms")
    for row in rows:
        if row["unresolved"] or row["not_listed"] or row["handler_errors"]:
            lines.append(f"{row['variant']}, {n_groups(row['groups'])}: {row['unresolved']} OOMs unresolved, "
                         f"{row['not_listed']} hogs not in the victim table when let go, "
                         f"{row['handler_errors']} handler errors")
    return "\n".join(lines)


def header_text(config: ScaleConfig, available: bool, kind: type[ScratchGroup]) -> str:
    """The run's first lines: the machine, and what is measured (*available*: useroom has the Supervisor)."""
    facts = machine()
    supervisor = "" if available else " (useroom.Supervisor not in this useroom: baseline only)"
    wall = f" ({kind.wall_file}; {kind.limit_file} = limit + V2_GAP)" if kind.wall_apart else ""
    return (f"useroom scale benchmark: cgroup v{kind.version}, kernel {facts['kernel']}, {facts['cores']} cores, "
            f"Python {facts['python']}\n"
            f"variants {', '.join(config.variants)}{supervisor}; groups {','.join(map(str, config.groups))} "
            f"(baseline up to {config.baseline_max}); limit {format_size(config.limit)}{wall}, hogs touch "
            f"{format_size(config.hog_size)}; idle {config.idle_seconds:g} s; OOMs: 1 and min({config.ooming}, N) "
            f"at once, {config.oom_rounds} rounds each; watchdog delay {config.delay:g} s")


def machine() -> dict[str, Any]:
    """The facts of the machine the figures are from."""
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return {"kernel": platform.release(), "cores": os.cpu_count(), "python": platform.python_version(),
            "memlock_limit": -1 if soft == resource.RLIM_INFINITY else soft, "uid": os.geteuid(),
            "emulated": os.environ.get("VMRUN_GUEST") == "1"}
