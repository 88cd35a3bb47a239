"""systemd's service notification protocol, for ``useroom handle``.

Under systemd (``Type=notify``), ``$NOTIFY_SOCKET`` names a datagram socket
(a path, or an abstract name written with a leading ``@``). A service sends
newline-separated ``KEY=value`` assignments in one datagram: ``READY=1``
once it serves, ``STATUS=...`` for ``systemctl status``, ``WATCHDOG=1``
at least every ``$WATCHDOG_USEC`` / 2 when the unit sets ``WatchdogSec=``,
``STOPPING=1`` on the way out. Without ``$NOTIFY_SOCKET`` every call does
nothing: the protocol needs no library.
"""

from __future__ import annotations

import os
import socket

__all__ = ["SystemdNotifier", "watchdog_interval"]


def _address(name: str) -> str:
    # An abstract socket's name starts with a NUL byte, written "@".
    return "\0" + name[1:] if name.startswith("@") else name


class SystemdNotifier:
    """Sends notifications to ``$NOTIFY_SOCKET`` (read once, at creation);
    :attr:`enabled` is False without one, and :meth:`send` does nothing."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        name = env.get("NOTIFY_SOCKET", "")
        self._address = _address(name) if name else None
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: object) -> bool:
        """Sends ``KEY=value`` lines (``send(READY=1, STATUS="...")``); True
        if a datagram went out. An error (systemd gone) is not raised: the
        handler serves its groups whether anyone listens or not."""
        if self._address is None:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(message, self._address)
        except OSError:
            return False
        return True

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
    """How often to send ``WATCHDOG=1`` (half of ``$WATCHDOG_USEC``, in
    seconds), or None when systemd does not watch this process (unset, or
    ``$WATCHDOG_PID`` names another process)."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid is not None and pid != str(os.getpid())):
        return None
    return usec / 2e6
