"""Attention-knockout curves: one line per edge, x = layer, with the 95% interval as a band."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from mm_lens.analysis.results import PatchResult
from mm_lens.viz.common import MIN_FONT, figure, integer_ticks


def knockout_curves(results: Union[PatchResult, Sequence[PatchResult]], title: Optional[str] = None,
                    ylabel: str = "change in answer probability (%)"):
    """A line per edge from :func:`~mm_lens.analysis.knockout.knockout_edges` (axes ``edge, layer``)
    or from a list of :func:`~mm_lens.analysis.knockout.attention_knockout` results."""
    lines = _lines(results)
    fig = figure(6.5, 3.8)
    ax = fig.subplots()
    for name, layers, mean, ci in lines:
        ax.plot(layers, mean, marker="o", markersize=3, label=name)
        if ci is not None:
            ax.fill_between(layers, mean - ci, mean + ci, alpha=0.2)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("layer (centre of the knockout window)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=MIN_FONT)
    integer_ticks(ax)
    if title:
        ax.set_title(title)
    return fig


def _lines(results) -> list:
    if isinstance(results, PatchResult):
        if results.axes == ("edge", "layer"):
            ci = results.ci95
            return [(name, np.asarray(results.label("layer")), results.values[i].cpu().numpy(),
                     None if ci is None else ci[i].cpu().numpy())
                    for i, name in enumerate(results.label("edge"))]
        results = [results]
    out = []
    for r in results:
        if r.axes != ("layer",):
            raise ValueError(f"knockout curves need results over ('layer',) or ('edge', 'layer'), got {r.axes}")
        ci = r.ci95
        out.append((r.meta.get("edge", "edge"), np.asarray(r.label("layer")), r.values.cpu().numpy(),
                    None if ci is None else ci.cpu().numpy()))
    return out
