"""Strict at the checkpoint: a missing, unexpected or mis-shaped tensor in the files is a ValueError that lists
every one of them, raised from the files' headers before any tensor is read (Hugging Face's loader would
random-initialise a missing weight with only a warning)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from mm_lens import HookedVLM
from mm_lens.conversion.checkpoint import SafetensorsFolder
from mm_lens.testing import tiny_llava_towers
from tests.conftest import NO_PROCESSING
from tests.parity.test_llava_original_parity import write_original_layout

# key names as transformers saves them (the hub's LLaVA layout)
MISSING = "language_model.model.layers.1.mlp.up_proj.weight"
EXTRA = "language_model.model.layers.0.self_attn.extra.weight"
RESHAPED = "multi_modal_projector.linear_2.weight"


@pytest.fixture(scope="module")
def tiny():
    return tiny_llava_towers("llama", "clip", seed=6)


def _edit_checkpoint(folder, drop=(), add=None, reshape=()):
    """Rewrite ``folder``'s one safetensors file with tensors dropped, added and reshaped."""
    path = folder / "model.safetensors"
    state = load_file(str(path))
    for key in drop:
        del state[key]
    state.update(add or {})
    for key in reshape:
        state[key] = state[key].reshape(-1, 4).contiguous()
    save_file(state, str(path), metadata={"format": "pt"})


@pytest.fixture
def folder(tmp_path, tiny):
    hf, processor = tiny
    hf.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    return tmp_path


def test_untouched_checkpoint_loads(folder):
    HookedVLM.from_pretrained(str(folder), device="cpu")


def test_every_problem_is_listed_before_anything_is_read(folder, monkeypatch):
    _edit_checkpoint(folder, drop=[MISSING], add={EXTRA: torch.zeros(3)}, reshape=[RESHAPED])
    reads = []
    original = SafetensorsFolder.__getitem__
    monkeypatch.setattr(SafetensorsFolder, "__getitem__", lambda self, key: reads.append(key) or original(self, key))
    with pytest.raises(ValueError) as err:
        HookedVLM.from_pretrained(str(folder), device="cpu")
    msg = str(err.value)
    assert f"missing source key {MISSING!r} (for blocks.1.mlp.W_in)" in msg
    assert "unexpected source keys" in msg and EXTRA in msg
    assert "shape mismatch for vision_projector.W_out" in msg and RESHAPED in msg
    assert reads == []


@pytest.mark.parametrize("problem", ["missing", "extra", "reshaped"])
def test_each_problem_alone(folder, problem):
    edits = dict(missing=dict(drop=[MISSING]), extra=dict(add={EXTRA: torch.zeros(3)}), reshaped=dict(reshape=[RESHAPED]))
    _edit_checkpoint(folder, **edits[problem])
    expected = dict(missing=MISSING, extra=EXTRA, reshaped=RESHAPED)[problem]
    with pytest.raises(ValueError, match="cannot convert this LlavaForConditionalGeneration checkpoint") as err:
        HookedVLM.from_pretrained(str(folder), device="cpu", dtype=torch.bfloat16)
    assert expected in str(err.value)


def test_a_head_split_that_cannot_apply_is_reported(folder):
    """A query weight whose rows do not split into heads: the transform's failure is named, not raised raw."""
    key = "language_model.model.layers.0.self_attn.q_proj.weight"
    path = folder / "model.safetensors"
    state = load_file(str(path))
    state[key] = state[key][:-1].contiguous()
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"shape mismatch for blocks.0.attn.W_Q.*q_proj.weight"):
        HookedVLM.from_pretrained(str(folder), device="cpu")


def test_known_buffers_saved_by_older_checkpoints_are_skipped(folder):
    """Llama's ``rotary_emb.inv_freq`` and CLIP's ``position_ids`` are buffers some checkpoints saved."""
    _edit_checkpoint(folder, add={"language_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(6),
                                  "vision_tower.embeddings.position_ids": torch.arange(17)[None]})
    HookedVLM.from_pretrained(str(folder), device="cpu")


def test_original_layout_is_strict_too(tmp_path, tiny):
    """The original LLaVA layout (text folder plus separate CLIP folder) streams through the same check."""
    hf, processor = tiny
    folder, tower = tmp_path / "llava", tmp_path / "clip"
    folder.mkdir(), tower.mkdir()
    write_original_layout(hf, processor, folder, tower)
    HookedVLM.from_pretrained(str(folder), vision_tower=str(tower), device="cpu", **NO_PROCESSING)
    _edit_checkpoint(folder, drop=["model.layers.0.mlp.down_proj.weight"])
    clip = tower / "model.safetensors"
    state = load_file(str(clip))
    state["encoder.layers.1.mlp.fc1.weight"] = state["encoder.layers.1.mlp.fc1.weight"][:, :5]
    save_file({k: v.contiguous() for k, v in state.items()}, str(clip), metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        HookedVLM.from_pretrained(str(folder), vision_tower=str(tower), device="cpu")
    msg = str(err.value)
    assert "model.language_model.layers.0.mlp.down_proj.weight" in msg
    assert "shape mismatch for vision_encoder.blocks.1.mlp.W_in" in msg


def test_pickled_weights_are_refused(tmp_path, tiny):
    hf, processor = tiny
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"no safetensors weights.*pytorch_model.bin.*unpickling"):
        HookedVLM.from_pretrained(str(tmp_path), device="cpu")


def test_index_naming_an_absent_shard(tmp_path, tiny):
    hf, processor = tiny
    hf.save_pretrained(tmp_path, max_shard_size="60KB")
    processor.save_pretrained(tmp_path)
    next(tmp_path.glob("model-*.safetensors")).unlink()
    with pytest.raises(ValueError, match="names shards that are not in the folder"):
        HookedVLM.from_pretrained(str(tmp_path), device="cpu")
