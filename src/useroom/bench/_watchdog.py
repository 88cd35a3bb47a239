"""The watchdog benchmark: how fast a faulty handler's episode reaches the kernel.

``python -m useroom.bench watchdog [--runs N] [--delay 0.5]`` runs each
scenario N times, each in a fresh group (64 MiB, kernel killer off) below the
caller's memcg, with a handler process outside the group and a hog that
touches 128 MiB inside it:

- ``stopped``: the handler is SIGSTOPped before the OOM;
- ``killed``: the handler is SIGKILLed while the hog sleeps in the OOM wait
  (takeover timed from the kill);
- ``delay``: the handler is healthy but its plan does nothing (no victims, no
  kernel fallback), so only the delay ends the episode (overshoot = takeover
  time minus the delay);
- baseline ``stopped, no watchdog``: the same stopped handler without a
  watchdog; an episode still under OOM after ``--stuck-after`` seconds is
  counted as stuck (then rescued).

Figures come from the watchdog's own log (CLOCK_MONOTONIC): notification to
takeover (the kernel killer enabled) and notification to ``under_oom`` 0.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

__all__ = ["main"]

_SERVICE = r"""
import sys, useroom
path, log, delay, mode = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]

class Nobody(useroom.KillLargest):
    def order(self, victims):
        return []

group = useroom.Group.open(path)
handler = useroom.Handler(group, Nobody() if mode == "delay" else useroom.KillLargest(), thresholds=(),
                          kernel_fallback=mode != "delay", delay=delay, watchdog_log=log,
                          watchdog=mode != "nowatchdog")
with handler:
    print("ready", handler.watchdog.pid if handler.watchdog else 0, flush=True)
    sys.stdin.readline()
"""

_HOG = r"""
import mmap, time
size = 128 << 20
m = mmap.mmap(-1, size)
for off in range(0, size, mmap.PAGESIZE):
    m[off] = 1
