"""Edge interventions written out as plain hooks, for the known-answer tests: the receiver's input at the
edge's positions is the clean residual plus (corrupted - current) output of the sender, computed here from
run_with_cache and the block's own weights, independently of mm_lens.circuits."""

import torch

from mm_lens.circuits.graph import node_parts


def sender_output(model, cache, component):
    """What a component wrote to the residual stream: [batch, pos, d_model]."""
    if component == "input":
        return cache["hook_embed"]
    if component.startswith("visual_in"):  # DeepStack (Qwen3-VL): what block l adds after its MLP
        return cache[f"blocks.{int(component[9:])}.hook_visual_in"]
    if component.startswith("mlp"):
        return cache[f"blocks.{int(component[3:])}.hook_mlp_out"]
    layer, head = (int(x) for x in component[1:].split("H"))
    return cache[f"blocks.{layer}.attn.hook_z"][:, :, head] @ model.blocks[layer].attn.W_O[head]


def head_of(component):
    layer, head = (int(x) for x in component[1:].split("H"))
    return layer, head


def positions(groups, name):
    return (groups.index[0] == groups.names.index(name)).nonzero().flatten()


def project(model, layer, x, which, head):
    """One head's q (or its key/value head's k/v) from a residual x [batch, pos, d_model]."""
    attn = model.blocks[layer].attn
    kv = head // attn.repeat
    W, b = {"q": (attn.W_Q[head], attn.b_Q[head]), "k": (attn._W_K[kv], attn._b_K[kv]),
            "v": (attn._W_V[kv], attn._b_V[kv])}[which]
    return model.blocks[layer].ln1(x) @ W + b


def metric_with_edge(model, clean, corrupted_cache, clean_cache, groups, edge, metric, eps=1.0):
    """The metric of the clean run with one edge patched by eps x (corrupted - clean sender output)."""
    s_comp, s_group = node_parts(edge.sender)
    r_comp, r_group = node_parts(edge.receiver)
    delta = eps * (sender_output(model, corrupted_cache, s_comp) - sender_output(model, clean_cache, s_comp))
    at = positions(groups, s_group)
    mask = torch.zeros(clean.shape[1], dtype=torch.bool)
    mask[at] = True
    delta = delta * mask[None, :, None].to(delta.dtype)
    L = model.cfg.n_layers
    if edge.slot == "logits":
        def add(x, hook):
            return x + delta
        logits = model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{L - 1}.hook_resid_post", add)])
        return metric(logits)
    if edge.slot == "mlp":
        layer = int(r_comp[3:])
        logits = model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{layer}.hook_mlp_in", lambda x, hook: x + delta)])
        return metric(logits)
    layer, head = head_of(r_comp)
    resid = clean_cache[f"blocks.{layer}.hook_resid_pre"]
    changed = project(model, layer, resid + delta, edge.slot, head)  # [batch, pos, d_head]
    if edge.slot == "q":
        def set_q(q, hook):
            q = q.clone()
            q[:, at, head] = changed[:, at].to(q.dtype)
            return q
        return metric(model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{layer}.attn.hook_q", set_q)]))
    # keys/values at K as read by the queries at Q only: pass 1 attends with the changed keys/values and keeps
    # head h's output at Q; pass 2 is the clean run with that output at Q
    kv = head // model.blocks[layer].attn.repeat
    query = positions(groups, r_group)
    kept = {}

    def set_kv(x, hook):
        x = x.clone()
        x[:, at, kv] = changed[:, at].to(x.dtype)
        return x

    def keep_z(z, hook):
        kept["z"] = z[:, query, head]

    model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{layer}.attn.hook_{edge.slot}", set_kv),
                                           (f"blocks.{layer}.attn.hook_z", keep_z)])

    def set_z(z, hook):
        z = z.clone()
        z[:, query, head] = kept["z"]
        return z

    return metric(model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", set_z)]))
