"""A cache service run by systemd, which handles its own OOMs with useroom.

    systemctl --user start useroom-cache      (see useroom-cache.service)

The unit delegates its cgroup (``Delegate=yes``). The service makes a
child group ``cache`` there, moves itself in, and gives the group a limit
(``--limit``); a useroom Handler runs in the service itself, inside that
group. Worker threads fill an unbounded cache, and

- ``@handler.on_pressure(0.75)`` drops a quarter of it when the usage
  passes 75% of the limit, and at each memory pressure signal systemd
  sends (``MemoryPressureWatch=``, systemd 254 and later, sets
  ``$MEMORY_PRESSURE_WATCH``; useroom follows the protocol);
- ``@handler.on_oom`` drops half of it when the group is out of memory
  all the same.

Every second it writes what happened to ``$RUNTIME_DIRECTORY/status.json``
and tells systemd (``STATUS=``). ``SIGTERM`` stops it; systemd removes the
groups.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import socket
import sys
import threading

import useroom

VALUE_SIZE = 64 << 10


class Cache:
    """An unbounded cache, oldest entries first."""

    def __init__(self) -> None:
        self.entries: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self.lock = threading.Lock()

    def fill(self, key: int) -> None:
        value = key.to_bytes(8, "little") * (VALUE_SIZE // 8)  # every page touched
        with self.lock:
            self.entries[key] = value

    def drop(self, fraction: float) -> int:
        """Drops the oldest ``fraction`` of the entries; allocates nothing."""
        with self.lock:
            n = int(len(self.entries) * fraction)
            for _ in range(n):
                self.entries.popitem(last=False)
            return n


def notify(state: str) -> None:
    """One datagram to systemd's notification socket, if it gave one."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:
            pass  # systemd is gone or never listened: the service serves anyway


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", default="128M")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rate", type=float, default=200.0, help="cache fills per second per thread")
    args = parser.parse_args()
    status_path = os.path.join(os.environ.get("RUNTIME_DIRECTORY", "."), "status.json")

    # The unit's cgroup is delegated: the service makes its own limited
    # group below it and moves in (on cgroup v2 in that order: a group that
    # gives its children memory limits may hold no process).
    home = useroom.Group.current()
    group = home.enter_child("cache", args.limit)

    cache = Cache()
    counts = {"usage_signals": 0, "service_signals": 0, "oom_hooks": 0, "dropped": 0}
    stop = threading.Event()
    handler = useroom.Handler(group, reserve="16M")

    @handler.on_pressure(0.75)
    def trim(ctx: useroom.PressureContext) -> None:
        key = "service_signals" if ctx.source is useroom.PressureSource.SERVICE else "usage_signals"
        counts[key] += 1
        counts["dropped"] += cache.drop(0.25)

    @handler.on_oom
    def shed(ctx: useroom.OomContext) -> bool:
        counts["oom_hooks"] += 1
        dropped = cache.drop(0.5)
        counts["dropped"] += dropped
        return dropped > 0

    def serve(worker: int) -> None:
        key = worker
        while not stop.wait(1 / args.rate):
            cache.fill(key)
            key += args.threads

    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with handler:
        workers = [threading.Thread(target=serve, args=(i,), daemon=True) for i in range(args.threads)]
        for worker in workers:
            worker.start()
        notify("READY=1")
        while not stop.wait(1.0):
            acted = [e for e in handler.events if e.outcome != "not_needed"]
            status = {**counts, "entries": len(cache.entries), "usage": group.usage(),
                      "episodes": len(acted), "killed": sum(len(e.victims) for e in acted),
                      "pressure_watch": os.environ.get("MEMORY_PRESSURE_WATCH")}
            with open(status_path + ".tmp", "w") as out:
                json.dump(status, out)
            os.replace(status_path + ".tmp", status_path)
            notify(f"STATUS={len(cache.entries)} entries; pressure signals: {counts['usage_signals']} from usage, "
                   f"{counts['service_signals']} from systemd; OOM episodes: {len(acted)}")
        notify("STOPPING=1")
        for worker in workers:
            worker.join()
    # Out of the group and remove it. On cgroup v2 the unit's cgroup gives
    # its children memory limits and can take no process back: systemd
    # removes both when the service has exited.
    with contextlib.suppress(OSError):
        home.attach(os.getpid())
        group.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
