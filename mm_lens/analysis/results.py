"""The result every sweep returns: a tensor of values with named axes and labels.

``values`` is the mean over examples; ``per_example`` (when a batch was swept) keeps
one value per example on an extra trailing ``batch`` axis, and ``ci95`` is the
half-width of the normal 95% interval of the mean.

Patching results also carry the metric of both unpatched runs (``baseline``: the run patched
into; ``source_metric``: the run patched from), so :meth:`PatchResult.normalized` gives the
field's normalised effect (TransformerLens / ARENA):
``(metric - metric_corrupted) / (metric_clean - metric_corrupted)``.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass, field, replace
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
    source_metric: Optional[Tensor] = None  # metric of the run patched from, per example (patching only)

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

    @property
    def clean_metric(self) -> Optional[Tensor]:
        """Metric of the clean run per example (the source when denoising, the base when noising)."""
        return self.source_metric if self.meta.get("direction", "denoise") == "denoise" else self.baseline

    @property
    def corrupted_metric(self) -> Optional[Tensor]:
        """Metric of the corrupted run per example."""
        return self.baseline if self.meta.get("direction", "denoise") == "denoise" else self.source_metric

    def normalized(self, atol: float = 1e-2, rtol: float = 5e-2) -> "PatchResult":
        """The normalised effect of TransformerLens / ARENA: ``(value - corrupted) / (clean - corrupted)``.

        Uses the metrics averaged over examples, so it is a linear map of ``values`` (and of each
        ``per_example`` column): when denoising, 0 = no effect and 1 = the clean metric fully restored;
        when noising, 1 = no effect and 0 = the corrupted metric. First-order estimates
        (``meta["estimate"]``, e.g. attribution patching) are changes, so only divided. Warns when the
        corruption barely changes the metric (``|clean - corrupted| < max(atol, rtol * |clean|)``): the
        ratio then magnifies noise.
        """
        if self.baseline is None or self.source_metric is None:
            raise ValueError("this result has no clean and corrupted metrics to normalise by (only patching "
                             "results carry them)")
        if self.meta.get("normalized"):
            raise ValueError("this result is already normalised")
        clean, corrupted = float(self.clean_metric.float().mean()), float(self.corrupted_metric.float().mean())
        diff = clean - corrupted
        if abs(diff) < max(atol, rtol * abs(clean)):
            warnings.warn(corruption_warning(clean, corrupted), stacklevel=2)
        if diff == 0:
            raise ValueError(f"clean and corrupted runs give the same metric ({clean:.4g}): the corruption does not "
                             "corrupt, so there is nothing to normalise by")
        shift = 0.0 if self.meta.get("estimate") else corrupted

        def norm(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else (t - shift) / diff

        meta = dict(self.meta, normalized=True, clean=clean, corrupted=corrupted)
        return replace(self, values=norm(self.values), per_example=norm(self.per_example), meta=meta)

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


def corruption_warning(clean: float, corrupted: float) -> str:
    """The message shown when a corruption barely changes the metric."""
    return (f"the corruption barely changes the metric (clean {clean:.4g}, corrupted {corrupted:.4g}): normalised "
            "effects divide by that difference and mostly show noise. Use a stronger corruption (check it first: "
            "the metric on the corrupted input should be far from the clean one).")
