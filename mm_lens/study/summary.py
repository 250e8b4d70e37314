"""The papers' aggregates of a study: mean and confidence interval over examples, per output cell.

Knockout (Zhang et al.): per (edge, layer), the mean relative change of the answer probability and its
95% interval. Causal tracing (Meng et al.; Basu et al.): per (module, layer, position kind), the mean
restored probability and indirect effect, positions of one kind averaged within an example first.
Patching: per cell, the mean effect, and the TransformerLens/ARENA normalised effect
``(mean - mean corrupted) / (mean clean - mean corrupted)``. Every other method: per its ``by`` cells.

The interval is the normal one, ``z * std / sqrt(n)`` with the sample standard deviation (``ddof=1``),
as :attr:`mm_lens.analysis.PatchResult.ci95`.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from mm_lens.study import methods


def summarize(df: pd.DataFrame, method: Optional[str] = None, by: Optional[Sequence[str]] = None,
              values: Optional[Sequence[str]] = None, confidence: float = 0.95) -> pd.DataFrame:
    """One row per ``by`` cell and quantity: ``n`` (examples), ``mean``, ``std``, ``ci95`` (half-width), ``low``, ``high``.

    ``method`` defaults to the one recorded with the results (``df.attrs``, set by :func:`load_results`);
    ``by`` / ``values`` default to the method's cells (with the optional ones the results have, e.g.
    ``head``) and quantities. Only ``status == "ok"`` rows count.
    """
    name = method or df.attrs.get("study", {}).get("method")
    spec = methods.get(name) if name is not None else None
    if by is None:
        by = list(spec.by) + [c for c in spec.more_by if c in df.columns] if spec else []
    by = list(by)
    values = list(values if values is not None else (spec.values if spec else ("value",)))
    if not by:
        raise ValueError("summarize needs by=[...] columns (or results loaded with study.load_results, which know "
                         "their method)")
    missing = [c for c in by + values + ["example_id"] if c not in df.columns]
    if missing:
        raise ValueError(f"the results have no columns {missing}; they have {list(df.columns)}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    ok = df[df["status"] == "ok"] if "status" in df.columns else df
    if spec is not None and spec.select is not None:
        ok = spec.select(ok)
    out = mean_interval(ok, by, values, confidence)
    if spec is not None and spec.patching:
        out = pd.concat([out, normalized(ok, out, by, estimate=spec.patching == "estimate")], ignore_index=True)
    return out


def mean_interval(df: pd.DataFrame, by: list, values: list, confidence: float) -> pd.DataFrame:
    """Average each example's rows per cell, then mean and interval over examples."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    numbers = df[["example_id", *by]].assign(**{v: df[v].astype(float) for v in values})
    per_example = numbers.groupby(["example_id", *by], sort=False)[values].mean()
    long = per_example.reset_index().melt(id_vars=["example_id", *by], value_vars=values, var_name="quantity",
                                          value_name="v")
    out = long.groupby([*by, "quantity"], sort=False)["v"].agg(n="count", mean="mean", std="std").reset_index()
    out[_ci(confidence)] = z * out["std"] / np.sqrt(out["n"])
    out["low"] = out["mean"] - out[_ci(confidence)]
    out["high"] = out["mean"] + out[_ci(confidence)]
    return out


def normalized(df: pd.DataFrame, summary: pd.DataFrame, by: list, estimate: bool = False) -> pd.DataFrame:
    """The normalised effect of each cell from the mean clean and corrupted metrics (first-order estimates,
    being changes, are only divided)."""
    per_example = df.drop_duplicates("example_id")
    clean, corrupted = per_example["clean_metric"].mean(), per_example["corrupted_metric"].mean()
    diff = clean - corrupted
    if diff == 0:
        return summary.iloc[:0]
    out = summary[summary["quantity"] == "value"].copy()
    shift = 0.0 if estimate else corrupted
    ci = [c for c in out.columns if c.startswith("ci")][0]
    out["mean"] = (out["mean"] - shift) / diff
    out["std"], out[ci] = out["std"] / abs(diff), out[ci] / abs(diff)
    out["low"], out["high"] = out["mean"] - out[ci], out["mean"] + out[ci]
    out["quantity"] = "normalized"
    return out


def _ci(confidence: float) -> str:
    return f"ci{round(confidence * 100):g}"
