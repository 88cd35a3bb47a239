"""Starts handlers under a lowered RLIMIT_NOFILE or RLIMIT_NPROC; run by
tests/test_start_limits.py in a process of its own (the limits are the
process's, or its user's).

``python _start_limits_probe.py nofile|nproc GROUP_DIR`` joins the group
directory (the caller's scratch or delegated group), makes ``app`` below
it with a limit, and handles that group from outside it, with an
``on_oom`` hook so that every thread a handler may start is started:

1. one start and stop with the limit as inherited, counting what a
   running handler holds (fds, or this user's tasks);
2. a sweep upward from what the process holds before any start: at each
   value of the soft limit, one start, until one succeeds; that value is
   what start needs;
3. starts with the limit at 1, 2 and 4 times what start needs.

After each start that failed, and after each stop, it records what was
left behind compared with before (fds, threads, child processes, zombies
included, and the group's OOM killer setting and limit). It prints one
JSON report.
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import sys
import time
from typing import Any

from useroom import Group, Handler, ResourceLimitError, UseroomError

#: How long a thread that Python has joined may take to leave /proc/self/task.
SETTLE = 5.0
#: The sweep gives up this far above what a running handler holds.
SWEEP_MARGIN = 16


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            pass  # the listing's own fd
    return out


def _threads() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(pathlib.Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except FileNotFoundError:
            pass
    return names


def _children() -> list[list[str]]:
    """Every process whose parent is this one, zombies included: [pid, name, state]."""
    out = []
    me = str(os.getpid())
    for entry in os.listdir("/proc"):
        if not entry.isdecimal():
            continue
        try:
            fields = dict(line.split(":\t", 1) for line in
                          pathlib.Path(f"/proc/{entry}/status").read_text().splitlines() if ":\t" in line)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields.get("PPid", "").strip() == me:
            out.append([entry, fields["Name"].strip(), fields["State"].strip()])
    return out


def _user_tasks() -> int:
    """The tasks (threads) of this process's real uid: what RLIMIT_NPROC counts."""
    uid = str(os.getuid())
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdecimal():
            continue
        try:
            fields = dict(line.split(":\t", 1) for line in
                          pathlib.Path(f"/proc/{entry}/status").read_text().splitlines() if ":\t" in line)
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields.get("Uid", "").split()[:1] == [uid]:
            count += int(fields.get("Threads", "1"))
    return count


class Probe:
    def __init__(self, kind: str, app: Group) -> None:
        self.kind = kind
        self.which = resource.RLIMIT_NOFILE if kind == "nofile" else resource.RLIMIT_NPROC
        self.app = app
        self.inherited = resource.getrlimit(self.which)
        self.fds = _fds()
        self.state = self._group_state()

    def _group_state(self) -> list[Any]:
        return [self.app.oom_control().kill_disabled, self.app.limit()]

    def left(self) -> dict[str, Any]:
        """What differs from before any start: empty if nothing was left behind."""
        deadline = time.monotonic() + SETTLE
        while len(_threads()) > 1 and time.monotonic() < deadline:
            time.sleep(0.001)  # a joined thread leaves the task list a moment after Python saw it end
        out: dict[str, Any] = {}
        fds = _fds()
        extra = {fd: target for fd, target in fds.items() if self.fds.get(fd) != target}
        if extra or set(fds) != set(self.fds):
            out["fds"] = {str(fd): target for fd, target in extra.items()}
            out["fds_gone"] = sorted(set(self.fds) - set(fds))
        threads = _threads()
        if len(threads) != 1:
            out["threads"] = threads
        children = _children()
        if children:
            out["children"] = children
        state = self._group_state()
        if state != self.state:
            out["group"] = state
        return out

    def held(self) -> int:
        """What a running handler holds of the limit: its highest fd + 1, or its user's tasks."""
        return max(_fds()) + 1 if self.kind == "nofile" else _user_tasks()

    def start(self, soft: int | None) -> tuple[dict[str, Any], int]:
        """One start (and stop) with the soft limit at *soft* (None: as inherited): its outcome and
        what the running handler held (0 if it did not start)."""
        handler = Handler(self.app, thresholds=(0.5,))
        handler.on_oom(lambda ctx: False)
        if soft is not None:
            resource.setrlimit(self.which, (soft, self.inherited[1]))
        held = 0
        try:
            handler.start()
        except ResourceLimitError as err:
            outcome: dict[str, Any] = {
                "outcome": "ResourceLimitError", "errno": err.errno, "limit": err.limit, "value": err.value,
                "message": str(err), "oserror": isinstance(err, OSError), "useroom": isinstance(err, UseroomError)}
        except Exception as err:  # noqa: BLE001 - reported to the test, which fails on it
            outcome = {"outcome": type(err).__name__, "message": str(err)}
        else:
            try:
                held = self.held()
                link = handler.watchdog
                outcome = {"outcome": "started", "watchdog": bool(link is not None and not link.exited())}
            finally:
                handler.stop()
        finally:
            resource.setrlimit(self.which, self.inherited)
        outcome["left"] = self.left()
        outcome["soft"] = soft
        return outcome, held

    def run(self) -> dict[str, Any]:
        report: dict[str, Any] = {"kind": self.kind, "before": self.held()}
        first, running = self.start(None)
        report["first"] = first
        report["running"] = running
        sweep = []
        need = None
        for soft in range(report["before"], running + SWEEP_MARGIN):
            outcome, _ = self.start(soft)
            sweep.append(outcome)
            if outcome["outcome"] == "started":
                need = soft
                break
        report["sweep"] = sweep
        report["need"] = need
        if need is not None:
            report["factors"] = [self.start(factor * need)[0] for factor in (1, 2, 4)]
        return report


def main(kind: str, directory: str) -> None:
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])  # only what this process opens counts
    with open(os.path.join(directory, "cgroup.procs"), "w") as procs:
        procs.write(str(os.getpid()))
    app_dir = os.path.join(directory, "app")
    os.mkdir(app_dir)
    app = Group.open(app_dir)
    app.set_limit(64 << 20)
    report = Probe(kind, app).run()
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    assert sys.argv[1] in ("nofile", "nproc"), sys.argv
    main(sys.argv[1], sys.argv[2])
