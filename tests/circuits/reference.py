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
    z = cache[f"blocks.{layer}.attn.hook_z"][:, :, head]
    return post_norm(model, cache, layer, z @ model.blocks[layer].attn.W_O[head])


def post_norm(model, cache, layer, x):
    """With sandwich norms (Gemma 3), a head's write (or b_O's) is its part of ln1_post's output: divided by the scale
    the norm computed for the whole attention output in that run (its hook_scale), times the norm's weight."""
    norm = model.blocks[layer].ln1_post
    if norm is None:
        return x
    return x / cache[f"blocks.{layer}.ln1_post.hook_scale"] * norm.w


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


def input_gradient(model, clean, groups, edge, metric, hooks=()):
    """``d metric / d input_r`` at the receiver's input (one head's q, k or v as read at its query group; an MLP's
    input), written out with hooks: a zero perturbation of that input that autograd differentiates."""
    r_comp, r_group = edge.receiver.split("@")
    P = clean.shape[1]
    delta = torch.zeros(1, P, model.cfg.d_model, requires_grad=True)
    with torch.enable_grad():
        if edge.slot == "mlp":
            layer = int(r_comp[3:])
            value = metric(model.run_with_hooks(clean, fwd_hooks=list(hooks) + [
                (f"blocks.{layer}.hook_mlp_in", lambda x, hook: x + delta)]))
        else:
            layer, head = (int(x) for x in r_comp[1:].split("H"))
            block = model.blocks[layer]
            attn = block.attn
            kv = head // attn.repeat
            W, b, index = {"q": (attn.W_Q[head], attn.b_Q[head], head), "k": (attn._W_K[kv], attn._b_K[kv], kv),
                           "v": (attn._W_V[kv], attn._b_V[kv], kv)}[edge.slot]
            kept = {}

            def keep_resid(x, hook):
                kept["resid"] = x

            def change(x, hook):
                x = x.clone()
                x[:, :, index] = block.ln1(kept["resid"] + delta) @ W + b
                return x

            site = [(f"blocks.{layer}.hook_resid_pre", keep_resid), (f"blocks.{layer}.attn.hook_{edge.slot}", change)]
            if edge.slot == "q":
                value = metric(model.run_with_hooks(clean, fwd_hooks=list(hooks) + site))
            else:  # keys/values as read by the queries of the receiver's group only: two passes
                query = positions(groups, r_group)
                z = {}
                model.run_with_hooks(clean, fwd_hooks=list(hooks) + site + [
                    (f"blocks.{layer}.attn.hook_z", lambda x, hook: z.update(q=x[:, query, head]))])

                def set_z(x, hook):
                    x = x.clone()
                    x[:, query, head] = z["q"]
                    return x

                value = metric(model.run_with_hooks(clean, fwd_hooks=list(hooks) + [
                    (f"blocks.{layer}.attn.hook_z", set_z)]))
        (grad,) = torch.autograd.grad(value.sum(), delta)
    return grad
