"""Attribution patching: the first-order approximation of activation patching.

``attribution = (source - base) . d metric / d activation`` at the base run, from one clean
forward, one corrupted forward and one backward pass (``direction="denoise"``: base =
corrupted, source = clean, as in :func:`~mm_lens.analysis.patching.activation_patch`).
Residual-stream sites give ``[layer, pos]``; ``z`` gives ``[layer, pos, head]``; with position
groups the attributions of the group's positions are summed (the linear estimate of patching
the whole group).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from mm_lens.analysis.groups import as_group, resolve_batch
from mm_lens.analysis.patching import _logit_view, base_and_source, hook_name
from mm_lens.analysis.results import PatchResult
from mm_lens.inputs import MultimodalInput

SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z")


def attribution_patch(
    model,
    clean: MultimodalInput,
    corrupted: MultimodalInput,
    metric: Callable[[Tensor], Tensor],
    hook: str = "resid_pre",
    positions="each",
    direction: str = "denoise",
    clean_hooks=None,
    corrupted_hooks=None,
    logits: str = "last",
) -> PatchResult:
    """Linear estimates of ``activation_patch(...) - baseline`` for every layer x position (x head)."""
    if hook not in SITES:
        raise ValueError(f"attribution patching supports {SITES}, not {hook!r}")
    base, base_hooks, source, source_hooks = base_and_source(clean, corrupted, direction, clean_hooks, corrupted_hooks)
    L = model.cfg.n_layers
    names = [hook_name(model, hook, l) for l in range(L)]
    with torch.no_grad(), model.hooks(fwd_hooks=source_hooks):
        src_logits, src = model.run_with_cache(source, names_filter=lambda n: n in names, return_cache_object=False)
        source_metric = torch.as_tensor(metric(_logit_view(src_logits, source, logits))).float().reshape(-1)
    saved: dict[str, Tensor] = {}

    def keep(x: Tensor, hook) -> Tensor:
        if not x.requires_grad:  # the first site when the weights need no gradient
            x = x.detach().requires_grad_(True)
        saved[hook.name] = x
        return x

    with torch.enable_grad(), model.hooks(fwd_hooks=base_hooks + [(n, keep) for n in names]):
        out = torch.as_tensor(metric(_logit_view(model(base), base, logits)))
        baseline = out.detach().float().reshape(-1)
        grads = torch.autograd.grad(out.sum(), [saved[n] for n in names])
    per = []
    for n, g in zip(names, grads):
        diff = (src[n] - saved[n].detach()) * g  # [batch, pos, ...]
        per.append(diff.sum(-1))  # [batch, pos] or [batch, pos, head]
    per_example = torch.stack(per).movedim(1, -1).float()  # [layer, pos, (head,) batch]
    axes = ("layer", "pos") + (("head",) if hook == "z" else ())
    labels = {"layer": list(range(L))}
    if not (isinstance(positions, str) and positions == "each"):
        groups = [positions] if not isinstance(positions, (list, tuple)) or (positions and isinstance(positions[0], int)) \
            else list(positions)
        cols = []
        for g in groups:
            rows = resolve_batch(model, base, g)
            summed = torch.stack([per_example[:, pos.to(per_example.device), ..., r].sum(1)
                                  for r, pos in enumerate(rows)], dim=-1)
            cols.append(summed)
        per_example = torch.stack(cols, dim=1)
        axes = ("layer", "group") + axes[2:]
        labels["group"] = [as_group(g).name for g in groups]
    return PatchResult(per_example.mean(-1), axes, labels, per_example if base.shape[0] > 1 else None, baseline,
                       {"hook": hook, "direction": direction, "estimate": "first order (minus baseline)"}, source_metric)
