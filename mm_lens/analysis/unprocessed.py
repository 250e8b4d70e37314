"""The checkpoint's own numbers, whatever the weight-processing flags.

Weight processing (``fold_ln``, ``center_writing_weights``, ``center_unembed``,
``fold_value_biases``; TransformerLens' defaults, on in ``from_pretrained``) keeps every
log-probability but changes raw numbers: ``W_U`` carries the final norm's weight (and, on LayerNorm
towers, is centred over ``d_model``) and is centred over the vocabulary; on LayerNorm towers every
write into the residual stream is centred, so the residual stream is the checkpoint's minus its
mean over ``d_model``; ``b_V`` lives in ``b_O``. Methods that read raw numbers (the logit lens
without the final norm, modality similarity, attention contribution, MultEdit's norms, the std of
embedding noise) use this module, built on the small pieces processing remembers
(:mod:`mm_lens.weights`), to compute what the checkpoint itself gives:

* :func:`checkpoint_logits`: the checkpoint's ``lm_head(final_norm(h))`` or ``lm_head(h)``;
* :class:`ResidualMeans`: per position and layer, the mean over ``d_model`` that centring removed
  from the residual stream (zero without centring), gathered in the same forward with hooks that
  keep one number per position;
* :func:`checkpoint_embeddings`, :func:`embedding_std`, :func:`checkpoint_values`,
  :func:`head_write_means`, :func:`checkpoint_mlp_write`: the checkpoint's ``W_E`` rows, the std of
  its ``W_E``, value vectors with ``b_V``, and the means centring took from each head's and the
  MLP's writes.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch
from jaxtyping import Float
from torch import Tensor

from mm_lens.inputs import MultimodalInput


def _kept(module, name: str) -> Optional[Tensor]:
    return module._buffers.get(name) if module is not None else None


def writes_centred(model) -> bool:
    """Whether ``center_writing_weights`` centred this model's writes into the residual stream."""
    return _kept(model.embed, "removed_mean") is not None


# ---------------------------------------------------------------- unembedding
def checkpoint_logits(model, resid: Float[Tensor, "... d_model"], apply_ln_final: bool = True
                      ) -> Float[Tensor, "... d_vocab"]:
    """The checkpoint's logits read from ``resid`` (in the checkpoint's residual coordinates, see
    :class:`ResidualMeans`): ``lm_head(final_norm(resid))``, or ``lm_head(resid)`` without the norm.

    From the processed ``W_U``: with ``W_U1 = w * W_U`` (the final norm's weight folded in) centred
    over ``d_model`` (mean ``r``, LayerNorm) and over the vocabulary (mean ``c``), ``y @ W_U1 =
    y @ W_U + (y · c) + sum(y) r``; without the norm ``y = (resid - b) / w`` (rows of ``W_U`` that a
    zero weight erased are kept as they were and read directly).
    """
    U = model.unembed
    w, b = _kept(U, "folded_norm_w"), _kept(U, "folded_norm_b")
    c, r, beta = _kept(U, "removed_mean_vocab"), _kept(U, "removed_mean_d_model"), _kept(U, "removed_mean_b_U")
    dead_part = None
    if apply_ln_final:
        y = model.ln_final(resid)  # the norm up to its weight when that was folded into W_U, else all of it
    elif w is None:
        y = resid
    else:
        u = resid.float() - (b.float() if b is not None else 0.0)
        alive = w != 0
        y = torch.where(alive, u / torch.where(alive, w.float(), 1.0), 0.0)
        if bool((~alive).any()):
            dead_part = u[..., ~alive] @ _kept(U, "folded_dead_rows").float()
    logits = U(y.to(U.W_U.dtype)).float()
    yf = y.float()
    if c is not None:
        logits = logits + (yf @ c.float())[..., None] + beta.float()
    if r is not None:
        logits = logits + yf.sum(-1, keepdim=True) * r.float()
    return logits if dead_part is None else logits + dead_part


