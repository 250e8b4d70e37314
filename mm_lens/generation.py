"""Token-by-token generation with a key/value cache, as TransformerLens' ``HookedTransformer.generate``.

The prompt (and its images) runs once; each step then runs only the new token over the cached keys
and values, so the vision tower runs once and hooks on a step see ``[batch, 1, ...]``. Without the
cache every step re-runs the whole sequence (from the embeddings: image features are still
computed once). Rows of a batch are padded on the left; a row that produced the end-of-sequence
token is filled with it until every row has stopped.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mm_lens.components import KVCache
from mm_lens.inputs import MultimodalInput, PositionMap

RETURN_TYPES = ("input", "str", "tokens")


def sample(logits: Float[Tensor, "batch d_vocab"], tokens: Int[Tensor, "batch pos"], top_k: Optional[int] = None,
           top_p: Optional[float] = None, temperature: float = 1.0, freq_penalty: float = 0.0
           ) -> Int[Tensor, " batch"]:
    """One token per row, with TransformerLens' conventions: logits divided by ``temperature`` (0 = greedy),
    minus ``freq_penalty`` times each token's count in ``tokens``, then restricted to the ``top_k`` largest
    or to the most probable tokens until their mass exceeds ``top_p`` (the token that crosses it included)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if freq_penalty:
        counts = torch.zeros_like(logits).scatter_add_(-1, tokens, torch.ones_like(tokens, dtype=logits.dtype))
        logits = logits - freq_penalty * counts
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        ordered, order = logits.sort(-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], -1)  # mass ranked above
        drop = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before > top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.distributions.Categorical(logits=logits.float()).sample()


def _last_real(attention_mask: Tensor) -> Int[Tensor, " batch"]:
    """Index of each row's last real token."""
    n = attention_mask.shape[1]
    return n - 1 - attention_mask.flip(-1).argmax(-1)


def _stop_tokens(model, stop_at_eos: bool, eos_token_id) -> list[int]:
    if not stop_at_eos:
        return []
    if eos_token_id is None:
        eos_token_id = getattr(model.tokenizer, "eos_token_id", None)
        if eos_token_id is None:
            raise ValueError("stop_at_eos needs an end-of-sequence token: pass eos_token_id=... (or "
                             "stop_at_eos=False)")
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(t) for t in eos_token_id]


def _step_inputs(model, tokens: Tensor) -> MultimodalInput:
    """New tokens as an input of their own (generated ids are text, as Hugging Face reads them: no image id)."""
    none = torch.zeros_like(tokens, dtype=torch.bool)
    return MultimodalInput(tokens, torch.ones_like(tokens), None, PositionMap([], none), -1)


@torch.no_grad()
def generate(
    model,
    input=None,
    prompts: Optional[Union[str, Sequence[str]]] = None,
    max_new_tokens: int = 10,
    stop_at_eos: bool = True,
    eos_token_id: Optional[Union[int, Sequence[int]]] = None,
    do_sample: bool = False,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    use_past_kv_cache: bool = True,
    return_type: str = "input",
    verbose: bool = False,
):
    """See :meth:`mm_lens.HookedVLM.generate`."""
    if return_type not in RETURN_TYPES:
        raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
    if return_type == "input":
        return_type = "tokens" if isinstance(input, (MultimodalInput, Tensor)) else "str"
    inputs = model._as_inputs(input, prompts, padding_side="left")
    stops = _stop_tokens(model, stop_at_eos, eos_token_id)
    model.eval()
    cache = KVCache.empty(model.cfg.n_layers) if use_past_kv_cache else None
    if cache is not None:
        logits = model(inputs, past_kv_cache=cache)
    else:  # the vision tower runs once (its features also feed Qwen3-VL's DeepStack blocks at every step)
        features = model.input_image_features(inputs, None)
        embeds = model.embed_inputs(inputs, features)
        logits = model(inputs, start_at_layer=0, residual=embeds, image_features=features)
    rows = torch.arange(inputs.shape[0], device=logits.device)
    final = logits[rows, _last_real(inputs.attention_mask).to(logits.device)]
    tokens, mask = inputs.input_ids, inputs.attention_mask
    finished = torch.zeros(inputs.shape[0], dtype=torch.bool, device=tokens.device)
    for step in tqdm(range(max_new_tokens), desc="generate", disable=not verbose):
        if do_sample:
            token = sample(final, tokens, top_k, top_p, temperature, freq_penalty)
        else:
            token = final.argmax(-1)
        token = token.to(tokens.device)
        if stops:
            token = torch.where(finished, torch.full_like(token, stops[0]), token)
            finished |= torch.isin(token, torch.tensor(stops, device=token.device))
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        new = model.hook_embed(model.embed(token[:, None]))
        if cache is not None:
            logits = model(_step_inputs(model, token[:, None]), start_at_layer=0, residual=new, past_kv_cache=cache)
        else:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            embeds = torch.cat([embeds, new], dim=1)
            whole = MultimodalInput(tokens, mask, None, inputs.positions, inputs.image_token_id)
            logits = model(whole, start_at_layer=0, residual=embeds, image_features=features)
        final = logits[:, -1]
    if return_type == "tokens":
        return tokens
    model._require_tokenizer()
    text = [model.tokenizer.decode(row, skip_special_tokens=True) for row in tokens.tolist()]
    return text[0] if len(text) == 1 else text
