"""Parsing and formatting of memory sizes."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from useroom._units import UNLIMITED, format_size, parse_size
from useroom.exceptions import InvalidSize, UseroomError

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

sizes = st.integers(min_value=0, max_value=UNLIMITED)


class TestParseSize:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("0", 0),
            ("4096", 4096),
            ("100B", 100),
            ("64k", 64 * KIB),
            ("64K", 64 * KIB),
            ("512KiB", 512 * KIB),
            ("512kib", 512 * KIB),
            ("256M", 256 * MIB),
            ("256Mi", 256 * MIB),
            ("2MB", 2 * MIB),
            ("3 GiB", 3 * GIB),
            ("1.5G", 3 * GIB // 2),
            (".5K", 512),
            ("2T", 2 << 40),
            ("1P", 1 << 50),
            ("  8M\n", 8 * MIB),
            ("007M", 7 * MIB),
        ],
    )
    def test_valid_strings(self, text: str, expected: int) -> None:
        """Units are binary multiples in every spelling; whitespace around the size is ignored."""
        assert expected == parse_size(text)

    def test_fraction_rounds_down(self) -> None:
        """A fraction that is not a whole number of bytes is rounded down (1.1 KiB is 1126.4 bytes)."""
        assert 1126 == parse_size("1.1K")

    def test_fraction_is_exact(self) -> None:
        """Fractions are computed exactly, without float rounding."""
        assert 1000 * GIB + 3221225 == parse_size("1000.003G")  # 0.003 GiB is 3221225.472 bytes

    @pytest.mark.parametrize("text", ["max", "MAX", "infinity", " Infinity "])
    def test_unlimited_words(self, text: str) -> None:
        """'max' and 'infinity' mean no limit."""
        assert UNLIMITED == parse_size(text)

    def test_ints(self) -> None:
        """Ints from 0 to UNLIMITED are taken as bytes."""
        assert (0, 123, UNLIMITED) == (parse_size(0), parse_size(123), parse_size(UNLIMITED))

    def test_largest(self) -> None:
        """The largest size is 2**63 - 1, which is UNLIMITED."""
        assert UNLIMITED == 2**63 - 1 == parse_size(str(2**63 - 1))

    @pytest.mark.parametrize(
        "value",
        [
            "",
            "   ",
            "-1",
            "-2M",
            "abc",
            "M",
            "1e9",
            "1_000",
            "+1",
            "1.5.5",
            "1 K B",
            "1KBi",
            "1X",
            "0x10",
            "\u0661\u0662",  # Arabic-Indic digits
            "8E",
            "8192P",
            str(2**63),
            "9" * 5000,
            -1,
            2**63,
            10**5000,
            True,
            False,
            1.5,
            math.nan,
            math.inf,
            None,
            b"1M",
        ],
        # pytest's own str() of a 5000-digit int would raise
        ids=lambda value: f"int-{value.bit_length()}-bits" if isinstance(value, int) else repr(value)[:20],
    )
    def test_invalid(self, value: object) -> None:
        """Negative, empty, garbage, bool, float and too large values raise InvalidSize."""
        with pytest.raises(InvalidSize):
            parse_size(value)  # type: ignore[arg-type]

    def test_invalid_size_is_value_error(self) -> None:
        """InvalidSize can be caught as ValueError or as the library's base error."""
        with pytest.raises(ValueError):
            parse_size("lots")
        with pytest.raises(UseroomError):
            parse_size("lots")

    def test_message_names_the_problem(self) -> None:
        """The message says what is wrong, not just that it is."""
        with pytest.raises(InvalidSize, match="negative"):
            parse_size("-5M")
        with pytest.raises(InvalidSize, match="too large"):
            parse_size("9000P")
        with pytest.raises(InvalidSize, match="not float"):
            parse_size(1.5)  # type: ignore[arg-type]

    def test_message_is_short_for_huge_input(self) -> None:
        """A huge input is shortened in the message."""
        with pytest.raises(InvalidSize) as info:
            parse_size("x" * 100_000)
        assert len(str(info.value)) < 300

    @given(sizes)
    def test_int_text_round_trip(self, size: int) -> None:
        """The decimal text of any valid size parses to that size."""
        assert size == parse_size(str(size))

    @given(st.integers(min_value=0, max_value=UNLIMITED >> 30), st.sampled_from(["K", "M", "G"]))
    def test_unit_multiplies(self, number: int, unit: str) -> None:
        """A number with a unit is the number times the binary multiple."""
        multiplier = {"K": KIB, "M": MIB, "G": GIB}[unit]
        assert number * multiplier == parse_size(f"{number}{unit}")

    @given(st.text())
    @example("1." + "0" * 10_000)
    @example("0." + "9" * 10_000 + "P")
    @example("\x00")
    def test_arbitrary_text_raises_only_invalid_size(self, text: str) -> None:
        """Any text either parses to a valid size or raises InvalidSize, never another error."""
        try:
            size = parse_size(text)
        except InvalidSize:
            return
        assert 0 <= size <= UNLIMITED

    @given(st.from_regex(r"\A[0-9]{0,25}\.?[0-9]{0,25}\s?[kmgtpKMGTP]?i?[bB]?\Z"))
    def test_size_like_text_raises_only_invalid_size(self, text: str) -> None:
        """Text shaped like a size either parses to a valid size or raises InvalidSize."""
        try:
            size = parse_size(text)
        except InvalidSize:
            return
        assert 0 <= size <= UNLIMITED


class TestFormatSize:
    @pytest.mark.parametrize(
        ("size", "expected"),
        [
            (0, "0B"),
            (1126, "1126B"),
            (KIB, "1KiB"),
            (256 * MIB, "256MiB"),
            (3 * GIB // 2, "1.5GiB"),
            (GIB + GIB // 4, "1.25GiB"),
            (GIB + 1, "1073741825B"),
            (5 << 40, "5TiB"),
            (UNLIMITED, "max"),
        ],
    )
    def test_examples(self, size: int, expected: str) -> None:
        """The largest binary unit that shows the size exactly, with at most two decimals."""
        assert expected == format_size(size)

    @given(sizes)
    def test_round_trip(self, size: int) -> None:
        """parse_size(format_size(n)) == n for every valid size."""
        assert size == parse_size(format_size(size))

    @pytest.mark.parametrize("value", [-1, 2**63, True, 1.0, "1M"])
    def test_invalid(self, value: object) -> None:
        """format_size takes only a valid int."""
        with pytest.raises(InvalidSize):
            format_size(value)  # type: ignore[arg-type]
