"""The copy-head model of the method tests: behaviour fixed by construction, image features fixed.

``copy_head_model()`` edits a tiny random LLaVA (converted to HookedVLM) so that:

* the vision side always produces the same image features (a permanent hook on
  ``vision_projector.hook_out``): random "filler" features at every patch, plus a
  strong marker (residual dim 0) and a payload (dims 10..21) at image patch ``P``;
* rotary is switched off (``inv_freq = 0``), so attention depends on content only;
* layer ``COPY_LAYER`` head 0 attends from the query-marker token (the final
  "ASSISTANT:", residual dim 2) to the marked patch and copies its payload;
  every other head and every MLP writes nothing (``W_O = 0``, ``W_out = 0``), the
  other heads attend uniformly (``W_Q = 0``);
* the unembedding reads the payload as the token ``TARGET``.

So the answer ``TARGET`` at the last position comes from patch ``P`` through that
one head, and nothing else.
"""

from __future__ import annotations

import torch

from mm_lens.circuits.groundtruth.build import hooked, unit_norms
from mm_lens.model import HookedVLM
from mm_lens.testing import random_image

PROMPT = "USER: <image>\nwhat is the color of the circle ? ASSISTANT:"
TARGET_WORD = "cat"
P_ROW, P_COL = 2, 1  # the marked patch on the 4 x 4 grid
COPY_LAYER = 1
PAYLOAD = slice(10, 22)  # 12 = d_head dims


@torch.no_grad()
def copy_head_model(seed: int = 0) -> HookedVLM:
    model = hooked(seed)
    cfg = model.cfg
    d, g = cfg.d_model, torch.Generator().manual_seed(seed + 1)
    n_patch = cfg.n_image_tokens
    p_index = P_ROW * 4 + P_COL
    target = model.to_single_token(TARGET_WORD)
    query_tok = model.to_single_token("ASSISTANT:")

    payload = torch.zeros(d)
    payload[PAYLOAD] = torch.randn(12, generator=g)
    payload = payload / payload.norm() * 3.0
    feats = torch.zeros(n_patch, d)
    feats[:, 22:] = torch.randn(n_patch, d - 22, generator=g)
    feats[p_index, 0] = 8.0
    feats[p_index] += payload

    def fixed_features(out, hook):
        return feats.to(out.dtype).expand(out.shape[0], -1, -1).clone()

    model.vision_projector.hook_out.add_hook(fixed_features, is_permanent=True)
    model.rotary.inv_freq.zero_()

    W_E = torch.zeros_like(model.W_E)
    W_E[:, 22:] = torch.randn(W_E.shape[0], d - 22, generator=g)
    W_E[query_tok, 2] = 4.0
    model.embed.W_E.copy_(W_E)

    unit_norms(model)
    for layer, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        mlp.W_out.zero_()
        mlp.b_out.zero_()
        attn.W_O.zero_()
        attn.b_O.zero_()
        attn.W_Q.zero_()
        attn.b_Q.zero_()
        attn._b_K.zero_()
        attn._b_V.zero_()
        if layer == COPY_LAYER:
            attn.W_Q[0, 2, 0] = 6.0
            attn._W_K[0].zero_()
            attn._W_K[0, 0, 0] = 6.0
            attn._W_V[0].zero_()
            attn._W_V[0, PAYLOAD, :] = torch.eye(12)
            attn.W_O[0, :, PAYLOAD] = torch.eye(12) * 4.0
    W_U = 0.1 * torch.randn(model.W_U.shape, generator=g)
    W_U[PAYLOAD, :] = 0
    W_U[:, target] = 0
    W_U[PAYLOAD, target] = payload[PAYLOAD] / payload[PAYLOAD].norm() * 4.0
    model.unembed.W_U.copy_(W_U)
    model.unembed.b_U.zero_()
    return model


def patch_position(model: HookedVLM, inputs) -> int:
    return inputs.positions.patch(P_ROW, P_COL)


def copy_inputs(model: HookedVLM):
    return model.to_inputs(random_image(0), PROMPT)
