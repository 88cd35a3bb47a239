"""The in-process variant: a Python "service" in the group that runs useroom's handler itself.

``python -m useroom.bench _service GROUP_DIR JSON_PATH [RESERVE]`` opens the group with
the public API, moves itself into it, starts a :class:`useroom.Handler` with
the kill-largest policy and prints ``ready``. Its main thread then keeps
allocating a little, as a service would: small objects, and now and then a
buffer large enough to need fresh pages, so that during an OOM this thread may
well be asleep in the kernel's OOM wait (holding the GIL) while the handler
must still resolve the OOM. On SIGTERM it stops the handler and writes
``{"locked_bytes": ..., "events": [...], "errors": [...]}`` to JSON_PATH.
"""

from __future__ import annotations

import enum
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import attrs

__all__ = ["main"]

_CHURN_PAUSE_S = 0.001
_BUFFER_BYTES = 256 * 1024  # above glibc's default mmap threshold: fresh pages when it is not tuned


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m useroom.bench _service GROUP_DIR JSON_PATH [RESERVE]", file=sys.stderr)
        return 2
    group_path, json_path = argv[:2]
    reserve = int(argv[2]) if len(argv) == 3 else 0
    import useroom

    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    group = useroom.Group.open(group_path)
    group.attach(os.getpid())
    handler = useroom.Handler(group, policy=useroom.KillLargest(), reserve=reserve or None)
    handler.start()
    try:
        print("ready", flush=True)
        _churn(lambda: stopping)
    finally:
        handler.stop()
    report = {"locked_bytes": _locked_bytes(handler), "events": [event_to_json(e) for e in handler.events],
              "events_dropped": handler.history.dropped, "errors": [repr(e) for e in handler.errors]}
    with open(json_path, "w") as file:
        json.dump(report, file, default=_json_default)
    return 0


def _churn(stop: Callable[[], bool]) -> None:
    rounds = 0
    while not stop():
        junk: list[object] = [str(i) for i in range(200)]
        if rounds % 16 == 0:
            junk.append(bytearray(_BUFFER_BYTES))  # zero-filled, so its pages are touched
        del junk
        rounds += 1
        time.sleep(_CHURN_PAUSE_S)


def event_to_json(event: Any) -> Any:
    """An ``OomEvent`` as plain JSON data: its ``to_dict()`` if it has one, else ``attrs.asdict``."""
    to_dict = getattr(event, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    if attrs.has(type(event)):
        return attrs.asdict(event, value_serializer=lambda inst, field, value: _json_default(value)
                            if isinstance(value, enum.Enum) else value)
    return event


def _locked_bytes(handler: Any) -> int | None:
    """What the handler reports it locked, wherever it keeps that figure (None if nowhere)."""
    for holder in (handler, getattr(handler, "lock_report", None), getattr(handler, "hardening", None)):
        value = getattr(holder, "locked_bytes", None)
        if isinstance(value, int):
            return value
    return None


def _json_default(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.name.lower()
    if isinstance(value, (tuple, frozenset, set)):
        return list(value)
    return str(value)
