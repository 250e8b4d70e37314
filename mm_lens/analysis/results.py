"""The result every sweep returns: a tensor of values with named axes and labels.

``values`` is the mean over examples; ``per_example`` (when a batch was swept) keeps
one value per example on an extra trailing ``batch`` axis, and ``ci95`` is the
half-width of the normal 95% interval of the mean.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import Tensor


@dataclass
class PatchResult:
    """``values`` shaped like ``axes`` (e.g. ``("layer", "pos")``); ``labels[axis]`` names each index."""

    values: Tensor
    axes: tuple[str, ...]
    labels: dict = field(default_factory=dict)
    per_example: Optional[Tensor] = None  # values.shape + (batch,)
    baseline: Optional[Tensor] = None  # metric of the unpatched run, per example
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.axes = tuple(self.axes)
        if self.values.ndim != len(self.axes):
            raise ValueError(f"values have {self.values.ndim} dims but {len(self.axes)} axis names {self.axes}")

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    @property
    def ci95(self) -> Optional[Tensor]:
        """Half-width of the 95% confidence interval of the mean over examples (None without examples)."""
        if self.per_example is None or self.per_example.shape[-1] < 2:
            return None
        n = self.per_example.shape[-1]
        return 1.96 * self.per_example.std(-1) / n**0.5

    def label(self, axis: str) -> list:
        if axis not in self.axes:
            raise ValueError(f"no axis {axis!r}; axes are {self.axes}")
        n = self.values.shape[self.axes.index(axis)]
        given = self.labels.get(axis)
        return list(given) if given is not None else list(range(n))

    def to_frame(self):
        """A tidy DataFrame: one row per cell, a column per axis plus ``value`` (and ``ci95``)."""
        import pandas as pd

        values = self.values.detach().cpu()
        ci = self.ci95.detach().cpu() if self.ci95 is not None else None
        axis_labels = [self.label(a) for a in self.axes]
        rows = []
        for idx in itertools.product(*(range(len(lab)) for lab in axis_labels)):
            row = {a: lab[i] for a, lab, i in zip(self.axes, axis_labels, idx)}
            for a, i in zip(self.axes, idx):
                if self.labels.get(a) is not None:
                    row[f"{a}_index"] = i
            row["value"] = float(values[idx])
            if ci is not None:
                row["ci95"] = float(ci[idx])
            rows.append(row)
        return pd.DataFrame(rows)

    def __repr__(self) -> str:
        n = "" if self.per_example is None else f", examples={self.per_example.shape[-1]}"
        return f"PatchResult(axes={self.axes}, shape={tuple(self.values.shape)}{n})"


def from_per_example(per_example: Tensor, axes: Sequence[str], labels: Optional[dict] = None,
                     baseline: Optional[Tensor] = None, **meta) -> PatchResult:
    """A result from ``[..., batch]`` values: the mean over the batch, the examples kept."""
    per_example = per_example.detach()
    return PatchResult(per_example.mean(-1), tuple(axes), dict(labels or {}), per_example, baseline, dict(meta))
