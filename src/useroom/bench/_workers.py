"""Workers: forked children that join the group, wait for "go", then touch far more than the limit.

Each worker is forked from the benchmark process (which stays in its own
memcg), moved into the group by the parent, and blocks reading a shared "go"
pipe. Only when every worker is in the group and has said it is ready does
the parent close the pipe's write end: every worker sees EOF at once and starts
allocating. A worker maps ``size`` bytes of private anonymous memory and writes
one byte per page; ``size`` is above the group's limit, so no worker can finish
and every one of them must be killed by whoever handles the OOM.
"""

from __future__ import annotations

import math
import mmap
import os
import select
import signal
import time
from typing import Final, NoReturn

import attrs

from useroom.bench._sandbox import BenchError, Child, Lab, ScratchGroup, SignalGuard, settle_child

__all__ = ["Crew", "spawn_crew"]

PAGE: Final = mmap.PAGESIZE
#: A worker's exit code when something other than the allocation failed.
WORKER_ERROR: Final = 70


@attrs.define(eq=False)
class Crew:
    """The workers of one episode, held back by the go pipe until :meth:`release`."""

    children: list[Child]
    _go_fd: int
    start_ns: int | None = None

    def release(self) -> int:
        """Let every worker start allocating; return the "workers start" timestamp (monotonic ns)."""
        fd, self._go_fd = self._go_fd, -1
        self.start_ns = time.monotonic_ns()
        os.close(fd)  # EOF on every worker's end of the pipe at once
        return self.start_ns

    def close(self) -> None:
        """Close the go pipe if it was never released (the workers are killed first by the caller)."""
        fd, self._go_fd = self._go_fd, -1
        if fd >= 0:
            os.close(fd)

    def alive(self) -> list[Child]:
        return [child for child in self.children if not child.reaped]

    def wait_all(self, deadline_ns: int) -> bool:
        """Reap workers as they exit until all have or *deadline_ns* passes; True if all did.

        Each worker's exit time is the moment poll() reported its pidfd readable.
        """
        poller = select.poll()
        pending = {child.fileno(): child for child in self.children if not child.reaped}
        for fd in pending:
            poller.register(fd, select.POLLIN)
        while pending:
            left_ns = deadline_ns - time.monotonic_ns()
            if left_ns <= 0:
                return False
            for fd, _ in poller.poll(math.ceil(left_ns / 1e6)):
                now = time.monotonic_ns()
                poller.unregister(fd)
                pending.pop(fd).reap(now)
        return True

    def reap_exited(self) -> None:
        """Reap the workers that have exited by now, without waiting."""
        now = time.monotonic_ns()
        for child in self.children:
            if not child.reaped and child.exited():
                child.reap(now)


def spawn_crew(lab: Lab, group: ScratchGroup, guard: SignalGuard, *, count: int, size: int,
               ready_timeout: float) -> Crew:
    """Fork *count* workers into *group*, each ready and waiting for :meth:`Crew.release`.

    Every worker is registered with *lab* as soon as it exists. If anything
    fails, the workers already made are killed before the go pipe closes, so
    none of them allocates.
    """
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    crew = Crew([], go_w)
    try:
        for _ in range(count):
            crew.children.append(_fork_worker(lab, group, guard, go_r, size, ready_timeout))
    except BaseException:
        for child in crew.children:
            child.kill()
        crew.close()
        raise
    finally:
        os.close(go_r)
    return crew


def _fork_worker(lab: Lab, group: ScratchGroup, guard: SignalGuard, go_r: int, size: int,
                 ready_timeout: float) -> Child:
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    parent = os.getpid()
    try:
        # Signals stay blocked across fork so that no Python signal handler of
        # the benchmark can run in the child (and unwind the benchmark's own
        # code there); the child resets them before unblocking.
        signal.pthread_sigmask(signal.SIG_BLOCK, guard.SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                _worker_main(parent, ready_w, go_r, size, guard.SIGNALS)
            child = lab.adopt(pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, guard.SIGNALS)
        os.close(ready_w)
        ready_w = -1
        group.attach(pid)
        readable = select.select([ready_r], [], [], ready_timeout)[0]
        if not readable or os.read(ready_r, 1) != b"r":
            raise BenchError(f"worker {pid} did not report ready within {ready_timeout:g} s")
        return child
    finally:
        if ready_w >= 0:
            os.close(ready_w)
        os.close(ready_r)


def _worker_main(parent: int, ready_w: int, go_r: int, size: int,
                 signals: tuple[signal.Signals, ...]) -> NoReturn:
    """The forked worker: never returns into the benchmark's code."""
    try:
        if not settle_child(parent, (ready_w, go_r), signals):
            os._exit(WORKER_ERROR)
        os.write(ready_w, b"r")
        os.read(go_r, 1)  # blocks until EOF: the parent closed the write end
        memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for offset in range(0, size, PAGE):
            memory[offset] = 1
        os._exit(0)  # reached only if the limit did not stop it
    except BaseException:  # noqa: BLE001 - a forked worker: any failure is its exit status
        os._exit(WORKER_ERROR)
