"""The hook thread's side of an episode: pausing the main thread and holding
the process's other Python threads while the hooks run.

The core calls into the interpreter here (its switch interval, the thread
states' profile functions), through functions it looks up at run time.
That lookup is done once, at the first use of any function of this module,
not at import: :func:`can_hold_threads` and :func:`can_lower_switch_interval`
report what it found. The functions that must keep the GIL are called
through :data:`useroom.native._lib.HELD`.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Iterable

import attrs

from useroom.native._lib import HELD, check, lib
from useroom.native.fds import EventFd

__all__ = [
    "HOLD_EXEMPT_MAX",
    "can_hold_threads",
    "can_lower_switch_interval",
    "hold_arm",
    "hold_begin",
    "hold_disarm",
    "hold_end",
    "holds",
    "hooks_done",
    "hooks_next",
    "hooks_wait",
    "main_thread_pauses",
]

#: Most threads :func:`hold_begin` can exempt.
HOLD_EXEMPT_MAX = 8


@attrs.frozen
class _Setup:
    """What the one-time lookup of the interpreter's functions found."""

    can_lower_switch_interval: bool
    can_hold_threads: bool


_setup: _Setup | None = None
_setup_lock = threading.Lock()


def _ready() -> _Setup:
    """Looks up the interpreter's functions the core calls, once (the
    lookups are idempotent: a second one finds the same functions)."""
    global _setup
    setup = _setup
    if setup is None:
        with _setup_lock:
            if _setup is None:
                _setup = _Setup(bool(lib.uro_hooks_init()), bool(lib.uro_hold_init()))
            setup = _setup
    return setup


def _after_fork_in_child() -> None:
    global _setup_lock
    # The child has one thread: a lock another thread held at the fork
    # would never be released.
    _setup_lock = threading.Lock()
    # A child forked while a hold was armed (or active) keeps neither: its
    # one thread would run slower, or wait for hooks that are not its own.
    if _setup is not None and _setup.can_hold_threads:
        HELD.uro_hold_reset()


os.register_at_fork(after_in_child=_after_fork_in_child)


def can_lower_switch_interval() -> bool:
    """Whether the hook thread can lower CPython's switch interval while it
    waits for the GIL (the interpreter exports the setter)."""
    return _ready().can_lower_switch_interval


def can_hold_threads() -> bool:
    """Whether the other Python threads can be held while the hooks run (the
    interpreter exports the functions :func:`hold_begin` needs)."""
    return _ready().can_hold_threads


def hooks_wait(wake: EventFd, resume: EventFd, pause: float) -> int:
    """Blocks (without the GIL) until ``wake`` fires; then asks the main
    thread to release the GIL and pause for at most ``pause`` seconds, until
    :func:`hooks_done`. Returns the eventfd counter."""
    _ready()
    while True:
        ret = lib.uro_hooks_wait(wake.fileno(), resume.fileno(), int(pause * 1e9))
        if ret != -errno.EINTR:
            return check(ret, "read")


def hooks_done(resume: EventFd) -> None:
    """Ends the main thread's pause."""
    _ready()
    check(lib.uro_hooks_done(resume.fileno()), "write")


def main_thread_pauses() -> int:
    """How many times the main thread paused for hooks."""
    return int(lib.uro_pauses())


def _exempt(exempt: Iterable[int]) -> tuple[ctypes.Array[ctypes.c_uint64], int]:
    ids = [int(i) for i in exempt]
    if len(ids) > HOLD_EXEMPT_MAX:
        raise ValueError(f"at most {HOLD_EXEMPT_MAX} exempt threads, not {len(ids)}")
    return (ctypes.c_uint64 * max(1, len(ids)))(*ids), len(ids)


def hold_begin(release: EventFd, deadline_ns: int, stall_ns: int, exempt: Iterable[int] = ()) -> int:
    """Holds every Python thread of this process but ``exempt`` (values of
    ``threading.get_ident()``) at its next call or return until
    :func:`hold_end` or ``deadline_ns``; a held thread runs on to its next
    event when the exempt threads made no progress for ``stall_ns`` (they may
    wait for a lock it holds). Returns how many threads got the hold. Needs
    :func:`can_hold_threads`."""
    _ready()
    ids, n = _exempt(exempt)
    return check(HELD.uro_hold_begin(release.fileno(), deadline_ns, stall_ns, ids, n), "hold_begin")


def hold_arm(release: EventFd, stall_ns: int, exempt: Iterable[int] = ()) -> int:
    """Installs the hold on every thread ahead of an episode, inactive (the
    interpreter runs slower meanwhile); :func:`hooks_wait` starts it the
    moment the hooks are woken, before the hook thread asks for the GIL.
    Returns how many threads have it."""
    _ready()
    ids, n = _exempt(exempt)
    return check(HELD.uro_hold_arm(release.fileno(), stall_ns, ids, n), "hold_arm")


def hold_disarm() -> int:
    """Removes an armed hold (at the end of the active one, if one is)."""
    _ready()
    return check(HELD.uro_hold_disarm(), "hold_disarm")


def hold_end(resume: EventFd) -> int:
    """Releases the threads :func:`hold_begin` held; returns how many had the hold."""
    _ready()
    return check(HELD.uro_hold_end(resume.fileno()), "hold_end")


def hooks_next(reply: EventFd, value: int, hold: EventFd, wake: EventFd, resume: EventFd, pause: float) -> int:
    """The hook thread between episodes, without needing the GIL from its
    reply to its next wake-up: ends the hold (``hold``), then without the
    GIL replies ``value`` (if > 0, after ending the main thread's pause) and
    waits as :func:`hooks_wait` does. Returns the wake eventfd's counter."""
    _ready()
    ret = HELD.uro_hooks_next(reply.fileno(), value, hold.fileno(), wake.fileno(), resume.fileno(),
                                int(pause * 1e9))
    return check(ret, "read")


def holds() -> int:
    """How many times a thread was held so far."""
    return int(lib.uro_holds())
