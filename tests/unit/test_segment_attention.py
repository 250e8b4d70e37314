"""Qwen2.5-VL's windowed vision attention, run window by window (mm_lens/components/segment_attention.py): the
cached ``hook_attn_scores`` / ``hook_pattern`` of every vision layer equal a dense masked softmax written here
from the cached rotated queries and keys, with the windows taken from Hugging Face's ``get_vision_window_index``
(two images of different grids in one batch: windows of two sizes, padding); hooks that edit the dense maps drive
the output as on the dense path; gradients flow through the dense maps."""

import pytest
import torch
from transformers.vision_utils import get_vision_window_index

from mm_lens import HookedVLM
from mm_lens.components.attention import Attention
from mm_lens.components.segment_attention import SegmentMask
from mm_lens.testing import random_image
from mm_lens.testing_qwen import tiny_qwen_vl
from tests.conftest import NO_PROCESSING

TWO = ("<|im_start|> user <|vision_start|><|image_pad|><|vision_end|> and <|vision_start|><|image_pad|><|vision_end|>"
       " what is the color of the circle ? <|im_end|>")
SIZES = [(40, 48), (70, 90)]  # 4x6 and 8x12 patches: windows of 16 and 8 patches, the first image padded


@pytest.fixture(scope="module")
def qwen25():
    hf, processor = tiny_qwen_vl("2.5", seed=3, vision_layers=3, full_attention=(1,))
    model = HookedVLM.from_hf(hf, processor, device="cpu", **NO_PROCESSING)
    images = [random_image(1, size=SIZES[0]), random_image(2, size=SIZES[1])]
    enc = processor(images=images, text=TWO, return_tensors="pt")
    return hf, model, model.to_inputs(images, TWO), enc


def reference_windows(hf, enc) -> list[torch.Tensor]:
    """Each image's window id per patch (processor order), from Hugging Face's window index."""
    vc = hf.config.vision_config
    grid = enc["image_grid_thw"]
    index, cu = get_vision_window_index(grid, vc.spatial_merge_size, vc.window_size, vc.patch_size)
    unit = vc.spatial_merge_size ** 2
    patch_order = (index[:, None] * unit + torch.arange(unit)).flatten()  # window order -> processor order
    cu = torch.unique_consecutive(torch.as_tensor(cu))
    window = torch.empty(len(patch_order), dtype=torch.long)
    window[patch_order] = torch.searchsorted(cu, torch.arange(len(patch_order)), right=True) - 1
    counts = [int(t * h * w) for t, h, w in grid]
    return list(torch.split(window, counts))


def dense_reference(q, k, windows, full: bool, scale: float):
    """Scores and pattern ``[image, head, q, k]`` of a dense masked softmax: a real patch sees the real patches of
    its window (of its image when ``full``), a padding patch only itself; -inf / 0 elsewhere."""
    n_images, n = q.shape[:2]
    allowed = torch.zeros(n_images, n, n, dtype=torch.bool)
    for i, w in enumerate(windows):
        k_i = len(w)
        allowed[i, :k_i, :k_i] = True if full else (w[:, None] == w[None, :])
    allowed |= torch.eye(n, dtype=torch.bool)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores, torch.softmax(scores, dim=-1)


def run_tower(model, inputs, hooks=(), names=lambda name: name.startswith("vision_encoder.blocks")):
    with model.hooks(fwd_hooks=list(hooks)):
        _, cache = model.run_with_cache(inputs, names_filter=names)
    return cache


