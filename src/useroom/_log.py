"""The log output of ``useroom handle``: levels, and a JSON formatter.

The library logs under the ``useroom`` logger (each module under its own
name, ``useroom.handler.group`` ...) and configures nothing but a
``NullHandler``; only the command line calls :func:`configure`.

:class:`JsonFormatter` writes one JSON object per line with these fields:

- ``time``: when the record was made, ISO 8601 in UTC with microseconds;
- ``level``: ``DEBUG``, ``INFO``, ``WARNING``, ``ERROR`` or ``CRITICAL``;
- ``logger``: the logger's name (``useroom.handler.group`` ...);
- ``message``: the line a person reads;
- ``exc``: the formatted traceback, only for a record with one;
- every field the record was given with ``extra=``, under its own name
  (the episode record's ``group``, ``episode``, ``outcome`` ..., see the
  user guide's section "Logging"). A value JSON cannot write is written
  as its ``str()``.
"""

from __future__ import annotations

import datetime
import json
import logging
import warnings
from typing import IO, Any

from useroom.exceptions import DegradedWarning

__all__ = ["FORMATS", "JsonFormatter", "configure", "level_for"]

#: The values of ``--log-format``.
FORMATS = ("text", "json")

#: The text format: time, level, logger, message.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: What every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module's docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        return json.dumps(out, default=str)


def level_for(verbose: bool, quiet: bool) -> int:
    """``-v``: DEBUG; ``-q``: WARNING; neither: INFO."""
    if verbose:
        return logging.DEBUG
    return logging.WARNING if quiet else logging.INFO


def configure(level: int, fmt: str = "text", stream: IO[str] | None = None) -> logging.Handler:
    """Sends the ``useroom`` logger's records at ``level`` and above to
    ``stream`` (stderr by default) in ``fmt`` (``text`` or ``json``);
    returns the handler added. The root logger is left alone."""
    if fmt not in FORMATS:
        raise ValueError(f"the log format is one of {', '.join(FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    logger = logging.getLogger("useroom")
    logger.addHandler(handler)
    logger.setLevel(level)
    # A degraded mode is a warning record already (with its fields, in the
    # chosen format): the DegradedWarning for library users would say it twice.
    warnings.filterwarnings("ignore", category=DegradedWarning)
    return handler
