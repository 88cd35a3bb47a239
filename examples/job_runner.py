"""A job runner: one group per job, one supervisor for all of them.

    python examples/job_runner.py [--jobs 8] [--limit 32M] [--greedy 3]

It creates a group per job below its own memory cgroup and serves them all
from one useroom.Supervisor: one native watcher thread, one manager thread
and one watchdog process, however many jobs run. Each job is a child
process in its own group; the first ``--greedy`` jobs need more than their
limit and are killed by their group's handler, the others finish. Each
job's group is added when the job starts and removed when it is over, while
the supervisor runs; the runner is never in a job's group.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import useroom

JOB = """\
import mmap, os, sys
with open(sys.argv[2], "w") as procs:  # into its group before it allocates
    procs.write(str(os.getpid()))
size = int(sys.argv[1]) << 20
m = mmap.mmap(-1, size)
for off in range(0, size, 4096):
    m[off] = 1
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=8)
    parser.add_argument("--limit", default="32M")
    parser.add_argument("--greedy", type=int, default=3, help="how many jobs need more than their limit")
    args = parser.parse_args()
    limit = useroom.parse_size(args.limit)

    home = useroom.Group.current()
    groups: list[useroom.Group] = []
    jobs: list[tuple[subprocess.Popen[bytes], useroom.Handler]] = []
    try:
        with useroom.Supervisor(delay="2s") as sup:
            for i in range(args.jobs):
                group = home.create_child(f"job-{os.getpid()}-{i}", memory_max=limit)
                groups.append(group)
                handler = sup.add(group, policy=useroom.KillLargest())
                mib = (2 * limit if i < args.greedy else limit // 4) >> 20
                procs = os.path.join(group.path, group.procs_file)
                proc = subprocess.Popen([sys.executable, "-c", JOB, str(mib), procs])
                jobs.append((proc, handler))
            print(f"{len(jobs)} jobs in {len(groups)} groups: {len(sup.handlers)} handlers, "
                  f"1 watcher thread, 1 manager thread, watchdog pid {sup.watchdog.pid if sup.watchdog else None}")
            for i, (proc, handler) in enumerate(jobs):
                proc.wait(timeout=60)
                sup.remove(handler.group)  # its settings are put back; the others carry on
                acted = [e for e in handler.events if e.outcome != "not_needed"]
                how = "killed by its handler" if proc.returncode == -9 else f"exited {proc.returncode}"
                print(f"job {i}: {how}; {len(acted)} OOM episode(s)"
                      + (f", {acted[-1].outcome}: {acted[-1].action}" if acted else ""))
        killed = sum(proc.returncode == -9 for proc, _ in jobs)
        print(f"{killed} of {len(jobs)} jobs killed, {len(jobs) - killed} finished; the runner is alive")
        return 0
    finally:
        for proc, _ in jobs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for group in groups:
            group.remove(force=True)


if __name__ == "__main__":
    raise SystemExit(main())