# ---------------------------------------------------------------- residual stream
class ResidualMeans:
    """The mean over ``d_model`` that centring removed from the residual stream, per position.

    On a model whose writes were centred (LayerNorm towers with ``center_writing_weights``), the
    residual stream before block ``l`` is the checkpoint's minus ``at(l)[..., None]``. Each write's
    removed mean is linear in an activation of the same forward: the token's row mean of ``W_E`` (or
    the projector's hidden state times the mean of its output weight, or the newline's mean), and
    per block ``z · mean(W_O) + mean(b_O)`` and ``post · mean(W_out) + mean(b_out)``. ``hooks()``
    gathers them in a forward (one number per position and layer is kept); ``from_cache`` reads them
    from a cache holding those activations. Without centring every mean is zero.
    """

    def __init__(self, model, inputs: MultimodalInput):
        self.model, self.inputs = model, inputs
        self.centred = writes_centred(model)
        self._image: Optional[Tensor] = None  # [n_images_or_crops, n_tokens]
        self.embed: Optional[Tensor] = None  # [batch, pos]
        self.writes: dict[int, Tensor] = {}  # layer -> [batch, pos]

    def names(self) -> list[str]:
        """The activations the means are read from (none without centring)."""
        if not self.centred:
            return []
        proj = self.model.vision_projector
        names = []
        if proj is not None:
            names.append("vision_projector.hook_hidden" if proj.cfg.kind == "mlp2x_gelu" else "vision_projector.hook_in")
        names.append("hook_embed")
        for l in range(self.model.cfg.n_layers):
            names += [f"blocks.{l}.attn.hook_z", f"blocks.{l}.mlp.hook_post"]
        return names

    def hooks(self) -> list[tuple[str, Callable]]:
        """``fwd_hooks`` that fill this object during a forward (they leave activations unchanged)."""

        def hook(act: Tensor, hook) -> None:
            self.read(hook.name, act)

        return [(name, hook) for name in self.names()]

    def from_cache(self, cache) -> "ResidualMeans":
        missing = [n for n in self.names() if n not in cache.cache_dict]
        if missing:
            raise ValueError(f"the model's writes into the residual stream were centred (center_writing_weights), so "
                             f"the checkpoint's residual stream needs {missing[:4]}{'...' if len(missing) > 4 else ''} "
                             "from the cache: pass the inputs instead of a cache, cache those hooks too, or load "
                             "with center_writing_weights=False")
        for name in self.names():
            self.read(name, cache[name])
        return self

    @torch.no_grad()
    def read(self, name: str, act: Tensor) -> None:
        model = self.model
        if name.startswith("vision_projector."):
            proj = model.vision_projector
            self._image = (act.float() @ proj.removed_mean_W.float() + proj.removed_mean_b.float()).detach()
        elif name == "hook_embed":
            self.embed = self._embed_means(act.device)
        else:  # blocks.{l}.attn.hook_z or blocks.{l}.mlp.hook_post
            layer = int(name.split(".")[1])
            block = model.blocks[layer]
            if name.endswith("attn.hook_z"):
                mean = head_write_means(model, layer, act.float()).sum(-1) + block.attn.removed_mean_b_O.float()
            else:
                mean = act.float() @ block.mlp.removed_mean_W_out.float() + block.mlp.removed_mean_b_out.float()
            self.writes[layer] = self.writes.get(layer, 0) + mean.detach()

    def _embed_means(self, device) -> Float[Tensor, "batch pos"]:
        model, x = self.model, self.inputs
        ids = x.input_ids.to(device)
        is_image = ids == model.cfg.image_token_id
        out = model.embed.removed_mean.float().to(device)[ids.masked_fill(is_image, 0)]
        if bool(is_image.any()):
            if self._image is None:
                raise ValueError("the image features did not come from the projector in this forward (image_features "
                                 "passed in?), so the means centring removed at image positions are unknown")
            image = self._image.to(device)
            if model.image_pipeline is not None:  # laid over the image positions as the family packs its crops
                image = model.image_pipeline.position_means(model, x, image)
            out = out.masked_scatter(is_image, image.flatten().to(out.dtype))
        return out

    def at(self, layer: int) -> Float[Tensor, "batch pos"]:
        """The removed mean of the residual stream before block ``layer`` (``n_layers``: after the last)."""
        if not self.centred:
            return torch.zeros(self.inputs.shape, device=self.inputs.device)
        if self.embed is None or any(l not in self.writes for l in range(layer)):
            raise ValueError("ResidualMeans has not seen the forward up to that layer: run with its hooks() first")
        return self.embed + sum((self.writes[l] for l in range(layer)), torch.zeros_like(self.embed))


def checkpoint_residual(resid: Float[Tensor, "... d_model"], mean: Float[Tensor, "..."]) -> Float[Tensor, "... d_model"]:
    """The checkpoint's residual stream from the model's and :meth:`ResidualMeans.at`."""
    return resid + mean.to(resid.device, resid.dtype)[..., None]


# ---------------------------------------------------------------- weights
def checkpoint_embeddings(model, rows: Union[slice, Tensor]) -> Float[Tensor, "rows d_model"]:
    """Rows of the checkpoint's ``W_E`` (a slice or token ids): centring removed each row's mean."""
    out = model.embed.W_E[rows]
    mean = _kept(model.embed, "removed_mean")
    return out if mean is None else out + mean[rows, None].to(out.dtype)


@torch.no_grad()
def embedding_std(model, chunk: int = 8192) -> float:
    """Standard deviation of every entry of the checkpoint's ``W_E`` (a few rows at a time)."""
    n, total, square = 0, 0.0, 0.0
    for start in range(0, model.cfg.d_vocab, chunk):
        rows = checkpoint_embeddings(model, slice(start, start + chunk)).double()
        n, total, square = n + rows.numel(), total + float(rows.sum()), square + float(rows.pow(2).sum())
    return ((square - total * total / n) / (n - 1)) ** 0.5


def checkpoint_values(model, layer: int, v: Float[Tensor, "... head d_head"]) -> Float[Tensor, "... head d_head"]:
    """Value vectors as the checkpoint computes them (``b_V`` added back when it was folded into ``b_O``);
    ``v`` per query head."""
    b_V = _kept(model.blocks[layer].attn, "folded_b_V")
    return v if b_V is None else v + b_V.to(v.dtype)


def head_write_means(model, layer: int, v: Float[Tensor, "... head d_head"]) -> Float[Tensor, "... head"]:
    """The mean over ``d_model`` centring removed from ``v @ W_O`` per head (zero without centring)."""
    mean = _kept(model.blocks[layer].attn, "removed_mean_W_O")
    return torch.zeros(v.shape[:-1], device=v.device, dtype=v.dtype) if mean is None else \
        torch.einsum("...he,he->...h", v, mean.to(v.dtype))


def checkpoint_mlp_write(model, layer: int, key: Float[Tensor, " d_mlp"]) -> Float[Tensor, " d_model"]:
    """``W k`` with the checkpoint's MLP output matrix (no bias): ``key @ W_out`` plus the mean centring removed."""
    mlp = model.blocks[layer].mlp
    out = key @ mlp.W_out.to(key.dtype)
    mean = _kept(mlp, "removed_mean_W_out")
    return out if mean is None else out + key @ mean.to(key.dtype)

