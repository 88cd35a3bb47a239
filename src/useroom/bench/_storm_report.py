"""The storm's configuration and its figures: the runs' order, the rounds merged, the rows, the table."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Final, NamedTuple

from useroom.bench._badness import PAGE

if TYPE_CHECKING:
    from useroom.bench._plot import Distributions

__all__ = ["GOALS", "MIB", "VARIANTS", "StormConfig", "below_goal", "distributions", "fmt", "in_order",
           "kill_intervals_ms", "merge", "render", "schedule", "summarize"]

MIB: Final = 1 << 20
#: The baseline first: the useroom row's kill rate is given relative to it.
VARIANTS: Final = ("kernel", "useroom")

#: The goals of the useroom variant, as data: (figure, key of the row, test, shown).
GOALS: Final[tuple[tuple[str, str, Callable[[Any], bool], str], ...]] = (
    ("kernel kills in the group", "kernel_kills", lambda v: v == 0, "0"),
    ("supervisor killed", "supervisor_killed", lambda v: v == 0, "0"),
    ("handler alive at the end", "handler_alive", lambda v: v is True, "yes"),
    ("kill rate vs the kernel's", "rate_ratio", lambda v: v is not None and v >= 0.9, ">= 0.9x"),
    ("victim agreement", "agreement_pct", lambda v: v is not None and v >= 95.0, ">= 95%"),
)


class StormConfig(NamedTuple):
    #: Storm time per variant, split over the rounds.
    seconds: float = 10.0
    #: Each variant runs this many times, alternating in ABBA order (kernel,
    #: useroom, useroom, kernel, ...): the machine's load drifts (another
    #: guest on the same cores), and both variants then see it alike.
    rounds: int = 2
    workers: int = 2
    worker_size: int = 200 * MIB
    limit: int = 64 * MIB
    driver: str = "python"
    #: One of PAGES: what the workers' memory is made of.
    pages: str = "small"
    sample_ms: float = 2.0
    #: The periodic snapshots may take this share of one CPU: the interval
    #: grows to (cost of the last snapshot / budget) when that is longer than
    #: sample_ms (the emulated guest's reads are ~10x slower, on one core).
    sample_budget: float = 0.1
    max_age_ms: float = 50.0
    #: cgroup v2, useroom variant: memory.max this far above the wall
    #: (twice the handler's least gap, as the hooks benchmark's).
    gap: int = 32 * MIB
    #: "equal": the useroom variant's limit (v2: wall and memory.max) is
    #: raised by the handler process's own charge, so that the workload has
    #: the room it has in the kernel variant; "shared": the handler's charge
    #: comes out of the workload's room.
    room: str = "equal"


def schedule(variants: Iterable[str], rounds: int) -> list[str]:
    """The runs in order: the variants, then reversed, and so on (ABBA):
    a load that rises or falls steadily during the benchmark weighs alike on each."""
    order = list(variants)
    return [mode for number in range(rounds) for mode in (order if number % 2 == 0 else order[::-1])]


def in_order(raw: dict[str, list[dict[str, Any]]], rounds: int) -> list[tuple[str, dict[str, Any]]]:
    """The runs that finished, in the order of :func:`schedule`."""
    taken = {mode: iter(runs) for mode, runs in raw.items()}
    runs = []
    for mode in schedule(raw, rounds):
        run = next(taken[mode], None)
        if run is not None:
            runs.append((mode, run))
    return runs


def merge(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One variant's rounds as one: counts and times added, lists joined,
    the worst of each state kept. A round whose handler record was lost makes
    the handler's figures unknown."""
    handlers = [r.get("handler") for r in rounds]
    snapshots = sum(r["snapshots"] for r in rounds)
    useroom = rounds[0]["mode"] == "useroom"
    return {
        "mode": rounds[0]["mode"],
        "rounds": len(rounds),
        "seconds": sum(r["seconds"] for r in rounds),
        "sampled_s": sum(r["sampled_s"] for r in rounds),
        "kernel_kills": sum(r["kernel_kills"] for r in rounds),
        "ooms": sum(r["ooms"] for r in rounds),
        "snapshots": snapshots,
        "snapshot_us_mean": sum(r["snapshot_us_mean"] * r["snapshots"] for r in rounds) / max(1, snapshots),
        "sampling_cpu_share": max(r["sampling_cpu_share"] for r in rounds),
        "growth_pages_per_ms": max(r["growth_pages_per_ms"] for r in rounds),
        "supervisor_deaths": [d for r in rounds for d in r["supervisor_deaths"]],
        "verdicts": [v for r in rounds for v in r["verdicts"]],
        "roles": {pid: role for r in rounds for pid, role in r["roles"].items()},
        "left_after_kill": [pid for r in rounds for pid in r["left_after_kill"]],
        "handler_alive": all(r["handler_alive"] for r in rounds) if useroom else None,
        "handler_rss_kb": max((r["handler_rss_kb"] for r in rounds if r["handler_rss_kb"] is not None), default=None),
        "usage_before_storm": max(r["usage_before_storm"] for r in rounds),
        "handler": None if not useroom or any(h is None for h in handlers) else {
            "events": [e for h in handlers if h is not None for e in h["events"]],
            "errors": [e for h in handlers if h is not None for e in h["errors"]],
        },
    }


