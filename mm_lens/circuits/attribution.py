"""Edge attribution: every edge's score from a fixed number of forward and backward passes.

* EAP (Syed et al., "Attribution Patching Outperforms Automated Circuit Discovery", 2023): the
  score of edge ``s -> r`` is ``(corrupted_s - clean_s) . d metric / d input_r`` at the clean run, the
  first-order estimate of ``metric(clean, edge patched) - metric(clean)``.
* EAP-IG (Hanna et al., "Have Faith in Faithfulness", 2024; the inputs variant that leads MIB's
  circuit-localisation track): the gradient is averaged over ``steps`` runs whose input embedding
  (``hook_embed``: image features and token embeddings) moves from the corrupted run's to the clean
  run's, ``embed_k = corrupted + (k / steps) (clean - corrupted)`` for ``k = 1 .. steps``, as in the
  paper's formula (so ``steps=1`` is EAP; the published code's loop takes ``k = 0 .. steps - 1``).
  Hanna et al. use 5 steps. On DeepStack models (Qwen3-VL) the vision features at each
  ``blocks.{l}.hook_visual_in`` are inputs too, and move along the same line.

Each step is one plain forward and backward of the model (the two plain runs of the pair come
first). The gradient at a receiver's input ``d metric / d input_r`` is the chain rule from what the
backward pass leaves at the hook points, through the block's own ``ln1`` (a vector-Jacobian product)
and the head's weights: for a query, from ``hook_q``; for the keys and values at K *as read by the
queries at Q* (the cross-position edges of :mod:`mm_lens.circuits.graph`), from the attention scores'
and the outputs' gradients summed over the query positions of Q only:
``d/dv_K = sum_{q in Q} pattern[q, K] dz_q`` and ``d/dk_K = R_K^T sum_{q in Q} scale dscores[q, K] q_rot_q``
(``scale``: the attention's own scaling, e.g. Gemma 3's ``query_pre_attn_scalar``, and the score soft-cap's
derivative where the model has one; ``R``: the rotary rotation, at the model's own position ids, M-RoPE
included, with a sliding-window layer's local rotary where it has one; with per-head key norms, as Qwen3's
and Gemma 3's, the norm's vector-Jacobian product at ``hook_k`` follows); for an MLP, from
``hook_mlp_in``; for the logits, from the last block's ``hook_resid_post`` at the last position. Scores are
averaged over the examples of the batch; a negative score means patching the edge lowers the metric (the
edge carries the clean answer).
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mm_lens.circuits.forward import metric_value
from mm_lens.circuits.runs import Runs
from mm_lens.components.rotary import apply_rotary

METHODS = ("eap", "eap-ig")


def _backward(runs: Runs, embed: Tensor, visual: list[Tensor]) -> dict:
    """One forward and backward of the clean input with ``embed`` at ``hook_embed`` (and ``visual[l]`` at
    ``blocks.{l}.hook_visual_in``): what the receivers' gradients need, per layer (activations and gradients at
    the hook points)."""
    model, L = runs.model, runs.model.cfg.n_layers
    acts, grads = {}, {}
    rotary = model.rotary is not None

    def keep(x, hook):
        acts[hook.name] = x.detach()

    def keep_grad(g, hook):
        grads[hook.name] = g.detach()

    def set_embed(x, hook):
        return embed

    fwd = [("hook_embed", set_embed)] + [(f"blocks.{l}.hook_visual_in", lambda x, hook, v=v: v.to(x.dtype))
                                         for l, v in enumerate(visual)]
    bwd = []
    for l in range(L):
        pre = f"blocks.{l}."
        fwd += [(pre + "hook_resid_pre", keep), (pre + "attn.hook_pattern", keep), (pre + "attn.hook_k", keep),
                (pre + ("attn.hook_rot_q" if rotary else "attn.hook_q"), keep)]
        fwd += [(pre + "attn.hook_attn_scores", keep)] if model.blocks[l].attn.softcap is not None else []
        bwd += [(pre + n, keep_grad) for n in ("attn.hook_q", "attn.hook_attn_scores", "attn.hook_z", "hook_mlp_in")]
    bwd.append((f"blocks.{L - 1}.hook_resid_post", keep_grad))
    with torch.enable_grad(), model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
        final = model(runs.clean, stop_at_layer=L)
        from mm_lens.circuits.forward import last_logits

        metric_value(runs.metric, last_logits(model, runs.clean, final)).mean().backward()
    return dict(acts=acts, grads=grads)


def _input_gradient(block, resid: Tensor, cotangent: Tensor) -> Tensor:
    """``d metric / d x`` for an input ``x = resid`` read through ``block.ln1``, given the gradient
    ``cotangent [..., batch, pos, head, d_model]`` at ``ln1(x)`` (one per head, and per query group)."""
    with torch.enable_grad():
        x = resid.detach()[:, :, None, :].expand(cotangent.shape).clone().requires_grad_(True)
        (g,) = torch.autograd.grad(block.ln1(x), x, cotangent)
    return g


def _key_gradient(model, runs: Runs, attn, k: Tensor, g_rot: Tensor) -> Tensor:
    """A gradient ``g_rot [group, batch, key, head, d_head]`` at the keys the scores read (after the key norm and
    rotary) taken back to ``hook_k`` (``k [batch, key, kv_head, d_head]``): the vector-Jacobian product of the
    attention's own ``k_norm`` (if any) and rotary at the model's position ids."""
    if model.rotary is None and attn.k_norm is None:
        return g_rot
    k = k.repeat_interleave(attn.repeat, dim=2).to(g_rot.dtype)  # each query head's key/value head
    with torch.enable_grad():
        x = k.expand(g_rot.shape).clone().requires_grad_(True)
        y = x if attn.k_norm is None else attn.k_norm(x)
        if model.rotary is not None:
            rotary = model.rotary_local if attn.window and model.rotary_local is not None else model.rotary
            y = apply_rotary(y, *rotary(model.input_position_ids(runs.clean), g_rot.dtype))
        (g,) = torch.autograd.grad(y, x, g_rot)
    return g


def _raw_score_gradient(attn, g: Tensor, capped: Tensor | None) -> Tensor:
    """The gradient at ``hook_attn_scores [batch, head, query, key]`` taken back to ``q . k`` (before the
    attention's own ``scaling`` and, on soft-capped models, ``cap * tanh(s / cap)``, whose derivative is
    ``1 - (capped / cap)^2``; masked scores get no gradient)."""
    if capped is not None:
        g = g * torch.where(capped.isfinite(), 1 - (capped / attn.softcap) ** 2, 0.0)
    return g * attn.scaling


def _by_query_group(weights: Tensor, x: Tensor, onehot: Tensor) -> Tensor:
    """``sum_{q in Q} weights[b, h, q, k] x[b, q, h, :]`` for each query group Q: ``[group, batch, key, head, d_head]``
    (``weights [batch, head, query, key]``, ``x [batch, query, head, d_head]``, ``onehot [batch, query, group]``).
    Each group multiplies only its own query rows."""
    B, H, _, K = weights.shape
    out = x.new_zeros(onehot.shape[-1], B, K, H, x.shape[-1], dtype=weights.dtype)
    for g in range(onehot.shape[-1]):
        for b in range(B):
            rows = onehot[b, :, g].nonzero().flatten()
            if len(rows):
                w = weights[b][:, rows].transpose(-1, -2)  # [head, key, rows]
                out[g, b] = (w @ x[b, rows].transpose(0, 1).to(w.dtype)).transpose(0, 1)  # [key, head, d_head]
    return out


@torch.no_grad()
def _scores(runs: Runs, state: dict, diff: Tensor) -> list[Tensor]:
    """Per-slot score blocks ``(corrupted_s - clean_s) . d metric / d input_r`` summed over each edge's
    positions and the batch (:attr:`Graph.slots` order)."""
    model, graph = runs.model, runs.graph
    acts, grads = state["acts"], state["grads"]
    G = len(graph.groups)
    onehot = torch.nn.functional.one_hot(graph.groups.index.to(diff.device), G + 1)[..., :G].to(diff.dtype)
    blocks = []
    for l in range(graph.n_layers):
        pre, block = f"blocks.{l}.", model.blocks[l]
        attn = block.attn
        n = graph.first_of_layer(l)
        resid = acts[pre + "hook_resid_pre"]
        d = diff[:n]
        # queries: the gradient at hook_q, back through W_Q and ln1
        g_q = _input_gradient(block, resid, torch.einsum("bphe,hde->bphd", grads[pre + "attn.hook_q"], attn.W_Q))
        blocks.append(torch.einsum("sbpd,bphd,bpg->sgh", d, g_q.to(d.dtype), onehot))
        # keys and values at each position, as read by the queries of each group Q
        q_rot = acts[pre + ("attn.hook_rot_q" if model.rotary is not None else "attn.hook_q")]
        g_scores = _raw_score_gradient(attn, grads[pre + "attn.hook_attn_scores"], acts.get(pre + "attn.hook_attn_scores"))
        g_k = _key_gradient(model, runs, attn, acts[pre + "attn.hook_k"], _by_query_group(g_scores, q_rot, onehot))
        g_v = _by_query_group(acts[pre + "attn.hook_pattern"], grads[pre + "attn.hook_z"], onehot)
        for g_in, W in ((g_k, attn.W_K), (g_v, attn.W_V)):
            g_in = _input_gradient(block, resid, torch.einsum("gbkhe,hde->gbkhd", g_in, W)).to(d.dtype)
            per_key = torch.einsum("sbkd,gbkhd->sbkgh", d, g_in)  # [sender, batch, key, query group, head]
            blocks.append(torch.einsum("sbkgh,bkc->schg", per_key, onehot))
        # the MLP's input
        n_mlp = n + (0 if graph.parallel else graph.n_heads)
        blocks.append(torch.einsum("sbpd,bpd,bpg->sg", diff[:n_mlp], grads[pre + "hook_mlp_in"].to(d.dtype), onehot))
    last = runs.clean.positions.last_positions.to(diff.device)
    rows = torch.arange(diff.shape[1], device=diff.device)
    g_final = grads[f"blocks.{graph.n_layers - 1}.hook_resid_post"][rows, last]
    blocks.append(torch.einsum("sbd,bd->s", diff[:, rows, last], g_final.to(diff.dtype)))
    return blocks


def edge_attribution(runs: Runs, method: str = "eap-ig", steps: int = 5, progress: bool = False) -> Tensor:
    """Flat edge scores (:attr:`Graph.edges` order) by EAP (``method="eap"``) or EAP-IG with ``steps``
    (module docstring), averaged over the batch."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    steps = 1 if method == "eap" else steps
    model, graph = runs.model, runs.graph
    n_all = len(graph.components)
    with torch.no_grad():
        diff = (runs.corrupted_acts.stacked(model, n_all) - runs.clean_acts.stacked(model, n_all)).float()
    clean, corrupted = runs.clean_acts, runs.corrupted_acts
    total = None
    for k in tqdm(range(1, steps + 1), desc="EAP-IG steps", disable=not progress or steps == 1):
        embed = (corrupted.embed + (k / steps) * (clean.embed - corrupted.embed)).detach().requires_grad_(True)
        visual = [(c + (k / steps) * (v - c)).detach() for v, c in zip(clean.visual, corrupted.visual)]
        blocks = _scores(runs, _backward(runs, embed, visual), diff)
        total = blocks if total is None else [t + b for t, b in zip(total, blocks)]
    return graph.flatten([t.cpu() / steps for t in total])
