"""A threaded service whose cache grows without bound, kept alive by an on_oom hook.

    python examples/cache_service.py [--limit 96M] [--seconds 5] [--threads 4]

The service makes a group below its own memory cgroup, moves itself in, and
serves "requests" on worker threads: each looks up a key and, on a miss,
computes a 64 KiB value and caches it, forever. Sooner or later the group
runs out of memory. A useroom Handler runs in the service itself; its
``@handler.on_oom`` hook drops the older half of the cache. The service keeps
serving through every OOM and is never killed; at the end it prints what
happened and leaves and removes its group.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import sys
import threading
import time

import useroom

VALUE_SIZE = 64 << 10


class Cache:
    """An unbounded cache, oldest entries first."""

    def __init__(self) -> None:
        self.entries: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: int) -> bytes:
        with self.lock:
            value = self.entries.get(key)
        if value is None:
            value = key.to_bytes(8, "little") * (VALUE_SIZE // 8)  # "computed", every page touched
            with self.lock:
                self.entries[key] = value
        return value

    def drop_oldest_half(self) -> int:
        """Frees the older half; called by the hook, so it allocates nothing new."""
        with self.lock:
            n = len(self.entries) // 2
            for _ in range(n):
                self.entries.popitem(last=False)
        return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", default="96M")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()

    cache = Cache()
    served = [0] * args.threads
    hook_runs = []
    stop = threading.Event()

    home = useroom.Group.current()
    group = home.create_child(f"cache-service-{os.getpid()}", memory_max=args.limit)
    try:
        group.attach(os.getpid())
        handler = useroom.Handler(group, reserve="16M")

        @handler.on_oom
        def shed_cache(ctx: useroom.OomContext) -> bool:
            dropped = cache.drop_oldest_half()
            hook_runs.append(dropped)
            return dropped > 0

        def serve(worker: int) -> None:
            for key in itertools.count(worker, args.threads):
                if stop.is_set():
                    return
                cache.get(key)
                served[worker] += 1
                time.sleep(0.0002)  # the network, say

        with handler:
            workers = [threading.Thread(target=serve, args=(i,)) for i in range(args.threads)]
            for t in workers:
                t.start()
            stop.wait(args.seconds)
            stop.set()
            for t in workers:
                t.join()

        acted = [e for e in handler.events if e.outcome != "not_needed"]
        by_hooks = sum(e.resolved_by == "hooks" for e in acted)
        killed = sum(len(e.victims) for e in acted)
        latencies = sorted(e.notify_to_hook_ns for e in acted if e.notify_to_hook_ns is not None)
        print(f"served {sum(served)} requests in {args.seconds:.1f} s; cache now {len(cache.entries)} entries")
        print(f"OOM episodes: {len(acted)}; resolved by the hook: {by_hooks}; hook runs: {len(hook_runs)}; "
              f"tasks killed: {killed}")
        if latencies:
            print(f"notification to hook start: median {latencies[len(latencies) // 2] / 1e6:.2f} ms, "
                  f"max {latencies[-1] / 1e6:.2f} ms")
        return 0
    finally:
        home.attach(os.getpid())
        group.remove(force=True)


if __name__ == "__main__":
    sys.exit(main())
