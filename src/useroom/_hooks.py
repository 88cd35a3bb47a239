"""Hooks: the user's Python code that frees memory before anything is killed.

``on_oom`` hooks run on a dedicated thread, woken by the native plan only
after it has granted headroom (the group's limit raised by the reserve): the
thread of this process that faulted may hold the GIL while it sleeps in the
OOM wait, and the grant is what wakes it. Woken, the hook thread asks the
main thread (through a pending call) to release the GIL and pause, and
lowers CPython's switch interval, so that it gets the GIL within one
bytecode of the threads ahead of it. Holding the GIL, it then holds every
other Python thread of the process at its next call or return (see
:func:`useroom.native.hold_begin`): a service whose threads keep
allocating would otherwise take the headroom back, or fault at the limit
with the GIL held, while the hooks run.

The hooks run in rounds, in priority order, with a preallocated
:class:`OomContext`, the garbage collector off, and a deadline. After each
hook the allocator is trimmed (the pages it freed leave the process) and the
group's usage is read again: each :class:`HookRecord` says how much came
back. The rounds end once the usage fits the limit, when a round released
nothing, or at the deadline. Then, with the other threads still held, the
hook thread closes the grant itself (:class:`useroom._settle.GrantCloser`)
and tells the plan so; if it could not, the plan restores the limit when
the hooks are done or the deadline passes, and kills by policy if the usage
still does not fit.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import itertools
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from useroom import native
from useroom.cgroup import Group
from useroom._limits import spawning
from useroom._settle import SETTLED, GrantCloser

__all__ = ["HookRecord", "HookRegistry", "HookRunner", "OomContext", "PressureContext", "PressureSource"]


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
    #: 1 for the first round of hooks of an episode; a hook may shed more
    #: in later rounds (the earlier ones did not free enough).
    round: int = 1
    #: The group's other processes (victim-table entries), stopped
    #: (SIGSTOP) while the hooks run; see :meth:`resume_others`.
    held: tuple[Any, ...] = ()
    #: Their pidfds by pid (the victim table's, lent for the episode),
    #: which signal them.
    pidfds: Mapping[int, Any] = attrs.field(factory=dict, repr=False)
    #: Pids of the processes in :attr:`held` continued by
    #: :meth:`resume_others` and running now.
    resumed: set[int] = attrs.field(factory=set)
    #: Pids stopped again by :meth:`stop_others`: the hook thread continues
    #: them itself once the grant is closed (the plan may have continued
    #: them already, at its deadline).
    restopped: set[int] = attrs.field(factory=set)

    def resume_others(self, pids: Iterable[int] | None = None) -> None:
        """Continues the group's other processes (or those of ``pids``),
        which were stopped for the hooks: for a hook that asks them to free
        memory (over a pipe, say) and waits for their answer. Each may
        finish the allocation it was in. When the hook returns they are
        stopped again until the grant is closed (what they freed must not
        be taken back before the usage is measured), then continued with
        the rest."""
        self.resumed.update(self._signal_held(signal.SIGCONT, pids))

    def stop_others(self, pids: Iterable[int] | None = None) -> None:
        """Stops again what :meth:`resume_others` continued (all, or those of
        ``pids``): a hook calls it for each process that has answered, so
        that it cannot take the grant the slower ones need. The hook thread
        calls it for the rest when the hook returns. SIGSTOP takes effect at
        the target's next return to user space: a process running on
        another CPU is interrupted at once, so at most the fault it is in
        completes."""
        wanted = set(self.resumed if pids is None else pids) & self.resumed
        if wanted:
            self.restopped.update(self._signal_held(signal.SIGSTOP, wanted))
            self.resumed -= wanted

    def continue_others(self) -> None:
        """Continues what :meth:`stop_others` stopped; after the grant is closed."""
        if self.restopped:
            self._signal_held(signal.SIGCONT, set(self.restopped))
            self.restopped.clear()

    def _signal_held(self, sig: int, pids: Iterable[int] | None) -> list[int]:
        wanted = None if pids is None else set(pids)
        done = []
        for victim in self.held:
            if wanted is not None and victim.pid not in wanted:
                continue
            pidfd = self.pidfds.get(victim.pid)
            try:
                if pidfd is not None:
                    signal.pidfd_send_signal(pidfd.fileno(), sig)
                    done.append(victim.pid)
            except (OSError, ValueError):
                pass  # gone, or its pidfd closed: nothing to signal
        return done

    def time_left(self) -> float:
        """Seconds before the native plan stops waiting for the hooks."""
        return max(0.0, (self.deadline_ns - time.monotonic_ns()) / 1e9)

    @property
    def excess(self) -> int:
        """Bytes to free for usage to fit the limit (0 if it fits)."""
        return max(0, self.usage - self.limit)


class PressureSource(enum.Enum):
    """What ran an ``on_pressure`` hook."""

    #: The group's usage crossed the hook's threshold upward.
    USAGE = "usage"
    #: The service manager's memory pressure source (systemd's
    #: ``$MEMORY_PRESSURE_WATCH``) signalled: every hook runs, whatever its threshold.
    SERVICE = "service"


@attrs.frozen
class PressureContext:
    """What an ``on_pressure`` hook is told: the threshold crossed (in bytes;
    0 when the service manager signalled), the usage and the limit, and
    what ran it."""

    group: Group
    threshold: int
    usage: int
    limit: int
    source: PressureSource = PressureSource.USAGE


@attrs.frozen
class HookRecord:
    """One hook's run during an episode: when it started, how long it took,
    what it returned (``freed``) or raised (``error``), whether it ended past
    the deadline, and the group's usage in bytes just before it ran and
    after it returned and the allocator was trimmed (-1 if unreadable)."""

    name: str
    started_ns: int
    duration_ns: int
    freed: bool | None
    error: str | None
    late: bool
    usage_before: int = -1
    usage_after: int = -1
    round: int = 1

    @property
    def released(self) -> int:
        """Bytes the group's usage fell while the hook ran and the allocator
        was trimmed (0 if it rose, or could not be read)."""
        if self.usage_before < 0 or self.usage_after < 0:
            return 0
        return max(0, self.usage_before - self.usage_after)


Hook = Callable[..., Any]

#: Bytes of stack the hook thread touches when it starts.
THREAD_STACK_PREFAULT = 256 << 10
#: How long the hook thread may make no progress (it waits for something,
#: maybe a lock a held thread owns) before the held threads run on, each to
#: its next call or return.
HOLD_STALL_NS = 2_000_000
#: The hold is armed ahead of an episode (see :meth:`HookRunner.update_hold`)
#: once the usage reaches this fraction of the limit (by default always:
#: the handler's thread, which arms it, may not get the GIL in time while
#: the service's threads fill the group) ...
HOLD_ARM_AT = 0.0
#: ... and disarmed once it falls below half of that.
HOLD_DISARM_RATIO = 0.5


def hooks_short_by(records: tuple[HookRecord, ...], limit: int) -> int | None:
    """After the hooks' last round, by how many bytes the usage still
    exceeded ``limit`` (0 if it fitted); None if no hook ran or it is unknown."""
    after = [h.usage_after for h in records if h.usage_after >= 0]
    if not after or limit <= 0:
        return None
    return max(0, after[-1] - limit)


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

    def __init__(self, group: Group, registry: HookRegistry, watcher: native.WatchedGroup,
                 closer: GrantCloser, timeout: float, *, hold_threads: bool = True,
                 hold_arm_at: float = HOLD_ARM_AT,
                 held: Callable[[], tuple[tuple[Any, ...], Mapping[int, Any]]] = lambda: ((), {}),
                 unsettled: Callable[[int, tuple[HookRecord, ...]], None] = lambda seq, records: None) -> None:
        with contextlib.ExitStack() as opened:  # out of fds: none is left open
            self.wake: native.EventFd = opened.enter_context(native.EventFd())
            self.reply: native.EventFd = opened.enter_context(native.EventFd())
            self.resume: native.EventFd = opened.enter_context(native.EventFd())
            self.release: native.EventFd = opened.enter_context(native.EventFd())
            opened.pop_all()
        self.context = OomContext(group)
        self.records: dict[int, tuple[HookRecord, ...]] = {}
        self.busy_since_ns = 0
        self.abandoned = False
        self._registry = registry
        self._watcher = watcher
        self._closer = closer
        self._timeout_ns = int(timeout * 1e9)
        self._hold = hold_threads and native.can_hold_threads()
        self._arm_at = hold_arm_at
        self.hold_armed = False
        self._held = held
        self._unsettled = unsettled
        self._stopping = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="useroom-hooks", daemon=True)
        try:
            with spawning("the hook thread"):
                self._thread.start()
        except BaseException:
            self._close()
            raise

    def _exempt(self) -> list[int]:
        """The threads a hold never stops: this one."""
        own = self._thread.ident
        return [own] if own else []

    def update_hold(self, usage: int | None = None) -> None:
        """Arms the hold while the usage is near the limit, disarms it once
        well below (with the GIL: from the handler's thread between
        episodes, and from this one at the end of each).

        An armed hold starts the moment the hooks are woken: the service's
        threads stop at their next call or return, and none competes with
        the hook thread for the GIL, which it may otherwise get only after
        every other waiting thread had a turn (an allocating thread's turn
        can take the whole headroom). Armed, the interpreter runs slower
        (every call and return goes through the profile function), so it is
        armed from ``hold_arm_at`` of the limit (0: always) and disarmed
        below half of that. Re-arming reaches threads started since."""
        if not self._hold or self.abandoned or self._stopping:
            return
        limit = self._closer.limit()
        if usage is None:
            usage = self._closer.usage()
        if usage < 0 or limit <= 0:
            return
        if usage >= self._arm_at * limit:
            self._arm()
        elif usage < self._arm_at * HOLD_DISARM_RATIO * limit:
            self.disarm_hold()

    def _arm(self) -> None:
        native.hold_arm(self.release, HOLD_STALL_NS, self._exempt())
        self.hold_armed = True
        # A thread started from now on is armed at its first event (through
        # threading's profile hook, when the process sets none of its own).
        if threading.getprofile() is None:
            threading.setprofile(self._arm_new_thread)

    def _arm_new_thread(self, frame: Any, event: str, arg: Any) -> None:
        sys.setprofile(None)
        if self.hold_armed and not self.abandoned and not self._stopping:
            native.hold_arm(self.release, HOLD_STALL_NS, self._exempt())

    def disarm_hold(self) -> None:
        if threading.getprofile() == self._arm_new_thread:
            threading.setprofile(None)
        if self.hold_armed:
            native.hold_disarm()
            self.hold_armed = False

    @property
    def tid(self) -> int:
        """The hook thread's kernel thread id (0 if unknown)."""
        return self._thread.native_id or 0

    def stop(self) -> None:
        """Stops the thread; an abandoned one is left to finish on its own."""
        self._stopping = True
        if self.abandoned:
            return
        self.disarm_hold()  # the wake-up below must not hold anyone
        self.wake.write(1)
        # The thread's wake-up asks the main thread to pause; if this is the
        # main thread, the pause ends as soon as the hook thread is done. A
        # hook that never returns keeps its thread: abandon it.
        self._thread.join(self._timeout_ns / 1e9 + 1)
        if self._thread.is_alive():
            self.abandon()
        else:
            self._close()

    def where(self) -> str:
        """Where the hook thread is now (file:line in function, innermost
        last), for the error that abandons it; empty if it is not running."""
        frame = sys._current_frames().get(self._thread.ident or -1)
        if frame is None:
            return ""
        return " < ".join(f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}"
                          for f in reversed(traceback.extract_stack(frame)[-4:]))

    def abandon(self) -> None:
        with self._lock:
            self.abandoned = True
            if self._hold:
                self.disarm_hold()
                native.hold_end(self.release)  # the stuck hook's threads run on
            if self.busy_since_ns and not self.resume.closed:
                # End the main thread's pause on the stuck hook's behalf.
                native.hooks_done(self.resume)
            if not self._thread.is_alive():
                self._close()

    def _close(self) -> None:
        self.wake.close()
        self.reply.close()
        self.resume.close()
        self.release.close()

    def _run(self) -> None:
        # The hooks' stack must not need new pages during an episode.
        native.stack_prefault(THREAD_STACK_PREFAULT)
        reply = 0
        while True:
            # From the reply to the next wake-up this thread needs no GIL: a
            # service thread may fault at the limit while it holds the GIL.
            # An abandoned runner's reply reaches nobody: the plans use its
            # successor's eventfds.
            if self.abandoned:
                break
            native.hooks_next(self.reply, reply, self.release, self.wake, self.resume, self._timeout_ns / 1e9)
            if self._stopping or self.abandoned:
                if self._hold:
                    native.hold_end(self.release)
                native.hooks_done(self.resume)
                break
            self.busy_since_ns = time.monotonic_ns()
            try:
                reply = SETTLED if self._episode() else 1
            except BaseException:
                if self._hold:
                    native.hold_end(self.release)
                native.hooks_done(self.resume)
                raise
            finally:
                self.busy_since_ns = 0
        with self._lock:
            if self.abandoned:
                self._close()

    def _episode(self) -> bool:
        """Runs the hooks of one episode; True if it closed the grant."""
        ctx = self.context
        woke = time.monotonic_ns()
        current = self._watcher.current_episode()
        ctx.seq, ctx.notified_ns = current if current else (0, woke)
        ctx.deadline_ns = woke + self._timeout_ns
        ctx.limit = self._closer.limit()
        ctx.held, ctx.pidfds = self._held()
        ctx.resumed.clear()
        ctx.restopped.clear()
        if self._hold:
            # Armed, the hold started when this thread was woken; this
            # reaches the threads started since, or starts an unarmed one.
            native.hold_begin(self.release, ctx.deadline_ns, HOLD_STALL_NS, self._exempt())
        records: list[HookRecord] = []
        collecting = gc.isenabled()
        gc.disable()
        try:
            ctx.usage = self._usage(ctx.usage)
            ctx.round = 0
            while True:
                ctx.round += 1
                released = self._round(ctx, records)
                if self._closer.fits(ctx.usage) or released <= 0 or time.monotonic_ns() >= ctx.deadline_ns:
                    break  # done, or another round would free nothing more
            settled = self._closer.close_grant()
            if not settled:
                self._unsettled(ctx.seq, tuple(records))
            # The hold ends in hooks_next, after the reply; armed, it stays
            # installed for the next episode, which may come at once.
            self.update_hold(ctx.usage)
            return settled
        finally:
            ctx.continue_others()  # the grant is closed (or cannot be): they run on
            if collecting:
                gc.enable()
            self.records[ctx.seq] = tuple(records)
            for old in [k for k in self.records if k < ctx.seq - 64]:
                del self.records[old]

    def _round(self, ctx: OomContext, records: list[HookRecord]) -> int:
        """One pass over the hooks, until the usage fits; returns the bytes released."""
        released = 0
        for fn, _ in self._registry.get("oom"):
            if time.monotonic_ns() >= ctx.deadline_ns:
                break
            before = ctx.usage
            started = time.monotonic_ns()
            freed: bool | None = None
            error = None
            try:
                freed = bool(fn(ctx))
            except Exception as err:  # noqa: BLE001 - a faulty hook is recorded, never fatal
                error = repr(err)
            ctx.stop_others()
            ended = time.monotonic_ns()
            # What the hook freed is in the allocator, which useroom keeps
            # from trimming itself: hand it back (the GIL held, the other
            # threads held), or the group's usage stays put.
            native.heap_trim()
            ctx.usage = self._usage(ctx.usage)
            record = HookRecord(hook_name(fn), started, ended - started, freed, error, ended > ctx.deadline_ns,
                                before, ctx.usage, ctx.round)
            records.append(record)
            released += record.released
            if self._closer.fits(ctx.usage):
                break
        return released

    def _usage(self, fallback: int) -> int:
        usage = self._closer.usage()
        return usage if usage >= 0 else fallback
