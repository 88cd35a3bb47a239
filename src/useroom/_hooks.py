"""Hooks: the user's Python code that frees memory before anything is killed.

``on_oom`` hooks run on a dedicated thread, woken by the native plan only
after it has granted headroom (the group's limit raised by the reserve): the
thread of this process that faulted may hold the GIL while it sleeps in the
OOM wait, and the grant is what wakes it. Woken, the hook thread first asks
the main thread (through a pending call) to release the GIL and pause until
the hooks are done: a main thread allocating in a loop would otherwise keep
the GIL for a switch interval and could use up the headroom meanwhile. The
hooks then run in priority order with a preallocated :class:`OomContext`,
the garbage collector off, and a deadline; they stop as soon as the group's
usage fits its limit again.
Whatever they do, the plan restores the limit when they are done or when the
deadline passes, and kills by policy if usage still does not fit.
"""

from __future__ import annotations

import gc
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

from useroom import _native
from useroom._cgroup import Group

__all__ = ["HookRecord", "HookRegistry", "HookRunner", "OomContext", "PressureContext"]


@attrs.define(eq=False)
class OomContext:
    """What an ``on_oom`` hook is told; one object, reused for every episode.

    ``usage`` is the group's usage when the hooks woke (with the headroom
    granted), ``limit`` its limit without the grant: the hooks have done
    enough once usage is below it. Times are CLOCK_MONOTONIC nanoseconds.
    """

    group: Group
    seq: int = 0
    notified_ns: int = 0
    usage: int = 0
    limit: int = 0
    deadline_ns: int = 0

    def time_left(self) -> float:
        """Seconds before the native plan stops waiting for the hooks."""
        return max(0.0, (self.deadline_ns - time.monotonic_ns()) / 1e9)

    @property
    def excess(self) -> int:
        """Bytes to free for usage to fit the limit (0 if it fits)."""
        return max(0, self.usage - self.limit)


@attrs.frozen
class PressureContext:
    """What an ``on_pressure`` hook is told: the threshold crossed and the usage."""

    group: Group
    threshold: int
    usage: int
    limit: int


@attrs.frozen
class HookRecord:
    """One hook's run during an episode."""

    name: str
    started_ns: int
    duration_ns: int
    freed: bool | None
    error: str | None
    late: bool


Hook = Callable[..., Any]

#: Bytes of stack the hook thread touches when it starts.
THREAD_STACK_PREFAULT = 256 << 10


