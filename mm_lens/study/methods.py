"""The methods a study can run, by name: how one example becomes the method's call, and its result tidy rows.

Each :class:`Method` turns one example (its one-row inputs, built by
:meth:`mm_lens.data.Example.to_inputs`) into a call of a function of :mod:`mm_lens.analysis` /
:mod:`mm_lens.patching`, and the result into a DataFrame with one row per output cell. ``by`` and
``values`` say how :func:`mm_lens.study.summarize` aggregates them (the papers' figures): mean and 95%
interval over examples of each value per ``by`` cell. :func:`register` adds your own.

Methods and their defaults (every other keyword goes to the analysis function):

* ``knockout`` (``knockout_edges``): ``edges="paper"`` (the six edges of Zhang et al.; or
  ``["image->last", ...]``), ``window=9``; rows ``edge, layer, value``.
* ``attention_knockout``: one edge, ``source``, ``target``, ``window=9``.
* ``causal_trace``: ``corrupt="constraint"`` (the example's constraint span; or ``"question"``, a
  group or a substring); rows per (module, layer, position) with the ROME position kind.
* ``activation_patch``, ``path_patch``, ``attribution_patch``: ``corruption=`` and ``metric=`` (see
  :mod:`mm_lens.study.pairs`); activation patching defaults to the position groups
  ``["image", "question", "last"]`` so cells line up across examples.
* ``logit_lens``, ``attention_to_image``, ``attention_contribution``, ``modality_similarity``,
  ``visual_token_budget`` (prompted with the answer appended).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import pandas as pd

from mm_lens import analysis
from mm_lens.analysis import groups
from mm_lens.study import pairs


@dataclass(frozen=True)
class Method:
    """``call(model, example, inputs, ctx, **kwargs) -> result``; ``rows(result, example, ctx) -> DataFrame``.

    ``ctx["predicted"]`` is the clean run's top token at the last position. ``requires(example, kwargs)``
    returns why an example cannot be run (it is then dropped with that reason), or None.
    ``select(df)`` picks the rows :func:`summarize` averages.
    """

    name: str
    call: Callable
    rows: Callable = None
    defaults: dict = field(default_factory=dict)
    by: tuple = ()
    more_by: tuple = ()  # cells of results that have these columns (e.g. "head" with heads=True)
    values: tuple = ("value",)
    with_answer: bool = False
    requires: Optional[Callable] = None
    select: Optional[Callable] = None
    check: Optional[Callable] = None  # check(kwargs): raises on arguments no example could run with
    patching: str = ""  # "patch" or "estimate" (first order): summarize adds the normalised effect

    def frame(self, result, example, ctx) -> pd.DataFrame:
        if self.rows is not None:
            return self.rows(result, example, ctx)
        if not hasattr(result, "to_frame"):
            raise TypeError(f"method {self.name!r} returned {type(result).__name__}, which has no to_frame(): give "
                            "register() a rows= function")
        return result.to_frame()


METHODS: dict[str, Method] = {}
ALIASES = {"knockout_edges": "knockout"}


def register(method: Method) -> Method:
    """Make ``method`` available to :func:`mm_lens.study.run` by its name."""
    METHODS[method.name] = method
    return method


def get(method: Union[str, Method]) -> Method:
    if isinstance(method, Method):
        return method
    name = ALIASES.get(method, method)
    if name not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {sorted(METHODS)} or register your own")
    return METHODS[name]


# ---------------------------------------------------------------- helpers
def _drop_index(df: pd.DataFrame) -> pd.DataFrame:
    return df.drop(columns=[c for c in df.columns if c.endswith("_index")])


def _group(example, g):
    """A group name, with ``"constraint"`` meaning the example's constraint span."""
    if isinstance(g, str) and g == "constraint":
        return groups.question(example.constraint)
    return g


def _needs(example, names: Sequence) -> Optional[str]:
    used = {str(n).replace("-", "_") for n in names if isinstance(n, str)}
    if used & {"object", "non_object"} and example.box is None:
        return "no box: the object/non_object position groups need the example's object box"
    if "constraint" in used and not example.constraint:
        return "no constraint: the 'constraint' positions need the example's constraint span"
    return None


