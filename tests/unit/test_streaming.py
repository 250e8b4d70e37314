"""Streaming conversion: checkpoints are read one tensor at a time and processed one part at a time; the
Hugging Face model is never built; the rotary frequencies come from the config; dtype is honoured."""

import weakref

import pytest
import torch

import mm_lens.conversion.build as build_module
from mm_lens import HookedVLM
from mm_lens.conversion.checkpoint import SafetensorsFolder
from mm_lens.testing import random_image, tiny_llava, tiny_llava_towers
from mm_lens.weights import part_of
from tests.conftest import NO_PROCESSING, PROMPT


def test_sharded_folder_matches_hf_and_the_in_memory_conversion(sharded, llava_pair, image):
    hf, processor, reference = llava_pair
    model = HookedVLM.from_pretrained(str(sharded), device="cpu", **NO_PROCESSING)
    inputs = model.to_inputs(image, PROMPT)
    enc = processor(images=image, text=PROMPT, return_tensors="pt")
    torch.testing.assert_close(model(inputs), hf(**enc).logits, atol=1e-4, rtol=0)
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name


def test_processing_while_streaming_keeps_log_probs(sharded, llava_pair, image):
    _, _, reference = llava_pair
    model = HookedVLM.from_pretrained(str(sharded), device="cpu")  # TransformerLens' processing, part by part
    assert model.cfg.normalization_type == "RMSPre" and model.blocks[0].ln1.w is None
    inputs = model.to_inputs(image, PROMPT)
    torch.testing.assert_close(model(inputs).log_softmax(-1), reference(inputs).log_softmax(-1), atol=1e-4, rtol=0)


def test_the_hugging_face_model_is_never_built(sharded, monkeypatch, image):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a Hugging Face model was built")

    for cls in (transformers.LlavaForConditionalGeneration, transformers.PreTrainedModel):
        monkeypatch.setattr(cls, "__init__", refuse)
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    model = HookedVLM.from_pretrained(str(sharded), device="cpu")
    assert torch.isfinite(model(model.to_inputs(image, PROMPT))).all()


def test_one_tensor_and_one_part_at_a_time(sharded, monkeypatch):
    """No tensor read from the files outlives its conversion, and float32 working copies exist for one part
    at a time only (the rest of the model is either still on the meta device or already cast)."""
    alive, seen = [], []
    models = []
    original_skeleton = build_module.skeleton
    monkeypatch.setattr(build_module, "skeleton", lambda *a: models.append(original_skeleton(*a)) or models[-1])
    original_getitem = SafetensorsFolder.__getitem__

    def spying_getitem(self, key):
        alive[:] = [r for r in alive if r() is not None]
        working = {part_of(n) for n, p in models[0].named_parameters() if not p.is_meta and p.dtype == torch.float32}
        seen.append((key, len(alive), working))
        tensor = original_getitem(self, key)
        alive.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(SafetensorsFolder, "__getitem__", spying_getitem)
    HookedVLM.from_pretrained(str(sharded), device="cpu", dtype=torch.bfloat16)
    assert len(seen) > 50
    assert max(n for _, n, _ in seen) == 0, "a tensor read earlier was still alive"
    assert max(len(parts) for _, _, parts in seen) <= 1, [p for _, _, p in seen if len(p) > 1][:3]


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", "torch.float16", "auto"])
def test_dtype_honoured_end_to_end(sharded, dtype, image):
    model = HookedVLM.from_pretrained(str(sharded), device="cpu", dtype=dtype)
    expected = {"bfloat16": torch.bfloat16, "torch.float16": torch.float16, "auto": torch.float32}.get(dtype, dtype)
    assert {p.dtype for p in model.parameters()} == {expected}
    assert model.cfg.dtype == expected and model.rotary.inv_freq.dtype == torch.float32
    assert model(model.to_inputs(image, PROMPT)).dtype == expected


