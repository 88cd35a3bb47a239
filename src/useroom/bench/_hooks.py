"""The hooks benchmark: services that shed their cache in an ``on_oom`` hook,
in a matrix of allocation shapes, side by side with the kernel OOM killer.

``python -m useroom.bench hooks [--seconds S] [--limit 96M] [--shapes ...]``

Each shape (see :mod:`useroom.bench._hook_service`) runs twice, each time
in a fresh group below the caller's memory cgroup with the same limit:

- ``useroom``: the service is inside its group with a Handler (KillLargest)
  whose hook drops the oldest half of its cache; the group's limit is the
  wall (cgroup v1: the kernel killer off; v2: ``memory.high``, with
  ``memory.max`` two reserves above it);
- ``kernel``: no handler; the kernel OOM killer meets the limit (v2:
  ``memory.max``). A killed service is started again until the time is up.

Per shape it reports: episodes, the share the hooks resolved, kills of the
service (any of its processes: by the handler's plan, by the kernel, or a
death), grants left open at the end, the time from the notification to the
hook starting (p50, p99), the bytes each hook run gave back (median), and
what was served (allocations), for both variants.

The reserve is what the hooks' headroom grant may use. Before the hook
thread gets the GIL, each allocating thread may finish the allocation it is
in and start one more, so a shape needs a reserve of about (threads x
largest object); the benchmark sizes it so (at least 16M) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from useroom._units import format_size, parse_size
from useroom.bench._sandbox import Child, Lab, ScratchGroup, die_with_parent

__all__ = ["SHAPES", "Shape", "main", "run_shape"]

KIB, MIB = 1 << 10, 1 << 20


class Shape:
    """One workload of the matrix."""

    def __init__(self, kind: str, size: int, threads: int) -> None:
        self.kind, self.size, self.threads = kind, size, threads

    @property
    def name(self) -> str:
        if self.kind == "small":
            return f"small objects x{self.threads}"
        if self.kind == "mixed":
            return f"mixed 4K-{format_size(self.size)} x{self.threads}"
        if self.kind == "procs":
            return f"{self.threads} processes {format_size(self.size)}"
        return f"{format_size(self.size)} x{self.threads}"

    def reserve(self) -> int:
        """Threads: each may finish the allocation it is in and start one
        more before the hook thread has the GIL. Processes are stopped for
        the hooks, and continued to shed: each may finish an allocation on
        either side."""
        if self.kind == "procs":
            return max(16 * MIB, 2 * self.threads * self.size + 8 * MIB)
        per_thread = self.size if self.kind != "small" else 1 * MIB
        return max(16 * MIB, self.threads * per_thread + 8 * MIB)

    @classmethod
    def parse(cls, text: str) -> Shape:
        """``objects:1M:2``, ``small::4``, ``mixed:4M:2``, ``procs:1M:3``."""
        kind, size, threads = text.split(":")
        return cls(kind, parse_size(size) if size else 0, int(threads))


SHAPES = [
    *(Shape("objects", size, threads) for size in (4 * KIB, 64 * KIB, 1 * MIB, 8 * MIB) for threads in (1, 2, 4)),
    Shape("small", 0, 2),
    Shape("mixed", 4 * MIB, 2),
    Shape("procs", 1 * MIB, 3),
]


def _start(lab: Lab, group: ScratchGroup, spec: dict[str, Any]) -> tuple[subprocess.Popen[str], Child]:
    proc = subprocess.Popen([sys.executable, "-m", "useroom.bench", "_hook_service", json.dumps(spec)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
    child = lab.adopt(proc.pid, proc)
    assert proc.stdout is not None and proc.stdin is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"the service did not start (exit {proc.wait()})")
    group.attach(proc.pid)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return proc, child


def _finish(child: Child, deadline: float) -> int:
    """Waits for the service until ``deadline``, then kills it; its wait status."""
    if not child.wait(max(1.0, deadline - time.monotonic())):
        child.kill()
        child.wait(30)
    lab_status = child.reap()
    return 0 if os.WIFEXITED(lab_status) and os.WEXITSTATUS(lab_status) == 0 else lab_status or 1


def run_shape(lab: Lab, shape: Shape, *, limit: int, seconds: float, mode: str, hold_arm_at: float = 0.0,
              workdir: str) -> dict[str, Any]:
    """Runs one shape in one mode; returns its figures."""
    reserve = shape.reserve()
    tag = f"hooks-{mode}"
    group = lab.create_group(tag, limit=limit, kill_disable=False)
    if mode == "useroom":
        group.hold_wall(limit, 2 * reserve)  # v2: memory.high, with memory.max two reserves above it
    out = os.path.join(workdir, f"{group.name}.json")
    spec = {"shape": shape.kind, "size": shape.size, "threads": shape.threads, "seconds": seconds, "mode": mode,
            "reserve": reserve, "out": out, "hold_arm_at": hold_arm_at}
    figures: dict[str, Any] = {"shape": shape.name, "mode": mode, "reserve": reserve, "service_kills": 0,
                               "served": 0, "events": [], "runs": 0, "deaths": []}
    try:
        ends = time.monotonic() + seconds
        while True:
            left = ends - time.monotonic()
            if left < 0.5:
                break
            spec["seconds"] = left
            proc, child = _start(lab, group, spec)
            try:
                code = _finish(child, time.monotonic() + left + 60)
            finally:
                for pipe in (proc.stdin, proc.stdout):
                    if pipe is not None:
                        pipe.close()
            lab.forget(child)
            figures["runs"] += 1
            if os.path.exists(out):
                with open(out) as f:
                    data = json.load(f)
                os.unlink(out)
                figures["served"] += data["served"]
                figures["events"].extend(data.get("events", []))
                figures["errors"] = data.get("errors", [])
            elif os.path.exists(out + ".served"):
                with open(out + ".served") as f:
                    figures["served"] += int(f.read().strip() or 0)  # killed: what it reported last
            if code != 0:
                figures["deaths"].append(code)
                figures["service_kills"] += 1
            if mode == "useroom":
                break  # a handled service is never restarted: a death counts and ends the run
        figures["kernel_kills"] = group.oom_control().oom_kill
        events = figures["events"]
        # Every kill in the group is one of the service's processes; a
        # restarted service the kernel killed is also a death: counted once.
        deaths = len(figures["deaths"])
        figures["service_kills"] = (figures["kernel_kills"] + sum(len(e["victims"]) for e in events)
                                    + max(0, deaths - figures["kernel_kills"]))
        figures["grants_left_open"] = sum(e["grant_left_open"] for e in events)
        # A wall the kernel refuses below the usage (v1) may not have been put back.
        if group.wall_write_checks_fit and group.wall() != limit:
            figures["grants_left_open"] += 1
    finally:
        lab.release(group)
    return figures


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, int(round(q * len(ranked) + 0.5)) - 1))]


def summarize(useroom_run: dict[str, Any], kernel_run: dict[str, Any]) -> dict[str, Any]:
    events = useroom_run["events"]
    by_hooks = sum(e["resolved_by"] == "hooks" for e in events)
    starts = [e["notify_to_hook_ns"] / 1e6 for e in events if e["notify_to_hook_ns"] is not None]
    released = [r for e in events for r in e["released"]]
    return {
        "shape": useroom_run["shape"],
        "reserve": useroom_run["reserve"],
        "episodes": len(events),
        "by_hooks_pct": 100.0 * by_hooks / len(events) if events else None,
        "service_kills": useroom_run["service_kills"],
        "grants_left_open": useroom_run["grants_left_open"],
        "hook_start_p50_ms": _pct(starts, 0.5),
        "hook_start_p99_ms": _pct(starts, 0.99),
        "released_per_hook": statistics.median(released) if released else None,
        "served": useroom_run["served"],
        "kernel_service_kills": kernel_run["service_kills"],
        "kernel_served": kernel_run["served"],
    }


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict[str, Any]], out: Any = sys.stdout) -> None:
    header = ("shape", "reserve", "episodes", "by hooks", "kills", "grants open", "hook start p50/p99 ms",
              "released/hook", "served", "| kernel: kills", "served")
    lines = [header]
    for r in rows:
        lines.append((
            r["shape"], format_size(r["reserve"]), str(r["episodes"]), _fmt(r["by_hooks_pct"], ".1f") + "%",
            str(r["service_kills"]), str(r["grants_left_open"]),
            f"{_fmt(r['hook_start_p50_ms'], '.2f')} / {_fmt(r['hook_start_p99_ms'], '.2f')}",
            format_size(int(r["released_per_hook"])) if r["released_per_hook"] is not None else "-",
            str(r["served"]), f"| {r['kernel_service_kills']}", str(r["kernel_served"]),
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)).rstrip(), file=out)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m useroom.bench hooks", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="per shape and variant (default %(default)s)")
    parser.add_argument("--limit", default="96M", help="the group's limit (v2: the wall) (default %(default)s)")
    parser.add_argument("--shapes", default="", help="comma-separated KIND:SIZE:THREADS (default: the matrix)")
    parser.add_argument("--hold-arm-at", type=float, default=0.0,
                        help="the handler's hold_arm_at (default %(default)s: always armed)")
    parser.add_argument("--json", metavar="PATH", help="write every raw figure to PATH")
    args = parser.parse_args(argv)
    if args.seconds <= 1:
        parser.error("--seconds must be > 1")
    limit = parse_size(args.limit)
    shapes = [Shape.parse(s) for s in args.shapes.split(",") if s] or SHAPES
    rows, raw = [], []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))
    try:
        with Lab.below_own_memcg() as lab, tempfile.TemporaryDirectory(prefix="useroom-hooks-bench-") as workdir:
            lab.sweep_stale()
            print(f"useroom hooks benchmark: cgroup v{lab.version}, kernel {os.uname().release}, "
                  f"{os.cpu_count()} cores, limit {format_size(limit)}, {args.seconds:g} s per shape and variant, "
                  f"hold_arm_at {args.hold_arm_at:g}"
                  + (" (EMULATED guest)" if os.environ.get("VMRUN_GUEST") else ""), flush=True)
            for shape in shapes:
                mine = run_shape(lab, shape, limit=limit, seconds=args.seconds, mode="useroom",
                                 hold_arm_at=args.hold_arm_at, workdir=workdir)
                theirs = run_shape(lab, shape, limit=limit, seconds=args.seconds, mode="kernel", workdir=workdir)
                raw.append({"useroom": mine, "kernel": theirs})
                row = summarize(mine, theirs)
                rows.append(row)
                print(f"  {shape.name}: {row['episodes']} episodes, {_fmt(row['by_hooks_pct'], '.1f')}% by hooks, "
                      f"{row['service_kills']} service kills (kernel: {row['kernel_service_kills']})", flush=True)
            print()
            print_table(rows)
            if lab.problems:
                print("cleanup problems:", *lab.problems, sep="\n  ", file=sys.stderr)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "raw": raw}, f, default=str)
    failing = [r["shape"] for r in rows if r["service_kills"] or (r["by_hooks_pct"] or 0) < 95]
    if failing:
        print(f"below the goal (>= 95% by hooks, 0 service kills): {', '.join(failing)}")
    return 0
