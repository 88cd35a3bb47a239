"""check_hook: try an on_oom hook under OOM conditions before production.

The hook runs in this process (its side effects are real: it is the hook
the service will run), on a fresh thread whose stack is prefaulted like the
handler's hook thread, after the process is hardened like a handler's
(:func:`lock_memory`), with the process moved for the duration into a
throwaway group below its own memory cgroup, so that every page the hook
makes the kernel charge is counted there. It reports what a hook must not
do during an OOM: allocate (peak Python allocations, traced by
tracemalloc: they eat the prefaulted reserves), need new pages (bytes
charged, minor faults), grow the heap, open files, raise, outrun its
deadline, or exceed the headroom a grant would give it.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import attrs

from useroom import native
from useroom.cgroup import Group
from useroom._hardening import lock_memory
from useroom._hooks import THREAD_STACK_PREFAULT, OomContext
from useroom._units import format_size, parse_size

__all__ = ["HookReport", "check_hook"]

#: Minor faults a hook may cause and still pass: the interpreter's own
#: bookkeeping touches a page now and then; a hook that allocates touches many.
FAULT_TOLERANCE = 16
#: Bytes the kernel may charge during the hook and still pass (a few pages
#: of kernel bookkeeping).
CHARGE_TOLERANCE = 64 << 10
#: Bytes of Python allocations (peak, traced by tracemalloc) a hook may make
#: and still pass: a list of keys to delete, a few small objects.
ALLOC_TOLERANCE = 64 << 10


@attrs.frozen
class HookReport:
    """What :func:`check_hook` saw the hook do."""

    charged: int
    allocated: int
    minor_faults: int
    major_faults: int
    heap_growth: int
    files_opened: int
    duration: float
    deadline: float
    headroom: int
    freed: bool | None
    error: str | None
    hung: bool

    @property
    def problems(self) -> tuple[str, ...]:
        found = []
        if self.hung:
            found.append(f"did not return within {self.deadline} s (its thread was abandoned)")
        elif self.duration > self.deadline:
            found.append(f"outran its deadline: {self.duration:.3f} s > {self.deadline} s")
        if self.charged > self.headroom:
            found.append(f"needed {format_size(self.charged)}, more than the headroom "
                         f"{format_size(self.headroom)}")
        elif self.charged > CHARGE_TOLERANCE:
            found.append(f"made the kernel charge {format_size(self.charged)} of new memory")
        if self.allocated > ALLOC_TOLERANCE:
            found.append(f"allocated {format_size(self.allocated)} (at its peak) from the "
                         "process's reserves")
        if self.minor_faults > FAULT_TOLERANCE or self.major_faults:
            found.append(f"touched new pages: {self.minor_faults} minor, {self.major_faults} major faults")
        if self.heap_growth > 0:
            found.append(f"grew the heap by {format_size(self.heap_growth)}")
        if self.files_opened:
            found.append(f"opened {self.files_opened} file(s)")
        if self.error:
            found.append(f"raised {self.error}")
        return tuple(found)

    @property
    def ok(self) -> bool:
        """True if the hook did nothing a hook must not do during an OOM."""
        return not self.problems


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]


def _heap_bytes() -> int:
    """Bytes glibc has taken from the kernel (heap arenas and mmapped blocks)."""
    try:
        libc = ctypes.CDLL(None)
        mallinfo2 = libc.mallinfo2
    except (OSError, AttributeError):
        return 0
    mallinfo2.restype = _Mallinfo2
    info = mallinfo2()
    return int(info.arena + info.hblkhd)


_audit_lock = threading.Lock()
_audit_installed = False
_counting: set[int] = set()
_opened: dict[int, int] = {}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open":
        ident = threading.get_ident()
        if ident in _counting:
            _opened[ident] = _opened.get(ident, 0) + 1


def check_hook(fn: Callable[[OomContext], Any], *, headroom: int | str = "16M", deadline: float = 1.0,
               parent: Group | None = None) -> HookReport:
    """Runs ``fn`` once, as the handler would during an OOM, and reports what it did.

    ``parent`` is where the throwaway group is made (this process's own
    memory cgroup by default); the process returns to its group afterwards.
    A hook that does not return within ``deadline`` is reported hung and its
    thread abandoned.
    """
    global _audit_installed
    headroom_bytes = parse_size(headroom)
    home = Group.current()
    base = parent if parent is not None else home
    lock_memory()
    with _audit_lock:
        if not _audit_installed:
            sys.addaudithook(_audit)  # cannot be removed: installed once, counts only hook threads
            _audit_installed = True
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    group = base.create_child(f"useroom-check-{os.getpid()}-{time.monotonic_ns()}")
    try:
        group.attach(os.getpid())
        try:
            return _run(fn, group, home, headroom_bytes, deadline)
        finally:
            home.attach(os.getpid())
    finally:
        group.remove(force=False)
        if not tracing:
            tracemalloc.stop()


def _run(fn: Callable[[OomContext], Any], group: Group, home: Group, headroom: int,
         deadline: float) -> HookReport:
    usage = home.usage()
    now = time.monotonic_ns()
    ctx = OomContext(home, seq=0, notified_ns=now, usage=usage, limit=home.limit(),
                     deadline_ns=now + int(deadline * 1e9))
    result: dict[str, Any] = {}
    ready = threading.Event()
    go = threading.Event()

    def run() -> None:
        native.stack_prefault(THREAD_STACK_PREFAULT)
        ident = threading.get_ident()
        ready.set()
        go.wait()
        heap = _heap_bytes()
        charged = group.usage()
        traced, _ = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        before = resource.getrusage(resource.RUSAGE_THREAD)
        start = time.monotonic()
        _counting.add(ident)
        freed: bool | None = None
        error = None
        try:
            freed = bool(fn(ctx))
        except Exception as err:  # noqa: BLE001 - the hook under check: what it raises is its report
            error = repr(err)
        finally:
            _counting.discard(ident)
        duration = time.monotonic() - start
        after = resource.getrusage(resource.RUSAGE_THREAD)
        _, peak = tracemalloc.get_traced_memory()
        result.update(
            charged=max(0, group.usage() - charged),
            allocated=max(0, peak - traced),
            minor_faults=after.ru_minflt - before.ru_minflt,
            major_faults=after.ru_majflt - before.ru_majflt,
            heap_growth=max(0, _heap_bytes() - heap),
            files_opened=_opened.pop(ident, 0),
            duration=duration,
            freed=freed,
            error=error,
        )

    thread = threading.Thread(target=run, name="useroom-check-hook", daemon=True)
    thread.start()
    ready.wait()
    go.set()
    thread.join(deadline * 2 + 1)
    if thread.is_alive():
        return HookReport(0, 0, 0, 0, 0, 0, deadline * 2 + 1, deadline, headroom, None, None, True)
    return HookReport(**result, deadline=deadline, headroom=headroom, hung=False)
