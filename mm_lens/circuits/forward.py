"""Edge-level runs: the model's own forward, with every receiver reading its own residual stream.

Everything here is TransformerLens-style hooks on the model's public hook points; the blocks compute
as always, and the hooks only replace what a receiver reads:

* ``hook_q``: each head's query from its own input ``resid + sum(patches)`` through the block's own
  ``ln1`` and the attention's own projection;
* ``hook_k`` / ``hook_v``: the same for keys and values, but per *query group*: a head's keys at K
  as read from Q are an edge of their own (:mod:`mm_lens.circuits.graph`), so the batch is copied,
  each copy gives every head the keys/values of some query groups (and, with grouped-query attention,
  of one query head of each key/value group), and ``hook_z`` takes each head's output at Q from the
  copy that computed it. Query groups whose key/value edges are patched alike share a copy (one copy
  for the full and the empty circuit). Copy 0 is the run; the other copies exist only to attend;
* ``hook_mlp_in``: each MLP's input; the logits' input is patched at the last position after the
  last block;
* ``hook_visual_in`` (DeepStack models): set to the given vision features, as ``hook_embed`` is set to the
  given embedding; the features are senders, never receivers.

The patches are ``corrupted - current`` outputs of the senders, kept in one ``[sender, batch, pos,
d_model]`` tensor that the hooks fill in as the senders run (as EAP's activation-difference matrix).
:meth:`~mm_lens.circuits.runs.Runs.evaluate` runs it to verify a circuit exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mm_lens.circuits.graph import Graph
from mm_lens.inputs import MultimodalInput, PositionMap


# ---------------------------------------------------------------- sender outputs of a plain run
@dataclass
class SenderOutputs:
    """What every sender writes to the residual stream in one run: ``embed [batch, pos, d_model]``,
    per layer ``z [batch, pos, head, d_head]`` (heads write :func:`head_outputs`) and ``mlp [batch, pos, d_model]``,
    and per DeepStack layer ``visual [batch, pos, d_model]`` (``hook_visual_in``)."""

    embed: Tensor
    z: list[Tensor] = field(default_factory=list)
    mlp: list[Tensor] = field(default_factory=list)
    visual: list[Tensor] = field(default_factory=list)

    def stacked(self, model, n_senders: int) -> Float[Tensor, "sender batch pos d_model"]:
        """The outputs of the first ``n_senders`` components (:attr:`Graph.components` order)."""
        out = [self.embed]
        for l in range(len(self.z)):
            if len(out) >= n_senders:
                break
            out.extend(head_outputs(model, l, self.z[l]).unbind(0))
            out.append(self.mlp[l])
            if l < len(self.visual):
                out.append(self.visual[l])
        return torch.stack(out[:n_senders])

    def mean(self) -> "SenderOutputs":
        """The mean over the batch, kept as a batch of one (mean ablation)."""
        return SenderOutputs(self.embed.mean(0, keepdim=True), [z.mean(0, keepdim=True) for z in self.z],
                             [m.mean(0, keepdim=True) for m in self.mlp], [v.mean(0, keepdim=True) for v in self.visual])


def head_outputs(model, layer: int, z: Tensor) -> Float[Tensor, "head batch pos d_model"]:
    """Each head's write to the residual stream, ``z[..., h, :] @ W_O[h]`` (``b_O`` belongs to no head). With
    sandwich norms (Gemma 2 and 3: ``ln1_post`` between the attention and the residual stream) a head writes its
    share of ``ln1_post``'s output: its ``z @ W_O`` through ``ln1_post`` at the scale of the whole attention output
    in that run (the norm's own :meth:`~mm_lens.components.norms.Norm.at_scale_of`), so the heads' writes (and
    ``b_O``'s) still sum to ``hook_attn_out``."""
    block = model.blocks[layer]
    out = torch.einsum("bphe,hed->hbpd", z, block.attn.W_O.to(z.dtype))
    if block.ln1_post is not None:
        out = block.ln1_post.at_scale_of(out.sum(0) + block.attn.b_O.to(out.dtype), out)
    return out


@torch.no_grad()
def sender_outputs(model, inputs: MultimodalInput, hooks=()) -> tuple[Tensor, SenderOutputs]:
    """One plain run (with ``hooks``, e.g. a corruption at ``hook_embed``): last-position logits and what
    every sender wrote."""
    L = model.cfg.n_layers
    store: dict = {}

    def keep(x, hook):
        store[hook.name] = x.detach()

    k = getattr(model, "n_deepstack", 0)
    names = ["hook_embed"] + [f"blocks.{l}.{s}" for l in range(L) for s in ("attn.hook_z", "hook_mlp_out")]
    names += [f"blocks.{l}.hook_visual_in" for l in range(k)]
    with model.hooks(fwd_hooks=list(hooks) + [(n, keep) for n in names]):
        final = model(inputs, stop_at_layer=L)
    acts = SenderOutputs(store["hook_embed"], [store[f"blocks.{l}.attn.hook_z"] for l in range(L)],
                         [store[f"blocks.{l}.hook_mlp_out"] for l in range(L)],
                         [store[f"blocks.{l}.hook_visual_in"] for l in range(k)])
    return last_logits(model, inputs, final), acts


def last_logits(model, inputs: MultimodalInput, final: Tensor, patch: Optional[Tensor] = None
                ) -> Float[Tensor, "batch 1 d_vocab"]:
    """Logits at each row's last position from the residual after the last block (``+ patch``)."""
    last = inputs.positions.last_positions.to(final.device)
    x = final[torch.arange(len(last), device=final.device), last]
    if patch is not None:
        x = x + patch
    return model.unembed(model.ln_final(x[:, None]))


def metric_value(metric: Callable, logits: Tensor) -> Tensor:
    """The metric as a per-example vector (a scalar metric counts for every row)."""
    out = torch.as_tensor(metric(logits))
    if out.ndim == 0:
        return out.reshape(1).expand(logits.shape[0])
    if out.shape != (logits.shape[0],):
        raise ValueError(f"the metric must return a scalar or a [batch={logits.shape[0]}] tensor, got shape "
                         f"{tuple(out.shape)}")
    return out


# ---------------------------------------------------------------- the edge-level run
@dataclass
class Copies:
    """Which copy of the batch computes head h's output at query group g: ``table[layer][g, h]``."""

    n: int
    table: list[Tensor]


def copies_for(graph: Graph, patch: list[Tensor]) -> Copies:
    """As few copies as the patched key/value edges need: query groups (and heads of one key/value group)
    whose key/value edges are patched alike share a copy."""
    G, H, rep = len(graph.groups), graph.n_heads, graph.rep
    tables, n = [], 1
    for l in range(graph.n_layers):
        k, v = patch[4 * l + 1], patch[4 * l + 2]  # [sender, key_group, head, query_group]
        table = torch.zeros(G, H, dtype=torch.long)
        seen: dict = {}
        for g in range(G):
            for r in range(rep):
                key = (k[:, :, r::rep, g].cpu().numpy().tobytes(), v[:, :, r::rep, g].cpu().numpy().tobytes())
                table[g, r::rep] = seen.setdefault(key, len(seen))
        tables.append(table)
        n = max(n, len(seen))
    return Copies(n, tables)


def _repeat_inputs(inputs: MultimodalInput, n: int) -> MultimodalInput:
    """``n`` copies of the batch (copy-major), without pixels: the embedding comes from a hook."""
    if n == 1:
        return replace(inputs, pixel_values=None)
    rows = list(inputs.positions) * n
    return replace(inputs, input_ids=inputs.input_ids.repeat(n, 1), attention_mask=inputs.attention_mask.repeat(n, 1),
                   pixel_values=None, positions=PositionMap(rows, inputs.positions.image_mask.repeat(n, 1)),
                   image_sizes=list(inputs.image_sizes) * n)


class EdgeRun:
    """One forward of ``inputs`` with the input embedding ``embed`` (and DeepStack features ``visual``) in which
    each receiver reads
    ``resid + sum_s patch[s, r] * (corrupted_s - current_s)``.

    ``patch``: per-slot weights (1 = the edge is patched, 0 = kept; :attr:`Graph.slots` order).
    """

    def __init__(self, model, graph: Graph, inputs: MultimodalInput, corrupted: SenderOutputs,
                 patch: list[Tensor]):
        self.model, self.graph, self.inputs = model, graph, inputs
        self.corrupted, self.patch = corrupted, patch
        self.copies = copies_for(graph, patch)
        self.B, self.P = inputs.shape
        self.index = graph.groups.index.to(model.cfg.device)  # [batch, pos]; padding = number of groups
        self.diff: Optional[Tensor] = None  # [sender, batch, pos, d_model]: corrupted - current
        self.resid: Optional[Tensor] = None

    # ---- patches
    def _weights(self, slot_index: int) -> Optional[Tensor]:
        w = self.patch[slot_index]
        return w if bool(w.any()) else None

    def _per_position(self, w: Tensor) -> Tensor:
        """``[sender, group, ...]`` weights -> ``[sender, batch, pos, ...]`` (padding never patched)."""
        w = torch.cat([w, torch.zeros_like(w[:, :1])], dim=1).to(self.model.cfg.dtype)
        return w[:, self.index]

    def _sent(self, first: int, outputs: Tensor) -> None:
        """Senders ``first, first + 1, ...`` wrote ``outputs [n, batch, pos, d_model]`` in this run."""
        if self.diff is not None:
            self.diff[first:first + outputs.shape[0]] -= outputs.to(self.diff.dtype)

    # ---- receivers
    def _q_input(self, l: int) -> Tensor:
        x = self.resid[:, :, None, :].expand(-1, -1, self.graph.n_heads, -1)
        w = self._weights(4 * l)
        if w is not None:
            x = x + torch.einsum("sbph,sbpd->bphd", self._per_position(w), self.diff[:w.shape[0]])
        return x

    def _kv_input(self, l: int, slot: int) -> Tensor:
        """``[copy, batch, pos, kv_head, d_model]``: copy c's input for each key/value head."""
        graph, C = self.graph, self.copies.n
        table = self.copies.table[l]  # [G, H] -> copy
        x = self.resid[None, :, :, None, :].expand(C, -1, -1, graph.n_kv, -1)
        w = self._weights(4 * l + slot)
        if w is not None:
            # weights of copy c for kv head j: those of a (query group, query head) the copy computes
            ws = torch.zeros((C,) + w.shape[:2] + (graph.n_kv,), dtype=w.dtype, device=w.device)
            for g in range(table.shape[0]):
                for h in range(graph.n_heads):
                    ws[int(table[g, h]), :, :, h // graph.rep] = w[:, :, h, g]
            per = torch.stack([self._per_position(ws[c]) for c in range(C)])  # [copy, sender, batch, pos, kv]
            x = x + torch.einsum("csbpj,sbpd->cbpjd", per, self.diff[:w.shape[0]])
        return x

    def _mlp_input(self, l: int, resid: Tensor) -> Tensor:
        w = self._weights(4 * l + 3)
        if w is None:
            return resid
        return resid + torch.einsum("sbp,sbpd->bpd", self._per_position(w), self.diff[:w.shape[0]])

    # ---- hooks
    def _project(self, l: int, x: Tensor, which: str) -> Tensor:
        """``x [..., head, d_model]`` through the block's ``ln1`` and head-wise weights ``W_{which}``."""
        block = self.model.blocks[l]
        attn = block.attn
        W, b = {"q": (attn.W_Q, attn.b_Q), "k": (attn._W_K, attn._b_K), "v": (attn._W_V, attn._b_V)}[which]
        return torch.einsum("...hd,hde->...he", block.ln1(x), W) + b

    def hooks(self) -> list:
        C, B, graph = self.copies.n, self.B, self.graph
        hooks = [("hook_embed", self._embed_hook)]
        for l in range(graph.n_layers):
            pre = f"blocks.{l}."
            mlp_index = graph.first_of_layer(l) + graph.n_heads
            hooks += [
                (pre + "hook_resid_pre", lambda x, hook: self._keep_resid(x)),
                (pre + "attn.hook_q", lambda x, hook, l=l: self._project(l, self._q_input(l), "q").repeat(C, 1, 1, 1)),
                (pre + "attn.hook_k", lambda x, hook, l=l: self._project(l, self._kv_input(l, 1), "k").flatten(0, 1)),
                (pre + "attn.hook_v", lambda x, hook, l=l: self._project(l, self._kv_input(l, 2), "v").flatten(0, 1)),
                (pre + "attn.hook_z", lambda z, hook, l=l: self._merge(l, z)),
                (pre + "hook_mlp_in", lambda x, hook, l=l: self._mlp_input(l, x[:B]).repeat(C, 1, 1)),
                (pre + "hook_mlp_out", lambda x, hook, i=mlp_index: self._sent(i, x[None, :B])),
            ]
            if l < graph.n_deepstack:
                hooks.append((pre + "hook_visual_in", lambda x, hook, l=l, i=mlp_index + 1: self._visual_hook(l, i, x)))
        return hooks

    def _visual_hook(self, l: int, index: int, x: Tensor) -> Tensor:
        self._sent(index, self.visual[l][None])
        return self.visual[l].to(x.dtype).repeat(self.copies.n, 1, 1)

    def _embed_hook(self, x: Tensor, hook) -> Tensor:
        self._sent(0, self.embed[None])
        return self.embed.to(x.dtype).repeat(self.copies.n, 1, 1)

    def _keep_resid(self, x: Tensor) -> None:
        self.resid = x[:self.B]

    def _merge(self, l: int, z: Tensor) -> Tensor:
        """Head h's output at a position of group g comes from the copy that computed (g, h)."""
        C, B = self.copies.n, self.B
        table = torch.cat([self.copies.table[l], torch.zeros_like(self.copies.table[l][:1])]).to(z.device)
        which = table[self.index]  # [batch, pos, head]
        merged = z.view(C, B, *z.shape[1:]).gather(0, which[None, ..., None].expand(1, *which.shape, z.shape[-1]))[0]
        self._sent(self.graph.first_of_layer(l), head_outputs(self.model, l, merged))
        return merged.repeat(C, 1, 1, 1)

    # ---- run
    def run(self, embed: Tensor, visual: Sequence[Tensor] = ()) -> Tensor:
        """The last-position logits ``[batch, 1, d_vocab]`` of this run; ``visual``: what each DeepStack layer's
        ``hook_visual_in`` adds (``[batch, pos, d_model]`` each)."""
        model, B = self.model, self.B
        if len(visual) != self.graph.n_deepstack:
            raise ValueError(f"this graph has {self.graph.n_deepstack} DeepStack layers, got vision features for "
                             f"{len(visual)}")
        self.embed, self.visual = embed, list(visual)
        self.diff = None
        if any(bool(w.any()) for w in self.patch):
            n = len(self.graph.components)
            self.diff = self.corrupted.stacked(model, n).expand(-1, B, -1, -1).clone()
        big = _repeat_inputs(self.inputs, self.copies.n)
        n_image = int(big.positions.image_mask.sum())
        width = model.cfg.d_model * (1 + self.graph.n_deepstack)  # the hooks set the embedding and DeepStack features
        features = torch.zeros(n_image, width, dtype=model.cfg.dtype, device=model.cfg.device)
        with model.hooks(fwd_hooks=self.hooks()):
            final = model(big, image_features=features, stop_at_layer=model.cfg.n_layers)[:B]
        return last_logits(model, self.inputs, final, self._logits_patch())

    def _logits_patch(self) -> Optional[Tensor]:
        w = self._weights(len(self.graph.slots) - 1)
        if w is None:
            return None
        last = self.inputs.positions.last_positions.to(self.diff.device)
        d_last = self.diff[:w.shape[0], torch.arange(self.B, device=self.diff.device), last]  # [sender, batch, d]
        return torch.einsum("s,sbd->bd", w.to(d_last.dtype), d_last)
