"""A standalone OOM handler process for one group.

    python examples/standalone_handler.py GROUP [--join] [--reserve 16M]

GROUP is a memory cgroup path (``/sys/fs/cgroup/memory/...`` or a path in the
memory hierarchy). With ``--join`` the handler moves itself into the group it
handles: it keeps working when that group is out of memory. It prints one line
per OOM episode and runs until SIGINT or SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

import useroom


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("group")
    parser.add_argument("--join", action="store_true", help="run inside the handled group")
    parser.add_argument("--reserve", default="16M", help="headroom the handler may grant itself")
    args = parser.parse_args()

    group = useroom.Group.open(args.group)
    if args.join:
        group.attach(os.getpid())
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())

    with useroom.Handler(group, policy=useroom.KillLargest(), reserve=args.reserve) as handler:
        print(f"handling {group.relpath}; locked {useroom.format_size(handler.locked_bytes)}", flush=True)
        seen = 0
        while not stop.is_set():
            handler.wait_for_events(seen + 1, timeout=0.5)
            # The events are bounded (keep_events): follow them by their total, not their list's length.
            new, seen = handler.history.follow(seen)
            for event in new:
                if event.outcome != "not_needed":
                    took = "-" if event.duration_ns is None else f"{event.duration_ns / 1e6:.2f} ms"
                    print(f"OOM {event.seq}: {event.outcome} in {took}: {event.action}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
