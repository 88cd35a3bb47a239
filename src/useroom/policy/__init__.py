"""Policies: who to kill or what to raise, decided ahead and compiled to a native plan.

A policy orders the victim table (at refresh time, when reading ``/proc``
is allowed) and compiles that order into a :class:`useroom.native.Plan`:
a fixed list of actions the native watcher runs on the next OOM without
Python. Each action carries a one-line explanation that ends up in the
episode's event record.

The plan every kill policy compiles to, for victims v1, v2, ...::

    hooks: limit += reserve (opens a grant), wake the hooks, await them,
           restore the limit (resolves)             # only with on_oom hooks
    [SIGTERM v1, wait for v1 to exit (grace)]       # only with term_grace
    SIGKILL v1, process_mrelease v1,
    [wait for v1 to exit, restore the limit]        # only while the hooks' grant is open
    check                                           # done if the OOM is over
    SIGKILL v2, ...                                 # else the next victim
    grant: limit += reserve, wake Python, await its reply, restore the limit
    kernel: oom_kill_disable=0, check, oom_kill_disable=1 (once no task waits)

A victim that already exited is skipped without waiting. A restore runs only
if its grant did, and its success ends the episode: usage fits the limit
again; while a grant is open a check cannot end the episode, only see the
sleepers woken. The hooks' grant lets Python run with the OOM lifted (the
GIL may be held by a thread asleep in the OOM wait; the grant wakes it); the
tail grant lets Python refresh the table (a task forked after the last
refresh is not in the plan) and act; the kernel step is the last resort. If
no restore succeeds the episode ends ``relieved``: nobody waits, the limit
is raised by at most the reserve, and the handler restores it as soon as
usage allows.
"""


from useroom.policy.composed import DryRun, FreezeAndDecide, FrozenContext, MoveToOverflow, RaiseLimit
from useroom.policy.kills import KillByPriority, KillGroup, KillLargest, KillNewest, Policy
from useroom.policy.plan import HOLD_PROCESSES_MAX, PICK_REASON, CompiledPlan, Phase, PlanBuilder, PlanContext, StepTag

__all__ = [
    "CompiledPlan",
    "DryRun",
    "FreezeAndDecide",
    "FrozenContext",
    "HOLD_PROCESSES_MAX",
    "KillByPriority",
    "KillGroup",
    "KillLargest",
    "KillNewest",
    "MoveToOverflow",
    "PICK_REASON",
    "Phase",
    "PlanBuilder",
    "PlanContext",
    "Policy",
    "RaiseLimit",
    "StepTag",
]
