"""A handler process for the watchdog's fault-injection tests.

``python _fault_service.py MODE GROUP_DIR LOG DELAY [--join]``

Starts a Handler for the group (its watchdog logging to LOG, with DELAY
seconds), prints ``ready <watchdog pid> <manager tid>``, and then waits for
the test to do something to it (SIGSTOP, SIGKILL) or for a line on stdin,
on which it stops the handler cleanly and prints its events, errors, the
memory group of each of its threads and its watchdog's history as JSON.
MODE:

- ``plain``: KillLargest, no reserve;
- ``hang``: an on_oom hook that never returns (30 s deadline: the grant
  stays open);
- ``nothing``: a policy with no victims and no kernel fallback, so only the
  watchdog can end an episode;
- ``self-oom``: FreezeAndDecide whose callback touches far more than the
  reserve on the handler's own manager thread;
- ``slow-hook``: an on_oom hook that takes 4 s (the grant open meanwhile);
- ``slow-decide``: FreezeAndDecide whose callback takes 4 s (the group
  stopped and the grant open meanwhile), then picks the largest.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
import time

import useroom

MIB = 1 << 20


def main() -> int:
    mode, path, log, delay = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    group = useroom.Group.open(path)
    if "--join" in sys.argv:
        group.attach(os.getpid())
    kwargs: dict = dict(thresholds=(), refresh_interval=0.1, delay=delay, watchdog_log=log)
    if mode == "plain":
        handler = useroom.Handler(group, **kwargs)
    elif mode == "hang":
        handler = useroom.Handler(group, reserve="16M", hook_timeout=30, **kwargs)

        @handler.on_oom
        def hang(ctx: useroom.OomContext) -> bool:
            time.sleep(3600)
            return False
    elif mode == "nothing":
        handler = useroom.Handler(group, _Nobody(), kernel_fallback=False, **kwargs)
    elif mode == "slow-hook":
        handler = useroom.Handler(group, reserve="16M", hook_timeout=10, **kwargs)

        @handler.on_oom
        def slow(ctx: useroom.OomContext) -> bool:
            time.sleep(4)  # the grant stays open meanwhile
            return False
    elif mode == "slow-decide":
        def ponder(ctx: useroom.FrozenContext) -> list[int]:
            time.sleep(4)  # the group stopped and the grant open meanwhile
            return [max(ctx.victims, key=lambda v: v.rss).pid] if ctx.victims else []

        handler = useroom.Handler(group, useroom.FreezeAndDecide(ponder), reserve="16M", grant_timeout=10,
                                  **kwargs)
    elif mode == "self-oom":
        touched = []

        def decide(ctx: useroom.FrozenContext) -> list[int]:
            m = mmap.mmap(-1, 256 * MIB)
            for off in range(0, 256 * MIB, mmap.PAGESIZE):
                m[off] = 1  # the manager thread faults past the reserve
            touched.append(m)
            return []

        handler = useroom.Handler(group, useroom.FreezeAndDecide(decide), reserve="8M", grant_timeout=30,
                                  **kwargs)
    else:
        raise SystemExit(f"unknown mode {mode}")
    with handler:
        link = handler.watchdog
        assert link is not None
        print("ready", link.pid, handler.supervisor.manager_tid, flush=True)
        sys.stdin.readline()
        time.sleep(0.2)
    events = [e.to_dict() for e in handler.events]
    _wait_threads_gone()
    threads = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            threads[tid] = useroom.Group.of_thread(int(tid)).relpath
        except useroom.ProcessGone:
            pass  # a thread of a library exiting (the test checks what is left)
    print(json.dumps({"events": events, "errors": [repr(e) for e in handler.errors], "threads": threads,
                      "watchdog": list(link.history)}, default=str), flush=True)
    return 0


# include/linux/sched.h: set by do_exit() for the rest of a task's life.
PF_EXITING = 0x4


def _exiting(tid: str) -> bool:
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return bool(int(fields[6]) & PF_EXITING)  # field 9 of proc(5), "flags"


def _wait_threads_gone(timeout: float = 5.0) -> None:
    """Waits until no thread of this process is still exiting.

    ``Thread.join`` returns when the Python side of a thread is done, a little
    before the kernel has finished its exit; and for a task in do_exit(),
    /proc/<tid>/cgroup names no v1 group at all ("/"). Past the timeout the
    report shows such a thread as it is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_exiting(tid) for tid in os.listdir("/proc/self/task")):
        time.sleep(0.01)


class _Nobody(useroom.KillLargest):
    """A policy with no victims: its plan does nothing."""

    def order(self, victims):  # type: ignore[no-untyped-def]
        return []


if __name__ == "__main__":
    sys.exit(main())
