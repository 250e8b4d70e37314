"""The computational graph of a position-aware circuit: (component x position group) nodes and the
residual-stream edges between them.

Convention (position-aware edges of Haklay et al., "Position-aware Automatic Circuit Discovery",
ACL 2025, with the components of Hanna et al.'s EAP-IG graph):

* Components: ``input`` (``hook_embed``: token embeddings, and the projected image features at image
  positions, so the vision tower is part of the input), every attention head ``L{l}H{h}``, every MLP
  ``mlp{l}``, on DeepStack models (Qwen3-VL) ``visual_in{l}`` (``blocks.{l}.hook_visual_in``: the vision
  features added after block l, at image positions only), and ``logits``. Position groups: a partition of the positions
  (:mod:`mm_lens.circuits.groups`). A node is ``"{component}@{group}"``: the component's output at the
  group's positions (for ``logits``: the logits at ``last``).
* The residual stream is position-wise, so a sender's output at group P reaches a receiver only
  through what that receiver reads at P:

  - ``S@P -> L{l}H{h}@P.q``: head h's query input at P (the head's output at P);
  - ``S@K -> L{l}H{h}@Q.k`` / ``.v``: head h's key / value input at K, *as read by the head's queries at
    Q* (K at or before Q): the edge carries what the head moves from K to Q, and exists for every
    group Q that K can reach (K = Q included). This is the cross-position edge of Haklay et al.;
  - ``S@P -> mlp{l}@P``: the MLP's input at P;
  - ``S@last -> logits@last``: the unembedding's input at the last position.

  Senders precede receivers: the input and every component of an earlier layer; an MLP also reads the
  heads of its own layer (not in parallel attention/MLP blocks). ``visual_in{l}`` is added after block l,
  so only blocks after l and the logits read it, and it has nodes only at groups with image positions.
* Patching an edge gives its receiver, at those positions, the residual stream it would read if the
  sender's output were the corrupted run's: ``input_r = resid + sum over patched senders s of
  (corrupted_s - current_s)`` (Hanna et al.'s edge intervention, per position group).

Edge names read ``"input@object->L1H0@last.v"``, ``"L1H0@last->logits@last"``,
``"L0H1@question->mlp1@question"``.

Scores and masks are kept as dense tensors per receiver slot (:class:`Slot`); ``flat`` order lists
every real edge once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import torch
from torch import Tensor

from mm_lens.circuits.groups import PositionGroups

_NODE = re.compile(r"^(input|logits|mlp(\d+)|visual_in(\d+)|L(\d+)H(\d+))@(.+)$")


@dataclass(frozen=True)
class Edge:
    """One residual-stream edge: ``sender`` and ``receiver`` node names, the receiver's input ``slot``
    (``q``, ``k``, ``v``, ``mlp``, ``logits``) and its score (when scored)."""

    sender: str
    receiver: str
    slot: str
    score: float = float("nan")

    @property
    def name(self) -> str:
        suffix = f".{self.slot}" if self.slot in "qkv" else ""
        return f"{self.sender}->{self.receiver}{suffix}"

    @staticmethod
    def parse(name: str) -> "Edge":
        """``"input@object->L1H0@last.v"`` -> ``Edge("input@object", "L1H0@last", "v")``."""
        try:
            sender, receiver = name.split("->")
        except ValueError:
            raise ValueError(f"an edge is written 'sender@group->receiver@group[.q|.k|.v]', got {name!r}") from None
        slot = "logits" if receiver.startswith("logits@") else "mlp"
        if re.search(r"\.[qkv]$", receiver):
            receiver, slot = receiver[:-2], receiver[-1]
        for node in (sender, receiver):
            if not _NODE.match(node):
                raise ValueError(f"{node!r} in edge {name!r} is not a node: write component@group, e.g. L1H0@last")
        return Edge(sender, receiver, slot)


def node_parts(node: str) -> tuple[str, str]:
    """``"L1H0@last"`` -> ``("L1H0", "last")``."""
    component, _, group = node.partition("@")
    return component, group


def component_layer(component: str, n_layers: int) -> float:
    """Where a component sits: -1 for the input, ``l`` for a head of layer l, ``l + 0.5`` for ``mlp{l}``,
    ``l + 0.75`` for ``visual_in{l}`` (added after block l), ``n_layers`` for the logits."""
    if component == "input":
        return -1.0
    if component == "logits":
        return float(n_layers)
    m = re.match(r"^L(\d+)H\d+$", component)
    if m:
        return float(m.group(1))
    m = re.match(r"^mlp(\d+)$", component)
    if m:
        return int(m.group(1)) + 0.5
    m = re.match(r"^visual_in(\d+)$", component)
    if m:
        return int(m.group(1)) + 0.75
    raise ValueError(f"unknown component {component!r}")


@dataclass(frozen=True)
class Slot:
    """The edges into one kind of receiver input of one layer, as a dense block.

    ``kind`` ``q``: ``[sender, group, head]``; ``k``/``v``: ``[sender, key_group, head, query_group]``;
    ``mlp``: ``[sender, group]``; ``logits``: ``[sender]`` (senders at ``last``). Senders are the first
    ``n_senders`` components in :attr:`Graph.components` order.
    """

    kind: str
    layer: int
    n_senders: int
    shape: tuple[int, ...]


class Graph:
    """The edges of a model under a position partition (module docstring)."""

    def __init__(self, cfg, groups: PositionGroups, n_deepstack: int = 0):
        self.n_layers, self.n_heads = cfg.n_layers, cfg.n_heads
        self.n_deepstack = n_deepstack
        self.n_kv = cfg.n_key_value_heads or cfg.n_heads
        self.rep = self.n_heads // self.n_kv
        self.parallel = bool(getattr(cfg, "parallel_attn_mlp", False))
        self.groups = groups
        G, H = len(groups), self.n_heads
        slots = []
        for l in range(self.n_layers):
            n_attn = self.first_of_layer(l)
            slots.append(Slot("q", l, n_attn, (n_attn, G, H)))
            slots.append(Slot("k", l, n_attn, (n_attn, G, H, G)))
            slots.append(Slot("v", l, n_attn, (n_attn, G, H, G)))
            n_mlp = n_attn + (0 if self.parallel else H)
            slots.append(Slot("mlp", l, n_mlp, (n_mlp, G)))
        slots.append(Slot("logits", self.n_layers, len(self.components), (len(self.components),)))
        self.slots = slots

    # ---------------------------------------------------------------- components
    @cached_property
    def components(self) -> list[str]:
        """Senders in order: ``input``, then per layer its heads, its MLP and (DeepStack layers) ``visual_in{l}``."""
        out = ["input"]
        for l in range(self.n_layers):
            out += [f"L{l}H{h}" for h in range(self.n_heads)] + [f"mlp{l}"]
            out += [f"visual_in{l}"] if l < self.n_deepstack else []
        return out

    def first_of_layer(self, layer: int) -> int:
        """Index of layer ``layer``'s first head in :attr:`components` (= the senders before it)."""
        return 1 + layer * (self.n_heads + 1) + min(layer, self.n_deepstack)

    # ---------------------------------------------------------------- validity and order
    def valid(self, slot: Slot) -> Tensor:
        """Which entries of the slot's block are real edges (key groups must reach query groups; ``visual_in``
        senders only at groups with image positions)."""
        ok = torch.ones(slot.shape, dtype=torch.bool)
        if slot.kind in ("k", "v"):
            ok &= self.groups.reach[None, :, None, :]
        for s in self.visual_senders(slot.n_senders):
            if slot.kind == "logits":
                ok[s] &= bool(self.groups.image[self.groups.last])
            else:
                ok[s] &= self.groups.image.reshape(-1, *[1] * (len(slot.shape) - 2))
        return ok

    def visual_senders(self, n_senders: int) -> list[int]:
        """Indices of the ``visual_in`` components among the first ``n_senders``."""
        return [i for i, c in enumerate(self.components[:n_senders]) if c.startswith("visual_in")]

    @cached_property
    def _valid(self) -> list[Tensor]:
        return [self.valid(s) for s in self.slots]

    @cached_property
    def n_edges(self) -> int:
        return int(sum(int(v.sum()) for v in self._valid))

    def flatten(self, blocks: list[Tensor]) -> Tensor:
        """Per-slot dense blocks -> one vector over every real edge (:attr:`edges` order)."""
        return torch.cat([b[v.to(b.device)] for b, v in zip(blocks, self._valid)])

    def unflatten(self, flat: Tensor, fill=0) -> list[Tensor]:
        """The inverse of :meth:`flatten` (``fill`` where no edge exists)."""
        out, start = [], 0
        for slot, v in zip(self.slots, self._valid):
            block = torch.full(slot.shape, fill, dtype=flat.dtype, device=flat.device)
            n = int(v.sum())
            block[v.to(flat.device)] = flat[start:start + n]
            out.append(block)
            start += n
        return out

    def zeros(self, dtype=torch.float32, device=None) -> list[Tensor]:
        return [torch.zeros(s.shape, dtype=dtype, device=device) for s in self.slots]

    # ---------------------------------------------------------------- names
    def _names(self, slot: Slot) -> Iterator[tuple[str, str]]:
        """(sender, receiver) names of every entry of the slot's block, in row-major order."""
        g_names = self.groups.names
        comps = self.components
        last = g_names[self.groups.last]
        if slot.kind == "q":
            for s in range(slot.n_senders):
                for g in g_names:
                    for h in range(self.n_heads):
                        yield f"{comps[s]}@{g}", f"L{slot.layer}H{h}@{g}"
        elif slot.kind in ("k", "v"):
            for s in range(slot.n_senders):
                for k in g_names:
                    for h in range(self.n_heads):
                        for q in g_names:
                            yield f"{comps[s]}@{k}", f"L{slot.layer}H{h}@{q}"
        elif slot.kind == "mlp":
            for s in range(slot.n_senders):
                for g in g_names:
                    yield f"{comps[s]}@{g}", f"mlp{slot.layer}@{g}"
        else:
            for s in range(slot.n_senders):
                yield f"{comps[s]}@{last}", f"logits@{last}"

    @cached_property
    def edges(self) -> list[Edge]:
        """Every real edge, in :meth:`flatten` order."""
        out = []
        for slot, v in zip(self.slots, self._valid):
            for (sender, receiver), ok in zip(self._names(slot), v.flatten().tolist()):
                if ok:
                    out.append(Edge(sender, receiver, slot.kind))
        return out

    @cached_property
    def edge_index(self) -> dict[str, int]:
        return {e.name: i for i, e in enumerate(self.edges)}

    def mask_of(self, names, strict: bool = True) -> Tensor:
        """Bool vector over :attr:`edges`: True for the named edges."""
        mask = torch.zeros(self.n_edges, dtype=torch.bool)
        for name in names:
            name = name.name if isinstance(name, Edge) else name
            i = self.edge_index.get(name)
            if i is None:
                if strict:
                    raise ValueError(f"edge {name!r} is not in this graph (groups {self.groups.names}); "
                                     f"e.g. {self.edges[0].name!r}")
                continue
            mask[i] = True
        return mask

    def __repr__(self) -> str:
        return (f"Graph({self.n_layers} layers x {self.n_heads} heads, groups {self.groups.names}, "
                f"{self.n_edges} edges)")


