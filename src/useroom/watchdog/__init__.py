"""The watchdog: a process outside the handled groups that never lets one sleep forever.

It stands in for kernel interfaces that were proposed and never merged (see
:mod:`useroom._declare` and docs/design.md):

- **delay** (Rientjes' ``memory.oom_delay_millisecs``): when a group stays
  under OOM longer than ``delay``, the watchdog enables the kernel OOM
  killer for it until ``under_oom`` reads 0, then puts the setting back.
  Like the proposal, the delay re-arms on each episode.
- **declared handler** (Weiner): when the groups' declared handler has
  exited, is stopped, has its native watcher asleep in the memcg OOM wait
  (``mem_cgroup_oom_synchronize`` in its wait channel), has its manager
  thread asleep there while the headroom grant it was given is open (the
  grant is used up: the plan waits for a thread that waits for memory), or
  has sent no heartbeat for ``heartbeat_timeout`` since the later of its
  last one and the start of the episode, the watchdog hands the episode to
  the kernel at once instead of waiting out the delay. The manager asleep
  in the OOM wait with no grant open is the in-group design at work (the
  native watcher acts for it), not a fault.
- **reserve** (Rientjes' ``memory.oom_reserve_in_bytes``): the handler's
  headroom grant raises the limit; if the handler dies with a grant open,
  the watchdog restores the limit as soon as usage fits under it.

It gets each group's OOM notification through an eventfd of its own, like
the handler, and runs in a group of the user's own tree outside the handled
ones, so the OOM it watches never makes it wait. One process guards every
group of one handler process (a :class:`~useroom.Handler`, or a supervisor
serving many groups): the handler's side, :class:`WatchdogLink`, starts it,
adds and removes groups while it runs, and restarts it if it dies, with
every group it guarded. It can also run on its own to guard several groups::

    useroom watchdog /sys/fs/cgroup/memory/.../app --delay 2s
    python -m useroom.watchdog GROUP [GROUP ...] --delay 500ms --log takeovers.jsonl

With nothing happening it sleeps in the kernel: it waits on the groups'
eventfds, the handler's pidfd (its death) and the control socket, with a
timer only while an episode is under way or a limit restore is pending.
That is also why the heartbeat is judged from the episode's start: an idle
handler sends none, and owes one only ``heartbeat_timeout`` into an episode.

Each takeover is one JSON line in the log (and, for a handler's watchdog,
an :class:`~useroom.OomEvent` with ``takeover`` set in ``handler.events``).
See docs/watchdog.md for the control protocol.

The package: :mod:`~useroom.watchdog.protocol` (what the handler and the
watchdog say to each other), :mod:`~useroom.watchdog.guards` (one guard
per group) and :mod:`~useroom.watchdog.process` (the process's loop and
command line). The handler's side, :class:`WatchdogLink`, lives in
:mod:`useroom.handler.link` and is re-exported here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from useroom.watchdog.process import DEFAULT_DELAY, Watchdog, main
from useroom.watchdog.protocol import Takeover

if TYPE_CHECKING:
    from useroom.handler.link import WatchdogLink

__all__ = ["DEFAULT_DELAY", "Takeover", "Watchdog", "WatchdogLink", "main"]


def __getattr__(name: str) -> Any:
    # The link imports this package (its protocol and guards): imported
    # here eagerly, it would find this package half-made whenever the link
    # is imported first. So it is imported on first use.
    if name == "WatchdogLink":
        from useroom.handler.link import WatchdogLink

        return WatchdogLink
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
