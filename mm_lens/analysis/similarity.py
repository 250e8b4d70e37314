"""Modality similarity: how text-like the visual tokens' hidden states are, layer by layer.

Per lens layer (``0..n_layers-1`` = ``blocks.{l}.hook_resid_pre``, ``n_layers`` = the final
residual, as in :mod:`mm_lens.analysis.lens`):

* ``to_embeddings``: mean over image positions of the max over the vocabulary of
  ``cos(h_i, W_E[v])``;
* ``to_text``: mean of ``cos(h_i, h_t)`` over image positions i and the prompt's text positions t
  (the BOS token left out) at the same layer; ``to_text_max``: mean over i of the max over t;
* anisotropy baselines: ``baseline_text`` = mean cosine of random pairs of distinct hidden states
  at that layer, ``baseline_embeddings`` = mean cosine of random (hidden state, embedding row)
  pairs. ``corrected()`` subtracts them.

Hidden states and ``W_E`` are the checkpoint's whatever the weight-processing flags: on
LayerNorm towers ``center_writing_weights`` centres both (cosines of centred vectors would be the
Pearson correlations of the checkpoint's), so the removed means are added back
(:mod:`mm_lens.analysis.unprocessed`); ``W_E`` is read a chunk of rows at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from mm_lens.analysis.unprocessed import ResidualMeans, checkpoint_embeddings, checkpoint_residual
from mm_lens.inputs import MultimodalInput


@dataclass
class ModalitySimilarity:
    """Per-layer curves (each ``[layer]``)."""

    layers: list[int]
    to_embeddings: Float[Tensor, " layer"]
    to_text: Float[Tensor, " layer"]
    to_text_max: Float[Tensor, " layer"]
    baseline_embeddings: Float[Tensor, " layer"]
    baseline_text: Float[Tensor, " layer"]
    anisotropy_corrected: bool = False

    def corrected(self) -> "ModalitySimilarity":
        """The same curves with the random-pair baselines subtracted."""
        if self.anisotropy_corrected:
            return self
        return replace(self, to_embeddings=self.to_embeddings - self.baseline_embeddings,
                       to_text=self.to_text - self.baseline_text, to_text_max=self.to_text_max - self.baseline_text,
                       anisotropy_corrected=True)

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame({"layer": self.layers, "to_embeddings": self.to_embeddings.numpy(),
                             "to_text": self.to_text.numpy(), "to_text_max": self.to_text_max.numpy(),
                             "baseline_embeddings": self.baseline_embeddings.numpy(),
                             "baseline_text": self.baseline_text.numpy()})


@torch.no_grad()
def modality_similarity(
    model,
    inputs: MultimodalInput,
    layers: Optional[Sequence[int]] = None,
    anisotropy: bool = False,
    n_pairs: int = 2000,
    seed: int = 0,
    row: int = 0,
    vocab_chunk: int = 8192,
) -> ModalitySimilarity:
    """Cosine similarity of visual-token hidden states to the text embeddings and to the prompt's
    text hidden states, per layer; ``anisotropy=True`` returns the baseline-corrected curves."""
    n = model.cfg.n_layers
    layers = list(range(n + 1)) if layers is None else [int(l) for l in layers]
    names = {_name(l, n) for l in layers}
    means = ResidualMeans(model, inputs)
    with model.hooks(fwd_hooks=means.hooks()):
        _, cache = model.run_with_cache(inputs, names_filter=lambda x: x in names, return_type=None)
    rp = inputs.positions[row]
    image, text = rp.image, rp.text
    bos = getattr(model.tokenizer, "bos_token_id", None)
    ids = inputs.input_ids[row]
    text = torch.tensor([t for t in text.tolist() if bos is None or int(ids[t]) != bos], dtype=torch.long)
    if image.numel() == 0 or text.numel() == 0:
        raise ValueError("modality_similarity needs both image and text positions in the prompt")
    valid = inputs.attention_mask[row].bool().nonzero().flatten().cpu()
    n_vocab, dev = model.cfg.d_vocab, model.W_E.device

    def unit_embeddings(rows) -> Tensor:  # [rows, d_model]: the checkpoint's W_E rows, normalised
        return F.normalize(checkpoint_embeddings(model, rows).detach().float(), dim=-1)

    image, text, valid = image.to(dev), text.to(dev), valid.to(dev)
    g = torch.Generator().manual_seed(seed)
    out = {k: [] for k in ("emb", "text", "text_max", "b_emb", "b_text")}
    for l in layers:
        h = checkpoint_residual(cache[_name(l, n)][row].float().to(dev), means.at(l)[row].to(dev))
        h = F.normalize(h, dim=-1)  # [pos, d_model]
        hi, ht = h[image], h[text]
        best = torch.stack([(hi @ unit_embeddings(slice(s, s + vocab_chunk)).T).max(-1).values
                            for s in range(0, n_vocab, vocab_chunk)]).max(0).values
        cos_text = hi @ ht.T  # [image_pos, text_pos]
        out["emb"].append(best.mean())
        out["text"].append(cos_text.mean())
        out["text_max"].append(cos_text.max(-1).values.mean())
        a = valid[torch.randint(len(valid), (n_pairs,), generator=g).to(dev)]
        b = valid[torch.randint(len(valid), (n_pairs,), generator=g).to(dev)]
        keep = a != b
        out["b_text"].append((h[a[keep]] * h[b[keep]]).sum(-1).mean())
        v = torch.randint(n_vocab, (n_pairs,), generator=g).to(dev)
        out["b_emb"].append((h[a] * unit_embeddings(v)).sum(-1).mean())
    res = ModalitySimilarity(layers, *(torch.stack(out[k]).cpu() for k in ("emb", "text", "text_max", "b_emb", "b_text")))
    return res.corrected() if anisotropy else res


def _name(layer: int, n_layers: int) -> str:
    return f"blocks.{layer}.hook_resid_pre" if layer < n_layers else f"blocks.{n_layers - 1}.hook_resid_post"
