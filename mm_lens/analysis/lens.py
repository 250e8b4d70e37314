"""Logit lens over any positions, visual tokens included.

``z = lm_head(norm_final(h))`` (or ``lm_head(h)`` with ``apply_ln_final=False``, as the public
code of the cross-modal flow study, Zhang et al.: ``hidden_states[l] @ lm_head.weight.T``) for the
residual stream ``h`` before every block and after the last one. Layer axis: ``l = 0..n_layers-1``
is ``blocks.{l}.hook_resid_pre`` (``l = 0`` is the merged embedding) and ``l = n_layers`` is the
final ``blocks.{n_layers-1}.hook_resid_post``.

Whatever the weight-processing flags, ``lm_head``, ``norm_final`` and ``h`` are the checkpoint's
own (:mod:`mm_lens.analysis.unprocessed`): processing folds the final norm's weight into ``W_U``
and centres it, and on LayerNorm towers centres the residual stream itself, so decoding the
processed ``h`` with the processed ``W_U`` would agree with the checkpoint only after the norm.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import ActivationCache

from mm_lens.analysis.groups import GroupLike, resolve
from mm_lens.analysis.unprocessed import ResidualMeans, checkpoint_logits, checkpoint_residual
from mm_lens.inputs import MultimodalInput, PositionMap


@dataclass
class LogitLensResult:
    """Decoded top-k tokens per (layer, position), and probabilities of given words.

    ``top_tokens``/``top_probs``: ``[layer, pos, k]``; ``word_probs``: ``[layer, pos, word]``
    (empty last axis without ``words``). ``positions`` are sequence positions, ``layers`` the
    lens layers (see the module docstring), ``grid`` the patch coordinate of each image position
    (``(-1, -1)`` for text and class tokens).
    """

    layers: list[int]
    positions: Int[Tensor, " pos"]
    top_tokens: Int[Tensor, "layer pos k"]
    top_probs: Float[Tensor, "layer pos k"]
    top_strings: list[list[list[str]]]
    words: list[str]
    word_probs: Float[Tensor, "layer pos word"]
    grid: list[tuple[int, int]]
    grid_shape: tuple[int, int]
    str_tokens: list[str] = field(repr=False, default_factory=list)

    def to_frame(self):
        """Long DataFrame: layer, position, row, col, input_token, rank, token, prob."""
        import pandas as pd

        rows = []
        for li, layer in enumerate(self.layers):
            for pi, pos in enumerate(self.positions.tolist()):
                r, c = self.grid[pi]
                for k in range(self.top_tokens.shape[-1]):
                    rows.append((layer, pos, r, c, self.str_tokens[pos] if self.str_tokens else "", k,
                                 self.top_strings[li][pi][k], float(self.top_probs[li, pi, k])))
        return pd.DataFrame(rows, columns=["layer", "position", "row", "col", "input_token", "rank", "token", "prob"])

    def patch_grid(self, layer: int) -> list[list[str]]:
        """Top-1 token string of each image position at ``layer``, laid out on the patch grid."""
        li = self.layers.index(layer)
        rows, cols = self.grid_shape
        out = [["" for _ in range(cols)] for _ in range(rows)]
        for pi, (r, c) in enumerate(self.grid):
            if r >= 0:
                out[r][c] = self.top_strings[li][pi][0]
        return out

    def share_naming(self, names: Sequence[str]) -> Float[Tensor, " layer"]:
        """Per layer, the share of the positions whose top-1 token is one of ``names`` (after stripping)."""
        wanted = {n.strip().lower() for n in names}
        hits = [[s[0].strip().lower() in wanted for s in per_layer] for per_layer in self.top_strings]
        return torch.tensor(hits, dtype=torch.float32).mean(-1)


@torch.no_grad()
def logit_lens(
    model,
    inputs_or_cache: Union[MultimodalInput, ActivationCache],
    positions: GroupLike = "image",
    layers: Optional[Sequence[int]] = None,
    apply_ln_final: bool = True,
    top_k: int = 5,
    words: Sequence[str] = (),
    inputs: Optional[MultimodalInput] = None,
    row: int = 0,
) -> LogitLensResult:
    """Decode the residual stream at ``positions`` (a group name, a Group or a list) for each layer.

    Pass a :class:`MultimodalInput` (one cached run is made) or an ``ActivationCache`` together
    with ``inputs=`` (needed to resolve position groups). ``row`` picks the batch row.
    ``apply_ln_final``: decode through the final norm (default) or, as Zhang et al.'s code, the raw
    residual stream; either way with the checkpoint's own unembedding (module docstring). Without
    the norm on a LayerNorm tower whose writes were centred, a cache must also hold the activations
    :class:`~mm_lens.analysis.unprocessed.ResidualMeans` reads.
    """
    n = model.cfg.n_layers
    layers = list(range(n + 1)) if layers is None else [int(l) % (n + 1) if l < 0 else int(l) for l in layers]
    if any(l < 0 or l > n for l in layers):
        raise ValueError(f"lens layers run from 0 (embedding) to {n} (final residual), got {layers}")
    if isinstance(inputs_or_cache, ActivationCache):
        cache = inputs_or_cache
        if inputs is None:
            raise ValueError("with a cache, pass inputs=... too (the positions are resolved on it)")
        means = ResidualMeans(model, inputs)
        if not apply_ln_final:
            means.from_cache(cache)
    else:
        inputs = inputs_or_cache
        means = ResidualMeans(model, inputs)
        names = {_resid_name(l, n) for l in layers}
        with model.hooks(fwd_hooks=[] if apply_ln_final else means.hooks()):
            _, cache = model.run_with_cache(inputs, names_filter=lambda name: name in names, return_type=None)
    pos = resolve(model, inputs, positions, row)
    words = list(words)
    word_ids = torch.tensor([model.to_single_token(w) for w in words], dtype=torch.long)
    tops, probs_k, word_p = [], [], []
    for layer in layers:
        resid = cache[_resid_name(layer, n)]
        h = resid[row, pos.to(resid.device)]
        if not apply_ln_final:  # the checkpoint's residual stream (differs only where writes were centred)
            h = checkpoint_residual(h, means.at(layer)[row, pos.to(resid.device)])
        probs = decode(model, h, apply_ln_final).softmax(-1)
        p, t = probs.topk(min(top_k, probs.shape[-1]), dim=-1)
        tops.append(t.cpu())
        probs_k.append(p.cpu())
        word_p.append(probs[:, word_ids.to(probs.device)].cpu())
    top_tokens = torch.stack(tops)
    strings = [[[model.tokenizer.decode([t]) for t in per_pos] for per_pos in per_layer.tolist()]
               for per_layer in top_tokens]
    rp = inputs.positions[row]
    grid = [_coord(rp, p) for p in pos.tolist()]
    return LogitLensResult(layers, pos.cpu(), top_tokens, torch.stack(probs_k), strings, words, torch.stack(word_p),
                           grid, rp.grid_shape, model.to_str_tokens(_row(inputs, row)))


def decode(model, resid: Float[Tensor, "... d_model"], apply_ln_final: bool = True) -> Float[Tensor, "... d_vocab"]:
    """The checkpoint's logits read from a residual stream: ``lm_head(norm_final(resid))`` or ``lm_head(resid)``,
    whatever the processing flags. Without the norm, on a LayerNorm tower whose writes were centred, pass the
    checkpoint's residual stream (:class:`~mm_lens.analysis.unprocessed.ResidualMeans`); :func:`logit_lens` does."""
    return checkpoint_logits(model, resid, apply_ln_final)


def _resid_name(layer: int, n_layers: int) -> str:
    return f"blocks.{layer}.hook_resid_pre" if layer < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"


def _coord(rp, position: int) -> tuple[int, int]:
    c = rp.grid_coordinate(position)
    return (-1, -1) if c is None else (c[1], c[2])


def _row(inputs: MultimodalInput, row: int) -> MultimodalInput:
    """Batch row ``row`` alone (for its token strings)."""
    if inputs.shape[0] == 1:
        return inputs
    return replace(inputs, input_ids=inputs.input_ids[row:row + 1], attention_mask=inputs.attention_mask[row:row + 1],
                   positions=PositionMap([inputs.positions[row]], inputs.positions.image_mask[row:row + 1]))
