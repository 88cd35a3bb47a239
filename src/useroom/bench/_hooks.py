"""The hooks benchmark: a service whose cache outgrows its group, kept alive by an on_oom hook.

``python -m useroom.bench hooks [--seconds S] [--runs N] [--limit 96M]`` runs
``examples/cache_service.py``'s workload N times, each in a fresh group below
the caller's memcg, in a child process that is the service and its own
handler. It reports, over all runs: OOM episodes, how many the hook resolved
and how many needed the fallback (a kill, the kernel), tasks killed, and the
latency from the native notification to the hook starting (p50, p99, max).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import Any

__all__ = ["main"]

_SERVICE = r"""
import collections, json, os, sys, threading, time
import useroom
seconds, limit, threads = float(sys.argv[1]), sys.argv[2], int(sys.argv[3])
entries = collections.OrderedDict()
lock = threading.Lock()
home = useroom.Group.current()
group = home.create_child(f"useroom-hooks-bench-{os.getpid()}", memory_max=limit)
try:
    group.attach(os.getpid())
    handler = useroom.Handler(group, reserve="16M")

    @handler.on_oom
    def shed(ctx):
        with lock:
            n = len(entries) // 2
            for _ in range(n):
                entries.popitem(last=False)
        return n > 0

    stop = threading.Event()
    served = [0] * threads

    def serve(i):
        key = i
        while not stop.is_set():
            with lock:
                hit = key in entries
            if not hit:
                value = key.to_bytes(8, "little") * 8192
                with lock:
                    entries[key] = value
            served[i] += 1
            key += threads
            time.sleep(0.0002)

    with handler:
        ts = [threading.Thread(target=serve, args=(i,)) for i in range(threads)]
        for t in ts:
            t.start()
        stop.wait(seconds)
        stop.set()
        for t in ts:
            t.join()
    acted = [e for e in handler.events if e.outcome != "not_needed"]
    print(json.dumps({
        "served": sum(served),
        "episodes": len(acted),
        "by_hooks": sum(e.resolved_by == "hooks" for e in acted),
        "fallback": sum(e.fallback or (e.resolved_by not in (None, "hooks")) for e in acted),
        "unresolved": sum(e.outcome not in ("resolved", "superseded") for e in acted),
        "killed": sum(len(e.victims) for e in acted),
        "notify_to_hook_ns": [e.notify_to_hook_ns for e in acted if e.notify_to_hook_ns is not None],
    }))
finally:
    home.attach(os.getpid())
    group.remove(force=True)
"""


def _pct(values: list[int], q: float) -> float:
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, int(round(q * len(ranked) + 0.5)) - 1))]


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m useroom.bench hooks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--limit", default="96M")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.seconds <= 0:
        parser.error("--runs must be >= 1 and --seconds > 0")

    runs: list[dict[str, Any]] = []
    for _ in range(args.runs):
        done = subprocess.run([sys.executable, "-c", _SERVICE, str(args.seconds), args.limit, str(args.threads)],
                              capture_output=True, text=True, timeout=args.seconds + 120)
        if done.returncode != 0:
            runs.append({"error": f"service exited with {done.returncode}: {done.stderr.strip()[-500:]}"})
            continue
        runs.append(json.loads(done.stdout))
    ok = [r for r in runs if "error" not in r]
    latencies = [n for r in ok for n in r["notify_to_hook_ns"]]
    total = {key: sum(r[key] for r in ok) for key in ("served", "episodes", "by_hooks", "fallback",
                                                      "unresolved", "killed")}
    print("useroom hooks benchmark: a threaded service whose cache outgrows its group; "
          "its on_oom hook drops half the cache")
    print(f"kernel {os.uname().release}, {os.cpu_count()} cores; {args.runs} runs x {args.seconds} s, "
          f"limit {args.limit}, {args.threads} serving threads, reserve 16M")
    print(f"runs that failed: {len(runs) - len(ok)}")
    print(f"requests served: {total['served']}; OOM episodes: {total['episodes']}; "
          f"resolved by the hook: {total['by_hooks']}; needed the fallback: {total['fallback']}; "
          f"unresolved: {total['unresolved']}; tasks killed: {total['killed']}")
    if latencies:
        print(f"notification -> hook start: p50 {_pct(latencies, 0.5) / 1e6:.3f} ms, "
              f"p99 {_pct(latencies, 0.99) / 1e6:.3f} ms, max {max(latencies) / 1e6:.3f} ms, "
              f"mean {statistics.fmean(latencies) / 1e6:.3f} ms over {len(latencies)} episodes")
    for r in runs:
        if "error" in r:
            print(r["error"], file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "total": total}, f)
    return 0 if len(ok) == len(runs) else 1