def test_dtype_auto_reads_the_checkpoint(tmp_path, llava_pair):
    hf, processor, _ = llava_pair
    import copy

    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert HookedVLM.from_pretrained(str(tmp_path), device="cpu", dtype="auto").cfg.dtype == torch.bfloat16


def test_bad_dtype_names(sharded):
    with pytest.raises(ValueError, match=r"unknown dtype 'bfloat17'.*bfloat16"):
        HookedVLM.from_pretrained(str(sharded), device="cpu", dtype="bfloat17")
    with pytest.raises(TypeError, match="floating-point"):
        HookedVLM.from_pretrained(str(sharded), device="cpu", dtype=torch.int8)


@pytest.mark.parametrize("cast", ["half", "bfloat16", "float", "to"])
def test_casts_keep_cfg_in_step(llava_pair, cast):
    import copy

    model = copy.deepcopy(llava_pair[2])
    out = model.to(torch.float64) if cast == "to" else getattr(model, cast)()
    expected = dict(half=torch.float16, bfloat16=torch.bfloat16, float=torch.float32, to=torch.float64)[cast]
    assert out is model and model.cfg.dtype == expected and model.W_Q.dtype == expected
    assert model.rotary.inv_freq.dtype == torch.float32 and model.cfg.device == torch.device("cpu")


@pytest.mark.parametrize("rope", [dict(rope_type="linear", factor=2.0),
                                  dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=64)])
def test_rotary_scaling_from_the_config(rope, tmp_path):
    """Scaled rope types take their frequencies from transformers' own rope initialisation (no model needed)."""
    from transformers import LlavaForConditionalGeneration

    hf, processor = tiny_llava(seed=4)
    cfg = hf.config
    cfg.text_config.rope_parameters = {**rope, "rope_theta": 10000.0}
    scaled = LlavaForConditionalGeneration(cfg).eval()
    scaled.load_state_dict(hf.state_dict())
    scaled.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model = HookedVLM.from_pretrained(str(tmp_path), device="cpu", **NO_PROCESSING)
    hf_rotary = scaled.model.language_model.rotary_emb
    torch.testing.assert_close(model.rotary.inv_freq, hf_rotary.inv_freq)
    assert not torch.allclose(model.rotary.inv_freq, model.rotary.default_inv_freq())
    image = random_image(1)
    enc = processor(images=image, text=PROMPT, return_tensors="pt")
    torch.testing.assert_close(model(model.to_inputs(image, PROMPT)), scaled(**enc).logits, atol=1e-4, rtol=0)


def test_from_hf_leaves_the_hugging_face_model_untouched(image):
    """Processing works on copies: the user's model in memory is not modified."""
    hf, processor = tiny_llava_towers("phi", "clip", seed=2)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    HookedVLM.from_hf(hf, processor, device="cpu")  # every processing step on
    for k, v in hf.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_processing_is_done_in_float32_then_cast(sharded):
    """As TransformerLens: a model loaded in bf16 holds exactly the float32-processed weights, rounded once."""
    wide = HookedVLM.from_pretrained(str(sharded), device="cpu", dtype=torch.float32)
    narrow = HookedVLM.from_pretrained(str(sharded), device="cpu", dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(wide.named_parameters(), narrow.named_parameters()):
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_whole_stack_helpers_equal_process_weights():
    """The stack-wide helpers (kept for callers of the earlier API) are the per-part functions in a loop."""
    import copy

    from mm_lens import weights as W

    hf, processor = tiny_llava_towers("phi", "clip", seed=2)  # LayerNorm: every step applies
    model = HookedVLM.from_hf(hf, processor, device="cpu", **NO_PROCESSING)
    by_parts = copy.deepcopy(model).process_weights()
    W.fold_layer_norm(model.blocks, model.ln_final, model.unembed)
    W.fold_layer_norm(model.vision_encoder.blocks)
    W.center_writing_weights(model)
    W.center_unembed(model.unembed)
    W.fold_value_biases(model.blocks)
    for (name, a), (_, b) in zip(by_parts.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