# ---------------------------------------------------------------- knockout
def parse_edges(spec) -> list[tuple]:
    """``"paper"`` -> the paper's six edges; ``"image->last"`` strings or (source, target) pairs otherwise."""
    if isinstance(spec, str) and spec == "paper":
        return list(analysis.PAPER_EDGES)
    out = []
    for e in ([spec] if isinstance(spec, str) else spec):
        if isinstance(e, str):
            source, arrow, target = e.partition("->")
            if not arrow:
                raise ValueError(f"an edge is 'source->target' (e.g. 'image->last'), got {e!r}")
            out.append((source.strip(), target.strip()))
        else:
            out.append(tuple(e))
    return out


def _knockout(model, example, inputs, ctx, edges="paper", **kw):
    pairs_ = parse_edges(edges)
    result = analysis.knockout_edges(model, inputs, [(_group(example, s), _group(example, t)) for s, t in pairs_],
                                     progress=False, **kw)
    result.labels["edge"] = [_edge_name(s, t) for s, t in pairs_]  # "constraint", not this example's span
    return result


def _knockout_one(model, example, inputs, ctx, source, target, **kw):
    result = analysis.attention_knockout(model, inputs, _group(example, source), _group(example, target),
                                         progress=False, **kw)
    result.meta["edge"] = _edge_name(source, target)
    return result


def _edge_name(source, target) -> str:
    return "->".join(g if isinstance(g, str) else getattr(g, "name", str(g)) for g in (source, target))


def _edge_rows(result, example, ctx):
    df = _drop_index(result.to_frame())
    if "edge" not in df:
        df.insert(0, "edge", result.meta["edge"])
    return df[["edge", "layer", "value"]]


register(Method("knockout", _knockout, _edge_rows, dict(edges="paper", window=9), by=("edge", "layer"),
                check=lambda kw: parse_edges(kw["edges"]),
                requires=lambda ex, kw: _needs(ex, [g for e in parse_edges(kw["edges"]) for g in e])))
register(Method("attention_knockout", _knockout_one, _edge_rows, dict(window=9), by=("edge", "layer"),
                requires=lambda ex, kw: _needs(ex, [kw.get("source"), kw.get("target")])))


# ---------------------------------------------------------------- causal tracing
def _trace(model, example, inputs, ctx, corrupt="constraint", **kw):
    if kw.get("positions") is not None:
        kw["positions"] = _group(example, kw["positions"])
    return analysis.causal_trace(model, inputs, _group(example, corrupt), progress=False, **kw)


def _trace_rows(trace, example, ctx):
    df = trace.to_frame()
    kinds = position_kinds(trace.positions.tolist(), trace.corrupted_positions.tolist(), ctx["last"])
    df["position_kind"] = df["position"].map(kinds)
    return df.assign(p_clean=trace.p_clean, p_corrupt=trace.p_corrupt)


def position_kinds(positions: Sequence[int], corrupted: Sequence[int], last: int) -> dict[int, str]:
    """ROME's token kinds: ``first/middle/last_corrupted`` (a one-token span is ``last_corrupted``),
    ``first_subsequent``, ``further`` (after that), ``last`` (the prompt's last position) and ``before``."""
    lo, hi = (min(corrupted), max(corrupted)) if corrupted else (None, None)
    kinds = {}
    for p in positions:
        if p == last:
            kinds[p] = "last"
        elif lo is None or p < lo:
            kinds[p] = "before"
        elif p == hi:
            kinds[p] = "last_corrupted"
        elif p == lo:
            kinds[p] = "first_corrupted"
        elif p < hi:
            kinds[p] = "middle_corrupted"
        else:
            kinds[p] = "first_subsequent" if p == hi + 1 else "further"
    return kinds


register(Method("causal_trace", _trace, _trace_rows, dict(corrupt="constraint"),
                by=("module", "layer", "position_kind"), values=("p", "indirect_effect"),
                requires=lambda ex, kw: _needs(ex, [kw["corrupt"]])))


