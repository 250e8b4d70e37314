"""How much memory an activation cache needs, worked out from the config and the input's shape.

:func:`hook_shapes` gives the shape of every activation one forward passes through a hook
(language model, vision tower, projector; a family's image pipeline gives its own image side);
:func:`cache_bytes` sums those a ``names_filter`` keeps, per device; :func:`check_cache_fits` raises a
ValueError with the numbers instead of letting a CUDA device run out of memory half-way through ``run_with_cache``.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from mm_lens.weights import part_of

LANGUAGE_WIDE = ("hook_resid_pre", "hook_attn_out", "hook_mlp_in", "hook_mlp_out", "hook_resid_post")


def block_shapes(rows: int, pos: int, d_model: int, n_heads: int, n_kv: int, d_head: int, d_mlp: int, *,
                 rotary: bool, gated: bool, parallel: bool, attn_result: bool, post_norms: bool = False,
                 qk_norm: bool = False) -> dict[str, tuple[int, ...]]:
    """Hook suffix -> activation shape for one block over ``rows`` sequences of ``pos`` positions."""
    wide = (rows, pos, d_model)
    out = {name: wide for name in LANGUAGE_WIDE}
    if not parallel:
        out["hook_resid_mid"] = wide
    for ln in ("ln1", "ln2") + (("ln1_post", "ln2_post") if post_norms else ()):
        out[f"{ln}.hook_scale"], out[f"{ln}.hook_normalized"] = (rows, pos, 1), wide
    heads, kv = (rows, pos, n_heads, d_head), (rows, pos, n_kv, d_head)
    if qk_norm:
        for norm, shape in (("attn.q_norm", heads), ("attn.k_norm", kv)):
            out[f"{norm}.hook_scale"], out[f"{norm}.hook_normalized"] = (*shape[:3], 1), shape
    out.update({"attn.hook_q": heads, "attn.hook_k": kv, "attn.hook_v": kv, "attn.hook_z": heads,
                "attn.hook_attn_scores": (rows, n_heads, pos, pos), "attn.hook_pattern": (rows, n_heads, pos, pos)})
    if rotary:
        out["attn.hook_rot_q"], out["attn.hook_rot_k"] = heads, kv
    if attn_result:
        out["attn.hook_result"] = (rows, pos, n_heads, d_model)
    out["mlp.hook_pre"] = out["mlp.hook_post"] = (rows, pos, d_mlp)
    if gated:
        out["mlp.hook_pre_linear"] = (rows, pos, d_mlp)
    return out


def hook_shapes(model, inputs, start_at_layer: Optional[int] = None, stop_at_layer: Optional[int] = None
                ) -> dict[str, tuple[int, ...]]:
    """Every hook a forward on ``inputs`` (a :class:`MultimodalInput`) fires, with its activation's shape."""
    cfg = model.cfg
    batch, pos = inputs.shape
    out: dict[str, tuple[int, ...]] = {}
    if start_at_layer is None:
        out["hook_embed"] = (batch, pos, cfg.d_model)
        if inputs.pixel_values is not None and cfg.vision is not None:
            pipeline = getattr(model, "image_pipeline", None)
            out.update(pipeline.hook_shapes(model, inputs) if pipeline is not None else
                       tower_shapes(model, inputs.pixel_values.shape[0]))
    layers = range(cfg.n_layers)[start_at_layer:stop_at_layer]
    per_block = block_shapes(batch, pos, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_mlp,
                             rotary=model.rotary is not None, gated=cfg.gated_mlp, parallel=cfg.parallel_attn_mlp,
                             attn_result=cfg.use_attn_result, post_norms=cfg.use_normalization_before_and_after,
                             qk_norm=cfg.use_qk_norm)
    out.update({f"blocks.{l}.{k}": v for l in layers for k, v in per_block.items()})
    out.update({f"blocks.{l}.hook_visual_in": (batch, pos, cfg.d_model) for l in layers
                if l < getattr(model, "n_deepstack", 0)})  # Qwen3-VL's DeepStack layers
    if stop_at_layer is None:
        out["ln_final.hook_scale"], out["ln_final.hook_normalized"] = (batch, pos, 1), (batch, pos, cfg.d_model)
    return model.sae_hook_shapes(out) if hasattr(model, "sae_hook_shapes") else out  # SAEs spliced in (mm_lens.sae)


