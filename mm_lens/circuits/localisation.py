"""Every localisation method of the library as a score per edge of the position-aware graph.

Each method runs as the library has it (its own definition, its own corruption handling), on the
clean/corrupted pair and the position groups of the graph, and gives what it can: edge scores, node
scores (a node is ``component@group``), or both. One rule turns them into an edge score:

    score(s -> r) = min of |edge score|, |score of node s|, |score of node r| over those the method gives
                    (0 if it gives none),

so an edge is as strong as the weakest evidence on it ("an edge matters only if both its ends do"),
and an edge the method sees directly is not credited beyond what it measured. What each method gives:

========================  ==========================================================================
``activation_patching``   nodes: ``activation_patch`` (clean into corrupted) of each head's ``z``, each
                          MLP's output and the embedding (``resid_pre`` of layer 0) at each group;
                          ``|patched - corrupted|``
``attribution_patching``  nodes: ``attribution_patch`` of the same sites (first-order estimate)
``eap`` / ``eap_ig``      edges: :func:`~mm_lens.circuits.attribution.edge_attribution` (EAP-IG: 5 steps)
``path_patching``         edges: ``path_patch`` of every head and MLP (senders at group P) into each
                          head's q (at P), k and v (at K; the same score for every query group the keys
                          reach), into ``resid_pre{l+1}`` for ``mlp{l}`` (the MLP and the direct path past
                          it), and into the logits at ``last``. Path patching has no embedding sender,
                          so an edge from the input (or DeepStack's ``visual_in``) takes its receiver's
                          node score; nodes: a sender's largest path effect
``knockout``              edges: ``attention_knockout`` (window 1) of K -> Q at head h's layer for the
                          key/value edges ``* @K -> L{l}H{h}@Q.k/v`` (all heads of a layer alike); nodes:
                          a head at Q scores the largest knockout effect into Q at its layer
``causal_tracing``        nodes: ``causal_trace`` (window 1) restoring each MLP output, attention output
                          (every head of the layer alike) and the embedding (``resid`` at layer 0) at
                          each position; the normalised indirect effects summed over a group
``attention_contribution`` edges: ``attention_contribution`` norms summed from the positions of K to
                          those of Q, per layer (key/value edges as knockout); nodes as knockout
========================  ==========================================================================
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from mm_lens.analysis.groups import Group
from mm_lens.circuits.graph import Graph
from mm_lens.circuits.runs import Runs

METHODS: dict[str, Callable] = {}


def method(name: str):
    def register(fn):
        METHODS[name] = fn
        return fn
    return register


# ---------------------------------------------------------------- helpers
def partition_groups(runs: Runs) -> list[Group]:
    """The graph's position groups as analysis Groups (the positions of group g in each row)."""
    index = runs.graph.groups.index
    return [Group(name, lambda m, x, r, g=g: (index[r] == g).nonzero().flatten())
            for g, name in enumerate(runs.graph.groups.names)]


def combine(graph: Graph, edge_scores: dict, node_scores: dict) -> Tensor:
    """Edge scores by the module's rule from ``{edge name: score}`` and ``{node name: score}``."""
    out = torch.zeros(graph.n_edges)
    for i, e in enumerate(graph.edges):
        found = [abs(v) for v in (edge_scores.get(e.name), node_scores.get(e.sender), node_scores.get(e.receiver))
                 if v is not None and not math.isnan(v)]
        out[i] = min(found) if found else 0.0
    return out


def _heads(graph: Graph):
    return [(l, h) for l in range(graph.n_layers) for h in range(graph.n_heads)]


# ---------------------------------------------------------------- edge methods
@method("eap")
def eap(runs: Runs) -> Tensor:
    from mm_lens.circuits.attribution import edge_attribution

    return edge_attribution(runs, "eap").abs()


@method("eap_ig")
def eap_ig(runs: Runs) -> Tensor:
    from mm_lens.circuits.attribution import edge_attribution

    return edge_attribution(runs, "eap-ig", steps=5).abs()


