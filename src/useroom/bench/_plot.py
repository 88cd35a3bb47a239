"""``--plot PATH``: a benchmark's latency distributions, kernel and useroom side by side.

A benchmark builds a :class:`Distributions` (plain data: one :class:`Series`
of samples per variant) and :func:`write` draws it with matplotlib into an
SVG or PNG file, by the path's extension: on the left a box per variant
(quartiles and median, whiskers at the 1st and 99th percentiles, the samples
beyond them as points), on the right the empirical distribution functions
of the same samples (where some never ended, such as deadlocked episodes,
a curve stays below 1 by their share). The value axis is logarithmic where the samples span
more than :data:`LOG_SPAN` (a tail of a few slow episodes would otherwise
squash every box).

matplotlib is the ``plot`` extra (``pip install 'useroom[plot]'``). It is
imported here only, and only when a plot is asked for; :func:`require`
checks for it before a benchmark starts, so that a run of minutes does not
end in an ImportError.
"""

from __future__ import annotations

import importlib
import math
import os
import textwrap
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs

from useroom.bench._sandbox import BenchError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.axis import Axis

__all__ = ["FORMATS", "INSTALL_HINT", "LOG_SPAN", "Distributions", "PlotUnavailable", "Series", "check_path",
           "check_plot", "ecdf", "require", "write"]

#: The file formats, by the path's extension.
FORMATS: Final = {".svg": "svg", ".png": "png"}
#: The value axis is logarithmic when the largest sample is more than this many times the smallest.
LOG_SPAN: Final = 20.0
#: At most this many points of each distribution function are drawn (evenly spaced in rank): an SVG of
#: ten thousand samples stays small, and the curve looks the same.
_ECDF_POINTS: Final = 1000
#: The baseline's colour, then the others'.
_BASELINE_COLOUR: Final = "#555555"
_COLOURS: Final = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")
INSTALL_HINT: Final = "pip install 'useroom[plot]'"


class PlotUnavailable(BenchError):
    """matplotlib, which ``--plot`` needs, cannot be imported."""


def _floats(values: Iterable[float]) -> tuple[float, ...]:
    return tuple(float(value) for value in values)


@attrs.frozen
class Series:
    """One variant's samples, in milliseconds."""

    label: str
    values: tuple[float, ...] = attrs.field(converter=_floats)
    #: What the plot says beside the label, such as why there are no samples.
    note: str = ""
    #: Samples that have no value because what they time never ended (a
    #: deadlock): they count in the distribution function's fractions, which
    #: then stay below 1.
    unfinished: int = 0


def _all_series(series: Iterable[Series]) -> tuple[Series, ...]:
    return tuple(series)


@attrs.frozen
class Distributions:
    """What one plot shows: the series side by side, the baseline (the kernel's) first."""

    #: The benchmark and the quantity ("useroom deadlock benchmark: episode time").
    title: str
    #: The machine and the workload: kernel, cgroup version, sizes.
    subtitle: str
    #: The value axis's label, with its unit.
    quantity: str
    series: tuple[Series, ...] = attrs.field(converter=_all_series)
    #: The samples' unit, after each median.
    unit: str = "ms"
    #: What the quantity is, under the plot.
    footnote: str = ""


def require() -> None:
    """Raises :class:`PlotUnavailable`, naming the extra to install, if matplotlib cannot be imported."""
    try:
        importlib.import_module("matplotlib")
    except ImportError as err:
        raise PlotUnavailable(f"--plot needs matplotlib, which cannot be imported here ({err}); "
                              f"install it with: {INSTALL_HINT}") from err


def check_plot(path: str) -> None:
    """Before a run: BenchError if ``--plot`` *path* names no format, or matplotlib is missing."""
    check_path(path)
    require()


def check_path(path: str) -> str:
    """The format of *path* (``svg`` or ``png``), from its extension; BenchError for another."""
    fmt = FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise BenchError(f"--plot {path}: the file's name ends in {' or '.join(FORMATS)}, which says its format")
    return fmt


def write(plot: Distributions, path: str) -> None:
    """Draws *plot* into *path* (SVG or PNG, by its extension).

    The SVG is reproducible: no date in its metadata, fixed element ids,
    and its text as text (searchable, and small)."""
    fmt = check_path(path)
    require()
    import matplotlib
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"svg.hashsalt": "useroom", "svg.fonttype": "none", "font.size": 9}):
        figure = Figure(figsize=(13, 5.4), layout="constrained")
        boxes, curves = figure.subplots(1, 2, gridspec_kw={"width_ratios": (1.1, 1.2)})
        log = _log_scale([v for s in plot.series for v in s.values])
        _boxes(boxes, plot, log)
        _curves(curves, plot, log)
        figure.suptitle(f"{plot.title}\n{plot.subtitle}", fontsize=10)
        if plot.footnote:
            figure.supxlabel(plot.footnote, fontsize=8, color="#444444")
        metadata: dict[str, Any] = {"Date": None} if fmt == "svg" else {}
        figure.savefig(path, format=fmt, dpi=120, metadata=metadata)