def hook_name(fn: Hook) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class HookRegistry:
    """Hooks by kind, kept in (priority, registration) order; safe to change
    while the handler runs: readers take a snapshot."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._order = itertools.count()
        self._hooks: dict[str, list[tuple[int, int, Hook, Any]]] = {}

    def add(self, kind: str, fn: Hook, *, priority: int = 0, arg: Any = None) -> None:
        if not callable(fn):
            raise TypeError(f"a hook must be callable, not {fn!r}")
        with self._lock:
            hooks = [*self._hooks.get(kind, []), (-priority, next(self._order), fn, arg)]
            hooks.sort(key=lambda h: (h[0], h[1]))
            self._hooks[kind] = hooks

    def remove(self, fn: Hook) -> bool:
        """Unregisters ``fn`` from every kind; True if it was registered."""
        found = False
        with self._lock:
            for kind, hooks in self._hooks.items():
                kept = [h for h in hooks if h[2] != fn]
                found = found or len(kept) != len(hooks)
                self._hooks[kind] = kept
        return found

    def get(self, kind: str) -> list[tuple[Hook, Any]]:
        with self._lock:
            return [(h[2], h[3]) for h in self._hooks.get(kind, [])]


class HookRunner:
    """The thread that runs ``on_oom`` hooks when the native plan wakes it.

    It has its own pair of eventfds, named by the armed plan. A runner whose
    hook never returns is abandoned: the handler starts a new runner with new
    eventfds and re-arms; the old thread, if its hook ever returns, replies
    to nobody and closes its eventfds.
    """

    def __init__(self, group: Group, registry: HookRegistry, watcher: _native.NativeWatcher,
                 limit: Callable[[], int], timeout: float) -> None:
        self.wake = _native.EventFd()
        self.reply = _native.EventFd()
        self.resume = _native.EventFd()
        self.context = OomContext(group)
        self.records: dict[int, tuple[HookRecord, ...]] = {}
        self.busy_since_ns = 0
        self.abandoned = False
        self._registry = registry
        self._watcher = watcher
        self._limit = limit
        self._timeout_ns = int(timeout * 1e9)
        self._stopping = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="useroom-hooks", daemon=True)
        self._thread.start()

    @property
    def tid(self) -> int:
        """The hook thread's kernel thread id (0 if unknown)."""
        return self._thread.native_id or 0

    def stop(self) -> None:
        """Stops the thread; an abandoned one is left to finish on its own."""
        self._stopping = True
        if self.abandoned:
            return
        self.wake.write(1)
        # The thread's wake-up asks the main thread to pause; if this is the
        # main thread, the pause ends as soon as the hook thread is done. A
        # hook that never returns keeps its thread: abandon it.
        self._thread.join(self._timeout_ns / 1e9 + 1)
        if self._thread.is_alive():
            self.abandon()
        else:
            self._close()

    def abandon(self) -> None:
        with self._lock:
            self.abandoned = True
            if self.busy_since_ns and not self.resume.closed:
                # End the main thread's pause on the stuck hook's behalf.
                _native.hooks_done(self.resume)
            if not self._thread.is_alive():
                self._close()

    def _close(self) -> None:
        self.wake.close()
        self.reply.close()
        self.resume.close()

    def _run(self) -> None:
        # The hooks' stack must not need new pages during an episode.
        _native.stack_prefault(THREAD_STACK_PREFAULT)
        while True:
            _native.hooks_wait(self.wake, self.resume, self._timeout_ns / 1e9)
            if self._stopping or self.abandoned:
                _native.hooks_done(self.resume)
                break
            self.busy_since_ns = time.monotonic_ns()
            try:
                self._episode()
            finally:
                was_abandoned = self.abandoned
                self.busy_since_ns = 0
                if not was_abandoned:
                    _native.hooks_done(self.resume)
            with self._lock:
                if self.abandoned:
                    break
                self.reply.write(1)
        with self._lock:
            if self.abandoned:
                self._close()

    def _episode(self) -> None:
        ctx = self.context
        woke = time.monotonic_ns()
        current = self._watcher.current_episode()
        ctx.seq, ctx.notified_ns = current if current else (0, woke)
        ctx.deadline_ns = woke + self._timeout_ns
        ctx.limit = self._limit()
        ctx.usage = self._usage(ctx.usage)
        records = []
        collecting = gc.isenabled()
        gc.disable()
        try:
            for fn, _ in self._registry.get("oom"):
                if time.monotonic_ns() >= ctx.deadline_ns:
                    break
                started = time.monotonic_ns()
                freed: bool | None = None
                error = None
                try:
                    freed = bool(fn(ctx))
                except Exception as err:  # a faulty hook is recorded, never fatal
                    error = repr(err)
                ended = time.monotonic_ns()
                records.append(HookRecord(hook_name(fn), started, ended - started, freed, error,
                                          ended > ctx.deadline_ns))
                _native.heap_trim()
                ctx.usage = self._usage(ctx.usage)
                if ctx.usage < ctx.limit:
                    break
        finally:
            if collecting:
                gc.enable()
            # What the hooks freed is in glibc's heap, which useroom keeps
            # from trimming: hand it back, or the group's usage stays put.
            # This returns the prefaulted heap reserve too; later hooks run
            # with headroom granted, so new heap pages can be had then.
            _native.heap_trim()
        self.records[ctx.seq] = tuple(records)
        for old in [k for k in self.records if k < ctx.seq - 64]:
            del self.records[old]

    def _usage(self, fallback: int) -> int:
        try:
            return self.context.group.usage()
        except OSError:
            return fallback
