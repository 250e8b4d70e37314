"""HookedTransformer's token interface and config fields on HookedVLM, as TransformerLens code calls them, and
TransformerLens utility functions run on the model (with transformer-lens 3 and 4: `make test-tl4`)."""

import copy
import warnings

import numpy as np
import pytest
import torch
from transformer_lens import ActivationCache, head_detector, patching
from transformer_lens.utilities import get_attention_mask, get_device_for_block_index, lm_cross_entropy_loss, test_prompt

from mm_lens import load_toy
from mm_lens.toy import data

TEXTS = ["USER: what color is the circle ? ASSISTANT:", "USER: where is it ? ASSISTANT:"]
test_prompt.__test__ = False  # TransformerLens' function, not a test of this file


@pytest.fixture(scope="module")
def toy():
    return load_toy(device="cpu")


@pytest.fixture(scope="module")
def example():
    return data.make_examples(4, seed=3, kinds=("color",))[1]


@pytest.fixture(scope="module")
def hooked_transformer(toy):
    """TransformerLens' HookedTransformer with the same tokenizer: the reference for tokenization (TL 3 only)."""
    tl = pytest.importorskip("transformer_lens.HookedTransformer")
    from transformer_lens import HookedTransformerConfig

    c = toy.cfg
    cfg = HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=c.n_ctx, d_head=4, n_heads=4, d_vocab=c.d_vocab,
                                  attn_only=True, act_fn="relu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tl.HookedTransformer(cfg, tokenizer=copy.deepcopy(toy.tokenizer))


@pytest.mark.parametrize("kwargs", [{}, dict(prepend_bos=False), dict(prepend_bos=True), dict(padding_side="left"),
                                    dict(padding_side="right", prepend_bos=False)])
def test_tokens_equal_transformer_lens(toy, hooked_transformer, kwargs):
    for text in (TEXTS[0], TEXTS):
        expected = hooked_transformer.to_tokens(text, **kwargs)
        assert torch.equal(toy.to_tokens(text, **kwargs), expected)
        strings = hooked_transformer.to_str_tokens(text, **{k: v for k, v in kwargs.items() if k == "prepend_bos"})
        assert toy.to_str_tokens(text, **{k: v for k, v in kwargs.items() if k == "prepend_bos"}) == strings
    for mode in ("first", "last"):
        assert toy.get_token_position("?", TEXTS[0], mode=mode, **kwargs) == \
            hooked_transformer.get_token_position("?", TEXTS[0], mode=mode, **kwargs)
    assert toy.all_head_labels() == [f"L{l}H{h}" for l in range(3) for h in range(4)]


def test_tokens_follow_the_tokenizer_convention(toy):
    assert toy.cfg.tokenizer_prepends_bos is True and toy.cfg.default_prepend_bos is True
    bos, pad = toy.tokenizer.bos_token_id, toy.tokenizer.pad_token_id
    tokens = toy.to_tokens(TEXTS)  # TransformerLens' side: the tokenizer's (LLaVA's pad on the left), else right
    assert toy.tokenizer.padding_side == "left" and tokens[1, 0] == pad and tokens[1, 2] == bos
    right = toy.to_tokens(TEXTS, padding_side="right")
    assert (right[:, 0] == bos).all() and right[1, -1] == pad and right[0, -1] != pad
    assert torch.equal(toy.to_tokens(TEXTS[0], prepend_bos=False), tokens[:1, 1:])
    long = " ".join(["what"] * 300)
    with pytest.warns(UserWarning, match="truncated to the context window"):
        assert toy.to_tokens(long).shape == (1, toy.cfg.n_ctx)
    assert toy.to_tokens(long, truncate=False, move_to_device=False).shape == (1, 301)
    with pytest.raises(TypeError, match="prepend_bos must be"):
        toy.to_tokens(TEXTS[0], prepend_bos="yes")