def _log_scale(values: Sequence[float]) -> bool:
    positive = [v for v in values if v > 0]
    return bool(positive) and max(positive) > LOG_SPAN * min(positive)


def _shown(series: Series, log: bool) -> list[float]:
    """The samples a logarithmic axis can show (none of 0)."""
    return [v for v in series.values if v > 0] if log else list(series.values)


def _colour(number: int) -> str:
    return _BASELINE_COLOUR if number == 0 else _COLOURS[(number - 1) % len(_COLOURS)]


def _label(series: Series, log: bool, unit: str) -> str:
    """The series' name (broken after a hyphen if long), its count and median, the zeros a log axis
    leaves out, and its note, one a line."""
    values = sorted(series.values)
    name = series.label.replace("-", "-\n", 1) if len(series.label) > 12 else series.label
    parts = [name, f"n={len(values)}"]
    if values:
        parts.append(f"median {_number(_median(values))} {unit}")
    zeros = len(values) - len(_shown(series, log))
    if zeros:
        parts.append(f"{zeros} at 0 not shown")
    if series.note:
        parts.append(_wrapped(series.note))
    return "\n".join(parts)


def _wrapped(text: str) -> str:
    return "\n".join(textwrap.wrap(text, 16))


def _boxes(ax: Axes, plot: Distributions, log: bool) -> None:
    positions = list(range(1, len(plot.series) + 1))
    drawn = [(p, s) for p, s in zip(positions, plot.series, strict=True) if _shown(s, log)]
    if drawn:
        parts = ax.boxplot([_shown(s, log) for _, s in drawn], positions=[p for p, _ in drawn],
                           whis=(1, 99), widths=0.55, patch_artist=True,
                           medianprops={"color": "black"},
                           flierprops={"marker": ".", "markersize": 3, "alpha": 0.5})
        for (position, _), box in zip(drawn, parts["boxes"], strict=True):
            box.set_facecolor(_colour(position - 1))
            box.set_alpha(0.6)
    for position, series in zip(positions, plot.series, strict=True):
        if not _shown(series, log):
            ax.text(position, 0.5, "no samples", transform=ax.get_xaxis_transform(), ha="center",
                    color="#777777")
    ax.set_xticks(positions)
    ax.set_xticklabels([_label(s, log, plot.unit) for s in plot.series], fontsize=8)
    ax.set_xlim(0.4, len(positions) + 0.6)
    if log:
        ax.set_yscale("log")
        _plain_ticks(ax.yaxis)
    ax.set_ylabel(plot.quantity)
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.set_title("box: quartiles and median; whiskers: 1st and 99th percentiles", fontsize=8)


def ecdf(series: Series, log: bool = False) -> tuple[list[float], list[float]]:
    """The points of *series*' distribution function as drawn: at each value
    the fraction of the samples at or below it, the unfinished ones counted
    in the whole (at most :data:`_ECDF_POINTS`, evenly spaced in rank, from
    (smallest, 0) on). With *log*, zeros are not drawn but still counted."""
    values = sorted(_shown(series, log))
    if not values:
        return [], []
    total = len(series.values) + series.unfinished
    offset = len(series.values) - len(values)
    picks = sorted({round(i * (len(values) - 1) / (_ECDF_POINTS - 1)) for i in range(_ECDF_POINTS)})
    return [values[0]] + [values[i] for i in picks], [offset / total] + [(offset + i + 1) / total for i in picks]


def _curves(ax: Axes, plot: Distributions, log: bool) -> None:
    for number, series in enumerate(plot.series):
        xs, ys = ecdf(series, log)
        # A series with no samples draws no curve, but is in the legend with its note.
        ax.step(xs, ys, where="post", color=_colour(number), linewidth=1.6,
                label=series.label + (f" ({series.note})" if series.note else ""))
    if log:
        ax.set_xscale("log")
        _plain_ticks(ax.xaxis)
    ax.set_xlabel(plot.quantity)
    ax.set_ylabel("fraction at or below (of all, the unfinished too)"
                  if any(s.unfinished for s in plot.series) else "fraction at or below")
    ax.set_ylim(0, 1.02)
    ax.grid(which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("distribution functions", fontsize=8)


def _plain_ticks(axis: Axis) -> None:
    """A logarithmic axis labelled at 1, 2 and 5 of each decade, in plain numbers (20, 50, 100)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _median(ordered: Sequence[float]) -> float:
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _number(value: float) -> str:
    """A value for a label: three significant digits, no exponent."""
    if value == 0:
        return "0"
    digits = max(0, 2 - math.floor(math.log10(abs(value))))
    return f"{value:.{digits}f}"