def summarize(raw: dict[str, Any], kernel: dict[str, Any] | None) -> dict[str, Any]:
    """One row of the table from a variant's :func:`merge` d rounds (*kernel*: the baseline's, for the ratio)."""
    from useroom.bench._report import percentile

    useroom = raw["mode"] == "useroom"
    record = raw["handler"]
    events = record["events"] if record is not None else []
    # A handler that died took its record with it: its episodes and kills are unknown, not 0.
    handler_kills = sum(1 for event in events for victim in event["victims"]
                        if victim["signal"] == "SIGKILL" and victim["result"] == 0) if record is not None else None
    verdicts = raw["verdicts"]
    measured = [v for v in verdicts if v["match"] is not None]
    matches = sum(1 for v in measured if v["match"])
    unmeasured: dict[str, int] = {}
    for verdict in verdicts:
        if verdict["reason"] is not None:
            unmeasured[verdict["reason"]] = unmeasured.get(verdict["reason"], 0) + 1
    ages = [v["age_ns"] for v in measured]
    seconds = raw["seconds"]
    kills = handler_kills if useroom else raw["kernel_kills"]
    rate = kills / seconds if kills is not None and seconds else None
    if useroom:
        kernel_rate = summarize(kernel, None)["kills_per_s"] if kernel is not None else None
    else:
        kernel_rate = rate  # the baseline itself
    return {
        "variant": raw["mode"],
        "rounds": raw["rounds"],
        "seconds": seconds,
        "notifications": raw["ooms"],
        "episodes": len(events) if record is not None else None,
        "handler_rss_kb": raw["handler_rss_kb"],
        "usage_before_storm": raw["usage_before_storm"],
        "handler_kills": handler_kills,
        "kernel_kills": raw["kernel_kills"],
        "supervisor_killed": len(raw["supervisor_deaths"]),
        "supervisor_victims": sum(1 for v in verdicts if raw["roles"].get(str(v["pid"])) == "supervisor"),
        "handler_alive": raw["handler_alive"],
        "takeovers": sum(1 for event in events if event["takeover"]) if record is not None else None,
        "handler_errors": len(record["errors"]) if record is not None else None,
        "kills_per_s": rate,
        "rate_ratio": rate / kernel_rate if rate is not None and kernel_rate else None,
        "victims": len(verdicts),
        "measured": len(measured),
        "matches": matches,
        "beaten_by_earlier_victim": sum(1 for v in measured if v.get("beaten_by_earlier_victim")),
        "mismatched": [v for v in measured if not v["match"]][:5],
        "agreement_pct": 100.0 * matches / len(measured) if measured else None,
        "unmeasured": unmeasured,
        "age_p50_ms": _ms(percentile(ages, 0.5)),
        "age_max_ms": _ms(max(ages) if ages else None),
        "growth_mib_per_ms": raw["growth_pages_per_ms"] * PAGE / MIB,
        "snapshots": raw["snapshots"],
        "snapshot_us_mean": raw["snapshot_us_mean"],
        "snapshot_interval_ms": 1e3 * raw["sampled_s"] / raw["snapshots"] if raw["snapshots"] else None,
        "sampling_cpu_share": raw["sampling_cpu_share"],
    }


