"""A handler whose process runs out of fds: ``python _stale_service.py GROUP_DIR``.

Starts a Handler for the group (it runs outside it), prints ``ready``, then
obeys one command per line on stdin: ``exhaust`` (RLIMIT_NOFILE down to 3:
every new fd fails with EMFILE, the ones open stay usable), ``restore``
(the limit back), ``errors`` (the type names in handler.errors, as JSON),
``stop`` (stop the handler; print its events as JSON) .
"""

from __future__ import annotations

import json
import resource
import sys

import useroom


def main() -> int:
    group = useroom.Group.open(sys.argv[1])
    handler = useroom.Handler(group, useroom.KillLargest(), thresholds=(), refresh_interval=0.1)
    handler.start()
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    print("ready", flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "exhaust":
            resource.setrlimit(resource.RLIMIT_NOFILE, (3, limits[1]))
            print("exhausted", flush=True)
        elif command == "restore":
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            print("restored", flush=True)
        elif command == "errors":
            print(json.dumps(sorted({type(e).__name__ for e in handler.errors})), flush=True)
        elif command == "stop":
            handler.stop()
            events = [e.to_dict() for e in handler.events]
            print(json.dumps({"events": events, "errors": [repr(e) for e in handler.errors]}, default=str),
                  flush=True)
            return 0
    handler.stop()
    return 1


if __name__ == "__main__":
    sys.exit(main())
