"""Weight properties (stacked over layers, as TransformerLens 2.x exposes them) and weight processing.

``process_weights`` folds norms and centres weights exactly as TransformerLens does,
so log-probabilities are unchanged (tested). Processing works on one part at a time
(a block, the embedding, the head: :func:`weight_parts`), so a checkpoint can be
converted layer by layer; the language model and the vision tower share the block code.

Processing also remembers the small pieces it folds or removes, as non-persistent buffers on
the module they came from (so they are kept per layer and never enter a state dict): the final
norm's weight and bias folded into ``W_U`` (``unembed.folded_norm_w/_b``), the means centring
removes (``removed_mean_*`` on ``unembed``, ``embed``, each ``attn``/``mlp``, the projector and
an image pipeline's modules, e.g. ``anyres.removed_mean_image_newline``), and each layer's folded value
bias (``attn.folded_b_V``).
:mod:`mm_lens.analysis.unprocessed` uses them to give the checkpoint's own unembedding and
residual stream whatever the flags; none is larger than a bias or one row/column mean of a weight.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Processing:
    """TransformerLens' weight processing steps that apply to one model (resolved against its norms)."""

    fold_ln: bool = False
    center_writing_weights: bool = False
    center_unembed: bool = False
    fold_value_biases: bool = False

    @classmethod
    def resolve(cls, cfg, fold_ln: bool = True, center_writing_weights: bool = True, center_unembed: bool = True,
                fold_value_biases: bool = True) -> "Processing":
        """Norms fold only while they still have weights; writing weights are centred only for LayerNorm
        models (with RMSNorm it would change the output); the unembedding is not centred under a logit softcap
        (which is not shift-invariant), as in TransformerLens."""
        norm = cfg.normalization_type
        softcap = getattr(cfg, "output_logits_soft_cap", -1.0) > 0
        return cls(fold_ln=fold_ln and norm in ("LN", "RMS"),
                   center_writing_weights=center_writing_weights and norm.startswith("LN"),
                   center_unembed=center_unembed and not softcap, fold_value_biases=fold_value_biases)

    @property
    def any(self) -> bool:
        return self.fold_ln or self.center_writing_weights or self.center_unembed or self.fold_value_biases

    def normalization_type(self, norm: str) -> str:
        """TransformerLens' ``normalization_type`` after processing (folded norms become ``*Pre``)."""
        return norm + "Pre" if self.fold_ln else norm


def weight_parts(model) -> list[str]:
    """The model's weights in the parts that are processed independently of each other, in forward order:
    the vision tower's own weights, each vision block, the projector, the image pipeline's modules (LLaVA-NeXT's
    ``anyres``), the embedding, each block, and the ``head`` (``ln_final`` with ``unembed``)."""
    parts = []
    if model.vision_encoder is not None:
        parts += ["vision_encoder"] + [f"vision_encoder.blocks.{l}" for l in range(len(model.vision_encoder.blocks))]
    parts += ["vision_projector"] if model.vision_projector is not None else []
    parts += list(getattr(model, "image_modules", ()))
    return parts + ["embed"] + [f"blocks.{l}" for l in range(len(model.blocks))] + ["head"]


def part_of(name: str) -> str:
    """The part (:func:`weight_parts`) a parameter or module name belongs to."""
    block = re.match(r"(?:vision_encoder\.)?blocks\.\d+", name)
    if block:
        return block.group(0)
    top = name.split(".")[0]
    return "head" if top in ("ln_final", "unembed") else top


@torch.no_grad()
def process_part(model, part: str, p: Processing) -> None:
    """Apply ``p`` to one part of ``model`` (the others are untouched)."""
    if part.startswith("blocks."):
        process_block(model.blocks[int(part.split(".")[1])], p)
    elif part.startswith("vision_encoder.blocks.") and p.fold_ln:
        fold_block_norms(model.vision_encoder.blocks[int(part.split(".")[2])])
    elif part == "embed" and p.center_writing_weights:
        center_embed(model.embed)
    elif part == "vision_projector" and p.center_writing_weights:
        center_projector(model.vision_projector)
    elif part in getattr(model, "image_modules", ()) and p.center_writing_weights:
        center_vectors(getattr(model, part))
    elif part == "head":
        if p.fold_ln:
            fold_final_norm(model.ln_final, model.unembed)
        if p.center_unembed:
            center_unembed(model.unembed)