def kill_intervals_ms(run: dict[str, Any]) -> list[float]:
    """From each kill to the next in one run (a round), in ms: the storm's
    cycle of respawn, refill, OOM and kill. Not across the benchmark's own
    restart of a killed supervisor. The kills are the judged ones: the
    handler's signals, or the kernel's victims as the first snapshot
    without them times them."""
    times = sorted(verdict["t_ns"] for verdict in run["verdicts"])
    quiet = run.get("restarts") or []
    return [(later - earlier) / 1e6 for earlier, later in pairwise(times)
            if not any(start <= later and end >= earlier for start, end in quiet)]


def distributions(raw: dict[str, list[dict[str, Any]]], rows: list[dict[str, Any]], config: StormConfig,
                  machine: str) -> Distributions:
    """Each variant's time between kills, for ``--plot``, its kill rate in
    its note; *machine*: the kernel, cgroup version and cores."""
    from useroom._units import format_size
    from useroom.bench._plot import Distributions, Series

    rates = {row["variant"]: row["kills_per_s"] for row in rows}
    series = [Series(mode, [ms for run in raw[mode] for ms in kill_intervals_ms(run)],
                     note=f"{fmt(rates.get(mode), '.1f')} kills/s")
              for mode in VARIANTS if raw.get(mode)]
    return Distributions(
        title="useroom storm benchmark: time between kills, the kernel OOM killer and useroom side by side",
        subtitle=f"{machine}; driver {config.driver}, {config.workers} workers x {format_size(config.worker_size)} "
                 f"on {config.pages} pages in {format_size(config.limit)}; {config.seconds:g} s per variant "
                 f"in {config.rounds} rounds",
        quantity="from one kill to the next (ms)",
        series=series,
        footnote=f"within a round, not across a restart of a killed supervisor. useroom: the handler's signals; "
                 f"kernel: the first snapshot of the group without the victim (every {config.sample_ms:g} ms or "
                 f"more), so two kills may share a time",
    )


def _ms(ns: int | None) -> float | None:
    return None if ns is None else ns / 1e6


def fmt(value: Any, spec: str = "", suffix: str = "") -> str:
    """*value* formatted with *spec* and *suffix*; "-" for None."""
    return "-" if value is None else format(value, spec) + suffix