time.sleep(60)
"""

_PREFIX = "useroom-watchdog-bench-"


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        pass


def _under_oom(group: str) -> bool:
    with open(os.path.join(group, "memory.oom_control")) as f:
        return "under_oom 1" in f.read()


def _wchan(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read()
    except OSError:
        return ""


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def _takeovers(log: str) -> list[dict[str, Any]]:
    try:
        with open(log) as f:
            return [r for r in map(json.loads, f) if r.get("event") == "takeover"]
    except FileNotFoundError:
        return []


def _rescue(group: str, pids: list[int]) -> None:
    """The safety net, with plain file I/O: killer on, no limit, kill, reap, rmdir."""
    _write(os.path.join(group, "memory.oom_control"), "0")
    _write(os.path.join(group, "memory.limit_in_bytes"), "-1")
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while os.path.isdir(group) and time.monotonic() < deadline:
        try:
            with open(os.path.join(group, "cgroup.procs")) as f:
                for pid in map(int, f.read().split()):
                    os.kill(pid, signal.SIGKILL)
            os.rmdir(group)
        except OSError:
            time.sleep(0.01)


def _own_memcg() -> str:
    from useroom.cgroup import Group

    return Group.current().path


def _episode(scenario: str, delay: float, stuck_after: float, workdir: str, n: int) -> dict[str, Any]:
    group = os.path.join(_own_memcg(), f"{_PREFIX}{os.getpid()}-{n}")
    os.mkdir(group)
    log = os.path.join(workdir, f"{n}.jsonl")
    mode = {"stopped": "plain", "killed": "nothing-kill", "delay": "delay", "baseline": "nowatchdog"}[scenario]
    procs: list[subprocess.Popen[str]] = []
    result: dict[str, Any] = {"scenario": scenario}
    try:
        _write(os.path.join(group, "memory.limit_in_bytes"), str(64 << 20))
        service_delay = 30.0 if scenario == "killed" else delay  # the kill, not the delay, must end it
        service = subprocess.Popen([sys.executable, "-c", _SERVICE, group, log, repr(service_delay),
                                    "delay" if mode == "nothing-kill" else mode],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(service)
        assert service.stdout is not None
        words = service.stdout.readline().split()
        if not words or words[0] != "ready":
            raise RuntimeError(f"the handler did not start: {words}")
        result["watchdog_pid"] = int(words[1])
        if scenario in ("stopped", "baseline"):
            os.kill(service.pid, signal.SIGSTOP)
        hog = subprocess.Popen(["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', os.path.join(group, "cgroup.procs"),
                                sys.executable, "-c", _HOG], text=True)
        procs.append(hog)
        if scenario == "killed":
            if not _wait(lambda: _wchan(hog.pid) == "mem_cgroup_oom_synchronize", 10):
                raise RuntimeError("the hog never reached the OOM wait")
            result["killed_ns"] = time.monotonic_ns()
            os.kill(service.pid, signal.SIGKILL)
        if scenario == "baseline":
            _wait(lambda: _under_oom(group), 10)
            result["stuck"] = not _wait(lambda: not _under_oom(group), stuck_after)
        else:
            _wait(lambda: bool(_takeovers(log)), delay + 10)
            found = _takeovers(log)
            if found:
                result["takeover"] = found[0]
    finally:
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.kill(proc.pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        _rescue(group, [p.pid for p in procs] + ([result["watchdog_pid"]] if result.get("watchdog_pid") else []))
        for proc in procs:
            proc.wait(10)
            if proc.stdin:
                proc.stdin.close()
            if proc.stdout:
                proc.stdout.close()
    return result


def _ms(values: list[int]) -> str:
    if not values:
        return "-"
    ranked = sorted(values)

    def pick(q: float) -> float:
        return ranked[min(len(ranked) - 1, max(0, int(q * len(ranked) + 0.999) - 1))] / 1e6

    return f"{pick(0.5):.1f} / {pick(0.99):.1f} / {ranked[-1] / 1e6:.1f}"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m useroom.bench watchdog", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="runs per scenario (default %(default)s)")
    parser.add_argument("--delay", type=float, default=0.5, help="the watchdog's delay, s (default %(default)s)")
    parser.add_argument("--stuck-after", type=float, default=2.0,
                        help="baseline: still under OOM after this long is stuck (default %(default)s s)")
    parser.add_argument("--json", metavar="PATH", help="write every raw figure to PATH")
    args = parser.parse_args(argv)
    rows = []
    raw: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="useroom-watchdog-bench-") as workdir:
        n = 0
        for scenario in ("stopped", "killed", "delay", "baseline"):
            results = []
            for _ in range(args.runs):
                n += 1
                results.append(_episode(scenario, args.delay, args.stuck_after, workdir, n))
            raw.extend(results)
            taken = [r["takeover"] for r in results if "takeover" in r]
            if scenario == "killed":
                to_takeover = [t["acted_ns"] - r["killed_ns"] for r in results if "takeover" in r
                               for t in [r["takeover"]]]
            elif scenario == "delay":
                to_takeover = [t["acted_ns"] - t["notified_ns"] - int(args.delay * 1e9) for t in taken]
            else:
                to_takeover = [t["acted_ns"] - t["notified_ns"] for t in taken]
            to_resolved = [t["resolved_ns"] - t["notified_ns"] for t in taken if t["resolved_ns"]]
            reasons = sorted({t["reason"] for t in taken})
            stuck = sum(bool(r.get("stuck")) for r in results) if scenario == "baseline" else \
                len(results) - len(taken)
            rows.append((scenario, len(results), len(taken), ",".join(reasons) or "-", _ms(to_takeover),
                         _ms(to_resolved), stuck))
    header = ("scenario", "runs", "takeovers", "reason", "to takeover ms p50/p99/max",
              "notify->resolved ms p50/p99/max", "stuck")
    labels = {"stopped": "handler stopped", "killed": "handler killed (from the kill)",
              "delay": f"delay {args.delay:g} s (overshoot)", "baseline": "baseline: stopped, no watchdog"}
    table = [header] + [(labels[r[0]], *map(str, r[1:])) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)).rstrip())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)
    return 0
