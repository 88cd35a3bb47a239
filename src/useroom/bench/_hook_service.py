"""The hooks benchmark's service: ``python -m useroom.bench _hook_service SPEC_JSON``.

The benchmark starts it, puts it into its group, and writes a line to its
stdin to start. It caches objects until the group is full, for
``seconds``, in one of these shapes:

- ``objects``: ``threads`` threads each add ``bytearray(size)`` entries to a
  shared dict;
- ``small``: threads add batches of short ``bytes`` and ``str`` objects
  (pymalloc's, 24 to 200 bytes each);
- ``mixed``: threads add entries of sizes drawn log-uniformly from 4 KiB to
  ``size``;
- ``procs``: ``threads`` worker processes each cache ``bytearray(size)``
  entries; the parent holds the handler, and its hook tells every worker
  (over a pipe) to shed half and give the memory back, and waits for them.

With ``mode == "useroom"`` the service runs a :class:`useroom.Handler`
(KillLargest) whose ``on_oom`` hook drops the oldest half of the cache;
with ``mode == "kernel"`` it runs no handler and the kernel OOM killer is
what meets the limit. It writes one JSON object to ``out``: what it served,
and with a handler, every episode.
"""

from __future__ import annotations

import json
import math
import os
import random
import select
import sys
import threading
import time
import traceback
from collections import OrderedDict
from typing import Any

__all__ = ["main"]


def _object_factory(shape: str, size: int, seed: int) -> Any:
    rng = random.Random(seed)
    if shape == "objects":
        return lambda: bytearray(size)
    if shape == "mixed":
        low, high = math.log(4096), math.log(max(size, 8192))
        return lambda: bytearray(int(math.exp(rng.uniform(low, high))))
    if shape == "small":
        def batch() -> list[Any]:
            return [(b"k" * rng.randint(24, 200)) if i % 2 else ("v" * rng.randint(24, 200)) for i in range(2000)]
        return batch
    raise ValueError(f"unknown shape {shape!r}")


class Cache:
    """Entries in insertion order; the hook drops the oldest half."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entries: OrderedDict[int, Any] = OrderedDict()

    def add(self, key: int, value: Any) -> None:
        with self.lock:
            self.entries[key] = value

    def shed(self) -> int:
        with self.lock:
            n = len(self.entries) // 2
            for _ in range(n):
                self.entries.popitem(last=False)
        return n


def _serve(cache: Cache, make: Any, stop: threading.Event, served: list[int], i: int, stride: int) -> None:
    key = i
    while not stop.is_set():
        cache.add(key, make())
        served[i] += 1
        key += stride


def _worker(size: int, commands: int, replies: int) -> None:
    """A worker process of the ``procs`` shape: caches until told to stop;
    on ``s`` sheds half and gives the memory back, then answers."""
    import useroom

    cache = Cache()
    served = 0
    while True:
        ready, _, _ = select.select([commands], [], [], 0)
        if ready:
            command = os.read(commands, 1)
            if command in (b"", b"q"):
                break
            cache.shed()
            useroom.release_memory()
            os.write(replies, b"k")
        cache.add(served, bytearray(size))
        served += 1
    os.write(replies, served.to_bytes(8, "little"))


def _report(path: str, served: list[int], stop: threading.Event) -> None:
    """Keeps the count served in a file, for a service the kernel may kill."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while not stop.wait(0.05):
            try:
                os.pwrite(fd, str(sum(served)).encode().ljust(20), 0)
            except OSError:
                pass  # ENOMEM while the group is at its limit: the next one counts
    finally:
        os.close(fd)


