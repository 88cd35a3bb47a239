"""The handler layer: each group's handler and the supervisor serving them.

Collaborators that own their state, each in its module; a module imports
only the ones listed before it:

- :mod:`~useroom.handler.validate`: the checks of a handler's arguments
  made when it is constructed (sizes against the group's limit and the
  machine's memory, types, output paths);
- :mod:`~useroom.handler.events`: :class:`OomEvent` and its parts, and the
  watcher's record of an episode -> an event (a pure function);
- :mod:`~useroom.handler.history`: what a handler remembers, bounded: the
  newest events in full (:class:`EventHistory`), :class:`EpisodeCounts`
  over every episode, and :class:`~useroom.handler.history.Recent` for
  errors and the watchdog's history, each saying how many it dropped;
- :mod:`~useroom.handler.arming`: per backend (:class:`V1Arming`,
  :class:`V2Arming`, picked by :func:`arming_for` from the group's backend
  class), the fds the plans name, the settings held on the group and put
  back, the limit (or wall) held, the usage thresholds or polled sizes;
- :mod:`~useroom.handler.grants`: the headroom grant, answered from Python;
- :mod:`~useroom.handler.host`: what a supervisor gives each group it
  serves: the process-wide :class:`ProcessOptions` and a :class:`Host`;
- :mod:`~useroom.handler.group`: :class:`GroupHandler`, one group's
  options, hooks, victim table, plans, step and events;
- :mod:`~useroom.handler.guardian`, :mod:`~useroom.handler.placement`,
  :mod:`~useroom.handler.manager`: a supervisor's watchdog process, the
  placement of its threads' kernel allocations, its manager thread;
- :mod:`~useroom.handler.supervisor`: :class:`Supervisor` and the public
  :class:`Handler` (a supervisor of one group when started on its own).

Between a group and its supervisor the boundary is named: the supervisor
gives each group a :class:`Host`, and calls the group only through the
section "served by a supervisor" of :class:`GroupHandler`; no module here
reaches another's private attributes.
"""

from useroom.handler.arming import V2_GAP, Arming, V1Arming, V2Arming, arming_for
from useroom.handler.events import EventOutcome, OomEvent, StepRecord, VictimRecord
from useroom.handler.grants import Grants
from useroom.handler.history import EpisodeCounts, EventHistory
from useroom.handler.group import GroupHandler
from useroom.handler.host import Host, ProcessOptions
from useroom.handler.supervisor import Handler, Supervisor

__all__ = [
    "V2_GAP",
    "Arming",
    "EpisodeCounts",
    "EventHistory",
    "EventOutcome",
    "Grants",
    "GroupHandler",
    "Handler",
    "Host",
    "OomEvent",
    "ProcessOptions",
    "StepRecord",
    "Supervisor",
    "V1Arming",
    "V2Arming",
    "VictimRecord",
    "arming_for",
]