def test_a_tokenizer_without_bos_gets_one_only_when_asked(toy, example):
    from tokenizers import processors

    from mm_lens.tl_compat import tokenizer_fields

    tokenizer = copy.deepcopy(toy.tokenizer)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A")
    model = copy.deepcopy(toy)
    model.tokenizer = tokenizer
    model.cfg = tokenizer_fields(toy.cfg.replace(default_prepend_bos=None, tokenizer_prepends_bos=None), tokenizer)
    assert model.cfg.tokenizer_prepends_bos is False and model.cfg.default_prepend_bos is False
    plain = model.to_tokens(TEXTS[0])
    with_bos = model.to_tokens(TEXTS[0], prepend_bos=True)
    assert plain[0, 0] != tokenizer.bos_token_id and torch.equal(with_bos[:, 1:], plain)
    assert with_bos[0, 0] == tokenizer.bos_token_id
    torch.testing.assert_close(model(TEXTS[0], prepend_bos=True), toy(TEXTS[0]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="adds no BOS"):
        model(example.image, example.prompt, prepend_bos=True)


def test_forward_reads_text_and_padded_token_ids_as_transformer_lens(toy):
    torch.testing.assert_close(toy(TEXTS[0], prepend_bos=False), toy(toy.to_tokens(TEXTS[0], prepend_bos=False)))
    alone = [toy(toy.to_tokens(t)) for t in TEXTS]
    right = toy(toy.to_tokens(TEXTS, padding_side="right"))  # the real positions need no mask
    left_tokens = toy.to_tokens(TEXTS)  # the tokenizer's side: left
    mask = get_attention_mask(toy.tokenizer, left_tokens, prepend_bos=True, padding_side="left")
    assert mask[1, :2].sum() == 0 and mask[0].all()
    left = toy(left_tokens, attention_mask=mask)
    n = alone[1].shape[1]
    torch.testing.assert_close(right[1, :n], alone[1][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(left[1, -n:], alone[1][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(left[0], alone[0][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(toy(left_tokens), left)  # without a mask, inferred as TransformerLens does
    read_padding = toy(left_tokens, attention_mask=torch.ones_like(left_tokens))
    assert (read_padding[1, -n:] - alone[1][0]).abs().max() > 1e-3
    loss = toy(left_tokens, attention_mask=mask, return_type="loss", loss_per_token=True)
    assert loss.shape == (2, left_tokens.shape[1] - 1) and (loss[1, :left_tokens.shape[1] - n] == 0).all()
    with pytest.raises(TypeError, match="attention_mask goes with token ids"):
        toy(TEXTS[0], attention_mask=mask[:1])


def test_str_tokens_of_ids_and_of_inputs(toy, example):
    ids = toy.to_tokens(TEXTS)
    words = ["<s>"] + TEXTS[0].split()
    assert toy.to_str_tokens(ids[0].tolist()) == words
    assert toy.to_str_tokens(ids[:1]) == toy.to_str_tokens(ids[0]) == toy.to_str_tokens(ids[0].numpy()) == words
    both = toy.to_str_tokens(ids)
    assert both[0] == words and both[1][:5] == ["<pad>", "<pad>", "<s>", "USER:", "where"]
    assert toy.to_str_tokens(TEXTS) == [toy.to_str_tokens(t) for t in TEXTS]
    assert toy.to_single_str_token(int(ids[0, 3])) == "color"
    inputs = toy.to_inputs(example.image, example.prompt)
    labels = toy.to_str_tokens(inputs)
    assert toy.to_str_tokens(example.image, example.prompt) == labels and labels[2] == "<img 0,0>"
    assert toy.get_token_position("color", inputs) == labels.index("color")
    with pytest.raises(ValueError, match="does not occur"):
        toy.get_token_position("square", TEXTS[0])
    with pytest.raises(TypeError, match="one token id"):
        toy.to_single_str_token("red")


def test_generate_text_only(toy):
    out = toy.generate("USER: what", max_new_tokens=2)
    assert isinstance(out, str) and out.startswith("USER: what") and len(out.split()) == 4


def test_cfg_has_the_fields_transformer_lens_reads(toy):
    cfg = toy.cfg
    assert (cfg.n_ctx, cfg.d_vocab_out, cfg.positional_embedding_type, cfg.n_devices) == (256, 37, "rotary", 1)
    assert (cfg.default_prepend_bos, cfg.tokenizer_prepends_bos, cfg.default_padding_side) == (True, True, None)
    assert not (cfg.use_hook_tokens or cfg.use_split_qkv_input or cfg.use_hook_mlp_in or cfg.use_attn_in)
    assert cfg.output_logits_soft_cap <= 0 and cfg.attention_dir == "causal"
    d = cfg.to_dict()
    assert d["n_layers"] == 3 and d["vision"] is cfg.vision and d["default_prepend_bos"] is True
    assert get_device_for_block_index(2, cfg) == torch.device("cpu")


def test_transformer_lens_utilities_run_on_the_model(toy, example, capsys):
    test_prompt(TEXTS[0], "red", toy)
    assert "Tokenized prompt: ['<s>', 'USER:', 'what'" in capsys.readouterr().out
    with toy.with_images(example.image):  # TransformerLens' own test_prompt, with the picture
        tokens = toy.to_tokens(example.prompt)
        assert (tokens == toy.cfg.image_token_id).sum() == 9
        torch.testing.assert_close(toy(tokens), toy(toy.to_inputs(example.image, example.prompt)), atol=1e-5, rtol=0)
        test_prompt(example.prompt, example.answer, toy, prepend_space_to_answer=False)
    printed = capsys.readouterr().out
    assert "'<img 1,1>'" in printed and "Rank: 0 " in printed and f"Token: |{example.answer}|" in printed
    with pytest.raises(ValueError, match="with_images"):
        toy(tokens)

    tokens = toy.to_tokens(TEXTS[0])
    logits, cache = toy.run_with_cache(tokens)
    torch.testing.assert_close(lm_cross_entropy_loss(logits, tokens), toy(tokens, return_type="loss"))
    scores = head_detector.detect_head(toy, TEXTS[0], "previous_token_head")
    assert scores.shape == (3, 4) and ((scores >= -1) & (scores <= 1)).all()
    assert isinstance(cache, ActivationCache)
    stack, labels = cache.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
    torch.testing.assert_close(stack.sum(0), cache["blocks.2.hook_resid_post"], atol=1e-4, rtol=0)
    assert labels[:2] == ["L0H0", "L0H1"]
    accumulated = cache.accumulated_resid(layer=2, pos_slice=-1)
    torch.testing.assert_close(accumulated[-1], cache["blocks.1.hook_resid_post"][:, -1])
    heads = patching.get_act_patch_attn_head_out_all_pos(toy, tokens, cache, lambda lg: lg[0, -1, 0])
    torch.testing.assert_close(heads, torch.full((3, 4), float(logits[0, -1, 0])), atol=1e-4, rtol=0)
    mask = get_attention_mask(toy.tokenizer, toy.to_tokens(TEXTS), prepend_bos=True)
    np.testing.assert_array_equal(mask.sum(1).numpy(), [9, 7])
    np.testing.assert_array_equal(toy._as_inputs(toy.to_tokens(TEXTS)).attention_mask.numpy(), mask.numpy())
