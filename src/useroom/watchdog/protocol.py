"""What a handler's :class:`~useroom.watchdog.WatchdogLink` and its watchdog
process exchange: the takeovers it reports, the guards it is given.

See docs/watchdog.md for the control protocol.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Final

import attrs

__all__ = ["MESSAGE_MAX", "REASONS", "GuardSpec", "Takeover"]

#: The largest control message or record, in bytes (SOCK_SEQPACKET: one recv
#: takes one message, cut at the buffer's size).
MESSAGE_MAX: Final = 65536

#: Why the watchdog took an episode over.
REASONS: Final = ("delay", "handler-exited", "handler-stopped", "handler-in-oom-wait", "heartbeat")


@attrs.frozen
class Takeover:
    """One episode the watchdog handed to the kernel.

    Times are CLOCK_MONOTONIC nanoseconds, comparable with the handler's:
    ``notified_ns`` when the watchdog saw the OOM, ``acted_ns`` when it
    enabled the kernel OOM killer, ``resolved_ns`` when ``under_oom`` read 0
    (None if the group went away first). ``group`` is the group's path in
    the hierarchy (its ``relpath``), ``reason`` one of :data:`REASONS`;
    ``restored`` is the ``oom_kill_disable`` value written back afterwards.
    """

    group: str
    reason: str
    notified_ns: int
    acted_ns: int
    resolved_ns: int | None
    delay: float
    handler_pid: int | None
    restored: int | None

    @property
    def takeover_ns(self) -> int:
        """From the notification to the kernel killer enabled."""
        return self.acted_ns - self.notified_ns

    def to_dict(self) -> dict[str, Any]:
        return {"event": "takeover", **attrs.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Takeover:
        fields = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


def _pair(value: Sequence[int] | None) -> tuple[int, int] | None:
    """Two integers (JSON has them as a list), or None."""
    if value is None:
        return None
    if len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"not two integers: {value!r}")
    return value[0], value[1]


@attrs.frozen
class GuardSpec:
    """What the watchdog needs to guard one group: one ``--guard`` on its
    command line, or the body of an ``add`` message (both JSON)."""

    #: The group's directory.
    path: str = attrs.field(validator=attrs.validators.instance_of(str))
    #: The link's number for this addition of the group: the watchdog's
    #: records about the guard (``added``, ``add-failed``, ``done``,
    #: ``removed``) carry it back.
    key: int = attrs.field(validator=attrs.validators.instance_of(int))
    #: The limit the handler set (restored if it dies with a grant open); None with no handler.
    limit: int | None = attrs.field(default=None,
                                    validator=attrs.validators.optional(attrs.validators.instance_of(int)))
    #: The kernel OOM killer setting before the handler (put back if it dies); None with no handler.
    kill_enabled: bool | None = attrs.field(default=None,
                                            validator=attrs.validators.optional(attrs.validators.instance_of(bool)))
    #: cgroup v2: the group's ``memory.high`` and ``memory.max`` before the handler.
    saved: tuple[int, int] | None = attrs.field(default=None, converter=_pair)

    def to_json(self) -> str:
        return json.dumps(attrs.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> GuardSpec:
        """Parse :meth:`to_json`'s output; raises ValueError if it is not that."""
        try:
            data = json.loads(text)
            return cls(**data)
        except (TypeError, ValueError) as err:  # bad JSON, a missing or stray field, a wrong type
            raise ValueError(f"not a guard: {text!r}: {err}") from None
