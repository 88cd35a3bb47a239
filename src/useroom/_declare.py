"""Declaring the handler: which proposed kernel interfaces exist, else the shim.

Three kernel interfaces were proposed for user-space OOM handlers and none
was merged (see docs/design.md). :func:`probe` looks for each in a group's
directory; a kernel that has one is used directly, and every feature it
lacks is provided by useroom's own stand-in, the *shim*:

===========  ======================================  =====================================
feature      proposed kernel file                    shim
===========  ======================================  =====================================
``delay``    ``memory.oom_delay_millisecs``          the watchdog enables the kernel OOM
             (Rientjes 2011/2013)                    killer once an OOM outlasts the delay
``handler``  ``memory.oom_handler`` (the role        the watchdog hands the episode to the
             Weiner described in 2013; no file       kernel at once when the handler is
             was ever specified)                     stopped, exited, caught in the OOM
                                                     wait, or missed its heartbeat
``reserve``  ``memory.oom_reserve_in_bytes``         the native plan's headroom grant
             (Rientjes 2013/2014)                    (raise the limit, restore it)
===========  ======================================  =====================================
"""

from __future__ import annotations

import os
from typing import Final, Literal

import attrs

from useroom.cgroup import Group

__all__ = ["KERNEL_FILES", "Declaration", "probe"]

#: The file each proposed interface would add to a memory cgroup's directory.
KERNEL_FILES: Final = {
    "delay": "memory.oom_delay_millisecs",
    "handler": "memory.oom_handler",
    "reserve": "memory.oom_reserve_in_bytes",
}

Path = Literal["kernel", "shim"]


@attrs.frozen
class Declaration:
    """Which path serves each feature for a group: ``kernel`` or ``shim``."""

    delay: Path
    handler: Path
    reserve: Path
    #: The proposed files found in the group's directory, by feature.
    found: dict[str, str] = attrs.field(factory=dict)

    @property
    def needs_watchdog(self) -> bool:
        """True unless the kernel provides both the delay and the declared handler."""
        return "shim" in (self.delay, self.handler)

    def describe(self) -> str:
        """One line per feature, for people."""
        return "\n".join(
            f"{feature}: {getattr(self, feature)}"
            + (f" ({self.found[feature]})" if feature in self.found else f" (no {KERNEL_FILES[feature]})")
            for feature in ("delay", "handler", "reserve")
        )

    def to_dict(self) -> dict[str, object]:
        return {"delay": self.delay, "handler": self.handler, "reserve": self.reserve, "found": dict(self.found)}


def probe(group: Group) -> Declaration:
    """Look for each proposed interface's file in ``group``'s directory."""
    found = {feature: name for feature, name in KERNEL_FILES.items()
             if os.path.exists(os.path.join(group.path, name))}

    def path(feature: str) -> Path:
        return "kernel" if feature in found else "shim"

    return Declaration(delay=path("delay"), handler=path("handler"), reserve=path("reserve"), found=found)
