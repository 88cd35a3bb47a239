"""One kill where the kernel would make one, whatever the shape of the workload.

A victim's memory comes back page by page as it exits. On cgroup v1 the
tasks asleep in the OOM wake at each uncharge, take what came back, and may
run out again while the victim still exits: a second episode then begins
before the first victim's memory is all back. The kernel's killer kills
nobody meanwhile (it waits while its victim exits, and while the group has
room for the charge); the handler's plan must not either (its room gate,
see :meth:`useroom.policy.PlanBuilder.gate_room`). On v2 the kernel kills
at ``memory.max`` and the handler holds its wall below it; the same rule
holds there.

The matrix, in a group of 64 MiB: the policy (KillByPriority, whose victim
is named by its pid and is not the largest; KillLargest, whose victim is the
pick at the OOM), the victim (one thread or four), and the grower: sudden
(one thread), in four threads, in three processes, or slowly (a pause after
each MiB). Without the victim the rest fits. On the host, two busy loops outside the group load the CPU meanwhile,
which is when the victim's exit is slowest and the race most likely.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from helpers import wait_until
from useroom import Handler, KillByPriority, KillLargest, OomEvent
from useroom.cgroup import Group
from useroom.handler import V2_GAP

pytestmark = [pytest.mark.backends, pytest.mark.timeout(300)]

TIMEOUT = 60.0

#: A process that touches MIB MiB in THREADS threads (or in PROCS child
#: processes), pausing PAUSE seconds after each MiB; it says "ready", waits
#: for "go", says "touched" once all of it is touched, and then holds it.
WORKER = r"""
import mmap, os, signal, sys, threading, time
mib, threads, procs, pause = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
held = []

def touch(n):
    for _ in range(n):
        m = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        for off in range(0, 1 << 20, mmap.PAGESIZE):
            m[off] = 1
        held.append(m)
        if pause:
            time.sleep(pause)

out = sys.stdout.buffer
out.write(b"ready\n"); out.flush()
if sys.stdin.buffer.readline() != b"go\n":
    sys.exit(3)
if procs > 1:
    r, w = os.pipe()
    for _ in range(procs):
        if os.fork() == 0:
            os.close(r)
            touch(mib // procs)
            os.write(w, b"x")
            signal.pause()
            os._exit(0)
    os.close(w)
    got = b""
    while len(got) < procs:
        chunk = os.read(r, procs)
        if not chunk:
            sys.exit(4)  # a child died before it had touched its share
        got += chunk
else:
    workers = [threading.Thread(target=touch, args=(mib // threads,)) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
out.write(b"touched\n"); out.flush()
sys.stdin.buffer.read()
"""


class Worker:
    """One WORKER process, moved into the group once its interpreter is up."""

    def __init__(self, group: Group, mib: int, threads: int = 1, procs: int = 1, pause: float = 0.0) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(mib), str(threads), str(procs), str(pause)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        assert b"ready\n" == self.proc.stdout.readline()
        group.attach(self.proc.pid)
        self.pid = self.proc.pid

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def touched(self) -> bool:
        """Blocks until it says it has touched it all (True) or it exits (False)."""
        assert self.proc.stdout is not None
        return b"touched\n" == self.proc.stdout.readline()

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


#: The grower's shapes: (threads, processes, pause after each MiB).
GROWERS = {
    "sudden": (1, 1, 0.0),
    "threads": (4, 1, 0.0),
    "processes": (1, 3, 0.0),
    "slow": (1, 1, 0.005),
}


@contextlib.contextmanager
def _busy_cpu(group: Group) -> Iterator[None]:
    """Two busy loops outside the group on the host (none in the slow v2 guest)."""
    loops = [] if group.version == 2 else [
        subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def _killed(events: list[OomEvent]) -> list[int]:
    return [v.pid for e in events for v in e.victims if v.signal == "SIGKILL" and v.result == 0]


#: The policies: how it names the victim (by the pid, or the pick at the
#: OOM), and the sizes in MiB of (a bystander, the victim, the grower).
POLICIES = {
    "priority": (24, 16, 30),  # KillByPriority: the victim is not the largest
    "largest": (0, 36, 36),    # KillLargest: the victim is the largest
}


@pytest.mark.parametrize("victim_threads", [1, 4], ids=["victim-1-thread", "victim-4-threads"])
@pytest.mark.parametrize("grower", list(GROWERS))
@pytest.mark.parametrize("policy", list(POLICIES))
def test_one_kill_where_the_kernel_makes_one(scratch_group: Group, policy: str, grower: str,
                                             victim_threads: int) -> None:
    """Without the victim the rest fits: the handler kills it and nobody else, the grower
    completes, the bystander lives, and the kernel killed nobody."""
    group = scratch_group
    if group.version == 2 and victim_threads > 1:
        pytest.skip("the emulated v2 guest runs the one-thread victims (time); the host runs both")
    group.set_limit((64 << 20) + (V2_GAP if group.version == 2 else 0))
    threads, procs, pause = GROWERS[grower]
    bystander_mib, victim_mib, grower_mib = POLICIES[policy]
    workers: list[Worker] = []
    try:
        bystander = Worker(group, bystander_mib) if bystander_mib else None
        victim = Worker(group, victim_mib, threads=victim_threads)
        workers += [w for w in (bystander, victim) if w is not None]
        for worker in workers:
            worker.go()
            assert worker.touched()
        chosen = KillByPriority(lambda p: 10 if p.pid == victim.pid else 0) if policy == "priority" else KillLargest()
        with _busy_cpu(group), Handler(group, chosen, thresholds=(), refresh_interval=0.2) as handler:
            growing = Worker(group, grower_mib, threads=threads, procs=procs, pause=pause)
            workers.append(growing)
            expected = {w.pid for w in workers}
            assert wait_until(lambda: expected <= {v.pid for v in handler.victims}, TIMEOUT)
            growing.go()
            assert growing.touched(), "the grower (or one of its processes) was killed"
            assert -signal.SIGKILL == victim.proc.wait(TIMEOUT)
            assert wait_until(lambda: bool(handler.events) and not group.oom_control().under_oom, TIMEOUT)
        events = handler.events
        # The episodes after the kill (its memory coming back) end with room: not needed.
        assert str(events[-1].outcome) in ("resolved", "not_needed"), [str(e.outcome) for e in events]
        assert [victim.pid] == _killed(events), [e.to_dict() for e in events]
        assert {"plan"} == {v.by for e in events for v in e.victims}
        assert None is growing.proc.poll()
        assert bystander is None or bystander.proc.poll() is None
    finally:
        for worker in workers:
            worker.close()
        for pid in group.procs():  # the grower's own processes
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda: not group.procs(), 10)
