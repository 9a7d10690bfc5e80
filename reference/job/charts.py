"""Two small SVG charts for the main job's report, written by hand (no plotting library is a dependency).

* `line_chart`: per-step training losses; x is the optimizer step, so a run that continues another is drawn
  after it (its steps offset by the first run's), not beside it from the left edge.
* `bar_chart`: values in groups (seed 000's routes: the loss on the old and on the new data, before and
  after continuing).

Both draw a y axis from 0 with round tick values and labels, an x axis with its label, and a legend: a
change looks as large as it is. Not handled: negative values, logarithmic axes, more than six colours.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 16, 44  # margins around the plot area, in pixels
LEGEND_LINE = 17  # the legend stands above the plot area, one line per entry


@dataclass(frozen=True)
class Series:
    name: str
    steps: list[int]
    values: list[float]


def round_ticks(high: float, count: int = 5) -> list[float]:
    """0 and round values up to at least `high`: steps of 1, 2 or 5 times a power of ten."""
    if high <= 0:
        return [0.0, 1.0]
    raw = high / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    return [round(i * step, 10) for i in range(math.ceil(high / step - 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:g}"


class _Canvas:
    """A plot area of `width` x `height` pixels mapping data (x from x_low to x_high, y from 0 to the last
    y tick) onto it, with the axes, ticks and labels drawn."""

    def __init__(self, width: int, height: int, x_low: float, x_high: float, y_ticks: list[float], legend: int = 0):
        self.width, self.height, self.top = width, height + LEGEND_LINE * legend, TOP + LEGEND_LINE * legend
        self.x_low, self.x_high = x_low, x_high if x_high > x_low else x_low + 1
        self.y_ticks = y_ticks
        self.parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{self.height}" '
            f'viewBox="0 0 {width} {self.height}" font-family="sans-serif" font-size="12">',
            f'<rect width="{width}" height="{self.height}" fill="white"/>',
        ]

    def x(self, value: float) -> float:
        return LEFT + (value - self.x_low) / (self.x_high - self.x_low) * (self.width - LEFT - RIGHT)

    def y(self, value: float) -> float:
        return self.height - BOTTOM - value / self.y_ticks[-1] * (self.height - self.top - BOTTOM)

    def add(self, element: str) -> None:
        self.parts.append(element)

    def text(self, x: float, y: float, text: str, anchor: str = "start", **attributes) -> None:
        extra = "".join(f' {k.replace("_", "-")}="{v}"' for k, v in attributes.items())
        self.add(f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{escape(text)}</text>')

    def y_axis(self, label: str) -> None:
        for tick in self.y_ticks:
            y = self.y(tick)
            self.add(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{self.width - RIGHT}" y2="{y:.1f}" stroke="#e5e5e5"/>')
            self.text(LEFT - 6, y + 4, _label(tick), "end")
        middle = (self.top + self.height - BOTTOM) / 2
        self.text(14, middle, label, "middle", transform=f"rotate(-90 14 {middle:.1f})")
        self.add(f'<line x1="{LEFT}" y1="{self.top}" x2="{LEFT}" y2="{self.height - BOTTOM}" stroke="black"/>')

    def x_axis(self, label: str, ticks: list[tuple[float, str]]) -> None:
        """Ticks with their labels (a label with a newline takes two lines) and the axis label below."""
        bottom = self.height - BOTTOM
        self.add(f'<line x1="{LEFT}" y1="{bottom}" x2="{self.width - RIGHT}" y2="{bottom}" stroke="black"/>')
        for value, text in ticks:
            x = self.x(value)
            self.add(f'<line x1="{x:.1f}" y1="{bottom}" x2="{x:.1f}" y2="{bottom + 4}" stroke="black"/>')
            for n, part in enumerate(text.split("\n")):
                self.text(x, bottom + 16 + 14 * n, part, "middle")
        self.text((LEFT + self.width - RIGHT) / 2, self.height - 6, label, "middle")

    def legend(self, names: list[str], colours: list[str]) -> None:
        x = LEFT + 8
        for n, (name, colour) in enumerate(zip(names, colours, strict=True)):
            y = TOP + 10 + LEGEND_LINE * n
            self.add(f'<rect x="{x:.1f}" y="{y - 9}" width="12" height="10" fill="{colour}"/>')
            self.text(x + 18, y, name)

    def svg(self) -> str:
        return "\n".join([*self.parts, "</svg>"]) + "\n"


def line_chart(
    series: list[Series], x_label: str, y_label: str, marks: list[tuple[float, str]] = (), width=720, height=360
) -> str:
    """One polyline (with a dot per point) for each series, over shared step and value axes from 0.
    `marks`: vertical dashed lines at those x values, with a note (e.g. where a continuation starts)."""
    steps = [s for line in series for s in line.steps]
    values = [v for line in series for v in line.values]
    canvas = _Canvas(width, height, 0, max(steps), round_ticks(max(values)), legend=len(series))
    canvas.y_axis(y_label)
    x_ticks = round_ticks(max(steps), count=8)
    canvas.x_axis(x_label, [(t, _label(t)) for t in x_ticks if t <= max(steps)])
    for at, note in marks:
        x = canvas.x(at)
        bottom = canvas.height - BOTTOM
        canvas.add(
            f'<line x1="{x:.1f}" y1="{canvas.top}" x2="{x:.1f}" y2="{bottom}" stroke="#777" stroke-dasharray="4 3"/>'
        )
        canvas.text(x - 4, bottom - 8, note, "end", fill="#555")
    for line, colour in zip(series, COLOURS, strict=False):
        points = " ".join(f"{canvas.x(s):.1f},{canvas.y(v):.1f}" for s, v in zip(line.steps, line.values, strict=True))
        canvas.add(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
        if len(line.steps) <= 60:
            for s, v in zip(line.steps, line.values, strict=True):
                canvas.add(f'<circle cx="{canvas.x(s):.1f}" cy="{canvas.y(v):.1f}" r="2" fill="{colour}"/>')
    canvas.legend([line.name for line in series], list(COLOURS[: len(series)]))
    return canvas.svg()


def bar_chart(
    groups: list[str],
    bars: list[str],
    values: list[list[float | None]],
    y_label: str,
    colours: list[str] = COLOURS,
    width=720,
    height=360,
) -> str:
    """For each group, one bar per name in `bars` (values[group][bar]; None: no bar, marked "n/a"), its
    value written above it. A group name with a newline is written on two lines."""
    known = [v for row in values for v in row if v is not None]
    canvas = _Canvas(width, height + 14, 0, len(groups), round_ticks(max(known) * 1.05), legend=len(bars))
    canvas.y_axis(y_label)
    canvas.x_axis("", [(g + 0.5, name) for g, name in enumerate(groups)])
    slot = (canvas.x(1) - canvas.x(0)) * 0.8 / len(bars)
    for g, row in enumerate(values):
        start = canvas.x(g + 0.1)
        for b, value in enumerate(row):
            x = start + b * slot
            if value is None:
                canvas.text(x + slot / 2, canvas.y(0) - 4, "n/a", "middle", fill="#777", font_size="10")
                continue
            top = canvas.y(value)
            colour = colours[b % len(colours)]
            canvas.add(
                f'<rect x="{x:.1f}" y="{top:.1f}" width="{slot * 0.9:.1f}" height="{canvas.y(0) - top:.1f}" '
                f'fill="{colour}"/>'
            )
            canvas.text(x + slot * 0.45, top - 3, f"{value:.2f}", "middle", font_size="9")
    canvas.legend(bars, [colours[b % len(colours)] for b in range(len(bars))])
    return canvas.svg()
