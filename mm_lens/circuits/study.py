"""Edge attribution as a study method: EAP-IG (or EAP) edge scores for every example of a dataset, so
:func:`mm_lens.study.run` writes them resumably (locally or on Ray) and :func:`mm_lens.study.summarize`
averages them per edge. Importing this module registers the method ``"edge_attribution"``:

    from mm_lens import study
    import mm_lens.circuits.study  # noqa: F401  (registers "edge_attribution")
    study.run(model, ds, method="edge_attribution", method_kwargs=dict(corruption="mask_object",
              metric="logit_diff"), out="results/edges")

The position groups must name the same groups in every example (default ``last``, ``image``,
``question``; ``"object"``/``"non_object"`` need every example's box), so edge names line up across
examples. ``corruption`` (default ``"blank_image"``) and ``metric`` as for the study's patching methods
(:mod:`mm_lens.study.pairs`). Rows: ``edge, sender, receiver, slot, value`` (the score), and the
example's clean and corrupted metric.
"""

from __future__ import annotations

from mm_lens.study import pairs
from mm_lens.study.methods import Method, register


def _call(model, example, inputs, ctx, corruption="blank_image", metric="answer_logit", method="eap-ig", steps=5,
          positions=("image", "question")):
    from mm_lens.circuits.attribution import edge_attribution
    from mm_lens.circuits.runs import prepare

    args = pairs.patch_args(model, example, inputs, ctx, corruption, metric)
    runs = prepare(model, args["clean"], args["corrupted"], args["metric"], list(positions),
                   corrupted_hooks=args["corrupted_hooks"])
    return runs, edge_attribution(runs, method, steps)


def _rows(result, example, ctx):
    import pandas as pd

    runs, scores = result
    return pd.DataFrame([dict(edge=e.name, sender=e.sender, receiver=e.receiver, slot=e.slot, value=float(s))
                         for e, s in zip(runs.graph.edges, scores.tolist())]).assign(
        clean_metric=float(runs.clean_metric[0]), corrupted_metric=float(runs.corrupted_metric[0]))


def _requires(example, kw):
    return pairs.missing(example, kw.get("corruption"))


def _check(kw):
    pairs.parse(kw.get("corruption"))
    if kw.get("method", "eap-ig") not in ("eap", "eap-ig"):
        raise ValueError(f"method must be 'eap' or 'eap-ig', got {kw.get('method')!r}")


EDGE_ATTRIBUTION = register(Method("edge_attribution", _call, _rows,
                                   dict(corruption="blank_image", metric="answer_logit"), by=("edge",),
                                   requires=_requires, check=_check))