def tower_shapes(model, n: int) -> dict[str, tuple[int, ...]]:
    """LLaVA's fixed-size vision tower (only the blocks the selected features need) and projector on ``n`` images
    or crops."""
    cfg, vision = model.cfg, model.cfg.vision
    out = {"vision_encoder.hook_embed": (n, vision.n_ctx, vision.d_model),
           "vision_encoder.hook_pos_embed": (n, vision.n_ctx, vision.d_model)}
    if vision.has_ln_pre:
        out["vision_encoder.ln_pre.hook_scale"] = (n, vision.n_ctx, 1)
        out["vision_encoder.ln_pre.hook_normalized"] = (n, vision.n_ctx, vision.d_model)
    per_block = block_shapes(n, vision.n_ctx, vision.d_model, vision.n_heads, vision.n_heads, vision.d_head,
                             vision.d_mlp, rotary=False, gated=False, parallel=False, attn_result=False)
    n_run = max(l % (vision.n_layers + 1) for l in cfg.feature_layers)
    out.update({f"vision_encoder.blocks.{l}.{k}": v for l in range(n_run) for k, v in per_block.items()})
    tokens, proj = cfg.n_image_tokens, cfg.projector
    out["vision_projector.hook_in"] = (n, vision.n_patches if proj.kind == "pooled" else tokens, proj.d_in)
    if proj.kind == "mlp2x_gelu":
        out["vision_projector.hook_hidden"] = (n, tokens, proj.d_out)
    if proj.kind == "pooled":
        out["vision_projector.hook_pooled"] = (n, tokens, proj.d_in)
        out.update({f"vision_projector.norm.{k}": (n, tokens, d) for k, d in (("hook_scale", 1),
                                                                              ("hook_normalized", proj.d_in))})
    out["vision_projector.hook_out"] = (n, tokens, proj.d_out)
    return out


def as_filter(names_filter) -> Callable[[str], bool]:
    """TransformerLens' ``names_filter`` conventions: None (all), a name, a list of names, or a function."""
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if isinstance(names_filter, (list, tuple, set)):
        return lambda name: name in names_filter
    if callable(names_filter):
        return names_filter
    raise ValueError("names_filter must be a string, a list of strings, or a function")


def cache_bytes(model, inputs, names_filter=None, device=None, **layers) -> dict[torch.device, int]:
    """Bytes of the activations ``run_with_cache(inputs, names_filter=..., device=...)`` would keep, per device
    (each part's own device unless ``device`` is given)."""
    keep = as_filter(names_filter)
    size = torch.empty(0, dtype=model.cfg.dtype).element_size()
    devices = model.device_map or {}
    out: dict[torch.device, int] = {}
    for name, shape in hook_shapes(model, inputs, **layers).items():
        if keep(name):
            where = torch.device(device) if device is not None else devices.get(part_of(name), model.cfg.device)
            width = max(size, 4) if name.endswith("hook_scale") else size  # norms scale in float32 (half inputs)
            out[where] = out.get(where, 0) + width * _numel(shape)
    return out


def _numel(shape) -> int:
    total = 1
    for d in shape:
        total *= d
    return total


def free_bytes(device: torch.device) -> Optional[int]:
    """Memory a CUDA device can still give this process (free plus what PyTorch holds unused); None elsewhere."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def human(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_cache_fits(model, inputs, names_filter=None, device=None, **layers) -> None:
    """A ValueError with the numbers when the requested cache (plus the logits) cannot fit on a device."""
    devices = {torch.device(device)} if device is not None else {p.device for p in model.parameters()}
    if all(free_bytes(d) is None for d in devices | {model.unembed.W_U.device}):
        return  # nothing to check off CUDA devices
    need = cache_bytes(model, inputs, names_filter, device, **layers)
    batch, pos = inputs.shape
    logits_device = torch.device(model.unembed.W_U.device)
    size = torch.empty(0, dtype=model.cfg.dtype).element_size()
    need[logits_device] = need.get(logits_device, 0) + batch * pos * model.cfg.d_vocab * size
    for where, n in need.items():
        free = free_bytes(where)
        if free is not None and n > free:
            raise ValueError(
                f"run_with_cache would keep ~{human(n)} of activations and logits on {where} (batch {batch} x {pos}"
                f" positions, {'every hook' if names_filter is None else 'the hooks names_filter keeps'}), but only "
                f"{human(free)} is free there. Cache fewer hooks with names_filter (e.g. "
                "names_filter=lambda name: name.endswith('hook_resid_post')), keep the cache on the host with "
                "device='cpu', or use a shorter input or a smaller batch"
            )