def render(rows: list[dict[str, Any]], header: str, config: StormConfig, ooms_counted: str) -> str:
    """The table, and what its figures are; *ooms_counted*: what the OOM count is (the cgroup version's)."""
    from useroom._units import format_size

    columns = ("variant", "OOMs", "handler episodes", "handler kills", "kernel kills", "supervisor killed",
               "handler alive", "kills/s", "vs kernel", "agreement", "measured", "not measured",
               "snapshot age p50/max ms")
    lines = [columns]
    for r in rows:
        alive = None if r["handler_alive"] is None else ("yes" if r["handler_alive"] else "NO")
        lines.append((
            r["variant"], str(r["notifications"]), fmt(r["episodes"]), fmt(r["handler_kills"]),
            str(r["kernel_kills"]), str(r["supervisor_killed"]), fmt(alive), fmt(r["kills_per_s"], ".1f"),
            fmt(r["rate_ratio"], ".2f", "x"),
            fmt(r["agreement_pct"], ".1f", "%"), f"{r['measured']}/{r['victims']}",
            str(sum(r["unmeasured"].values())),
            f"{fmt(r['age_p50_ms'], '.2f')} / {fmt(r['age_max_ms'], '.2f')}",
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    out = [header, ""]
    out += ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)).rstrip() for line in lines]
    out.append("")
    out.append(f"OOMs: {ooms_counted}; handler episodes: the handler's own record of the OOMs it handled. Each run's "
               f"storm time starts at its first OOM notification (the driver's start before it is not storm): "
               f"kernel {_seconds(rows, 'kernel')}, useroom {_seconds(rows, 'useroom')} in all.")
    for r in rows:
        if r["variant"] == "useroom" and r["usage_before_storm"] is not None:
            charged = (f"The handler process is charged {r['usage_before_storm'] / MIB:.1f} MiB of the group "
                       f"before the storm ({(r['handler_rss_kb'] or 0) / 1024:.1f} MiB RSS at the end)")
            if config.room == "equal":
                out.append(charged + f": its limit was raised by that much above {format_size(config.limit)} "
                                     "(--room equal), so that the workload has the kernel variant's room.")
            else:
                out.append(charged + f" of its {format_size(config.limit)}: the workers have that much less room "
                                     "than in the kernel variant (--room shared), so each fills it sooner.")
    growth = ", ".join(f"{r['variant']} {r['growth_mib_per_ms']:.2f} MiB/ms" for r in rows)
    seen = "; ".join(f"{r['victims']} of its {r['kernel_kills']} kills seen" for r in rows if r["variant"] == "kernel")
    sampling = ", ".join(f"{r['variant']} every {fmt(r['snapshot_interval_ms'], '.1f')} ms on average, "
                         f"{fmt(r['snapshot_us_mean'], '.0f')} us each" for r in rows)
    out.append(f"agreement: each victim against the task with the highest oom_badness (RSS + swap + page tables, "
               f"oom_score_adj scaled to the limit) in this process's latest snapshot of the group before the "
               f"signal, with no kill in between. Snapshots: at each OOM notification and every "
               f"{config.sample_ms:g} ms, or less often so as to take at most {config.sample_budget:.0%} of a "
               f"CPU ({sampling}). A verdict that the tasks' growth since the snapshot could turn (at the "
               f"run's 99th-percentile growth: {growth}) is too close to call. The kernel row judges the "
               f"kernel's own victims (tasks gone between two snapshots: {seen}) against the same snapshots: the "
               f"accuracy of the measurement itself.")
    for r in rows:
        if r["variant"] == "useroom" and r["handler_kills"] is None:
            out.append("useroom: the handler's record was lost (it died before it was stopped): its episodes and "
                       "kills are unknown, and no kill could be judged")
        if r["beaten_by_earlier_victim"]:
            out.append(f"mismatches ({r['variant']}): {r['beaten_by_earlier_victim']} of the "
                       f"{r['measured'] - r['matches']} killed a task while an earlier victim, still exiting, held "
                       f"more memory (the kernel would have chosen it and waited for it)")
        for v in r.get("mismatched", ()):
            out.append(f"mismatch ({r['variant']}): killed {v['pid']} ({v['name'] or '?'}, "
                       f"{v['victim_pages'] * _PAGE_KIB} KiB) where oom_badness names {v['pick']} "
                       f"({v['pick_pages'] * _PAGE_KIB} KiB) in a snapshot {v['age_ns'] / 1e6:.1f} ms old "
                       f"(by {v['t_from']})")
        if r["unmeasured"]:
            reasons = ", ".join(f"{count} {reason}" for reason, count in sorted(r["unmeasured"].items()))
            out.append(f"not measured ({r['variant']}): {reasons}")
    return "\n".join(out)


_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024

def _seconds(rows: list[dict[str, Any]], variant: str) -> str:
    return next((f"{r['seconds']:.1f} s" for r in rows if r["variant"] == variant), "-")


def below_goal(row: dict[str, Any]) -> list[str]:
    return [f"{name}: {_shown(row[key])} (goal {goal})" for name, key, test, goal in GOALS if not test(row[key])]


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.2f}"
    return "-" if value is None else str(value)
