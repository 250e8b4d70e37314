"""Visual-token budget: the answer/caption loss when only k visual tokens are kept.

Two ways to drop the other image positions, which give the same result up to float error:

* ``mode="remove"``: the positions are cut out of the sequence and the rest keep their
  original position ids (rotary angles), so nothing moves;
* ``mode="mask"``: the sequence is unchanged and no query may attend to the dropped
  positions (their pre-softmax scores are set to -inf in every layer).

Strategies pick which k image positions stay: ``"first"`` (the first k in sequence order),
``"stride"`` (k evenly spaced), ``"random"`` (one draw per seed), ``"attention"`` (the k that
receive most attention from the prompt's text after the image in the full run, mean over
layers and heads).

The loss is the mean next-token cross-entropy on the target tokens: the answer
(``inputs.meta["answer"]``, its last occurrence in the prompt) or, without one, every text
token after the image (captioning) except one that directly follows an image position (it
would be read at a position that may be dropped).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mm_lens.analysis.causal_trace import _repeat, flat_image_features
from mm_lens.inputs import MultimodalInput

STRATEGIES = ("random", "stride", "attention", "first")
MODES = ("remove", "mask")


@dataclass
class TokenBudget:
    """``frame``: one row per (strategy, seed, keep, example) with the number kept and the loss."""

    frame: object

    def to_frame(self):
        return self.frame

    def curve(self):
        """Mean loss per strategy (rows) and number of visual tokens kept (columns)."""
        return self.frame.pivot_table(index="strategy", columns="kept", values="loss", aggfunc="mean")


@dataclass
class _Example:
    inputs: MultimodalInput
    targets: Int[Tensor, " n_target"]  # positions whose token is predicted (from the position before)
    features: Optional[Tensor]  # [n_image_pos, d_model]


@torch.no_grad()
def visual_token_budget(
    model,
    dataset_or_inputs: Union[MultimodalInput, Sequence[MultimodalInput]],
    keep: Sequence[int] = (576, 288, 144, 72, 36, 0),
    strategy: Union[str, Sequence[str]] = "random",
    seeds: Sequence[int] = (0,),
    mode: str = "remove",
    template: Optional[str] = None,
    progress: bool = True,
) -> TokenBudget:
    """Loss on the answer/caption tokens for each number of kept visual tokens and each strategy.

    ``dataset_or_inputs``: a one-row :class:`MultimodalInput` (with ``meta["answer"]``), a sequence
    of them, or a sequence of :class:`mm_lens.data.Example` (prompted with ``template``, default
    :data:`mm_lens.data.LLAVA_TEMPLATE`, and the answer appended). ``keep`` values above the number
    of image positions are clipped (column ``kept``).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    strategies = [strategy] if isinstance(strategy, str) else list(strategy)
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"unknown strategies {bad}; use some of {STRATEGIES}")
    _check_mode(model, mode)
    items = [dataset_or_inputs] if isinstance(dataset_or_inputs, MultimodalInput) else list(dataset_or_inputs)
    rows = []
    for ei, x in enumerate(tqdm(items, desc="token budget", disable=not progress)):
        if not isinstance(x, MultimodalInput):
            from mm_lens.data import LLAVA_TEMPLATE

            x = x.to_inputs(model, template or LLAVA_TEMPLATE, with_answer=True)
        ex = _example(model, x)
        n_img = len(ex.inputs.positions[0].image)
        received = _attention_received(model, ex) if "attention" in strategies else None
        for s in strategies:
            for seed in (seeds if s == "random" else seeds[:1]):
                keeps = [choose(s, n_img, min(k, n_img), seed=seed, scores=received) for k in keep]
                for k, kept in zip(keep, keeps):
                    loss = float(_losses(model, ex, [kept], mode)[0])
                    rows.append((s, seed, k, len(kept), ei, loss))
    return TokenBudget(pd.DataFrame(rows, columns=["strategy", "seed", "keep", "kept", "example", "loss"]))


def choose(strategy: str, n: int, k: int, seed: int = 0, scores: Optional[Tensor] = None) -> Int[Tensor, " k"]:
    """Indices (into the image positions, sorted) of the ``k`` of ``n`` kept by ``strategy``."""
    if k <= 0:
        return torch.empty(0, dtype=torch.long)
    if strategy == "first":
        idx = torch.arange(k)
    elif strategy == "stride":
        idx = torch.linspace(0, n - 1, k).round().long().unique()
    elif strategy == "random":
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]
    elif strategy == "attention":
        if scores is None:
            raise ValueError("the attention strategy needs the attention each image position receives")
        idx = scores.topk(k).indices
    else:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {STRATEGIES}")
    return idx.sort().values


@torch.no_grad()
def patch_ablation_map(model, inputs: MultimodalInput, mode: str = "remove", batch_size: int = 16,
                       progress: bool = True) -> Float[Tensor, "rows cols"]:
    """Loss increase on the answer/caption tokens when one image patch alone is dropped, on the patch grid.

    (Class-token positions, with ``vision_feature_select_strategy="full"``, are left out of the map.)
    """
    from tqdm.auto import tqdm

    _check_mode(model, mode)
    ex = _example(model, inputs)
    rp = ex.inputs.positions[0]
    n = len(rp.image)
    base = float(_losses(model, ex, [torch.arange(n)], mode)[0])
    out = torch.zeros(rp.grid_shape)
    for start in tqdm(range(0, n, batch_size), desc="patch ablation", disable=not progress):
        drops = list(range(start, min(n, start + batch_size)))
        keeps = [torch.tensor([j for j in range(n) if j != d], dtype=torch.long) for d in drops]
        for d, loss in zip(drops, _losses(model, ex, keeps, mode)):
            _, r, c = rp.grid_coordinate(int(rp.image[d]))
            if r >= 0:
                out[r, c] = float(loss) - base
    return out


