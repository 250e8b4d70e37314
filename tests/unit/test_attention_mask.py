"""The attention mask (sliding window, image groups, padding) against Hugging Face's own mask functions, the
eager and SDPA paths against each other, and the softcaps against TransformerLens' definition."""

import pytest
import torch
from transformers.masking_utils import (
    and_masks,
    blockwise_overlay,
    causal_mask_function,
    or_masks,
    padding_mask_function,
    sliding_window_overlay,
)
from transformers.models.gemma3.modeling_gemma3 import get_block_sequence_ids_for_mask

from mm_lens.components.attention import Attention, AttentionMask, image_groups

IS_IMAGE = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 1, 0, 1, 0, 0],
                         [0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
PADDING = torch.tensor([[1] * 12, [0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])


def hugging_face_mask(window):
    """Gemma 3's composition in Hugging Face's mask functions, evaluated on every (batch, query, key)."""
    blocks = get_block_sequence_ids_for_mask(IS_IMAGE.long())
    fn = or_masks(causal_mask_function, blockwise_overlay(blocks))
    if window is not None:
        fn = and_masks(fn, sliding_window_overlay(window))
    fn = and_masks(fn, padding_mask_function(PADDING.bool()))
    n = IS_IMAGE.shape[1]
    idx = torch.arange(n)
    return torch.stack([torch.stack([torch.stack([fn(torch.tensor(b), torch.tensor(0), q, k) for k in idx])
                                     for q in idx]) for b in range(2)])


def test_image_groups_number_as_hugging_face():
    assert torch.equal(image_groups(IS_IMAGE), get_block_sequence_ids_for_mask(IS_IMAGE.long()))


@pytest.mark.parametrize("window", [None, 3, 5])
def test_dense_mask_equals_hugging_face(window):
    mask = AttentionMask(causal=True, key_mask=PADDING.bool(), groups=image_groups(IS_IMAGE))
    ref = hugging_face_mask(window)
    ours = mask.dense(12, 12, torch.device("cpu"), window)[:, 0]
    diagonal = torch.eye(12, dtype=torch.bool)
    assert torch.equal(ours | diagonal, ref | diagonal)  # ours always keeps the diagonal (padded rows stay finite)
    assert torch.equal(ours[~diagonal.expand(2, -1, -1)], ref[~diagonal.expand(2, -1, -1)])
    # a suffix of queries (the fast engine, cached steps) gets the last rows of the same mask
    cpu = torch.device("cpu")
    assert torch.equal(mask.dense(4, 12, cpu, window), mask.dense(12, 12, cpu, window)[:, :, -4:])


def test_first_reader_is_the_start_of_the_image_group():
    mask = AttentionMask(causal=True, groups=image_groups(IS_IMAGE))
    assert [mask.first_reader(p) for p in range(12)] == [0, 1, 1, 1, 3, 5, 6, 6, 8, 9, 9, 9]  # earliest over the rows
    assert AttentionMask(causal=True).first_reader(7) == 7


def test_image_groups_after_a_cache():
    past = image_groups(IS_IMAGE[:, :5])
    whole = image_groups(IS_IMAGE[:, 5:], past)
    assert whole.shape == (2, 12)
    assert torch.equal(whole >= 0, IS_IMAGE)
    assert len(set(whole[0, 6:8].tolist()) & set(whole[0, :5].tolist())) == 0  # new images are new groups
    with pytest.raises(ValueError, match="one forward"):
        image_groups(IS_IMAGE[:, 3:], image_groups(IS_IMAGE[:, :3]))


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("n_q", [12, 5, 1])
def test_eager_equals_sdpa_with_window_groups_and_padding(window, n_q):
    torch.manual_seed(0)
    attn = Attention(16, 4, 8, 2, use_rotary=False, window=window, qk_norm=True, attn_scale=3.0)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 12, 16)
    mask = AttentionMask(causal=True, key_mask=PADDING.bool(), groups=image_groups(IS_IMAGE))
    sdpa = attn(x, mask, n_out=n_q)
    attn.force_eager = True
    torch.testing.assert_close(attn(x, mask, n_out=n_q), sdpa, atol=1e-5, rtol=0)
    attn.window = None if window else 4
    assert (attn(x, mask, n_out=n_q) - sdpa).abs().max() > 1e-4  # the window matters here


def test_softcaps_follow_transformer_lens():
    from transformer_lens.utilities.activation_functions import apply_softcap

    from mm_lens.components import Unembed
    from mm_lens.config import VLMConfig
    from mm_lens.weights import Processing

    torch.manual_seed(1)
    attn = Attention(16, 2, 8, use_rotary=False, softcap=2.0)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.5)
    assert attn.needs_eager()
    seen = {}
    attn.hook_attn_scores.add_hook(lambda t, hook: seen.setdefault("scores", t))
    x = torch.randn(1, 5, 16)
    attn(x, AttentionMask(causal=True))
    q = torch.einsum("bpd,hde->bhpe", x, attn.W_Q) + attn.b_Q[None, :, None]
    k = torch.einsum("bpd,hde->bhpe", x, attn.W_K) + attn.b_K[None, :, None]
    ref = apply_softcap(q @ k.transpose(-1, -2) / 8**0.5, 2.0)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(seen["scores"][0][:, causal], ref[0][:, causal], atol=1e-5, rtol=0)
    unembed = Unembed(16, 10, softcap=3.0)
    torch.nn.init.normal_(unembed.W_U, std=2.0)
    torch.testing.assert_close(unembed(x), apply_softcap(x @ unembed.W_U, 3.0), atol=1e-5, rtol=0)
    cfg = VLMConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_mlp=32, d_vocab=10, output_logits_soft_cap=3.0)
    assert not Processing.resolve(cfg).center_unembed  # not shift-invariant, as TransformerLens refuses it too
