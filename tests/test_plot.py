"""``--plot``: the latency distributions drawn side by side, what the benchmarks feed them, and the
clear refusal when matplotlib (the ``plot`` extra) is missing."""

from __future__ import annotations

import io
import os
import random
import subprocess
import sys

import pytest

from useroom.bench.__main__ import main
from useroom.bench._deadlock import Block, Config, Episode, Run
from useroom.bench._plot import (
    INSTALL_HINT,
    Distributions,
    PlotUnavailable,
    Series,
    check_path,
    ecdf,
    require,
    write,
)
from useroom.bench._report import distributions
from useroom.bench._sandbox import BenchError
from useroom.bench._storm import main as storm_main
from useroom.bench._storm_report import kill_intervals_ms

MS = 1_000_000


def _samples(median: float, count: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.lognormvariate(0, 0.25) * median for _ in range(count)]


def _plot(*series: Series) -> Distributions:
    return Distributions(title="useroom deadlock benchmark: episode time", subtitle="kernel 6.1, cgroup v1, 2 cores",
                         quantity="episode time (ms)", series=series, footnote="workers start -> all gone")


def _episode(variant: str, duration_ms: float | None) -> Episode:
    outcome = "resolved" if duration_ms is not None else "deadlock"
    end = None if duration_ms is None else int(duration_ms * MS)
    return Episode(variant=variant, index=1, block=1, group="g", start_ns=0, outcome=outcome, end_ns=end,
                   window_end_ns=end or 5000 * MS, worker_exit_ns=[], worker_signals=[], worker_codes=[],
                   kernel_kills=0, gone_before_rescue=0, rescued=duration_ms is None)


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
        many were left out; a series with no samples says so, with its note; the axis of the fractions
        says the unfinished count."""
        path = os.path.join(tmp_path, "out.svg")
        write(_plot(Series("kernel", [0.0, 5.0, 60.0, 2000.0]),
                    Series("naive", [], note="20 deadlocks in 20 episodes", unfinished=20)), path)
        with open(path) as file:
            svg = file.read()
        for text in ("1 at 0 not shown", "no samples", "20 deadlocks in 20", "n=0",
                     "fraction at or below (of all, the unfinished too)"):
            assert text in svg, text

    def test_another_extension_is_refused_before_anything_runs(self) -> None:
        """.pdf or no extension: BenchError naming the formats."""
        assert ("svg", "png") == (check_path("a/b.SVG"), check_path("b.png"))
        for path in ("out.pdf", "out"):
            with pytest.raises(BenchError, match=r"\.svg or \.png"):
                check_path(path)


class TestDistributionFunction:
    def test_fractions_of_every_sample(self) -> None:
        """From (smallest, 0), each value with the share of samples at or below it."""
        assert ([1.0, 1.0, 2.0, 3.0, 4.0], [0.0, 0.25, 0.5, 0.75, 1.0]) == ecdf(Series("k", [3.0, 1.0, 4.0, 2.0]))

    def test_unfinished_samples_keep_it_below_one(self) -> None:
        """One episode ended in ten (nine deadlocks): the curve rises to 0.1 only."""
        assert ([180.0, 180.0], [0.0, 0.1]) == ecdf(Series("naive", [180.0], unfinished=9))

    def test_zeros_on_a_log_axis_are_counted_not_drawn(self) -> None:
        """A log axis cannot show 0: the curve starts at the zeros' share."""
        assert ([5.0, 5.0, 60.0], [0.5, 0.75, 1.0]) == ecdf(Series("k", [0.0, 0.0, 5.0, 60.0]), log=True)

    def test_at_most_a_thousand_points(self) -> None:
        """Ten thousand samples draw as about a thousand points, the last at the largest value and 1."""
        xs, ys = ecdf(Series("k", [float(v) for v in range(10000)]))
        assert len(xs) <= 1001 and (9999.0, 1.0) == (xs[-1], ys[-1])


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

    @pytest.mark.parametrize("command", ["deadlock", "storm"])
    def test_the_benchmarks_refuse_before_running(self, no_matplotlib: None, command: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
        """deadlock --plot and storm --plot exit 2 at once, naming the extra, before any group or process
        is made (a run of minutes does not end in an ImportError)."""
        err = io.StringIO()
        if command == "deadlock":
            code = main(["deadlock", "--plot", "out.svg"], out=io.StringIO(), err=err)
        else:
            code = storm_main(["--plot", "out.svg"], out=io.StringIO())
        said = err.getvalue() + capsys.readouterr().err
        assert 2 == code
        assert "pip install 'useroom[plot]'" in said


class TestWhatIsPlotted:
    def test_deadlock_episode_times_kernel_first(self) -> None:
        """The deadlock plot has each variant's episode times in ms, the kernel's first whatever the order
        asked; a variant's deadlocks, which have no time, are in its note."""
        config = Config(variants=("useroom-standalone", "naive", "kernel"), episodes=2, naive_episodes=2)
        machine = {"kernel": "6.1.0", "cgroup_version": 1, "cores": 2}
        blocks = [Block("useroom-standalone", 1, "g", [_episode("useroom-standalone", 40.0),
                                                       _episode("useroom-standalone", 45.5)]),
                  Block("naive", 2, "g", [_episode("naive", None)]), Block("naive", 3, "g", [_episode("naive", None)]),
                  Block("kernel", 4, "g", [_episode("kernel", 62.0), _episode("kernel", 70.0)])]
        plot = distributions(Run(config, machine, blocks))
        assert [("kernel", (62.0, 70.0), "", 0), ("useroom-standalone", (40.0, 45.5), "", 0),
                ("naive", (), "2 deadlocks in 2 episodes", 2)] == \
            [(s.label, s.values, s.note, s.unfinished) for s in plot.series]
        assert "kernel 6.1.0, cgroup v1, 2 cores" in plot.subtitle
        assert "64MiB" in plot.subtitle

    def test_storm_times_between_kills_within_a_round(self) -> None:
        """From one kill to the next, in ms, in time order, leaving out what spans a restart of the
        supervisor."""
        run = {"verdicts": [{"t_ns": t * MS} for t in (30, 10, 50, 200, 215)], "restarts": [(60 * MS, 190 * MS)]}
        assert [20.0, 20.0, 15.0] == kill_intervals_ms(run)
        assert [] == kill_intervals_ms({"verdicts": [{"t_ns": 1}], "restarts": []})


@pytest.mark.kernel
@pytest.mark.timeout(300)
def test_a_deadlock_run_draws_its_plot(tmp_path: os.PathLike[str]) -> None:
    """python -m useroom.bench deadlock --plot draws the run's variants into the SVG."""
    pytest.importorskip("matplotlib")
    path = os.path.join(tmp_path, "deadlock.svg")
    done = subprocess.run([sys.executable, "-m", "useroom.bench", "deadlock", "--variants", "kernel",
                           "useroom-inprocess", "--episodes", "3", "--plot", path],
                          capture_output=True, text=True, timeout=280, check=False)
    assert 0 == done.returncode, done.stdout + done.stderr
    with open(path) as file:
        svg = file.read()
    assert all(text in svg for text in ("kernel", "inprocess", "n=3", "episode time")), svg[-2000:]
