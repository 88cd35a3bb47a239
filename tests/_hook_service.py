"""A service for the hook tests: ``python _hook_service.py MODE GROUP_DIR HOG_PID [DELAY [WATCHDOG_LOG]]``.

It joins the group, fills a 40 MiB cache, starts a Handler whose on_oom hook
behaves as MODE says (free, raise, hang, alloc), prints ``ready``, waits for
a line on stdin, then allocates on its main thread (which holds the GIL while
it faults) until the handler has recorded an episode that needed action, and
prints the events as JSON.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
import threading
import time

import useroom

MIB = 1 << 20


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def main() -> int:
    mode, path, hog = sys.argv[1], sys.argv[2], int(sys.argv[3])
    group = useroom.Group.open(path)
    group.attach(os.getpid())
    cache = [bytes([i % 256]) * MIB for i in range(40)]
    delay = float(sys.argv[4]) if len(sys.argv) > 4 else useroom.DEFAULT_DELAY
    log = sys.argv[5] if len(sys.argv) > 5 else None
    handler = useroom.Handler(group, reserve="16M", hook_timeout=0.5, refresh_interval=0.1, delay=delay,
                              watchdog_log=log)
    hoard = []
    ran = threading.Event()

    @handler.on_oom
    def hook(ctx: useroom.OomContext) -> bool:
        ran.set()
        if mode == "free":
            del cache[: len(cache) // 2]
            return True
        if mode == "raise":
            raise RuntimeError("hook failed")
        if mode == "hang":
            time.sleep(3600)
        if mode == "alloc":
            while True:
                hoard.append(bytes(MIB))
        return False

    with handler:
        print("ready", flush=True)
        sys.stdin.readline()
        grown = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if mode == "free" and ran.is_set():
                # One episode is what the test is about: allocating on would
                # empty the cache and make the next episode kill the hog.
                handler.wait_for_events(1, 10)
                break
            acted = [e for e in handler.events if e.outcome != "not_needed"]
            if acted and (any(e.victims for e in acted) or not _alive(hog)):
                break
            m = mmap.mmap(-1, 4 * MIB)
            for off in range(0, 4 * MIB, mmap.PAGESIZE):
                m[off] = 1  # faults with the GIL held
            grown.append(m)
            if len(grown) > 64:
                grown.clear()
        time.sleep(0.3)  # let the manager record the episode's callbacks
        events = [e.to_dict() for e in handler.events if e.outcome != "not_needed"]
    print(json.dumps({"events": events, "errors": [repr(e) for e in handler.errors]}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