# ---------------------------------------------------------------- node methods
def _site_nodes(runs: Runs, fn) -> dict:
    """Node scores from ``fn(hook, layers, heads) -> PatchResult`` over (layer, group[, head])."""
    graph = runs.graph
    names = graph.groups.names
    nodes = {}
    z = fn("z", None, True)
    for l, h in _heads(graph):
        for g, name in enumerate(names):
            nodes[f"L{l}H{h}@{name}"] = float(z[0][l, g, h]) - z[1]
    mlp = fn("mlp_out", None, False)
    for l in range(graph.n_layers):
        for g, name in enumerate(names):
            nodes[f"mlp{l}@{name}"] = float(mlp[0][l, g]) - mlp[1]
    embed = fn("resid_pre", [0], False)
    for g, name in enumerate(names):
        nodes[f"input@{name}"] = float(embed[0][0, g]) - embed[1]
    return nodes


@method("activation_patching")
def activation_patching(runs: Runs) -> Tensor:
    from mm_lens.analysis.patching import activation_patch

    def fn(hook, layers, heads):
        r = activation_patch(runs.model, runs.clean, runs.corrupted_input, runs.metric, hook=hook,
                             positions=partition_groups(runs), layers=layers, heads=heads, progress=False)
        return r.values, float(r.baseline.mean())

    return combine(runs.graph, {}, _site_nodes(runs, fn))


@method("attribution_patching")
def attribution_patching(runs: Runs) -> Tensor:
    from mm_lens.analysis.attribution import attribution_patch

    def fn(hook, layers, heads):
        r = attribution_patch(runs.model, runs.clean, runs.corrupted_input, runs.metric, hook=hook,
                              positions=partition_groups(runs))
        values = r.values if layers is None else r.values[layers]
        return values, 0.0  # attribution estimates are changes already

    return combine(runs.graph, {}, _site_nodes(runs, fn))


@method("causal_tracing")
def causal_tracing(runs: Runs) -> Tensor:
    from mm_lens.analysis import groups
    from mm_lens.analysis.causal_trace import causal_trace

    graph, clean = runs.graph, runs.clean
    if clean.shape[0] != 1:
        raise ValueError("causal tracing traces one example at a time")
    real = clean.attention_mask[0].bool().nonzero().flatten()
    trace = causal_trace(runs.model, clean, corrupt=runs.corrupted_input, modules=("mlp", "attn", "resid"),
                         positions=groups.at(real), progress=False)
    effect = trace.normalized_indirect_effect  # [module, layer, position]
    index = graph.groups.index[0][trace.positions]
    nodes = {}
    for g, name in enumerate(graph.groups.names):
        at = index == g
        for l in range(graph.n_layers):
            nodes[f"mlp{l}@{name}"] = float(effect[0, l, at].sum())
            for h in range(graph.n_heads):
                nodes[f"L{l}H{h}@{name}"] = float(effect[1, l, at].sum())
        nodes[f"input@{name}"] = float(effect[2, 0, at].sum())
    return combine(graph, {}, nodes)


# ---------------------------------------------------------------- attention-edge methods
def _attention_edges(graph: Graph, flow: Tensor) -> tuple[dict, dict]:
    """``flow[layer, K, Q]`` -> key/value edge scores and head node scores."""
    names, edges, nodes = graph.groups.names, {}, {}
    for e in graph.edges:
        if e.slot in ("k", "v"):
            layer = int(e.receiver[1:].split("H")[0])
            k, q = names.index(e.sender.split("@")[1]), names.index(e.receiver.split("@")[1])
            edges[e.name] = float(flow[layer, k, q])
    for l, h in _heads(graph):
        for q, name in enumerate(names):
            nodes[f"L{l}H{h}@{name}"] = float(flow[l, :, q].abs().max())
    return edges, nodes


