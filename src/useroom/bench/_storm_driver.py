"""The storm's drivers: the service in the group that respawns its workers.

The ``python`` driver's supervisor is this file run as a script (``python
-I -S``; the package is not imported): :func:`supervise` makes itself the
size of a small daemon (:data:`SUPERVISOR_RSS`), starts the workers, forked
from it, and starts another at once whenever one dies. The ``stress-ng`` driver is ``stress-ng
--vm N --vm-bytes SIZE --vm-keep``. :func:`driver_argv` is either's command
line.

This file's module-level imports are the standard library's only, because
it doubles as the supervisor's script.
"""

from __future__ import annotations

import math
import mmap
import os
import shutil
import signal
import sys
import time
from typing import TYPE_CHECKING, Any, Final, NoReturn

if TYPE_CHECKING:
    from useroom.bench._storm_report import StormConfig

__all__ = ["DRIVERS", "PAGES", "SCRIPT", "SUPERVISOR_RSS", "driver_argv", "supervise"]

PAGE: Final = mmap.PAGESIZE
DRIVERS: Final = ("python", "stress-ng")
#: This file: the python driver's supervisor runs it as a script.
SCRIPT: Final = os.path.abspath(__file__)
_PR_SET_PDEATHSIG: Final = 1
#: The supervisor's size, a small daemon's: before it starts its workers it
#: touches memory of its own until its VmRSS is this (its interpreter alone
#: is about 12 MiB). A fresh worker, forked from it, starts as large (the
#: kernel's badness counts the pages it shares). 16.5 MiB is what the
#: supervisor came to when its script was the whole storm benchmark, which
#: its interpreter compiled: the size the figures were measured with.
SUPERVISOR_RSS: Final = 16896 << 10
#: The memory that makes it so, held for the life of the process.
_HELD: Final[list[mmap.mmap]] = []


# -- the python driver's supervisor (this file run as a script) --------------

#: The workers' pages: small (4 KiB), huge (2 MiB transparent huge pages),
#: or "any" (the system's setting; stress-ng then advises each worker's
#: buffer at random, one choice per worker slot that its respawns repeat,
#: and a worker on huge pages fills the group about twice as fast, so the
#: kill rate of a run depended on that draw).
PAGES: Final = ("small", "huge", "any")
_ADVICE: Final = {"small": "MADV_NOHUGEPAGE", "huge": "MADV_HUGEPAGE"}
_STRESS_NG_ADVICE: Final = {"small": "nohugepage", "huge": "hugepage"}


def supervise(workers: int, size: int, pages: str = "any") -> NoReturn:
    """Start *workers* workers and start a new one whenever one dies, forever.

    Runs in its own small process in the group; ends by a signal. Its
    workers die with it (``PR_SET_PDEATHSIG``).
    """
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    me = os.getpid()
    _grow_to(SUPERVISOR_RSS)
    for _ in range(workers):
        _spawn(me, size, prctl, pages)
    while True:
        try:
            os.wait()
        except ChildProcessError:
            pass
        _spawn(me, size, prctl, pages)


def _grow_to(rss: int) -> None:
    """Touch private memory until this process's VmRSS is about *rss* bytes; it is held in :data:`_HELD`."""
    with open("/proc/self/status", "rb") as status:
        now = next(int(line.split()[1]) for line in status if line.startswith(b"VmRSS:")) << 10
    size = (rss - now) // PAGE * PAGE
    if size <= 0:
        return
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_NOHUGEPAGE)  # in pages of its own size, whatever the system's setting
    for offset in range(0, size, PAGE):
        memory[offset] = 1
    _HELD.append(memory)


def _spawn(parent: int, size: int, prctl: Any, pages: str) -> None:
    while True:
        try:
            pid = os.fork()
            break
        except OSError:
            # ENOMEM or EAGAIN: fork's kernel memory is charged to the group,
            # which is at its limit; the kill that ends the OOM makes room.
            time.sleep(0.001)
    if pid:
        return
    try:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if pages in _ADVICE:
            memory.madvise(getattr(mmap, _ADVICE[pages]))
        for offset in range(0, size, PAGE):
            memory[offset] = 1
        while True:  # kept: only a kill ends a worker (it never fits)
            signal.pause()
    finally:
        os._exit(0)


# -- the command line of either driver -----------------------------------------

def driver_argv(config: StormConfig) -> list[str]:
    """The command that runs *config*'s driver (stress-ng must be on PATH for its own)."""
    if config.driver == "stress-ng":
        stress_ng = shutil.which("stress-ng")
        assert stress_ng is not None
        advice = ["--vm-madvise", _STRESS_NG_ADVICE[config.pages]] if config.pages in _STRESS_NG_ADVICE else []
        return [stress_ng, "--vm", str(config.workers), "--vm-bytes", str(config.worker_size), "--vm-keep",
                *advice, "--timeout", str(math.ceil(config.seconds) + 120)]
    return [sys.executable, "-I", "-S", SCRIPT, "supervise", str(config.workers), str(config.worker_size),
            config.pages]


def _script_main(argv: list[str]) -> int:
    if argv[:1] == ["supervise"] and len(argv) in (3, 4):
        supervise(int(argv[1]), int(argv[2]), *argv[3:])
    print(f"usage: python -I -S {SCRIPT} supervise WORKERS SIZE [PAGES]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_script_main(sys.argv[1:]))
