"""The control protocol between a handler's :class:`~useroom.watchdog.WatchdogLink`
and its watchdog process: one place for both sides.

They talk over a ``SOCK_SEQPACKET`` socket pair, one message per packet.
The handler sends the messages below, each a word and, when it carries
data, one JSON value; the watchdog answers :data:`READY`, then one JSON
record per thing it did (:func:`encode_record`, :func:`decode_record`),
``{"event": "takeover", ...}`` being a :class:`Takeover`. The groups a
watchdog guards from its start are on its command line, one
:data:`GUARD_OPTION` each, with the JSON of an ``add``. Decisions are made
on this data: neither side parses text written for people.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Final

import attrs

__all__ = [
    "GUARD_OPTION",
    "MESSAGE_MAX",
    "READY",
    "REASONS",
    "Add",
    "Beat",
    "GuardSpec",
    "LastResort",
    "Message",
    "Remove",
    "SetLimit",
    "Stop",
    "Takeover",
    "decode",
    "decode_record",
    "encode_record",
    "guard_argv",
]

#: The largest control message or record, in bytes (SOCK_SEQPACKET: one recv
#: takes one message, cut at the buffer's size).
MESSAGE_MAX: Final = 65536
#: What the watchdog sends once it guards the groups of its command line.
READY: Final = b"ready"
#: The option of the watchdog's command line that carries one :class:`GuardSpec`'s JSON.
GUARD_OPTION: Final = "--guard"

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


def guard_argv(specs: Iterable[GuardSpec]) -> list[str]:
    """The watchdog's command line for *specs*: :data:`GUARD_OPTION` and
    the spec's JSON (read back with :meth:`GuardSpec.from_json`) for each."""
    argv: list[str] = []
    for spec in specs:
        argv += [GUARD_OPTION, spec.to_json()]
    return argv


# -- the handler's messages --------------------------------------------------


@attrs.frozen
class Beat:
    """A heartbeat: the watchdog counts the handler's silence from the last one."""

    word: ClassVar[bytes] = b"beat"

    def encode(self) -> bytes:
        return self.word

    @classmethod
    def parse(cls, body: bytes) -> Beat:
        return cls()


@attrs.frozen
class Add:
    """Guard one more group (answered ``added`` or ``add-failed``)."""

    word: ClassVar[bytes] = b"add"
    spec: GuardSpec

    def encode(self) -> bytes:
        return self.word + b" " + self.spec.to_json().encode()

    @classmethod
    def parse(cls, body: bytes) -> Add:
        return cls(GuardSpec.from_json(body))


@attrs.frozen
class Remove:
    """Stop guarding the group at ``path``, its settings untouched (answered ``removed``)."""

    word: ClassVar[bytes] = b"remove"
    path: str

    def encode(self) -> bytes:
        return self.word + b" " + json.dumps({"path": self.path}).encode()

    @classmethod
    def parse(cls, body: bytes) -> Remove:
        return cls(str(json.loads(body)["path"]))


@attrs.frozen
class SetLimit:
    """The limit the handler set for the group at ``path`` now (restored
    if the handler dies with a grant open)."""

    word: ClassVar[bytes] = b"limit"
    path: str
    limit: int

    def encode(self) -> bytes:
        return self.word + b" " + json.dumps({"path": self.path, "limit": self.limit}).encode()

    @classmethod
    def parse(cls, body: bytes) -> SetLimit:
        change = json.loads(body)
        return cls(str(change["path"]), int(change["limit"]))


@attrs.frozen
class LastResort:
    """The handler found nothing left to kill: the kernel acts next and may
    take the handler's own process. The watchdog logs ``note`` (a JSON
    object), which survives there."""

    word: ClassVar[bytes] = b"last-resort"
    note: Mapping[str, Any]

    def encode(self) -> bytes:
        return self.word + b" " + json.dumps(self.note).encode()

    @classmethod
    def parse(cls, body: bytes) -> LastResort:
        note = json.loads(body)
        if not isinstance(note, dict):
            raise TypeError(f"not a JSON object: {note!r}")
        return cls(note)


@attrs.frozen
class Stop:
    """Exit."""

    word: ClassVar[bytes] = b"stop"

    def encode(self) -> bytes:
        return self.word

    @classmethod
    def parse(cls, body: bytes) -> Stop:
        return cls()


#: A message from the handler to its watchdog.
Message = Beat | Add | Remove | SetLimit | LastResort | Stop

_BY_WORD: Final[dict[bytes, type[Message]]] = {
    kind.word: kind for kind in (Beat, Add, Remove, SetLimit, LastResort, Stop)
}


def decode(data: bytes) -> Message:
    """One packet from the handler; raises ValueError, KeyError or
    TypeError if it is not a message (an unknown word, bad JSON, a missing
    or wrong field)."""
    word, _, body = data.partition(b" ")
    kind = _BY_WORD.get(word)
    if kind is None:
        raise ValueError("unknown message")
    return kind.parse(body)


# -- the watchdog's records ----------------------------------------------------


def encode_record(record: Mapping[str, Any]) -> str:
    """One record of the watchdog: a line of its log and, encoded, a packet to the handler."""
    return json.dumps(record, sort_keys=True)


def decode_record(data: bytes) -> dict[str, Any] | None:
    """A record the watchdog sent, or None if *data* is not one (a record
    cut at :data:`MESSAGE_MAX`, such as an error with a long traceback)."""
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None
