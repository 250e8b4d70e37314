"""Where a rank-one MLP edit can act: the gradient of the edit objective at each layer's MLP output.

MultEdit (:func:`mm_lens.analysis.multedit`) adds a vector to one layer's MLP output at one
position (the last constraint token) and optimises it for ``-log p(target)`` at the last
position. A layer whose MLP output there has a zero gradient cannot change the answer: e.g.
the last block at any position but the last one (nothing reads it afterwards). Pick the layer
with these norms before editing.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mm_lens.inputs import MultimodalInput


def mlp_out_gradient_norms(model, inputs: MultimodalInput, target: int, position: int) -> Float[Tensor, " layer"]:
    """``‖∂(-log p(target at the last position)) / ∂ mlp_out[layer, position]‖`` for every layer."""
    names = [f"blocks.{l}.hook_mlp_out" for l in range(model.cfg.n_layers)]
    zeros = {}  # an added zero per layer: the gradient with respect to it is the gradient at the MLP output

    def add_zero(act: Tensor, hook) -> Tensor:  # act: [batch, pos, d_model]
        zeros[hook.name] = torch.zeros_like(act, requires_grad=True)
        return act + zeros[hook.name]

    with torch.enable_grad():
        logits = model.run_with_hooks(inputs, fwd_hooks=[(n, add_zero) for n in names])
        loss = -logits[0, -1].float().log_softmax(-1)[target]
        grads = torch.autograd.grad(loss, [zeros[n] for n in names], allow_unused=True)
    return torch.stack([torch.zeros(()) if g is None else g[0, position].float().norm().cpu() for g in grads])
