"""Build a HookedVLM from a checkpoint one part at a time (streaming conversion).

1. The model is a skeleton on the meta device (no memory).
2. The family's key table is checked against the checkpoint's headers: every missing, unexpected or
   mis-shaped tensor is listed before any tensor data is read (:func:`common.plan_strict`).
3. Part by part (:func:`mm_lens.weights.weight_parts`: the vision tower's own weights, each vision block,
   the projector, the embedding, each block, the head), its tensors are read one at a time, moved to the
   part's device in the checkpoint's dtype, made a working copy there (float32 when weights are processed,
   as TransformerLens processes them), processed (fold_ln, centring, value biases: per-part operations) and
   cast to ``dtype``.

Beyond the finished model, memory holds one part's working copy (on a GPU, up to one block in float32);
no device ever holds a float32 copy of a model loaded in a smaller dtype. The same code converts a state
dict already in memory (``from_hf``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping, Optional

import torch
from torch import Tensor, nn

from mm_lens.conversion.common import Fill, plan_strict
from mm_lens.weights import Processing, part_of, process_part, weight_parts


def skeleton(cls, cfg, processor=None):
    """The model with every parameter on the meta device (shapes only)."""
    with torch.device("meta"):
        return cls(cfg, tokenizer=getattr(processor, "tokenizer", processor), processor=processor)


def working_dtype(dtype: torch.dtype, processing: Processing) -> torch.dtype:
    """Weights are processed in float32 (or the target dtype when that is wider)."""
    if not processing.any or dtype in (torch.float32, torch.float64):
        return dtype
    return torch.float32


def fill_from(model, plan: Mapping[str, Fill], source, placement: Mapping[str, torch.device], dtype: torch.dtype,
              processing: Processing, rotary: Optional[tuple[Tensor, float]] = None, progress: bool = True):
    """Fill the skeleton ``model`` part by part (read, process, cast, place) and set its rotary frequencies."""
    from tqdm.auto import tqdm

    by_part: dict[str, list[Fill]] = defaultdict(list)
    for fill in plan.values():
        by_part[part_of(fill.target)].append(fill)
    work = working_dtype(dtype, processing)
    for part in tqdm(weight_parts(model), desc="Converting", unit="part", disable=None if progress else True):
        fills = by_part.pop(part, [])
        for fill in fills:
            _set(model, fill.target, fill.read(source, work, placement[part]))
        process_part(model, part, processing)
        for fill in fills:
            value = _get(model, fill.target)
            if value is not None:  # processing drops folded norms
                _set(model, fill.target, value.detach().to(device=placement[part], dtype=dtype))
    if by_part:
        raise RuntimeError(f"parameters outside every part: {sorted(by_part)}")
    _set_rotary(model, rotary, placement["embed"])
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"conversion left these tensors unfilled: {left}")
    model.cfg = model.cfg.replace(device=placement["embed"], dtype=dtype,
                                  normalization_type=processing.normalization_type(model.cfg.normalization_type))
    return model


def _get(model, name: str) -> Optional[Tensor]:
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attr)


def _set(model, name: str, value: Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, nn.Parameter(value, requires_grad=True))


def _set_rotary(model, rotary: Optional[tuple[Tensor, float]], device: torch.device) -> None:
    """The rotary frequencies from the config (``rotary``; None: the default rope), and the local layers' default
    rope (Gemma 3's ``rotary_base_local``)."""
    if model.rotary is None:
        return
    inv_freq, scaling = rotary if rotary is not None else (model.rotary.default_inv_freq(), 1.0)
    model.rotary.inv_freq = inv_freq.detach().to(device=device, dtype=torch.float32)
    model.rotary.attention_scaling = float(scaling)
    if getattr(model, "rotary_local", None) is not None:
        model.rotary_local.inv_freq = model.rotary_local.default_inv_freq(device=device)


def build_model(cls, cfg, processor, source, rules, ignore, family: str, *, dtype: torch.dtype, processing: Processing,
          placement_fn, rotary: Optional[tuple[Tensor, float]] = None, progress: bool = True):
    """Skeleton, strict plan, then :func:`fill_from`. ``placement_fn(skeleton) -> {part: device}``."""
    model = skeleton(cls, cfg, processor)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    plan = plan_strict(shapes, source, rules, ignore, family=family)
    return fill_from(model, plan, source, placement_fn(model), dtype, processing, rotary, progress)
