"""A handler process with one slow on_oom hook, for tests/test_slow_hooks.py.

``python _slow_hook_service.py GROUP_DIR SECONDS RETURNS SHED_MIB [--join]``

Fills a cache of SHED_MIB MiB, starts a Handler for the group (KillLargest,
reserve 16M, hook_timeout 10 s) whose hook sleeps SECONDS, drops the cache
(if any) and returns RETURNS (``true`` or ``false``), prints ``ready``, and
on a line on stdin stops the handler and prints its events and errors as
JSON. With ``--join`` it runs in the group (its cache charged there).
"""

from __future__ import annotations

import json
import os
import sys
import time

import useroom

MIB = 1 << 20


def main() -> int:
    path, seconds, returns, shed = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "true", int(sys.argv[4])
    group = useroom.Group.open(path)
    if "--join" in sys.argv:
        group.attach(os.getpid())
    cache = [bytes([i % 255 + 1]) * MIB for i in range(shed)]
    handler = useroom.Handler(group, reserve="16M", hook_timeout=10, thresholds=(), refresh_interval=0.1)

    @handler.on_oom
    def slow(ctx: useroom.OomContext) -> bool:
        time.sleep(seconds)  # the grant stays open meanwhile
        cache.clear()
        return returns

    with handler:
        print("ready", flush=True)
        sys.stdin.readline()
        time.sleep(0.2)  # the manager records the last episode's callbacks
        events = [e.to_dict() for e in handler.events if e.outcome != "not_needed"]
    print(json.dumps({"events": events, "errors": [repr(e) for e in handler.errors]}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