@torch.no_grad()
def process_block(block, p: Processing) -> None:
    """Everything ``p`` asks for on one language-model block, in TransformerLens' order."""
    if p.fold_ln:
        fold_block_norms(block)
    if p.center_writing_weights:
        center_block_writes(block)
    if p.fold_value_biases:
        fold_block_value_biases(block)


@torch.no_grad()
def fold_block_norms(block) -> None:
    """Fold ``ln1`` into ``W_Q/W_K/W_V`` (+ biases) and ``ln2`` into ``W_in``/``W_gate``.

    LayerNorm readers are also centred, so the folded ``LNPre`` (which centres its input) gives the
    same result. The norms become their ``*Pre`` form.
    """
    attn, mlp = block.attn, block.mlp
    _fold_into(block.ln1, [(attn.W_Q, attn.b_Q), (attn._W_K, attn._b_K), (attn._W_V, attn._b_V)])
    readers = [(mlp.W_in, mlp.b_in)] + ([(mlp.W_gate, mlp.b_gate)] if mlp.W_gate is not None else [])
    _fold_into(block.ln2, readers)


@torch.no_grad()
def fold_final_norm(final_norm, unembed) -> None:
    """Fold ``ln_final`` into ``W_U``/``b_U``, remembering the norm's weight and bias (and any rows of
    ``W_U`` a zero weight erases)."""
    if final_norm.w is None:
        return
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
def center_embed(embed) -> None:
    """Zero-mean token embeddings over ``d_model``."""
    _remove_mean(embed, "removed_mean", embed.W_E, dim=-1)


@torch.no_grad()
def center_projector(proj) -> None:
    """Zero-mean writes of the projector's last layer (they are the image positions' residual stream)."""
    last_W, last_b = (proj.W_out, proj.b_out) if proj.cfg.kind == "mlp2x_gelu" else (proj.W_in, getattr(proj, "b_in", None))
    _remove_mean(proj, "removed_mean_W", last_W, dim=-1)
    if last_b is not None:
        _remove_mean(proj, "removed_mean_b", last_b, dim=-1)


@torch.no_grad()
def center_vectors(module) -> None:
    """Zero-mean the vectors a module writes into the residual stream as they are (``module.residual_writes``,
    e.g. LLaVA-NeXT's ``image_newline``, written like an embedding); ``removed_mean_{name}`` keeps each mean."""
    for name in getattr(module, "residual_writes", ()):
        _remove_mean(module, f"removed_mean_{name}", getattr(module, name), dim=-1)


@torch.no_grad()
def center_block_writes(block) -> None:
    """Zero-mean writes of one block's attention and MLP outputs into the residual stream."""
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
def fold_block_value_biases(block) -> None:
    """Move ``b_V`` into ``b_O``: each head's output gets ``b_V W_O`` whatever the pattern (rows sum to 1).

    ``attn.folded_b_V`` keeps the folded bias (per query head); if ``W_O`` was centred before, the
    mean ``b_V W_O`` would have had is added to ``removed_mean_b_O``, so that an attention write's
    removed mean stays ``z · removed_mean_W_O + removed_mean_b_O`` with the processed ``z``.
    """
    attn = block.attn
    b_V = attn.b_V
    attn.b_O.add_(torch.einsum("he,hed->d", b_V, attn.W_O))
    if "removed_mean_W_O" in attn._buffers:
        remember(attn, "removed_mean_b_O", (b_V * attn.removed_mean_W_O).sum())
    remember(attn, "folded_b_V", b_V)
    attn._b_V.zero_()


# ---------------------------------------------------------------- whole stacks (the per-part functions in a loop)
@torch.no_grad()
def fold_layer_norm(blocks, final_norm=None, unembed=None) -> None:
    """:func:`fold_block_norms` on every block, and ``final_norm`` into ``unembed``."""
    for block in blocks:
        fold_block_norms(block)
    if final_norm is not None:
        fold_final_norm(final_norm, unembed)


@torch.no_grad()
def center_writing_weights(model) -> None:
    """Every write into the residual stream made zero-mean over ``d_model`` (LayerNorm models only)."""
    center_embed(model.embed)
    if model.vision_projector is not None:
        center_projector(model.vision_projector)
    for name in getattr(model, "image_modules", ()):
        center_vectors(getattr(model, name))
    for block in model.blocks:
        center_block_writes(block)


@torch.no_grad()
def fold_value_biases(blocks) -> None:
    """:func:`fold_block_value_biases` on every block."""
    for block in blocks:
        fold_block_value_biases(block)