# ---------------------------------------------------------------- internals
def _check_mode(model, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "remove" and model.rotary is None:
        raise ValueError("mode='remove' keeps position ids through the rotary embedding; this model has none: "
                         "use mode='mask'")


def _example(model, inputs: MultimodalInput) -> _Example:
    if inputs.shape[0] != 1:
        raise ValueError(f"pass one example per MultimodalInput (a list for several); got a batch of {inputs.shape[0]}")
    if inputs.padded:
        raise ValueError("pass unpadded one-row inputs (model.to_inputs(image, prompt))")
    rp = inputs.positions[0]
    answer = inputs.meta.get("answer")
    if isinstance(answer, (list, tuple)):
        answer = answer[0]
    if answer:
        start = rp.prompt.rfind(answer)
        if start < 0:
            raise ValueError(f"the answer {answer!r} is not in the prompt: append it (prompt + ' ' + answer)")
        targets = rp.span(answer, rp.prompt[:start].count(answer))  # its last occurrence
    else:
        targets = rp.text[rp.text > rp.image.max()] if rp.image.numel() else rp.text[1:]
    # a target is read at the position before it, which must be text (an image position may be dropped)
    targets = targets[targets > 0]
    targets = targets[~inputs.positions.image_mask[0, (targets - 1).to(inputs.positions.image_mask.device)].cpu()]
    if targets.numel() == 0:
        raise ValueError("no target token follows a text position: append an answer or caption after the image")
    features = flat_image_features(model, inputs)
    return _Example(inputs, targets, features)


def _attention_received(model, ex: _Example) -> Float[Tensor, " n_image"]:
    from mm_lens.analysis.attention import attention_to_image

    rp = ex.inputs.positions[0]
    queries = rp.text[(rp.text > rp.image.max()) & (rp.text < ex.targets.min())]
    if queries.numel() == 0:
        queries = ex.targets - 1
    return attention_to_image(model, ex.inputs, queries=queries).per_patch.mean((0, 1))


def _losses(model, ex: _Example, keeps: list[Tensor], mode: str) -> Float[Tensor, " batch"]:
    """Mean target loss for each set of kept image indices (all sets the same size)."""
    if mode == "mask":
        return _losses_masked(model, ex, keeps)
    return _losses_removed(model, ex, keeps)


def _nll(logits: Tensor, ids: Tensor, pred_pos: Tensor, targets: Tensor) -> Tensor:
    logp = logits.float().log_softmax(-1)  # [batch, pos, vocab]
    tok = ids[targets].to(logp.device)
    rows = torch.arange(logp.shape[0], device=logp.device)[:, None]
    return -logp[rows, pred_pos.to(logp.device), tok[None]].mean(-1)


def _losses_masked(model, ex: _Example, keeps: list[Tensor]) -> Tensor:
    x = ex.inputs
    image = x.positions[0].image
    drop = torch.zeros(len(keeps), x.shape[1], dtype=torch.bool)
    for b, kept in enumerate(keeps):
        drop[b, image] = True
        drop[b, image[kept]] = False
    n = x.shape[1]
    # no query reads a dropped key; a dropped position still reads itself, so no row is empty
    # (its own state never reaches a kept position)
    blocked = drop[:, None, :] & ~torch.eye(n, dtype=torch.bool)[None]  # [batch, query_pos, key_pos]
    blocked = blocked[:, None].to(x.input_ids.device)

    def mask_scores(scores: Tensor, hook) -> Tensor:  # [batch, head, query_pos, key_pos]
        return scores.masked_fill(blocked, float("-inf"))

    hooks = [(f"blocks.{l}.attn.hook_attn_scores", mask_scores) for l in range(model.cfg.n_layers)]
    batch = _repeat(x, len(keeps))
    feats = None if ex.features is None else ex.features.repeat(len(keeps), 1)
    logits = model.run_with_hooks(batch, fwd_hooks=hooks, image_features=feats)
    return _nll(logits, x.input_ids[0], (ex.targets - 1).expand(len(keeps), -1), ex.targets).cpu()


def _losses_removed(model, ex: _Example, keeps: list[Tensor]) -> Tensor:
    x = ex.inputs
    ids = x.input_ids[0]
    image = x.positions[0].image.to(ids.device)
    is_image = torch.zeros_like(ids, dtype=torch.bool)
    is_image[image] = True
    text = (~is_image).nonzero().flatten()
    order = [torch.cat([text, image[kept.to(ids.device)]]).sort().values for kept in keeps]
    if len({len(o) for o in order}) != 1:
        raise ValueError("every kept set in one batch must have the same size")
    position_ids = torch.stack(order)  # [batch, new_pos]: original positions of what stays
    new_ids = ids[position_ids]
    feats = None
    if ex.features is not None and len(keeps[0]):
        feats = torch.cat([ex.features[kept.to(ids.device)] for kept in keeps])
    small = replace(x, input_ids=new_ids, attention_mask=torch.ones_like(new_ids), pixel_values=None)
    pred = torch.searchsorted(position_ids, (ex.targets - 1).to(ids.device).expand(len(keeps), -1).contiguous())
    original = model.input_position_ids(x)[..., 0, :]  # [*axes, pos]: the full sequence's positions (M-RoPE: 3 axes)
    kept_ids = original[..., position_ids]  # [*axes, batch, new_pos]
    logits = model(small, image_features=feats, position_ids=kept_ids)
    return _nll(logits, ids, pred, ex.targets).cpu()
