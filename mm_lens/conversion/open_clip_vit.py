"""open_clip ViT towers (``open_clip.transformer.VisionTransformer``, e.g. ``model.visual``) as
HookedVLM vision encoders.

Key table over the tower's own state dict: ``conv1`` (patch embedding, no bias), ``class_embedding``,
``positional_embedding``, ``ln_pre``, ``transformer.resblocks.{l}`` (``ln_1``, ``attn`` as
``nn.MultiheadAttention`` with a fused ``in_proj_weight``, ``ln_2``, ``mlp.c_fc``/``mlp.c_proj``),
``ln_post`` and ``proj`` (the image-embedding projection, returned beside the encoder). Supported:
the class-token pooling CLIP layout; attention pooling, LayerScale, final-LN-after-pool, patch
dropout at run time and other block types are refused by name.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mm_lens.components.vision import VisionEncoder
from mm_lens.config import VisionConfig
from mm_lens.conversion.common import (
    Rule,
    expand,
    load_strict,
    split_heads_bias,
    split_heads_in,
    split_heads_out,
    transpose,
)
from mm_lens.conversion.phi3 import fused_qkv

ARCHITECTURE = "open_clip.VisionTransformer"


def _fused_bias(part: str):
    def fn(t: Tensor, dims) -> Tensor:
        return split_heads_bias(t.chunk(3)["qkv".index(part)], dims)

    fn.__name__ = f"fused_bias[{part}]"
    return fn


def _block_rules() -> list[Rule]:
    b = "transformer.resblocks.{l}."
    rules = [Rule("blocks.{l}.ln1.w", b + "ln_1.weight"), Rule("blocks.{l}.ln1.b", b + "ln_1.bias")]
    for part, target in (("q", "W_Q"), ("k", "_W_K"), ("v", "_W_V")):
        rules.append(Rule(f"blocks.{{l}}.attn.{target}", b + "attn.in_proj_weight", fused_qkv(part, split_heads_in)))
    for part, target in (("q", "b_Q"), ("k", "_b_K"), ("v", "_b_V")):
        rules.append(Rule(f"blocks.{{l}}.attn.{target}", b + "attn.in_proj_bias", _fused_bias(part)))
    return rules + [
        Rule("blocks.{l}.attn.W_O", b + "attn.out_proj.weight", split_heads_out),
        Rule("blocks.{l}.attn.b_O", b + "attn.out_proj.bias"),
        Rule("blocks.{l}.ln2.w", b + "ln_2.weight"), Rule("blocks.{l}.ln2.b", b + "ln_2.bias"),
        Rule("blocks.{l}.mlp.W_in", b + "mlp.c_fc.weight", transpose), Rule("blocks.{l}.mlp.b_in", b + "mlp.c_fc.bias"),
        Rule("blocks.{l}.mlp.W_out", b + "mlp.c_proj.weight", transpose),
        Rule("blocks.{l}.mlp.b_out", b + "mlp.c_proj.bias"),
    ]


VISION_TABLE = [
    Rule("W_patch", "conv1.weight"),
    Rule("cls_token", "class_embedding"),
    Rule("W_pos", "positional_embedding"),
    Rule("ln_pre.w", "ln_pre.weight"), Rule("ln_pre.b", "ln_pre.bias"),
    *_block_rules(),
    Rule("ln_post.w", "ln_post.weight"), Rule("ln_post.b", "ln_post.bias"),
]


def _act_name(visual) -> str:
    act = visual.transformer.resblocks[0].mlp[1]
    name = type(act).__name__
    if name == "QuickGELU":
        return "quick_gelu"
    if name == "GELU":
        return "gelu_pytorch_tanh" if getattr(act, "approximate", "none") == "tanh" else "gelu"
    raise ValueError(f"open_clip activation {name} is not supported; supported: QuickGELU, GELU")


def _refuse_unsupported(visual) -> None:
    problems = []
    if getattr(visual, "attn_pool", None) is not None:
        problems.append("attentional pooling")
    if getattr(visual, "final_ln_after_pool", False):
        problems.append("final_ln_after_pool")
    if getattr(visual, "pool_type", "tok") != "tok":
        problems.append(f"pool_type {visual.pool_type!r}")
    block = visual.transformer.resblocks[0]
    if type(block).__name__ != "ResidualAttentionBlock" or not isinstance(block.attn, torch.nn.MultiheadAttention):
        problems.append(f"block type {type(block).__name__}")
    elif not isinstance(block.ls_1, torch.nn.Identity):
        problems.append("LayerScale (ls_init_value)")
    if visual.ln_pre.__class__.__name__ == "Identity":
        problems.append("no_ln_pre")
    if problems:
        raise ValueError(f"this open_clip tower uses {', '.join(problems)}, which HookedVLM's ViT does not support")


def translate_vision_config(visual) -> VisionConfig:
    _refuse_unsupported(visual)
    block = visual.transformer.resblocks[0]
    image = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    patch = visual.patch_size if isinstance(visual.patch_size, int) else visual.patch_size[0]
    return VisionConfig(
        d_model=visual.transformer.width, n_layers=len(visual.transformer.resblocks), n_heads=block.attn.num_heads,
        d_mlp=block.mlp.c_fc.out_features, image_size=image, patch_size=patch,
        n_channels=visual.conv1.in_channels, act_fn=_act_name(visual), eps=block.ln_1.eps, architecture="open_clip",
    )


def vision_encoder_from_open_clip(visual) -> tuple[VisionEncoder, Optional[Tensor]]:
    """The hooked tower and the image-embedding projection ``proj [d_model, d_embed]`` (None if absent).

    ``encoder.hidden_states(x, [l])`` is the input of resblock ``l``; ``encoder(x)[:, 0] @ proj`` is
    ``visual(x)``.
    """
    cfg = translate_vision_config(visual)
    encoder = VisionEncoder(cfg)
    dims = dict(n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads)
    source = {k: v.detach() for k, v in visual.state_dict().items()}
    rules = [(r, dims) for r in expand(VISION_TABLE, cfg.n_layers, "", "")]
    load_strict(encoder, source, rules, ignore_source=("proj",), family=ARCHITECTURE)
    proj = getattr(visual, "proj", None)
    return encoder.eval(), None if proj is None else proj.detach().clone()


def use_open_clip_vision(model, visual):
    """Put an open_clip tower in place of ``model``'s vision encoder (same width as the projector reads)."""
    encoder, _ = vision_encoder_from_open_clip(visual)
    old = model.cfg.vision
    if old is not None and encoder.cfg.d_model != old.d_model:
        raise ValueError(f"the open_clip tower is {encoder.cfg.d_model} wide but the projector reads "
                         f"{old.d_model}: pick a tower of the projector's input width")
    model.vision_encoder = encoder.to(next(model.parameters()).device)
    model.cfg = model.cfg.replace(vision=encoder.cfg)
    model.setup()
    return model
