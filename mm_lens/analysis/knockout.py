"""Attention knockout (Zhang et al., CVPR 2025): block attention edges between position groups.

Target rows may not attend to source columns: their pre-softmax scores are set to -inf on
``attn.hook_attn_scores`` (all heads) in a window of layers centred on each layer. The metric is
the relative change (%) of the probability of the clean greedy answer's first token at the last
position: ``100 * (p_knock - p_clean) / p_clean``.

A row whose every key is blocked (``empty_rows``; none of the paper's six edges makes one, since
question and last rows always keep the BOS and template keys, but blocking e.g. every position
into ``"last"`` does):

* ``"self"`` (default): the row keeps its own score, so it attends to itself only, as a one-token
  run of that token would; nothing outside the row's causal past is read.
* ``"uniform"`` (the published code): that code adds the dtype minimum to the blocked scores, and
  Hugging Face's causal and padding masks are that same minimum, so every score of the row ends at
  the minimum and softmax spreads the row uniformly over *all* key columns, later positions and
  padding included. Use it to reproduce the published numbers; it lets the row read positions
  after it, which is why it is not the default.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from mm_lens.analysis.causal_trace import window_layers as centred_window
from mm_lens.analysis.groups import GroupLike, resolve_batch
from mm_lens.analysis.results import PatchResult, from_per_example
from mm_lens.hooks import positionwise
from mm_lens.inputs import MultimodalInput

# The edges of the paper (source -> target).
PAPER_EDGES: tuple[tuple[str, str], ...] = (
    ("question", "last"), ("image", "last"), ("image", "question"),
    ("last", "last"), ("object", "question"), ("non_object", "question"),
)


def knockout_mask(model, inputs: MultimodalInput, source: GroupLike, target: GroupLike
                  ) -> Bool[Tensor, "batch query_pos key_pos"]:
    """True where a target row may not attend to a source column."""
    n = inputs.shape[1]
    blocked = torch.zeros(inputs.shape[0], n, n, dtype=torch.bool, device=inputs.device)
    for r, (src, tgt) in enumerate(zip(resolve_batch(model, inputs, source), resolve_batch(model, inputs, target))):
        blocked[r, tgt.to(inputs.device)[:, None], src.to(inputs.device)[None, :]] = True
    return blocked


EMPTY_ROWS = ("self", "uniform")


def _block_scores(scores: Float[Tensor, "batch head q k"], blocked: Tensor, empty_rows: str = "self") -> Tensor:
    out = scores.masked_fill(blocked[:, None], float("-inf"))
    empty = torch.isneginf(out).all(-1)  # [batch, head, q]: rows with nothing left
    if bool(empty.any()) and empty_rows == "uniform":  # the same score everywhere: uniform over every column
        out = out.masked_fill(empty[..., None], 0.0)
    elif bool(empty.any()):
        n_q, n_k = scores.shape[-2:]
        diag = torch.arange(n_k - n_q, n_k, device=scores.device)
        own = scores.gather(-1, diag.view(1, 1, n_q, 1).expand(*scores.shape[:2], n_q, 1))
        kept = out.scatter(-1, diag.view(1, 1, n_q, 1).expand(*scores.shape[:2], n_q, 1), own)
        out = torch.where(empty[..., None], kept, out)
    return out


def knockout_hooks(model, inputs: MultimodalInput, source: GroupLike, target: GroupLike,
                   layers: Optional[Sequence[int]] = None, *, empty_rows: str = "self") -> list[tuple[str, Callable]]:
    """``fwd_hooks`` for ``run_with_hooks`` blocking source -> target attention in ``layers`` (default all).

    ``empty_rows``: ``"self"`` or ``"uniform"`` (the published code), see the module docstring.
    """
    if empty_rows not in EMPTY_ROWS:
        raise ValueError(f"empty_rows must be one of {EMPTY_ROWS}, got {empty_rows!r}")
    layers = range(model.cfg.n_layers) if layers is None else layers
    bad = [l for l in layers if not 0 <= l < model.cfg.n_layers]
    if bad:
        raise ValueError(f"layers {bad} are outside 0..{model.cfg.n_layers - 1}")
    blocked = knockout_mask(model, inputs, source, target)

    @positionwise  # exact on a suffix: its rows follow from the score shape, a repeated batch repeats them
    def hook(scores: Tensor, hook) -> Tensor:
        n_q, n_k = scores.shape[-2:]
        rows = blocked[:, n_k - n_q:n_k, :n_k]
        return _block_scores(scores, rows.repeat(scores.shape[0] // rows.shape[0], 1, 1), empty_rows)

    return [(f"blocks.{l}.attn.hook_attn_scores", hook) for l in layers]


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """Layers ``max(0, l - k//2) .. min(L, l - k//2 + k) - 1`` (for k = 9: l-4 .. l+4): the centred window."""
    return centred_window(layer, window, n_layers, mode="centered")


def _last_logits(model, inputs: MultimodalInput, logits: Tensor) -> Float[Tensor, "batch d_vocab"]:
    last = inputs.positions.last_positions.to(logits.device)
    return logits[torch.arange(logits.shape[0], device=logits.device), last]


@torch.no_grad()
def attention_knockout(
    model,
    inputs: MultimodalInput,
    source: GroupLike,
    target: GroupLike,
    window: int = 9,
    layers: Optional[Sequence[int]] = None,
    metric: Union[str, Callable] = "answer_prob",
    answers: Optional[Sequence[int]] = None,
    progress: bool = True,
    empty_rows: str = "self",
) -> PatchResult:
    """Knock out source -> target attention in a window of ``window`` layers centred on each of ``layers``.

    ``metric``: ``"answer_prob"`` (relative change in %, see module doc) or a callable
    ``(logits, inputs) -> [batch]`` reported as is. ``answers`` (first answer token per row):
    keep only the rows where the clean greedy answer equals it (``meta['kept']`` lists them).
    ``empty_rows``: what a row whose every key is blocked attends to (module docstring).
    Returns a result over ``("layer",)`` with per-example values and 95% intervals.
    """
    L = model.cfg.n_layers
    layers = list(range(L)) if layers is None else list(layers)
    clean_logits = model(inputs)
    clean_last = _last_logits(model, inputs, clean_logits)
    answer = clean_last.argmax(-1)
    kept = torch.arange(inputs.shape[0], device=answer.device)
    if answers is not None:
        kept = (answer == torch.as_tensor(answers, device=answer.device)).nonzero()[:, 0]
        if kept.numel() == 0:
            raise ValueError("the model answers no example correctly, so there is nothing to knock out")
    if metric == "answer_prob":
        p_clean = clean_last.softmax(-1).gather(-1, answer[:, None])[:, 0]

        def score(logits: Tensor) -> Tensor:
            p = _last_logits(model, inputs, logits).softmax(-1).gather(-1, answer[:, None])[:, 0]
            return 100 * (p - p_clean) / p_clean
    elif callable(metric):
        def score(logits: Tensor) -> Tensor:
            return torch.as_tensor(metric(logits, inputs))
    else:
        raise ValueError(f"metric must be 'answer_prob' or a callable (logits, inputs) -> [batch], got {metric!r}")
    values = []
    for l in tqdm(layers, desc="knockout", disable=not progress):
        logits = model.run_with_hooks(inputs, fwd_hooks=knockout_hooks(model, inputs, source, target,
                                                                       window_layers(l, window, L),
                                                                       empty_rows=empty_rows))
        values.append(score(logits)[kept])
    per_example = torch.stack(values).float()
    return from_per_example(per_example, ("layer",), {"layer": layers}, answer=answer.tolist(),
                            kept=kept.tolist(), window=window, edge=f"{_name(source)}->{_name(target)}")


def knockout_edges(model, inputs: MultimodalInput, edges: Sequence[tuple[GroupLike, GroupLike]] = PAPER_EDGES,
                   window: int = 9, layers: Optional[Sequence[int]] = None, metric: Union[str, Callable] = "answer_prob",
                   answers: Optional[Sequence[int]] = None, progress: bool = True, empty_rows: str = "self"
                   ) -> PatchResult:
    """:func:`attention_knockout` for several edges: a result over ``("edge", "layer")``."""
    results = [attention_knockout(model, inputs, s, t, window, layers, metric, answers, progress, empty_rows)
               for s, t in edges]
    per_example = torch.stack([r.per_example for r in results])
    labels = {"edge": [r.meta["edge"] for r in results], "layer": results[0].labels["layer"]}
    return from_per_example(per_example, ("edge", "layer"), labels, window=window, kept=results[0].meta["kept"])


def _name(group: GroupLike) -> str:
    return group if isinstance(group, str) else getattr(group, "name", str(group))
