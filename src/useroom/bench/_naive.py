"""A naive in-group OOM handler: what a careful Python programmer writes first.

Run by path (``python -I .../_naive.py GROUP_DIR first|largest``), so it
imports nothing but the standard library. It joins the group, registers an
eventfd on ``memory.oom_control`` through ``cgroup.event_control``, prints
``ready``, and then for every notification reads ``cgroup.procs`` and
SIGKILLs a victim: the first pid that is not itself (``first``, the most
generous choice: the least work) or the one with the most resident pages
(``largest``, from ``/proc/<pid>/statm``). A failed attempt (ENOMEM from the
kernel during the OOM) is retried a bounded number of times.

On SIGTERM it prints one JSON line: how often it woke, how many processes it
killed, and which errors it met how often. It has no defence against the page
faults and kernel allocations that put it to sleep with the tasks it should
rescue; that is the point.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys

RETRIES = 100


class _Stop(Exception):
    pass


def _stop(signum: int, frame: object) -> None:
    raise _Stop


class _Failed(Exception):
    def __init__(self, step: str, err: OSError) -> None:
        super().__init__(step, err)
        self.what = f"{errno.errorcode.get(err.errno or 0, type(err).__name__)} in {step}"


def _procs(group: str) -> list[int]:
    try:
        file = open(os.path.join(group, "cgroup.procs"))
    except OSError as err:
        raise _Failed("opening cgroup.procs", err) from err
    with file:
        try:
            return [int(line) for line in file.read().split()]
        except OSError as err:
            raise _Failed("reading cgroup.procs", err) from err


def _rss_pages(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as file:
        return int(file.read().split()[1])


def _victim(group: str, me: int, pick: str) -> int | None:
    others = [pid for pid in _procs(group) if pid != me]
    if not others:
        return None
    if pick == "first":
        return others[0]
    sizes = {}
    for pid in others:
        try:
            sizes[pid] = _rss_pages(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
        except OSError as err:
            raise _Failed("reading /proc/<pid>/statm", err) from err
    return max(sizes, key=sizes.__getitem__) if sizes else None


def main(argv: list[str]) -> int:
    group, pick = argv
    if pick not in ("first", "largest"):
        print(f"unknown pick {pick!r}: first or largest", file=sys.stderr)
        return 2
    me = os.getpid()
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    ofd = os.open(os.path.join(group, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
    with open(os.path.join(group, "cgroup.event_control"), "w") as file:
        file.write(f"{efd} {ofd}")
    with open(os.path.join(group, "cgroup.procs"), "w") as file:
        file.write(str(me))
    signal.signal(signal.SIGTERM, _stop)
    wakeups = kills = failures = 0
    errors: dict[str, int] = {}
    print("ready", flush=True)
    try:
        while True:
            os.eventfd_read(efd)
            wakeups += 1
            for _ in range(RETRIES):
                try:
                    victim = _victim(group, me, pick)
                    if victim is not None:
                        try:
                            os.kill(victim, signal.SIGKILL)
                        except OSError as err:
                            raise _Failed("kill", err) from err
                        kills += 1
                    break
                except _Failed as failed:
                    failures += 1
                    errors[failed.what] = errors.get(failed.what, 0) + 1
    except _Stop:
        pass
    print(json.dumps({"wakeups": wakeups, "kills": kills, "failures": failures, "errors": errors}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