def node_index(graph: Graph) -> tuple[Tensor, Tensor, list[str]]:
    """For every edge, the index of its sender and of its receiver in ``nodes`` (every node of the graph)."""
    if not hasattr(graph, "_node_index"):
        nodes: dict[str, int] = {}
        snd = [nodes.setdefault(e.sender, len(nodes)) for e in graph.edges]
        rcv = [nodes.setdefault(e.receiver, len(nodes)) for e in graph.edges]
        graph._node_index = (torch.tensor(snd), torch.tensor(rcv), list(nodes))
    return graph._node_index


def _closure(start: Tensor, frm: Tensor, to: Tensor, keep: Tensor) -> Tensor:
    """Nodes reached from ``start`` along the kept edges ``frm -> to``."""
    reached = start.clone()
    while True:
        new = reached.clone()
        new[to[keep & reached[frm]]] = True
        if bool((new == reached).all()):
            return reached
        reached = new


def prune_dangling(graph: Graph, keep: Tensor) -> Tensor:
    """Keep only the edges on some path from an input node (``input``, DeepStack's ``visual_in``) to the logits
    within ``keep`` (MIB's pruning)."""
    snd, rcv, nodes = node_index(graph)
    is_input = torch.tensor([n.startswith(("input@", "visual_in")) for n in nodes])
    is_logits = torch.tensor([n.startswith("logits@") for n in nodes])
    keep = keep.clone().bool()
    while True:
        reached = _closure(is_input, snd, rcv, keep)  # forward from the inputs
        useful = _closure(is_logits, rcv, snd, keep)  # backward from the logits
        pruned = keep & reached[snd] & useful[rcv]
        if bool((pruned == keep).all()):
            return pruned
        keep = pruned