def _event_summary(event: Any) -> dict[str, Any]:
    return {
        "seq": event.seq,
        "outcome": event.outcome,
        "resolved_by": event.resolved_by,
        "victims": [v.pid for v in event.victims],
        "grant_left_open": event.outcome == "relieved",
        "notify_to_hook_ns": event.notify_to_hook_ns,
        "released": [h.released for h in event.hooks],
        "hook_ms": [round(h.duration_ns / 1e6, 2) for h in event.hooks],
        "step_ms": [round((s.t_ns - s.started_ns) / 1e6, 2) for s in event.steps],
        "short_by": event.hooks_short_by,
        "settled": any(s.settled for s in event.steps),
        "takeover": event.takeover.reason if event.takeover is not None else None,
        "steps": [(s.kind, s.phase, s.result) for s in event.steps],
    }


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    shape, size, threads = spec["shape"], int(spec["size"]), int(spec["threads"])
    seconds, mode = float(spec["seconds"]), spec["mode"]
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.readline()

    import useroom

    stop = threading.Event()
    result: dict[str, Any] = {"pid": os.getpid()}
    handler = None
    workers: list[tuple[int, int, int]] = []  # pid, command fd, reply fd
    cache = Cache()
    if mode == "useroom":
        group = useroom.Group.current()
        handler = useroom.Handler(group, policy=useroom.KillLargest(), reserve=spec["reserve"],
                                  hold_arm_at=float(spec.get("hold_arm_at", 0.0)))

        @handler.on_oom
        def shed(ctx: useroom.OomContext) -> bool:
            if not workers:
                return cache.shed() > 0
            for _, commands, _ in workers:
                os.write(commands, b"s")
            # The workers were stopped for the hooks: they read the request
            # first thing (each may finish the allocation it was in).
            ctx.resume_others()
            waiting = {replies: pid for pid, _, replies in workers}
            # Return well before the deadline: the plan stops waiting then.
            answer_by = time.monotonic() + ctx.time_left() / 2
            while waiting and (left := answer_by - time.monotonic()) > 0:
                ready, _, _ = select.select(list(waiting), [], [], left)
                for replies in ready:
                    os.read(replies, 1)
                    # It has shed: held again, it cannot take the headroom
                    # the slower workers need to answer.
                    ctx.stop_others([waiting.pop(replies)])
            return True

    started = time.monotonic()
    served = [0] * threads
    if handler is not None:
        handler.start()
    if shape == "procs":
        for _ in range(threads):
            c_read, c_write = os.pipe()
            r_read, r_write = os.pipe()
            pid = os.fork()
            if pid == 0:
                from useroom.bench._sandbox import die_with_parent

                die_with_parent()  # never left in the group if the service is killed
                os.close(c_write)
                os.close(r_read)
                try:
                    _worker(size, c_read, r_write)
                finally:
                    os._exit(0)
            os.close(c_read)
            os.close(r_write)
            workers.append((pid, c_write, r_read))
    reporter = threading.Thread(target=_report, args=(spec["out"] + ".served", served, stop), daemon=True)
    reporter.start()
    try:
        if shape == "procs":
            stop.wait(seconds)
        else:
            make = _object_factory(shape, size, os.getpid())
            pool = [threading.Thread(target=_serve, args=(cache, make, stop, served, i, threads))
                    for i in range(threads)]
            for t in pool:
                t.start()
            stop.wait(seconds)
            stop.set()
            for t in pool:
                t.join()
    finally:
        stop.set()
        # The workers stop before the handler: without it they would meet
        # the kernel killer.
        for _, commands, _ in workers:
            try:
                os.write(commands, b"q")
            except OSError:
                pass
        if handler is not None and not workers:
            handler.stop()
    for pid, _commands, replies in workers:
        try:
            data = b""
            while chunk := os.read(replies, 4096):  # acks, then the count as the worker exits
                data = (data + chunk)[-8:]
            served.append(int.from_bytes(data, "little") if len(data) == 8 else 0)
        except OSError:
            pass
        os.waitpid(pid, 0)
    if handler is not None and workers:
        handler.stop()
    result["served"] = sum(served)
    result["seconds"] = time.monotonic() - started
    if handler is not None:
        result["events"] = [_event_summary(e) for e in handler.events if e.outcome != "not_needed"]
        result["events_dropped"] = handler.history.dropped  # older than those, beyond keep_events
        result["errors"] = ["".join(traceback.format_exception(e)) for e in handler.errors][-5:]
    with open(spec["out"], "w") as f:
        json.dump(result, f)
    return 0
