"""MultEdit (Basu et al., NeurIPS 2024): a rank-one edit of one MLP output matrix.

TransformerLens layout: the MLP computes ``post @ W_out + b_out`` with ``W_out [d_mlp, d_model]``.
With the key ``k = mlp.hook_post`` at the last constraint token (``[d_mlp]``) and a value
``v = k @ W_out + delta`` (``[d_model]``), the column-vector update of the paper
``W' = W + (v - W k) k^T / (lambda + k^T k)`` reads here

    W_out' = W_out + k (v - k @ W_out)^T / (lambda + k^T k)

so that ``k @ W_out' = v`` up to ``lambda / (lambda + k^T k)``; a row ``post`` is moved by
``(post · k) / (lambda + k^T k) · (v - k @ W_out)``. The update is computed in float32.

``delta`` is added to the MLP output at the constraint token and optimised as in ROME's
``compute_v``, which the published code follows: Adam on
``-log p(target first token | image, prompt) + 0.001 · ||delta|| / ||W k||^2``, and after each
step ``delta`` is scaled back into the ball ``||delta|| <= clamp · ||W k||``. ``W k`` is the
checkpoint's (``W_out`` without its bias, whatever the weight-processing flags).

``published=True`` uses the published runs' settings: lr 0.1, 10 steps, ``clamp = 1e-4``. That
ball is so small that the edit cannot move the model: on the bundled model p(target) goes from
5.19e-6 to 5.20e-6. The default keeps the published objective (weight 0.001), lambda (0.01) and
update, and takes ROME's own optimiser settings for ``v`` instead: lr 0.5, 20 steps, ``clamp = 4``
(on the bundled model, edited at layer 0 of the last token, the target becomes the answer in 5 of
6 examples, mean p(target) 0.77). Each can be set on its own (``lr``, ``steps``, ``clamp``).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from mm_lens.analysis.causal_trace import flat_image_features
from mm_lens.analysis.groups import NAMES, GroupLike, as_group, question, resolve
from mm_lens.analysis.unprocessed import checkpoint_mlp_write
from mm_lens.inputs import MultimodalInput


@dataclass
class Edit:
    """A rank-one edit of ``blocks[layer].mlp.W_out``:
    ``weight_delta = outer(key, value - key @ W_out) / (lambda + |key|^2)``.

    ``apply()`` adds it (keeping the original weights), ``undo()`` restores them exactly;
    ``with edit.applied():`` does both. ``report`` (a DataFrame, filled by :func:`multedit`)
    gives p(target) and p(original answer) before and after on the edited prompt (``set="edit"``,
    efficacy), paraphrases (generalisation) and unrelated prompts (specificity).
    """

    model: object = field(repr=False)
    layer: int
    key: Float[Tensor, " d_mlp"]
    value: Float[Tensor, " d_model"]
    weight_delta: Float[Tensor, "d_mlp d_model"]
    target: int
    losses: list[float] = field(default_factory=list)
    report: object = None
    _saved: Optional[Tensor] = field(default=None, repr=False)

    @property
    def is_applied(self) -> bool:
        return self._saved is not None

    @torch.no_grad()
    def apply(self) -> "Edit":
        if self.is_applied:
            raise ValueError("this edit is already applied: call undo() first")
        W = self.model.blocks[self.layer].mlp.W_out
        self._saved = W.detach().clone()
        W.add_(self.weight_delta.to(W.device, W.dtype))
        return self

    @torch.no_grad()
    def undo(self) -> "Edit":
        if not self.is_applied:
            raise ValueError("this edit is not applied: nothing to undo")
        self.model.blocks[self.layer].mlp.W_out.copy_(self._saved)
        self._saved = None
        return self

    @contextmanager
    def applied(self):
        self.apply()
        try:
            yield self
        finally:
            self.undo()

    def summary(self):
        """Mean of the report per set (edit / paraphrase / unrelated)."""
        return self.report.groupby("set").mean(numeric_only=True)


PUBLISHED = dict(steps=10, lr=0.1, clamp=1e-4)  # the published MultEdit runs
DEFAULTS = dict(steps=20, lr=0.5, clamp=4.0)  # ROME's compute_v: an edit that moves the model


def multedit(
    model,
    inputs: MultimodalInput,
    target: Union[int, str],
    layer: int = 2,
    constraint: Optional[GroupLike] = None,
    *,
    published: bool = False,
    steps: Optional[int] = None,
    lr: Optional[float] = None,
    clamp: Optional[float] = None,
    weight_decay: float = 0.001,
    lam: float = 0.01,
    paraphrases: Sequence[MultimodalInput] = (),
    unrelated: Sequence[MultimodalInput] = (),
    progress: bool = False,
) -> Edit:
    """Build the rank-one edit that makes the model answer ``target`` (a token id or single-token word).

    ``constraint``: the constraint span (a substring of the prompt, a group, positions); default
    the ``"question"`` group when ``inputs.meta["question"]`` is set, else the last prompt token.
    The key is read at the span's last token and ``delta`` is added to the MLP output there while
    it is optimised (module docstring). ``published=True``: the published runs' ``steps=10, lr=0.1,
    clamp=1e-4``; by default ROME's ``steps=20, lr=0.5, clamp=4`` (``clamp``: the radius of the ball
    ``delta`` is kept in, as a multiple of ``||W k||``). Warns when the edited layer cannot change
    the answer at all (its MLP output at the constraint token has exactly zero gradient, e.g. the
    last block with the constraint before the last position). Returns an :class:`Edit` that is
    *not* applied; its ``report`` is filled.
    """
    from tqdm.auto import tqdm

    if inputs.shape[0] != 1:
        raise ValueError(f"multedit edits for one example at a time; got a batch of {inputs.shape[0]}")
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer must be in 0..{model.cfg.n_layers - 1}, got {layer}")
    given = dict(steps=steps, lr=lr, clamp=clamp)
    if published and any(v is not None and v != PUBLISHED[k] for k, v in given.items()):
        raise ValueError(f"published=True fixes {PUBLISHED}; pass either published=True or your own settings")
    steps, lr, clamp = ((given[k] if given[k] is not None else (PUBLISHED if published else DEFAULTS)[k])
                        for k in ("steps", "lr", "clamp"))
    target = model.to_single_token(target) if isinstance(target, str) else int(target)
    pos = int(_constraint_positions(model, inputs, constraint)[-1])
    post_name, out_name = f"blocks.{layer}.mlp.hook_post", f"blocks.{layer}.hook_mlp_out"
    W = model.blocks[layer].mlp.W_out
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs, names_filter=lambda n: n == post_name, return_type=None)
        key = cache[post_name][0, pos].float()
        current = key @ W.float()
        norm_Wk = float(checkpoint_mlp_write(model, layer, key).norm())
        features = flat_image_features(model, inputs)
    delta = torch.zeros_like(current, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)

    def add_delta(act: Tensor, hook) -> Tensor:
        act = act.clone()
        act[:, pos] = act[:, pos] + delta.to(act.dtype)
        return act

    losses = []
    with torch.enable_grad():
        for step in tqdm(range(steps), desc="multedit", disable=not progress):
            logits = model.run_with_hooks(inputs, fwd_hooks=[(out_name, add_delta)], image_features=features)
            nll = -logits[0, -1].float().log_softmax(-1)[target]
            loss = nll + weight_decay * delta.norm() / (norm_Wk**2 + 1e-12)
            (grad,) = torch.autograd.grad(loss, [delta])
            if step == 0 and not bool(grad.any()):
                warnings.warn(f"the MLP output of layer {layer} at position {pos} has exactly zero gradient on the "
                              "target's probability, so no edit there can change the answer (a later layer than the "
                              "last one that reads that position?): the edit is empty. Edit an earlier layer.",
                              stacklevel=2)
            delta.grad = grad
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                radius = clamp * norm_Wk
                if float(delta.norm()) > radius:
                    delta.mul_(radius / delta.norm())
            losses.append(float(nll.detach()))
    value = (current + delta.detach()).float()
    weight_delta = rank_one_update(W.detach().float(), key, value, lam)
    edit = Edit(model, layer, key.cpu(), value.cpu(), weight_delta, target, losses)
    edit.report = _report(model, edit, inputs, paraphrases, unrelated)
    return edit


def rank_one_update(W_out: Float[Tensor, "d_mlp d_model"], key: Float[Tensor, " d_mlp"], value: Float[Tensor, " d_model"],
                    lam: float = 0.01) -> Float[Tensor, "d_mlp d_model"]:
    """``outer(k, v - k @ W_out) / (lam + k·k)``, the TransformerLens-layout form of
    ``(v - W k) k^T / (lam + k^T k)`` (equal to ``(v k^T + lam W)(k k^T + lam I)^-1 - W``)."""
    k, v, W = key.float(), value.float().to(key.device), W_out.float().to(key.device)
    return torch.outer(k, v - k @ W) / (lam + k @ k)


def _constraint_positions(model, inputs, constraint) -> Tensor:
    if constraint is None:
        return resolve(model, inputs, "question") if "question" in inputs.meta else resolve(model, inputs, "last")
    if isinstance(constraint, str) and constraint.replace("-", "_").lower() not in NAMES:
        return resolve(model, inputs, question(constraint))
    return resolve(model, inputs, as_group(constraint))


@torch.no_grad()
def _answer_probs(model, inputs: MultimodalInput, target: int, original: Optional[int] = None):
    probs = model(inputs)[0, -1].float().softmax(-1)
    original = int(probs.argmax()) if original is None else original
    return float(probs[target]), float(probs[original]), original


def _report(model, edit: Edit, inputs, paraphrases, unrelated):
    import pandas as pd

    sets = [("edit", [inputs]), ("paraphrase", list(paraphrases)), ("unrelated", list(unrelated))]
    before = {}
    for name, items in sets:
        for i, x in enumerate(items):
            before[name, i] = _answer_probs(model, x, edit.target)
    rows = []
    with edit.applied():
        for name, items in sets:
            for i, x in enumerate(items):
                pt, po, original = before[name, i]
                pt_after, po_after, _ = _answer_probs(model, x, edit.target, original)
                rows.append((name, i, original, pt, pt_after, po, po_after))
    return pd.DataFrame(rows, columns=["set", "index", "original_answer", "p_target_before", "p_target_after",
                                       "p_original_before", "p_original_after"])
