"""Multimodal causal tracing (Basu et al., NeurIPS 2024, after ROME): clean, corrupted and restored runs.

1. *clean*: the prompt with its image; the target is the clean run's top next token at the
   last position (or the token you pass).
2. *corrupted*: either the tokens of a span (e.g. the constraint "this building") are each
   replaced by one fixed token (``how="replace"``: the length is kept), or k x std Gaussian noise
   is added to the embeddings of chosen positions (``how="noise"``: works on image positions
   too), or you pass the corrupted :class:`MultimodalInput` yourself (e.g. another image).
3. *restored*: the corrupted run with the clean output of one module at one position copied
   back, over a window of layers; we read p(target) at the last position. By default every
   position from the last image position (inclusive) to the last prompt token is restored in
   turn, as the published code does.

Modules: ``"mlp"`` = ``blocks.{l}.hook_mlp_out``, ``"attn"`` = ``blocks.{l}.hook_attn_out``,
``"resid"`` = ``blocks.{l}.hook_resid_pre`` (layer 0 is the merged embedding).

Window conventions (``window=w``, for the layer ``l`` a score is reported at), clipped to the model:

* ``"published"`` (default; the published ``multimodal_trace.py`` of Basu et al.): ``--window 1``
  restores layer ``l`` alone; ``w > 1`` restores ``l - w .. l + w`` (``2w + 1`` layers). That code
  restores only modules named ``self_attn``/``mlp`` (never the projector), as here;
* ``"centered"`` (ROME): the ``w`` layers ``max(0, l - w//2) .. min(L, l - w//2 + w) - 1``;
* ``"trailing"``: the ``w`` layers ``max(0, l - w + 1) .. l`` (the window ends at ``l``).

``window=1`` restores layer ``l`` alone in every convention.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mm_lens.analysis.corruptions import embedding_noise_hook, replace_tokens
from mm_lens.analysis.groups import NAMES, Group, GroupLike, as_group, question, resolve
from mm_lens.inputs import MultimodalInput, PositionMap

MODULE_HOOKS = {"mlp": "hook_mlp_out", "attn": "hook_attn_out", "resid": "hook_resid_pre"}
WINDOW_MODES = ("published", "centered", "trailing")


@dataclass
class CausalTrace:
    """``scores[module, layer, position]`` = p(target) at the last position in the restored run.

    ``positions`` are the restored sequence positions, ``labels`` their token strings; ``p_clean``
    and ``p_corrupt`` the target probability without restoration.
    """

    modules: list[str]
    layers: list[int]
    positions: Int[Tensor, " position"]
    labels: list[str]
    scores: Float[Tensor, "module layer position"]
    p_clean: float
    p_corrupt: float
    target: int
    target_str: str
    corrupted_positions: Int[Tensor, " n"]
    window: int
    window_mode: str

    @property
    def indirect_effect(self) -> Float[Tensor, "module layer position"]:
        """``p_restored - p_corrupt``."""
        return self.scores - self.p_corrupt

    @property
    def normalized_indirect_effect(self) -> Float[Tensor, "module layer position"]:
        """``(p_restored - p_corrupt) / (p_clean - p_corrupt)``: 1 = fully restored, 0 = no effect."""
        denom = self.p_clean - self.p_corrupt
        if abs(denom) < 1e-12:
            return torch.zeros_like(self.scores)
        return self.indirect_effect / denom

    @property
    def relative_drop(self) -> float:
        """``(p_clean - p_corrupt) / p_clean``: how much the corruption hurt."""
        return (self.p_clean - self.p_corrupt) / max(self.p_clean, 1e-12)

    def module(self, name: str) -> Float[Tensor, "layer position"]:
        return self.scores[self.modules.index(name)]

    def to_frame(self):
        """DataFrame: module, layer, position, token, p, indirect_effect, normalized_indirect_effect."""
        import pandas as pd

        ie, nie = self.indirect_effect, self.normalized_indirect_effect
        rows = [(m, l, int(p), self.labels[pi], float(self.scores[mi, li, pi]), float(ie[mi, li, pi]),
                 float(nie[mi, li, pi]))
                for mi, m in enumerate(self.modules) for li, l in enumerate(self.layers)
                for pi, p in enumerate(self.positions.tolist())]
        return pd.DataFrame(rows, columns=["module", "layer", "position", "token", "p", "indirect_effect",
                                           "normalized_indirect_effect"])


def window_layers(layer: int, window: int, n_layers: int, mode: str = "published") -> list[int]:
    """The layers restored for ``layer`` under ``window`` and ``mode`` (see the module docstring)."""
    if mode not in WINDOW_MODES:
        raise ValueError(f"window_mode must be one of {WINDOW_MODES}, got {mode!r}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if mode == "centered":
        lo = layer - window // 2
        return list(range(max(0, lo), min(n_layers, lo + window)))
    if mode == "trailing":
        return list(range(max(0, layer - window + 1), layer + 1))
    if window == 1:
        return [layer]
    return list(range(max(0, layer - window), min(n_layers, layer + window + 1)))


@torch.no_grad()
def causal_trace(
    model,
    inputs: MultimodalInput,
    corrupt: Union[GroupLike, MultimodalInput] = "question",
    *,
    how: str = "replace",
    replace_token: Union[int, str, None] = None,
    noise: float = 3.0,
    noise_std: Optional[float] = None,
    seed: int = 0,
    modules: Sequence[str] = ("mlp", "attn", "resid"),
    window: int = 1,
    window_mode: str = "published",
    positions: Optional[GroupLike] = None,
    layers: Optional[Sequence[int]] = None,
    target: Union[int, str, None] = None,
    batch_size: int = 16,
    progress: bool = True,
) -> CausalTrace:
    """Trace where the answer is restored: p(target) per (module, layer, position).

    ``corrupt``: the positions to corrupt (a group name, a Group, positions, or a substring of the
    prompt such as ``"this building"``), or a corrupted :class:`MultimodalInput` of the same shape.
    ``how``: ``"replace"`` (each token -> ``replace_token``, default the unknown/pad token) or
    ``"noise"`` (``noise`` x ``noise_std`` Gaussian on the embeddings; std of ``W_E`` by default).
    ``positions``: where to restore; default the last image position and every position after it
    (the published code's range; the whole prompt without an image); pass ``"image"`` or a group for
    other positions. ``window``/``window_mode``: module docstring.
    """
    from tqdm.auto import tqdm

    if inputs.shape[0] != 1:
        raise ValueError(f"causal_trace traces one example at a time; got a batch of {inputs.shape[0]}")
    bad = [m for m in modules if m not in MODULE_HOOKS]
    if bad:
        raise ValueError(f"unknown modules {bad}; use a subset of {list(MODULE_HOOKS)}")
    n = model.cfg.n_layers
    layers = list(range(n)) if layers is None else [int(l) for l in layers]
    if any(not 0 <= l < n for l in layers):
        raise ValueError(f"layers must be in 0..{n - 1}, got {layers}")
    window_layers(0, window, n, window_mode)  # validates
    corrupted, hooks, corrupted_pos = _corruption(model, inputs, corrupt, how, replace_token, noise, noise_std, seed)
    restore_pos = _restore_positions(model, inputs, positions)

    names = {f"blocks.{l}.{MODULE_HOOKS[m]}" for m in modules for l in range(n)}
    clean_logits, clean_cache = model.run_with_cache(inputs, names_filter=lambda name: name in names)
    clean_probs = clean_logits[0, -1].float().softmax(-1)
    target = _target(model, target, clean_probs)
    p_clean = float(clean_probs[target])
    # the corrupted run's residual before every block: a restored run starts at its first restored layer
    resid = {}

    def keep_resid(act: Tensor, hook) -> None:
        resid[hook.name] = act.detach()

    corrupt_logits = model.run_with_hooks(
        corrupted, fwd_hooks=list(hooks) + [(f"blocks.{l}.hook_resid_pre", keep_resid) for l in range(n)])
    p_corrupt = float(corrupt_logits[0, -1].float().softmax(-1)[target])

    scores = torch.zeros(len(modules), len(layers), len(restore_pos))
    jobs = [(mi, li, start) for mi in range(len(modules)) for li in range(len(layers))
            for start in range(0, len(restore_pos), batch_size)]
    for mi, li, start in tqdm(jobs, desc="causal trace", disable=not progress):
        pos = restore_pos[start:start + batch_size]
        restored_layers = window_layers(layers[li], window, n, window_mode)
        restore = [(name, _restore_hook(clean_cache[name][0], pos))
                   for name in (f"blocks.{l}.{MODULE_HOOKS[modules[mi]]}" for l in restored_layers)]
        batch = _repeat(corrupted, len(pos))
        first = min(restored_layers)  # everything before the first restored layer is the corrupted run's
        x = model.run_with_hooks(batch, fwd_hooks=restore, start_at_layer=first, stop_at_layer=n,
                                 residual=resid[f"blocks.{first}.hook_resid_pre"].expand(len(pos), -1, -1))
        logits = model.unembed(model.ln_final(x[:, -1:]))[:, 0]  # only the last position is read
        scores[mi, li, start:start + len(pos)] = logits.float().softmax(-1)[:, target].cpu()

    labels = model.to_str_tokens(inputs)
    return CausalTrace(list(modules), layers, restore_pos.cpu(), [labels[p] for p in restore_pos.tolist()], scores,
                       p_clean, p_corrupt, target, model.tokenizer.decode([target]), corrupted_pos.cpu(),
                       window, window_mode)


def _corruption(model, inputs, corrupt, how, replace_token, noise, noise_std, seed):
    """The corrupted input, the hooks that corrupt a run, and the corrupted positions."""
    if isinstance(corrupt, MultimodalInput):
        if corrupt.shape != inputs.shape:
            raise ValueError(f"the corrupted input has shape {tuple(corrupt.shape)} but the clean one "
                             f"{tuple(inputs.shape)}: positions must line up")
        changed = (corrupt.input_ids[0] != inputs.input_ids[0]).nonzero().flatten()
        return corrupt, [], changed
    group = question(corrupt) if isinstance(corrupt, str) and corrupt.replace("-", "_").lower() not in NAMES \
        else as_group(corrupt)
    pos = resolve(model, inputs, group)
    if how == "noise":
        return inputs, [embedding_noise_hook(model, inputs, Group(group.name, lambda m, x, r: pos), k=noise,
                                             seed=seed, std=noise_std)], pos
    if how != "replace":
        raise ValueError(f"how must be 'replace' or 'noise', got {how!r}")
    if bool(inputs.positions.image_mask[0, pos].any()):
        raise ValueError("image positions cannot be replaced by a text token: use how='noise', or pass a "
                         "corrupted MultimodalInput (e.g. corruptions.other_image / blank_image)")
    token = _replacement_token(model, replace_token)
    return replace_tokens(inputs, pos, token), [], pos


def _replacement_token(model, token) -> int:
    if isinstance(token, str):
        return model.to_single_token(token)
    if token is not None:
        return int(token)
    tok = model.tokenizer
    for t in (tok.unk_token_id, tok.pad_token_id, tok.eos_token_id):
        if t is not None:
            return int(t)
    raise ValueError("the tokenizer has no unk/pad/eos token: pass replace_token=...")


def _target(model, target, clean_probs: Tensor) -> int:
    if target is None:
        return int(clean_probs.argmax())
    if isinstance(target, str):
        return model.to_single_token(target)
    return int(target)


def _restore_positions(model, inputs: MultimodalInput, positions) -> Tensor:
    if positions is not None:
        return resolve(model, inputs, positions)
    rp = inputs.positions[0]
    real = inputs.attention_mask[0].bool().nonzero().flatten().cpu()
    return real[real >= int(rp.image.max())] if rp.image.numel() else real


def _restore_hook(clean: Float[Tensor, "pos d_model"], pos: Tensor):
    """Row b of the batch gets the clean activation at ``pos[b]``."""
    rows, pos = torch.arange(len(pos), device=clean.device), pos.to(clean.device)

    def hook(act: Tensor, hook) -> Tensor:
        act = act.clone()
        act[rows, pos] = clean[pos].to(act.dtype)
        return act

    return hook


def flat_image_features(model, inputs: MultimodalInput) -> Optional[Float[Tensor, "n_image_pos d_model"]]:
    """The image features of a one-row input, one row per image position in sequence order (None without images)."""
    if inputs.pixel_values is None:
        return None
    feats = model.image_features(inputs.pixel_values, inputs.image_sizes, [len(r.images) for r in inputs.positions])
    return feats.reshape(-1, feats.shape[-1])


def _repeat(inputs: MultimodalInput, n: int) -> MultimodalInput:
    """A batch of ``n`` copies of a one-row input."""
    if n == 1:
        return inputs
    pv = inputs.pixel_values
    return replace(inputs, input_ids=inputs.input_ids.expand(n, -1), attention_mask=inputs.attention_mask.expand(n, -1),
                   pixel_values=None if pv is None else pv.repeat(n, *([1] * (pv.ndim - 1))),
                   positions=PositionMap([inputs.positions[0]] * n, inputs.positions.image_mask.expand(n, -1)),
                   image_sizes=list(inputs.image_sizes) * n)
