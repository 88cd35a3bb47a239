"""What a supervisor runs without, said once and kept.

A handler starts wherever it can: with RLIMIT_MEMLOCK at 0 it locks
nothing, on a kernel before 5.3 it has no pidfds, before 5.15 no
process_mrelease, and with ``watchdog=False`` nobody ends an episode it
cannot. Each such mode is recorded on the supervisor (``degraded``, also
read through each of its handlers), logged as a warning on the ``useroom``
logger with ``cause`` set to the mode's value, and raised once as a
:class:`~useroom.DegradedWarning` through :mod:`warnings`, so that a
service's tests and ``python -W error`` can see it too.
"""

from __future__ import annotations

import enum
import logging
import warnings
from collections.abc import Mapping

import attrs

from useroom.exceptions import DegradedWarning

__all__ = ["Degradation", "Degradations", "DegradedMode"]

logger = logging.getLogger(__name__)


class Degradation(enum.Enum):
    """A mode a handler runs in that is weaker than the one it was built for."""

    #: Less than the critical set is locked in memory (RLIMIT_MEMLOCK): the
    #: native thread may fault on a page that is not resident, at the OOM.
    PARTIAL_LOCK = "partial_lock"
    #: No pidfds (Linux 5.3): victims are signalled by pid, after a check
    #: that the pid is still in the group, and a pid can be reused meanwhile.
    NO_PIDFD = "no_pidfd"
    #: No process_mrelease (Linux 5.15): a killed victim's memory comes back
    #: only as fast as it exits.
    NO_MRELEASE = "no_mrelease"
    #: No watchdog (``watchdog=False``): an episode the handler does not end
    #: is never handed to the kernel's OOM killer.
    NO_WATCHDOG = "no_watchdog"


@attrs.frozen
class DegradedMode:
    """One degraded mode: which, what it means here, and its figures."""

    kind: Degradation
    message: str
    fields: Mapping[str, object] = attrs.field(factory=dict)


class Degradations:
    """The degraded modes of one supervisor. Each distinct mode is logged and
    warned about once, however often the supervisor starts."""

    def __init__(self) -> None:
        self._modes: dict[tuple[Degradation, str], DegradedMode] = {}

    def note(self, kind: Degradation, message: str, **fields: object) -> None:
        key = (kind, message)
        if key in self._modes:
            return
        self._modes[key] = DegradedMode(kind, message, dict(fields))
        logger.warning("%s", message, extra={"cause": kind.value, **fields})
        warnings.warn(message, DegradedWarning, stacklevel=2)

    @property
    def modes(self) -> tuple[DegradedMode, ...]:
        return tuple(self._modes.values())