def test_scores_and_patterns_equal_a_dense_masked_softmax(qwen25, monkeypatch):
    hf, model, inputs, enc = qwen25
    spread = []
    original = SegmentMask.spread
    monkeypatch.setattr(SegmentMask, "spread", lambda self, *a: spread.append(1) or original(self, *a))
    cache = run_tower(model, inputs)
    windows = reference_windows(hf, enc)
    assert [len(w) for w in windows] == [24, 96] and len(set(windows[0].tolist())) == 2
    cfg = model.cfg.vision
    assert spread == [1, 1] * (cfg.n_layers - len(cfg.full_attention_layers))  # the windowed layers ran packed
    for layer in range(cfg.n_layers):
        attn = f"vision_encoder.blocks.{layer}.attn."
        q, k = cache[attn + "hook_rot_q"], cache[attn + "hook_rot_k"]
        scores, pattern = dense_reference(q, k, windows, layer in cfg.full_attention_layers, cfg.d_head ** -0.5)
        ours_scores, ours_pattern = cache[attn + "hook_attn_scores"], cache[attn + "hook_pattern"]
        assert ours_scores.shape == ours_pattern.shape == (2, cfg.n_heads, 96, 96)
        assert torch.equal(torch.isinf(ours_scores), torch.isinf(scores))  # masked entries: -inf
        assert torch.equal(ours_pattern == 0, pattern == 0)  # masked entries: exactly 0
        finite = torch.isfinite(scores)
        torch.testing.assert_close(ours_scores[finite], scores[finite], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours_pattern, pattern, rtol=1e-6, atol=1e-6)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, cache[attn + "hook_v"])
        torch.testing.assert_close(cache[attn + "hook_z"], z, rtol=1e-5, atol=1e-6)
    assert bool((ours_pattern[0, :, 30, 30] == 1).all())  # padding attends to itself alone


def test_a_cache_alone_keeps_the_packed_path(qwen25, monkeypatch):
    _, model, inputs, _ = qwen25
    dense = []
    original = Attention._eager
    monkeypatch.setattr(Attention, "_eager", lambda self, *a: dense.append(1) or original(self, *a))
    run_tower(model, inputs, names=lambda name: name.startswith("vision_encoder.blocks.0.attn"))
    assert dense == []


def dense_path(monkeypatch):
    monkeypatch.setattr(SegmentMask, "packing_saves_work", lambda self, device: False)


def edit_in_place(tensor, hook):
    tensor[:, 1, :, :5] = 0.25


def edit_returned(tensor, hook):
    out = tensor.clone()
    out[:, 1, 3, 40:] = 0.5  # outside the windows too
    return out


@pytest.mark.parametrize("edit", [edit_in_place, edit_returned], ids=["in_place", "returned"])
@pytest.mark.parametrize("hook", ["hook_attn_scores", "hook_pattern"])
def test_edited_scores_and_patterns_drive_the_output(qwen25, monkeypatch, hook, edit):
    """An edit of the dense map changes the tower's output exactly as on the dense path."""
    _, model, inputs, _ = qwen25
    name = f"vision_encoder.blocks.0.attn.{hook}"
    out = "vision_encoder.blocks.2.hook_resid_post"
    plain = run_tower(model, inputs, names=[out])[out]
    edited = run_tower(model, inputs, [(name, edit)], names=[name, out])
    with monkeypatch.context() as m:
        dense_path(m)
        reference = run_tower(model, inputs, [(name, edit)], names=[name, out])
    assert not torch.allclose(edited[out], plain, atol=1e-3)
    torch.testing.assert_close(edited[out], reference[out], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", ["retain_grad", "backward_hook"])
def test_gradients_reach_the_dense_pattern(qwen25, how):
    """While autograd records, the dense pattern drives the output: its gradient (read by ``retain_grad`` in a forward
    hook, or by a backward hook) covers every entry, masked ones included, and is zero outside the rows the loss
    reads."""
    _, model, inputs, enc = qwen25
    seen = {}
    name = "vision_encoder.blocks.2.attn.hook_pattern"  # the last layer: the loss reads rows :5 of image 1
    hooks = dict(fwd_hooks=[(name, lambda t, hook: seen.setdefault("pattern", t).retain_grad())]) \
        if how == "retain_grad" else dict(bwd_hooks=[(name, lambda g, hook: seen.setdefault("grad", g))])
    with torch.enable_grad():
        pixels = inputs.pixel_values.clone().requires_grad_(True)
        with model.hooks(**hooks):
            out = model.vision_encoder(pixels, [(int(h), int(w)) for _, h, w in enc["image_grid_thw"]])
            out[1, :5].sum().backward()
    g = seen["pattern"].grad if how == "retain_grad" else seen["grad"]
    assert g.shape == (2, model.cfg.vision.n_heads, 96, 96)
    assert bool(g[1, :, :5].ne(0).all())
    assert not bool(g[1, :, 5:].any()) and not bool(g[0].any())