# ---------------------------------------------------------------- patching
def _patch_rows(result, example, ctx):
    df = _drop_index(result.to_frame()).drop(columns=["ci95"], errors="ignore")
    return df.assign(clean_metric=float(result.clean_metric.reshape(-1)[0]),
                     corrupted_metric=float(result.corrupted_metric.reshape(-1)[0]))


def _patching(fn, has_progress: bool = True):
    def call(model, example, inputs, ctx, corruption=None, metric="answer_logit", **kw):
        args = pairs.patch_args(model, example, inputs, ctx, corruption, metric)
        if has_progress:
            kw["progress"] = False
        if "positions" in kw and isinstance(kw["positions"], (list, tuple)):
            kw["positions"] = [_group(example, g) for g in kw["positions"]]
        return fn(model, **args, **kw)
    return call


def _patch_check(kw):
    pairs.parse(kw.get("corruption"))
    if kw.get("metric") not in pairs.METRICS:
        raise ValueError(f"unknown metric {kw.get('metric')!r}; use one of {pairs.METRICS}")


def _patch_requires(ex, kw):
    return pairs.missing(ex, kw.get("corruption")) or _needs(ex, list(_flat(kw.get("positions"))))


def _flat(x):
    if isinstance(x, (list, tuple)):
        for v in x:
            yield from _flat(v)
    elif x is not None:
        yield x


PATCH = dict(corruption=None, metric="answer_logit")
AXES = ("group", "pos", "head")
register(Method("activation_patch", _patching(analysis.activation_patch), _patch_rows,
                dict(PATCH, hook="resid_pre", positions=["image", "question", "last"]), by=("layer",), more_by=AXES,
                requires=_patch_requires, check=_patch_check, patching="patch"))
register(Method("path_patch", _patching(analysis.path_patch), _patch_rows, dict(PATCH), by=("sender",),
                requires=_patch_requires, check=_patch_check, patching="patch"))
register(Method("attribution_patch", _patching(analysis.attribution_patch, has_progress=False), _patch_rows,
                dict(PATCH, hook="resid_pre", positions=["image", "question", "last"]), by=("layer",), more_by=AXES,
                requires=_patch_requires, check=_patch_check, patching="estimate"))


# ---------------------------------------------------------------- lens, attention, similarity, budget
def _lens(model, example, inputs, ctx, positions="image", **kw):
    return analysis.logit_lens(model, inputs, _group(example, positions), **kw)


def _lens_rows(result, example, ctx):
    df = result.to_frame()
    return df.assign(is_answer=(df["token"] == ctx["predicted_str"]))


def _attention(model, example, inputs, ctx, queries="text", **kw):
    return analysis.attention_to_image(model, inputs, _group(example, queries), **kw)


def _contribution(model, example, inputs, ctx, source="image", target="last", **kw):
    return analysis.attention_contribution(model, inputs, _group(example, source), _group(example, target), **kw)


def _contribution_rows(result, example, ctx):
    return pd.DataFrame({"layer": result.layers, "contribution": result.per_layer().tolist()})


def _budget(model, example, inputs, ctx, **kw):
    return analysis.visual_token_budget(model, inputs, progress=False, **kw)


register(Method("logit_lens", _lens, _lens_rows, dict(positions="image", top_k=1), by=("layer",),
                values=("prob", "is_answer"), select=lambda df: df[df["rank"] == 0],
                requires=lambda ex, kw: _needs(ex, [kw["positions"]])))
register(Method("attention_to_image", _attention, None, dict(queries="text"), by=("layer",), more_by=("head",),
                values=("mass",),
                requires=lambda ex, kw: _needs(ex, [kw["queries"]])))
register(Method("attention_contribution", _contribution, _contribution_rows, dict(source="image", target="last"),
                by=("layer",), values=("contribution",),
                requires=lambda ex, kw: _needs(ex, [kw["source"], kw["target"]])))
register(Method("modality_similarity", lambda model, example, inputs, ctx, **kw: analysis.modality_similarity(
    model, inputs, **kw), None, {}, by=("layer",), values=("to_embeddings", "to_text", "to_text_max")))
register(Method("visual_token_budget", _budget, lambda r, ex, ctx: r.to_frame().drop(columns=["example"]), {},
                by=("strategy", "kept"), values=("loss",), with_answer=True))
