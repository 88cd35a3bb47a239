"""A service that is its own OOM handler, from inside its memory-limited group.

    python examples/inprocess_service.py [--limit 64M] [--workers 3]

It creates a group below its own memory cgroup, moves itself in, starts a
useroom Handler in-process, then spawns workers (children, so in the same
group) that each overrun the limit. The handler kills them, largest first,
while the service's own thread keeps allocating; the service is never
killed (a handler protects its own process). On exit it leaves the group
and removes it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import useroom

WORKER = """\
import mmap
size = 160 << 20
m = mmap.mmap(-1, size)
for off in range(0, size, 4096):
    m[off] = 1
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", default="64M")
    parser.add_argument("--workers", type=int, default=3)
    args = parser.parse_args()

    home = useroom.Group.current()
    group = home.create_child(f"inprocess-service-{os.getpid()}", memory_max=args.limit)
    try:
        group.attach(os.getpid())
        with useroom.Handler(group, policy=useroom.KillLargest()) as handler:
            workers = [subprocess.Popen([sys.executable, "-c", WORKER]) for _ in range(args.workers)]
            churn = []
            for proc in workers:
                proc.wait(timeout=60)
                churn.append(bytearray(64 << 10))  # the service keeps allocating meanwhile
        acted = [e for e in handler.events if e.outcome != "not_needed"]
        for event in acted:
            print(f"OOM {event.seq}: {event.outcome}: {event.action}")
        killed = sum(proc.returncode == -9 for proc in workers)
        print(f"{killed} of {len(workers)} workers killed by the handler; the service is alive")
        return 0
    finally:
        home.attach(os.getpid())
        group.remove(force=True)


if __name__ == "__main__":
    raise SystemExit(main())