@method("knockout")
def knockout(runs: Runs) -> Tensor:
    from mm_lens.analysis.knockout import attention_knockout

    graph, G = runs.graph, len(runs.graph.groups)
    parts = partition_groups(runs)
    full = float(runs.clean_metric.mean())
    flow = torch.zeros(graph.n_layers, G, G)
    for k in range(G):
        for q in range(G):
            if bool(graph.groups.reach[k, q]):
                r = attention_knockout(runs.model, runs.clean, parts[k], parts[q], window=1, progress=False,
                                       metric=lambda logits, inputs: _last_metric(runs, logits, inputs))
                flow[:, k, q] = r.values - full
    return combine(graph, *_attention_edges(graph, flow))


def _last_metric(runs: Runs, logits: Tensor, inputs) -> Tensor:
    from mm_lens.circuits.forward import metric_value

    last = inputs.positions.last_positions.to(logits.device)
    return metric_value(runs.metric, logits[torch.arange(len(last)), last][:, None])


@method("attention_contribution")
def attention_contribution(runs: Runs) -> Tensor:
    from mm_lens.analysis import groups
    from mm_lens.analysis.contribution import attention_contribution as contribution

    graph, G = runs.graph, len(runs.graph.groups)
    real = runs.clean.attention_mask[0].bool().nonzero().flatten()
    c = contribution(runs.model, runs.clean, source=groups.at(real), target=groups.at(real))
    index = graph.groups.index[0]
    onehot_t = torch.nn.functional.one_hot(index[c.targets], G + 1)[:, :G].float()  # [target, G]
    onehot_s = torch.nn.functional.one_hot(index[c.sources], G + 1)[:, :G].float()  # [source, G]
    flow = torch.einsum("lts,tq,sk->lkq", c.norms, onehot_t, onehot_s)
    return combine(graph, *_attention_edges(graph, flow))


@method("path_patching")
def path_patching(runs: Runs) -> Tensor:
    from mm_lens.analysis.path_patching import path_patch

    graph = runs.graph
    names = graph.groups.names
    parts = partition_groups(runs)
    edges: dict = {}

    def run(senders, receiver, group):
        if not senders:
            return
        r = path_patch(runs.model, runs.clean, runs.corrupted_input, runs.metric, senders=senders,
                       receivers=receiver, sender_positions=parts[group], receiver_positions=parts[group],
                       direction="noise", progress=False)
        base = float(r.baseline.mean())
        for s, v in zip(senders, r.values.tolist()):
            yield s, v - base

    senders = [c for c in graph.components[1:] if not c.startswith("visual_in")]  # path patching has no input senders

    def earlier(layer: float) -> list[str]:
        return [c for c in senders if _layer(c) < layer]

    for g, name in enumerate(names):
        for l, h in _heads(graph):
            for slot in ("q", "k", "v"):
                for s, v in run(earlier(l), f"L{l}H{h}.{slot}", g):
                    if slot == "q":
                        edges[f"{s}@{name}->L{l}H{h}@{name}.q"] = v
                    else:
                        for q, qname in enumerate(names):
                            if bool(graph.groups.reach[g, q]):
                                edges[f"{s}@{name}->L{l}H{h}@{qname}.{slot}"] = v
        for l in range(graph.n_layers):
            receiver = f"resid_pre{l + 1}" if l + 1 < graph.n_layers else "logits"
            if receiver == "logits" and g != graph.groups.last:
                continue
            for s, v in run([c for c in earlier(l + 0.5)], receiver, g):
                edges[f"{s}@{name}->mlp{l}@{name}"] = v
    last = names[graph.groups.last]
    for s, v in run(senders, "logits", graph.groups.last):
        edges[f"{s}@{last}->logits@{last}"] = v
    nodes: dict = {}
    for e, v in edges.items():
        sender = e.split("->")[0]
        nodes[sender] = max(nodes.get(sender, 0.0), abs(v))
    return combine(graph, edges, nodes)


def _layer(component: str) -> float:
    from mm_lens.circuits.graph import component_layer

    return component_layer(component, 10 ** 6)
