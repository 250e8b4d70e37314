"""Edge attribution: every edge's score from a fixed number of forward and backward passes.

* EAP (Syed et al., "Attribution Patching Outperforms Automated Circuit Discovery", 2023): the
  score of edge ``s -> r`` is ``(corrupted_s - clean_s) . d metric / d input_r`` at the clean run, the
  first-order estimate of ``metric(clean, edge patched) - metric(clean)``. One forward and one
  backward (on a batch copied once per query group, :mod:`mm_lens.circuits.forward`).
* EAP-IG (Hanna et al., "Have Faith in Faithfulness", 2024; the inputs variant that leads MIB's
  circuit-localisation track): the gradient is averaged over ``steps`` runs whose input embedding
  (``hook_embed``: image features and token embeddings) moves from the corrupted run's to the clean
  run's, ``embed_k = corrupted + (k / steps) (clean - corrupted)`` for ``k = 1 .. steps``, as in the
  paper's formula (so ``steps=1`` is EAP; the published code's loop takes ``k = 0 .. steps - 1``).
  ``steps + 2`` forwards and ``steps`` backwards; Hanna et al. use 5 steps.

Scores are averaged over the examples of the batch. A negative score means patching the edge
lowers the metric: the edge carries what makes the clean answer.
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mm_lens.circuits.forward import EdgeRun, all_copies, metric_value
from mm_lens.circuits.runs import Runs

METHODS = ("eap", "eap-ig")


def mean_input_gradients(runs: Runs, steps: int = 1, progress: bool = False) -> dict:
    """The gradient of the metric (mean over the batch) at every receiver input, averaged over the
    ``steps`` points ``corrupted + (k / steps)(clean - corrupted)``, ``k = 1 .. steps`` of the input
    embedding: ``{(kind, layer): tensor}`` (``q [batch, pos, head, d]``, ``k``/``v`` ``[copy, batch, pos,
    kv_head, d]`` with copy = query group x head within its key/value group, ``mlp [batch, pos, d]``,
    ``logits [batch, d]``)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    model, graph = runs.model, runs.graph
    run = EdgeRun(model, graph, runs.clean, None, None, all_copies(graph), track=True)
    clean, corrupted = runs.clean_acts.embed, runs.corrupted_acts.embed
    total: dict = {}
    with torch.enable_grad():
        for k in tqdm(range(1, steps + 1), desc="EAP-IG steps", disable=not progress or steps == 1):
            embed = (corrupted + (k / steps) * (clean - corrupted)).detach().requires_grad_(True)
            value = metric_value(runs.metric, run.run(embed)).mean()
            keys = list(run.targets)
            grads = torch.autograd.grad(value, [run.targets[key] for key in keys], allow_unused=True)
            for key, g in zip(keys, grads):
                g = torch.zeros_like(run.targets[key]) if g is None else g.detach()
                total[key] = total[key] + g if key in total else g
    return {key: g / steps for key, g in total.items()}


@torch.no_grad()
def scores_from_gradients(runs: Runs, grads: dict) -> Tensor:
    """``(corrupted_s - clean_s) . gradient_r`` summed over each edge's positions and the batch: the flat
    edge scores (:attr:`Graph.edges` order)."""
    model, graph = runs.model, runs.graph
    G, H, rep = len(graph.groups), graph.n_heads, graph.rep
    n_all = len(graph.components)
    diff = (runs.corrupted_acts.stacked(model, n_all) - runs.clean_acts.stacked(model, n_all)).float()
    onehot = torch.nn.functional.one_hot(graph.groups.index.to(diff.device), G + 1)[..., :G].float()  # [b, p, G]
    blocks = []
    for slot in graph.slots:
        d = diff[:slot.n_senders]
        g = grads[(slot.kind, slot.layer)].float()
        if slot.kind == "q":
            blocks.append(torch.einsum("sbpd,bphd,bpg->sgh", d, g, onehot))
        elif slot.kind in ("k", "v"):
            s = torch.einsum("sbpd,cbpjd,bpk->skcj", d, g, onehot)  # copy c = query group * rep + r
            s = s.reshape(d.shape[0], G, G, rep, graph.n_kv).permute(0, 1, 4, 3, 2)  # [s, K, j, r, Q]
            blocks.append(s.reshape(d.shape[0], G, H, G))
        elif slot.kind == "mlp":
            blocks.append(torch.einsum("sbpd,bpd,bpg->sg", d, g, onehot))
        else:
            last = runs.clean.positions.last_positions.to(d.device)
            d_last = d[:, torch.arange(d.shape[1], device=d.device), last]
            blocks.append(torch.einsum("sbd,bd->s", d_last, g))
    return graph.flatten([b.cpu() for b in blocks])


def edge_attribution(runs: Runs, method: str = "eap-ig", steps: int = 5, progress: bool = False) -> Tensor:
    """Flat edge scores by EAP (``method="eap"``) or EAP-IG with ``steps`` (module docstring)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    grads = mean_input_gradients(runs, 1 if method == "eap" else steps, progress)
    return scores_from_gradients(runs, grads)
