"""Shared plotting helpers: the figure type every plot returns, colour scales, ticks, font sizes."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure

# Smallest font (points) any plot uses; the report shows figures at 100 CSS px per inch, so 8 pt is 11 px.
MIN_FONT = 8
DIVERGING = "RdBu_r"  # negative blue, 0 white, positive red


class PlotFigure(Figure):
    """A matplotlib Figure not attached to any GUI backend that notebooks display as a PNG
    (IPython calls ``_repr_png_``), whatever the matplotlib backend."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100)
        return buf.getvalue()


def figure(width: float, height: float) -> PlotFigure:
    """A figure safe in scripts, tests and notebooks (shown inline as a PNG when it is a cell's value)."""
    return PlotFigure(figsize=(width, height), layout="constrained")


def integer_ticks(ax, axis: str = "x") -> None:
    """Ticks at whole numbers only (layers, heads, token counts)."""
    from matplotlib.ticker import MaxNLocator

    (ax.xaxis if axis == "x" else ax.yaxis).set_major_locator(MaxNLocator(integer=True))


def diverging(values, at_least: float = 0.0) -> dict:
    """``imshow`` arguments for a diverging map centred at 0: limits ±max(|values|, ``at_least``)."""
    lim = max(float(np.nanmax(np.abs(values))) if np.size(values) else 0.0, at_least) or 1.0
    return dict(cmap=DIVERGING, vmin=-lim, vmax=lim)


def colorbar(fig, image, ax, label: str, **kwargs):
    """A colour bar with its label (what the colours mean, with units)."""
    bar = fig.colorbar(image, ax=ax, shrink=kwargs.pop("shrink", 0.85), **kwargs)
    bar.set_label(label, fontsize=MIN_FONT + 1)
    bar.ax.tick_params(labelsize=MIN_FONT)
    return bar
