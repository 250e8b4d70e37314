"""Weight properties (stacked over layers, as TransformerLens 2.x exposes them) and weight processing.

``process_weights`` folds norms and centres weights exactly as TransformerLens does,
so log-probabilities are unchanged (tested). Folding works on any stack of blocks:
the language model and the vision tower share it.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import FactoredMatrix


class AttentionWeightsMixin:
    """Stacked ``[n_layers, ...]`` weight views over ``self.blocks``."""

    def _stack(self, get) -> Tensor:
        return torch.stack([get(block) for block in self.blocks], dim=0)

    @property
    def W_Q(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack(lambda b: b.attn.W_Q)

    @property
    def W_K(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack(lambda b: b.attn.W_K)

    @property
    def W_V(self) -> Float[Tensor, "n_layers n_heads d_model d_head"]:
        return self._stack(lambda b: b.attn.W_V)

    @property
    def W_O(self) -> Float[Tensor, "n_layers n_heads d_head d_model"]:
        return self._stack(lambda b: b.attn.W_O)

    @property
    def b_Q(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack(lambda b: b.attn.b_Q)

    @property
    def b_K(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack(lambda b: b.attn.b_K)

    @property
    def b_V(self) -> Float[Tensor, "n_layers n_heads d_head"]:
        return self._stack(lambda b: b.attn.b_V)

    @property
    def b_O(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack(lambda b: b.attn.b_O)

    @property
    def W_in(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        return self._stack(lambda b: b.mlp.W_in)

    @property
    def W_gate(self) -> Float[Tensor, "n_layers d_model d_mlp"]:
        if self.blocks[0].mlp.W_gate is None:
            raise AttributeError("this model's MLPs are not gated: it has no W_gate")
        return self._stack(lambda b: b.mlp.W_gate)

    @property
    def W_out(self) -> Float[Tensor, "n_layers d_mlp d_model"]:
        return self._stack(lambda b: b.mlp.W_out)

    @property
    def b_in(self) -> Float[Tensor, "n_layers d_mlp"]:
        return self._stack(lambda b: b.mlp.b_in)

    @property
    def b_out(self) -> Float[Tensor, "n_layers d_model"]:
        return self._stack(lambda b: b.mlp.b_out)

    @property
    def QK(self) -> FactoredMatrix:
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        return FactoredMatrix(self.W_V, self.W_O)


# ---------------------------------------------------------------- weight processing
@torch.no_grad()
def fold_layer_norm(blocks, final_norm=None, unembed=None) -> None:
    """Fold each norm's weight (and bias) into the weights that read its output.

    ``ln1`` into ``W_Q/W_K/W_V`` (+ biases), ``ln2`` into ``W_in``/``W_gate``, ``final_norm`` into
    ``W_U``/``b_U``. LayerNorm readers are also centred, so the folded ``LNPre`` (which
    centres its input) gives the same result. The norms become their ``*Pre`` form.
    """
    for block in blocks:
        attn, mlp = block.attn, block.mlp
        _fold_into(block.ln1, [(attn.W_Q, attn.b_Q), (attn._W_K, attn._b_K), (attn._W_V, attn._b_V)])
        readers = [(mlp.W_in, mlp.b_in)] + ([(mlp.W_gate, None)] if mlp.W_gate is not None else [])
        _fold_into(block.ln2, readers)
    if final_norm is not None:
        _fold_into(final_norm, [(unembed.W_U, unembed.b_U)])


def _fold_into(norm, readers) -> None:
    """``readers``: (W [..., d_model, out], b [..., out] or None) pairs that read ``norm``'s output."""
    if norm.w is None:
        return
    for W, b in readers:
        if norm.b is not None:
            shift = torch.einsum("d,...de->...e", norm.b, W)
            if b is None:
                if bool(shift.abs().max() > 0):
                    raise ValueError("cannot fold a norm bias into weights without a bias (a gated MLP's W_gate); "
                                     "load with fold_ln=False")
            else:
                b.add_(shift)
        W.mul_(norm.w[:, None])
        if norm.center:
            W.sub_(W.mean(dim=-2, keepdim=True))
    norm.fold()


@torch.no_grad()
def center_writing_weights(model) -> None:
    """Make every write into the residual stream zero-mean over ``d_model`` (LayerNorm models only)."""
    model.embed.W_E.sub_(model.embed.W_E.mean(-1, keepdim=True))
    if model.vision_projector is not None:
        proj = model.vision_projector
        last_W, last_b = (proj.W_out, proj.b_out) if proj.cfg.kind == "mlp2x_gelu" else (proj.W_in, proj.b_in)
        last_W.sub_(last_W.mean(-1, keepdim=True))
        last_b.sub_(last_b.mean())
    for block in model.blocks:
        block.attn.W_O.sub_(block.attn.W_O.mean(-1, keepdim=True))
        block.attn.b_O.sub_(block.attn.b_O.mean())
        block.mlp.W_out.sub_(block.mlp.W_out.mean(-1, keepdim=True))
        block.mlp.b_out.sub_(block.mlp.b_out.mean())


@torch.no_grad()
def center_unembed(unembed) -> None:
    """Subtract the mean over the vocabulary from ``W_U`` and ``b_U`` (softmax is shift-invariant)."""
    unembed.W_U.sub_(unembed.W_U.mean(-1, keepdim=True))
    unembed.b_U.sub_(unembed.b_U.mean())


@torch.no_grad()
def fold_value_biases(blocks) -> None:
    """Move ``b_V`` into ``b_O``: each head's output gets ``b_V W_O`` whatever the pattern (rows sum to 1)."""
    for block in blocks:
        attn = block.attn
        attn.b_O.add_(torch.einsum("he,hed->d", attn.b_V, attn.W_O))
        attn._b_V.zero_()
