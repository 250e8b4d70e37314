import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from constructed import P_COL, P_ROW, PROMPT, copy_head_model, hooked  # noqa: E402

from mm_lens.analysis import patch_ablation_map, visual_token_budget  # noqa: E402
from mm_lens.analysis.token_budget import _example, _losses, choose  # noqa: E402
from mm_lens.testing import random_image  # noqa: E402


def test_choose_strategies():
    assert choose("first", 10, 3).tolist() == [0, 1, 2]
    assert choose("stride", 10, 4).tolist() == [0, 3, 6, 9]
    r = choose("random", 10, 4, seed=1)
    assert len(r.unique()) == 4 and torch.equal(r, choose("random", 10, 4, seed=1))
    assert choose("attention", 5, 2, scores=torch.tensor([0.1, 0.5, 0.0, 0.9, 0.2])).tolist() == [1, 3]
    assert choose("random", 10, 0).numel() == 0
    with pytest.raises(ValueError):
        choose("best", 10, 2)


def test_removing_with_original_positions_equals_masking():
    model = hooked(seed=6)
    inputs = model.to_inputs(random_image(6), "USER: <image>\nwhat is the color of the circle ? ASSISTANT: red circle")
    inputs.meta["answer"] = "red circle"
    ex = _example(model, inputs)
    assert ex.targets.tolist() == [inputs.shape[1] - 2, inputs.shape[1] - 1]
    logits = model(inputs)
    full = -logits[0].log_softmax(-1)[ex.targets - 1, inputs.input_ids[0, ex.targets]].mean()
    for mode in ("remove", "mask"):
        assert float(_losses(model, ex, [torch.arange(16)], mode)[0]) == pytest.approx(float(full), abs=1e-5)
    for k in (8, 3, 0):
        keeps = [choose("random", 16, k, seed=s) for s in range(3)]
        removed, masked = _losses(model, ex, keeps, "remove"), _losses(model, ex, keeps, "mask")
        torch.testing.assert_close(removed, masked, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(removed, full.expand(3), atol=1e-4)


def test_budget_reads_dataset_examples():
    from mm_lens.data import Example

    model = hooked(seed=6)
    examples = [Example(random_image(i), "what is the color of the circle ?", "red") for i in range(2)]
    res = visual_token_budget(model, examples, keep=[16, 4], strategy="stride", mode="mask", progress=False)
    df = res.to_frame()
    assert sorted(df.example.unique()) == [0, 1] and sorted(df.kept.unique()) == [4, 16]
    inputs = examples[1].to_inputs(model, with_answer=True)
    logits = model(inputs)
    red = model.to_single_token("red")
    expected = -logits[0, -2].log_softmax(-1)[red]
    full = df[(df.example == 1) & (df.kept == 16)].loss.item()
    assert full == pytest.approx(float(expected), abs=1e-5)


def test_budget_and_ablation_single_out_the_marked_patch():
    model = copy_head_model()
    inputs = model.to_inputs(random_image(0), PROMPT + " cat")
    inputs.meta["answer"] = "cat"
    res = visual_token_budget(model, inputs, keep=[16, 1, 0], strategy=["attention", "first", "random"],
                              seeds=[0, 1], progress=False)
    df = res.to_frame()
    assert len(df) == 3 * 1 + 3 * 1 + 3 * 2
    curve = res.curve()
    assert curve.loc["attention", 1] < 0.05  # the marked patch alone is enough
    assert curve.loc["first", 1] > 1.0  # patch 0 carries nothing
    assert curve.loc["attention", 0] > 1.0
    assert curve.loc["first", 16] == pytest.approx(curve.loc["attention", 16])
    grid = patch_ablation_map(model, inputs, progress=False)
    assert grid.shape == (4, 4) and int(grid.argmax()) == P_ROW * 4 + P_COL
    others = grid.flatten()[torch.arange(16) != P_ROW * 4 + P_COL]
    assert grid[P_ROW, P_COL] > 1.0 > 100 * others.abs().max()
    masked = patch_ablation_map(model, inputs, mode="mask", progress=False)
    torch.testing.assert_close(masked, grid, atol=1e-4, rtol=1e-3)
    from mm_lens.viz.interaction import plot_patch_ablation, plot_token_budget

    fig = plot_token_budget(res)
    assert sorted(line.get_label() for line in fig.axes[0].lines) == ["attention", "first", "random"]
    assert plot_patch_ablation(grid).axes[0].images[0].get_array().argmax() == P_ROW * 4 + P_COL


def test_llava_next_tiles_and_newlines_remove_equals_mask():
    from mm_lens import HookedVLM
    from mm_lens.testing import tiny_llava_next

    hf, proc = tiny_llava_next()
    model = HookedVLM.from_hf(hf, proc, fold_ln=False, center_writing_weights=False, center_unembed=False,
                              fold_value_biases=False)
    prompt = "USER: <image>\nwhat is the color of the circle ? ASSISTANT: red"
    inputs = model.to_inputs(random_image(0, size=(40, 70)), prompt)
    ex = _example(model, inputs)  # no answer given: every text token after the image is a target
    assert ex.targets.tolist() == list(range(int(inputs.positions.image.max()) + 2, inputs.shape[1]))
    n = len(inputs.positions.image)
    assert n > 16  # base grid, tiles and newline tokens
    keeps = [choose("random", n, 20, seed=s) for s in range(2)]
    torch.testing.assert_close(_losses(model, ex, keeps, "remove"), _losses(model, ex, keeps, "mask"), atol=1e-4,
                               rtol=1e-4)
    logp = model(inputs)[0].log_softmax(-1)
    full = -logp[ex.targets - 1, inputs.input_ids[0, ex.targets]].mean()
    assert float(_losses(model, ex, [torch.arange(n)], "remove")[0]) == pytest.approx(float(full), abs=1e-5)


def test_removed_tokens_equal_hugging_face_on_the_shortened_sequence():
    """``mode="remove"`` against Hugging Face itself: its merged embeddings (``hidden_states[0]``) at the kept
    positions, run through its language model with the original position ids, scored by hand."""
    from mm_lens import HookedVLM
    from mm_lens.testing import tiny_llava

    hf, proc = tiny_llava(seed=6)
    model = HookedVLM.from_hf(hf, proc, device="cpu")  # processed: the loss is a log-probability, unchanged
    prompt = "USER: <image>\nwhat is the color of the circle ? ASSISTANT: red circle"
    image = random_image(6)
    inputs = model.to_inputs(image, prompt)
    inputs.meta["answer"] = "red circle"
    ex = _example(model, inputs)
    enc = proc(images=image, text=prompt, return_tensors="pt")
    merged = hf(**enc, output_hidden_states=True).hidden_states[0][0]
    ids, image_pos = enc["input_ids"][0], inputs.positions.image
    keeps = [choose("random", 16, 5, seed=s) for s in range(2)] + [torch.arange(16), torch.tensor([], dtype=torch.long)]
    for kept in keeps:
        drop = image_pos[[j for j in range(16) if j not in kept.tolist()]]
        stay = torch.tensor([p for p in range(len(ids)) if p not in drop.tolist()])
        out = hf.model.language_model(inputs_embeds=merged[stay][None], position_ids=stay[None])
        logp = hf.lm_head(out.last_hidden_state)[0].log_softmax(-1)
        at = {int(p): i for i, p in enumerate(stay)}
        expected = -torch.stack([logp[at[int(t) - 1], ids[t]] for t in ex.targets]).mean()
        got = _losses(model, ex, [kept], "remove")[0]
        assert float(got) == pytest.approx(float(expected), abs=1e-5)
