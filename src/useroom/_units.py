"""Memory sizes: parse ``"256M"``, ``"1.5G"`` or an int; format them back.

The grammar, case-insensitive, surrounding whitespace ignored::

    size   := "max" | "infinity" | number [" "*] [unit]
    number := digits ["." digits] | "." digits
    unit   := ("K" | "M" | "G" | "T" | "P") ["i"] ["B"] | "B"

Units are binary multiples (``K`` = 1024), whatever the spelling: ``"2MB"``,
``"2M"``, ``"2Mi"`` and ``"2MiB"`` all mean 2 MiB. That is what the kernel's
own ``memparse`` does for ``memory.limit_in_bytes``, and a memory limit in
decimal megabytes is almost always a typo for binary ones.

A decimal fraction is computed exactly (no float rounding) and the result is
rounded *down* to a whole byte: ``"1.5G"`` is 1610612736, ``"1.1K"`` is 1126
(1126.4 rounded down). Exponents, signs, underscores and non-ASCII digits are
rejected.

``"max"`` and ``"infinity"`` parse to :data:`UNLIMITED`, which is also the
largest size accepted (2**63 - 1, the kernel's ``LONG_MAX``); a kernel file
that reports "no limit" (v1: 9223372036854771712, ``LONG_MAX`` rounded down to
a page) is mapped to it by the cgroup backends.
"""

from __future__ import annotations

import mmap
import re
from fractions import Fraction
from typing import Final

from useroom.exceptions import InvalidDuration, InvalidSize

__all__ = ["PAGE_SIZE", "UNLIMITED", "format_size", "parse_duration", "parse_size"]

#: No limit. Equal to the largest size :func:`parse_size` accepts.
UNLIMITED: Final[int] = 2**63 - 1
#: The size of a page: the unit a memory cgroup charges and limits in.
PAGE_SIZE: Final[int] = mmap.PAGESIZE

_MULTIPLIERS: Final[dict[str, int]] = {
    "": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
}
_UNLIMITED_WORDS: Final = frozenset({"max", "infinity"})
# Longer integer parts cannot fit in 63 bits anyway; refusing them early (and
# truncating fractions) keeps Fraction() away from CPython's limit on huge digit
# strings. Truncating to 60 decimals never changes the result: every multiple of
# 1/1024**5 has at most 50 decimals, so the floor is the same.
_MAX_INTEGER_DIGITS: Final = 40
_MAX_FRACTION_DIGITS: Final = 60
_SIZE_RE: Final = re.compile(
    r"(?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?:(?P<unit>[kmgtp])i?b?|(?P<bytes>b))?",
    re.ASCII | re.IGNORECASE,
)
# format_size keeps at most this many decimals, so its output stays readable.
_FORMAT_DECIMALS: Final = 2
_FORMAT_UNITS: Final = (("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))


def parse_size(value: str | int) -> int:
    """Return *value* as a number of bytes.

    *value* is an int in ``0 .. UNLIMITED`` or a string in the grammar of the
    module docstring. Raises :class:`~useroom.exceptions.InvalidSize` (a
    ``ValueError``) for anything else, including bools and floats: a float
    size is ambiguous about rounding, so pass a string such as ``"1.5G"``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidSize(f"a size is an int or a string such as '256M', not {type(value).__name__} {_shown(value)}")
    shown = _shown(value)
    if isinstance(value, int):
        return _checked(value, shown)
    text = value.strip()
    if not text:
        raise InvalidSize("empty size: expected an int or a string such as '256M' or 'max'")
    if text.lower() in _UNLIMITED_WORDS:
        return UNLIMITED
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        if text.startswith("-"):
            raise InvalidSize(f"invalid size {shown}: a size cannot be negative (use 'max' for no limit)")
        raise InvalidSize(
            f"invalid size {shown}: expected a number with an optional unit K, M, G, T or P "
            "(binary; 'Ki', 'KB', 'KiB' also accepted), or 'max'"
        )
    integer, _, fraction = match["number"].partition(".")
    integer = integer.lstrip("0") or "0"
    if len(integer) > _MAX_INTEGER_DIGITS:
        raise InvalidSize(f"size {shown} is too large: the largest is {UNLIMITED} bytes ('max')")
    number = Fraction(f"{integer}.{fraction[:_MAX_FRACTION_DIGITS] or '0'}")
    exact = number * _MULTIPLIERS[(match["unit"] or "").lower()]
    return _checked(int(exact), shown)  # int() of a non-negative Fraction rounds down


def format_size(size: int) -> str:
    """Return *size* (bytes) in the largest binary unit that shows it exactly.

    At most two decimals are used, so the text parses back to the same number:
    ``parse_size(format_size(n)) == n`` for every valid *n*. Examples:
    ``"256MiB"``, ``"1.5GiB"``, ``"1126B"``, and ``"max"`` for
    :data:`UNLIMITED`.
    """
    if isinstance(size, bool) or not isinstance(size, int):
        raise InvalidSize(f"format_size() takes an int number of bytes, not {type(size).__name__} {_shown(size)}")
    size = _checked(size, _shown(size))
    if size == UNLIMITED:
        return "max"
    scale = 10**_FORMAT_DECIMALS
    for suffix, multiplier in _FORMAT_UNITS:
        if size >= multiplier and (size * scale) % multiplier == 0:
            whole, fraction = divmod(size * scale // multiplier, scale)
            if fraction == 0:
                return f"{whole}{suffix}"
            return f"{whole}.{fraction:0{_FORMAT_DECIMALS}d}".rstrip("0") + suffix
    return f"{size}B"


def _shown(value: object) -> str:
    """Return repr(value), shortened so that a huge input cannot flood a message."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"<an int of {value.bit_length()} bits>"  # str() of a huge int raises ValueError
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}...({len(text)} characters)"


def _checked(size: int, shown: str) -> int:
    if size < 0:
        raise InvalidSize(f"invalid size {shown}: a size cannot be negative (use 'max' for no limit)")
    if size > UNLIMITED:
        raise InvalidSize(f"size {shown} is too large: the largest is {UNLIMITED} bytes ('max')")
    return size


_DURATION: Final = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|)\s*", re.ASCII)


def parse_duration(value: str | float | int) -> float:
    """Seconds from ``"2s"``, ``"500ms"``, ``"1.5"`` (seconds) or a number of seconds.

    Anything else, and negative, infinite or not-a-number values, raise
    :class:`~useroom.exceptions.InvalidDuration` (a ``ValueError``).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidDuration(f"a duration is a number of seconds or a string such as '2s' or '500ms', "
                              f"not {type(value).__name__} {_shown(value)}")
    if isinstance(value, str):
        match = _DURATION.fullmatch(value)
        if match is None:
            raise InvalidDuration(f"not a duration: {_shown(value)} (say '2s', '500ms' or a number of seconds)")
        seconds = float(match.group(1)) / (1000 if match.group(2) == "ms" else 1)
    else:
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond a float's range
            seconds = float("inf")
    if not 0 <= seconds < float("inf"):
        raise InvalidDuration(f"a duration must be a finite number of seconds >= 0, not {_shown(value)}")
    return seconds
