"""open_clip ViT towers against open_clip's own forward (float32, 1e-4): every residual stream,
the pooled image embedding; and the tower used as a HookedVLM's vision encoder."""

import copy

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from mm_lens import HookedVLM  # noqa: E402
from mm_lens.conversion.open_clip_vit import use_open_clip_vision, vision_encoder_from_open_clip  # noqa: E402
from mm_lens.testing import random_image, tiny_llava  # noqa: E402
from tests.conftest import NO_PROCESSING, PROMPT  # noqa: E402
from tests.parity.compare import transpose_heads_  # noqa: E402

ATOL = 1e-4


def _visual(act: str, seed: int = 0):
    from open_clip.transformer import QuickGELU, VisionTransformer

    torch.manual_seed(seed)
    visual = VisionTransformer(image_size=32, patch_size=8, width=32, layers=3, heads=4, mlp_ratio=2.0,
                               output_dim=16, act_layer=QuickGELU if act == "quick_gelu" else torch.nn.GELU).eval()
    with torch.no_grad():  # weights large enough that attention patterns are far from uniform
        for name, p in visual.named_parameters():
            if ".ln_" in name or name.startswith("ln_"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if name.endswith("weight") else p.normal_(0, 0.05)
            elif p.ndim >= 2:
                p.normal_(0, 1.5 / p.shape[-1] ** 0.5)
            else:
                p.normal_(0, 1.0 if "embedding" in name else 0.05)
    return visual


def _resblock_inputs(visual, x):
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, args: seen.append(args[0])) for b in visual.transformer.resblocks]
    try:
        pooled = visual(x)
    finally:
        for h in handles:
            h.remove()
    return pooled, seen


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_hidden_states_and_pooled_embedding(act):
    visual = _visual(act)
    encoder, proj = vision_encoder_from_open_clip(visual)
    x = torch.randn(2, 3, 32, 32)
    pooled, inputs = _resblock_inputs(visual, x)
    ours = encoder.hidden_states(x, list(range(len(inputs))))
    for a, b in zip(ours, inputs):
        b = b if b.shape[0] == 2 else b.transpose(0, 1)  # older open_clip runs blocks sequence-first
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    torch.testing.assert_close(encoder(x)[:, 0] @ proj, pooled, atol=ATOL, rtol=0)
    broken = copy.deepcopy(encoder)
    W = broken.blocks[0].attn.W_Q.data
    transpose_heads_(W)
    assert (broken(x)[:, 0] @ proj - pooled).abs().max() > ATOL


def test_unsupported_tower_is_refused():
    from open_clip.transformer import VisionTransformer

    visual = VisionTransformer(image_size=32, patch_size=8, width=32, layers=1, heads=4, mlp_ratio=2.0,
                               ls_init_value=0.1, output_dim=16)
    with pytest.raises(ValueError, match="LayerScale"):
        vision_encoder_from_open_clip(visual)


def test_as_the_vision_encoder_of_a_hooked_vlm():
    hf, processor = tiny_llava(seed=1, vision_feature_layer=-2)
    model = HookedVLM.from_hf(hf, processor, device="cpu", **NO_PROCESSING)
    visual = _visual("quick_gelu", seed=4)
    use_open_clip_vision(model, visual)
    inputs = model.to_inputs(random_image(1), PROMPT)
    _, blocks_in = _resblock_inputs(visual, inputs.pixel_values)
    feature = blocks_in[-1]  # hidden_states[-2] of a 3-layer tower: the input of its last block
    feature = feature if feature.shape[0] == 1 else feature.transpose(0, 1)
    expected = model.vision_projector(feature[:, 1:])
    _, cache = model.run_with_cache(inputs)
    torch.testing.assert_close(cache["vision_projector.hook_out"], expected, atol=ATOL, rtol=0)
    assert "vision_encoder.blocks.2.attn.hook_pattern" not in cache  # the last block is not needed
    torch.testing.assert_close(cache["hook_embed"][0, inputs.positions.image], expected[0], atol=ATOL, rtol=0)
