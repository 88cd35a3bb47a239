"""``--plot``: the latency distributions drawn side by side, and the clear refusal when matplotlib
(the ``plot`` extra) is missing."""

from __future__ import annotations

import os
import random
import sys

import pytest

from useroom.bench._plot import INSTALL_HINT, Distributions, PlotUnavailable, Series, check_path, require, write
from useroom.bench._sandbox import BenchError

def _samples(median: float, count: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.lognormvariate(0, 0.25) * median for _ in range(count)]


def _plot(*series: Series) -> Distributions:
    return Distributions(title="useroom deadlock benchmark: episode time", subtitle="kernel 6.1, cgroup v1, 2 cores",
                         quantity="episode time (ms)", series=series, footnote="workers start -> all gone")


@pytest.fixture
def no_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    """matplotlib cannot be imported (None in sys.modules makes every import of it fail)."""
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


class TestWrite:
    @pytest.fixture(autouse=True)
    def matplotlib(self) -> None:
        pytest.importorskip("matplotlib")

    def test_the_svg_names_both_series_and_the_benchmark(self, tmp_path: os.PathLike[str]) -> None:
        """An SVG is written whose text names the benchmark, the machine, each series with its count and
        median, and the quantity."""
        path = os.path.join(tmp_path, "out.svg")
        write(_plot(Series("kernel", _samples(62.0, 300, 1)), Series("useroom-standalone", [40.0, 41.0, 42.0])),
              path)
        with open(path) as file:
            svg = file.read()
        assert svg.startswith("<?xml") and "</svg>" in svg
        for text in ("useroom deadlock benchmark: episode time", "kernel 6.1, cgroup v1, 2 cores", "kernel",
                     "useroom-", "standalone", "n=300", "n=3", "median 41.0 ms", "episode time (ms)"):
            assert text in svg, text

    def test_png_by_the_extension(self, tmp_path: os.PathLike[str]) -> None:
        """A path ending in .png gets a PNG."""
        path = os.path.join(tmp_path, "out.png")
        write(_plot(Series("kernel", [60.0, 70.0]), Series("useroom", [40.0, 45.0])), path)
        with open(path, "rb") as file:
            assert b"\x89PNG\r\n\x1a\n" == file.read(8)

    def test_the_svg_is_the_same_each_time(self, tmp_path: os.PathLike[str]) -> None:
        """No date and no random ids: the same figures draw the same file (it is committed to the docs)."""
        plot = _plot(Series("kernel", _samples(62.0, 50, 2)), Series("useroom", _samples(45.0, 50, 3)))
        paths = [os.path.join(tmp_path, f"{n}.svg") for n in (1, 2)]
        for path in paths:
            write(plot, path)
        with open(paths[0], "rb") as first, open(paths[1], "rb") as second:
            assert first.read() == second.read()

    def test_a_series_without_samples_and_zeros_on_a_log_axis_are_said(self, tmp_path: os.PathLike[str]) -> None:
        """Samples spanning orders of magnitude get a log axis, which cannot show 0: the label says how
        many were left out; a series with no samples says so, with its note."""
        path = os.path.join(tmp_path, "out.svg")
        write(_plot(Series("kernel", [0.0, 5.0, 60.0, 2000.0]),
                    Series("naive", [], note="20 deadlocks in 20 episodes")), path)
        with open(path) as file:
            svg = file.read()
        for text in ("1 at 0 not shown", "no samples", "20 deadlocks in 20", "n=0"):
            assert text in svg, text

    def test_another_extension_is_refused_before_anything_runs(self) -> None:
        """.pdf or no extension: BenchError naming the formats."""
        assert ("svg", "png") == (check_path("a/b.SVG"), check_path("b.png"))
        for path in ("out.pdf", "out"):
            with pytest.raises(BenchError, match=r"\.svg or \.png"):
                check_path(path)


class TestMissingMatplotlib:
    def test_require_names_the_extra(self, no_matplotlib: None) -> None:
        """Without matplotlib, require() raises PlotUnavailable (a BenchError) that names
        pip install 'useroom[plot]'."""
        with pytest.raises(PlotUnavailable) as info:
            require()
        assert isinstance(info.value, BenchError)
        assert INSTALL_HINT == "pip install 'useroom[plot]'"
        assert INSTALL_HINT in str(info.value)

    def test_write_raises_the_same(self, no_matplotlib: None, tmp_path: os.PathLike[str]) -> None:
        """write() itself refuses the same way, and leaves no file."""
        path = os.path.join(tmp_path, "out.svg")
        with pytest.raises(PlotUnavailable, match=r"pip install 'useroom\[plot\]'"):
            write(_plot(Series("kernel", [1.0])), path)
        assert not os.path.exists(path)
