"""Weight properties (stacked over layers, as TransformerLens 2.x exposes them) and weight processing.

``process_weights`` folds norms and centres weights exactly as TransformerLens does,
so log-probabilities are unchanged (tested). Folding works on any stack of blocks:
the language model and the vision tower share it.

Processing also remembers the small pieces it folds or removes, as non-persistent buffers on
the module they came from (so they follow the module's device and dtype, are kept per layer and
never enter a state dict): the final norm's weight and bias folded into ``W_U``
(``unembed.folded_norm_w/_b``), the means centring removes (``removed_mean_*`` on ``unembed``,
``embed``, each ``attn``/``mlp``, the projector and ``anyres``), and each layer's folded value
bias (``attn.folded_b_V``). :mod:`mm_lens.analysis.unprocessed` uses them to give the
checkpoint's own unembedding and residual stream whatever the flags; none is larger than a
bias or one row/column mean of a weight.
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
def remember(module, name: str, value: Tensor, accumulate: bool = True) -> None:
    """Keep ``value`` as the non-persistent buffer ``module.<name>`` (added to one kept before)."""
    value = value.detach().clone()
    if accumulate and name in module._buffers:
        value = module._buffers[name] + value
    module.register_buffer(name, value, persistent=False)


def _remove_mean(module, name: str, param: Tensor, dim: int) -> None:
    """Centre ``param`` over ``dim`` in place and remember what was removed as ``module.<name>``."""
    mean = param.mean(dim)
    param.sub_(mean.unsqueeze(dim) if mean.ndim else mean)
    remember(module, name, mean)


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
    if final_norm is not None and final_norm.w is not None:
        dead = final_norm.w == 0  # rows of W_U a zero weight erases: kept as they are (almost always none)
        remember(unembed, "folded_dead_rows", unembed.W_U[dead], accumulate=False)
        remember(unembed, "folded_norm_w", final_norm.w, accumulate=False)
        if final_norm.b is not None:
            remember(unembed, "folded_norm_b", final_norm.b, accumulate=False)
        _fold_into(final_norm, [(unembed.W_U, unembed.b_U)], keeper=unembed)


def _fold_into(norm, readers, keeper=None) -> None:
    """``readers``: (W [..., d_model, out], b [..., out] or None) pairs that read ``norm``'s output.
    ``keeper``: the module that remembers the mean a LayerNorm fold removes from (only) reader ``W``."""
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
        if norm.center and keeper is not None:
            _remove_mean(keeper, "removed_mean_d_model", W, dim=-2)
        elif norm.center:
            W.sub_(W.mean(dim=-2, keepdim=True))
    norm.fold()


@torch.no_grad()
def center_writing_weights(model) -> None:
    """Make every write into the residual stream zero-mean over ``d_model`` (LayerNorm models only):
    token embeddings, the projector's output (image positions), LLaVA-NeXT's ``image_newline``, and
    every attention and MLP output. The removed means are remembered (module docstring)."""
    _remove_mean(model.embed, "removed_mean", model.embed.W_E, dim=-1)
    if model.vision_projector is not None:
        proj = model.vision_projector
        last_W, last_b = (proj.W_out, proj.b_out) if proj.cfg.kind == "mlp2x_gelu" else (proj.W_in, proj.b_in)
        _remove_mean(proj, "removed_mean_W", last_W, dim=-1)
        _remove_mean(proj, "removed_mean_b", last_b, dim=-1)
    if getattr(model, "anyres", None) is not None:
        _remove_mean(model.anyres, "removed_mean_newline", model.anyres.image_newline, dim=-1)
    for block in model.blocks:
        _remove_mean(block.attn, "removed_mean_W_O", block.attn.W_O, dim=-1)
        _remove_mean(block.attn, "removed_mean_b_O", block.attn.b_O, dim=-1)
        _remove_mean(block.mlp, "removed_mean_W_out", block.mlp.W_out, dim=-1)
        _remove_mean(block.mlp, "removed_mean_b_out", block.mlp.b_out, dim=-1)


@torch.no_grad()
def center_unembed(unembed) -> None:
    """Subtract the mean over the vocabulary from ``W_U`` and ``b_U`` (softmax is shift-invariant)."""
    _remove_mean(unembed, "removed_mean_vocab", unembed.W_U, dim=-1)
    _remove_mean(unembed, "removed_mean_b_U", unembed.b_U, dim=-1)


@torch.no_grad()
def fold_value_biases(blocks) -> None:
    """Move ``b_V`` into ``b_O``: each head's output gets ``b_V W_O`` whatever the pattern (rows sum to 1).

    ``attn.folded_b_V`` keeps the folded bias (per query head); if ``W_O`` was centred before, the
    mean ``b_V W_O`` would have had is added to ``removed_mean_b_O``, so that an attention write's
    removed mean stays ``z · removed_mean_W_O + removed_mean_b_O`` with the processed ``z``.
    """
    for block in blocks:
        attn = block.attn
        b_V = attn.b_V
        attn.b_O.add_(torch.einsum("he,hed->d", b_V, attn.W_O))
        if "removed_mean_W_O" in attn._buffers:
            remember(attn, "removed_mean_b_O", (b_V * attn.removed_mean_W_O).sum())
        remember(attn, "folded_b_V", b_V)
        attn._b_V.zero_()
