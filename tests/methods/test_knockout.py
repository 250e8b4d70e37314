import pytest
import torch

from mm_lens.analysis import groups
from mm_lens.analysis.knockout import PAPER_EDGES, attention_knockout, knockout_edges, knockout_hooks, window_layers
from mm_lens.testing import random_image
from tests.methods.conftest import PROMPT


def test_window_layers_centred():
    assert window_layers(0, 9, 32) == [0, 1, 2, 3, 4]
    assert window_layers(10, 9, 32) == list(range(6, 15))
    assert window_layers(31, 9, 32) == list(range(27, 32))
    assert window_layers(2, 1, 4) == [2]


def test_image_blocked_everywhere_makes_text_independent_of_image(model):
    a = model.to_inputs(random_image(0), PROMPT)
    b = model.to_inputs(random_image(5), PROMPT)
    text = a.positions.text
    everything = groups.at(range(a.shape[1]))
    outs = []
    for x in (a, b):
        outs.append(model.run_with_hooks(x, fwd_hooks=knockout_hooks(model, x, "image", everything))[0, text])
    assert (model(a)[0, text] - model(b)[0, text]).abs().max() > 1e-3  # the image matters without knockout
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", ["auto", "eager"])
def test_empty_block_changes_nothing(model, pair, implementation):
    clean, _ = pair
    model.set_attn_implementation(implementation)
    try:
        reference = model(clean)  # SDPA under "auto"
        # the last position as source for the first position as target: already causally masked
        hooks = knockout_hooks(model, clean, "last", groups.at([0]))
        knocked = model.run_with_hooks(clean, fwd_hooks=hooks)
    finally:
        model.set_attn_implementation("auto")
    torch.testing.assert_close(knocked, reference, atol=1e-5, rtol=0)


def test_full_knockout_into_last_equals_last_token_alone(model, pair):
    """Blocking everything -> last at every layer leaves the last row attending to itself only,
    which is what a one-token run of that token computes (known answer)."""
    clean, _ = pair
    n = clean.shape[1]
    res = attention_knockout(model, clean, groups.at(range(n)), "last", window=2 * model.cfg.n_layers + 1,
                             layers=[0], progress=False)
    clean_last = model(clean)[0, -1].softmax(-1)
    answer = int(clean_last.argmax())
    alone = model(clean.input_ids[:, -1:])[0, -1].softmax(-1)
    expected = 100 * (alone[answer] - clean_last[answer]) / clean_last[answer]
    assert res.axes == ("layer",)
    assert abs(float(res.values[0]) - float(expected)) < 1e-3
    assert res.meta["answer"] == [answer]


# ---------------------------------------------------------------- the published definition, by hand
def published_knockout_probs(model, x, blocked_rows_cols, layers):
    """p(clean answer) at the last position of each row with target rows blocked from source columns in
    ``layers``, written as the published code does it: the dtype minimum added to the blocked scores, on
    top of a causal/padding mask that is itself the dtype minimum, clamped at the minimum."""
    n = x.shape[1]
    add = torch.zeros(x.shape[0], 1, n, n)
    for r, (rows, cols) in enumerate(blocked_rows_cols):
        add[r, 0, rows[:, None], cols[None, :]] = torch.finfo(torch.float32).min
    lowest = torch.finfo(torch.float32).min

    def hook(scores, hook):
        scores = scores.masked_fill(torch.isneginf(scores), lowest)  # Hugging Face's mask: the minimum
        return torch.clamp(scores + add, min=lowest)

    logits = model.run_with_hooks(x, fwd_hooks=[(f"blocks.{l}.attn.hook_attn_scores", hook) for l in layers])
    return logits[torch.arange(x.shape[0]), x.positions.last_positions].softmax(-1)


def centred_window(l, k, L):
    return list(range(max(0, l - k // 2), min(L, l - k // 2 + k)))


def hand_groups(model, x, row, question, box):
    """Every group of the paper by hand: image/last from the position map, the question by its characters,
    object/non-object from a hand-drawn mask through the processor (LLaVA-1.5: 16 patches in order)."""
    from tests.methods.test_groups import hand_masks

    rp = x.positions[row]
    image = rp.image
    w, h = x.image_sizes[row]
    inside = hand_masks(model.processor, (w, h), box)[0]
    start = rp.prompt.index(question)
    q = torch.tensor([p for p, (a, b) in enumerate(rp.offsets) if a < start + len(question) and b > start
                      and p not in image.tolist()])
    return dict(image=image, last=torch.tensor([rp.last]), question=q, object=image[inside],
                non_object=image[~inside])


def test_paper_edges_equal_the_published_definition_by_hand(model):
    q = "what is the color of the circle ?"
    x = model.to_inputs([random_image(0), random_image(2)], [PROMPT, PROMPT])
    boxes = [(0, 0, 20, 20), (10, 10, 40, 30)]
    x.meta["question"] = [q, q]
    x.meta["box"] = boxes
    L, k = model.cfg.n_layers, 3
    res = knockout_edges(model, x, PAPER_EDGES, window=k, progress=False)
    assert res.axes == ("edge", "layer") and res.per_example.shape == (6, L, 2)
    assert res.labels["edge"] == [f"{s}->{t}" for s, t in PAPER_EDGES]
    clean = model(x)[torch.arange(2), x.positions.last_positions].softmax(-1)
    answer = clean.argmax(-1)
    p_clean = clean[torch.arange(2), answer]
    by_hand = [hand_groups(model, x, r, q, boxes[r]) for r in range(2)]
    expected = torch.zeros(6, L, 2)
    for e, (src, tgt) in enumerate(PAPER_EDGES):
        pairs = [(g[tgt], g[src]) for g in by_hand]
        for l in range(L):
            p = published_knockout_probs(model, x, pairs, centred_window(l, k, L))[torch.arange(2), answer]
            expected[e, l] = 100 * (p - p_clean) / p_clean
    torch.testing.assert_close(res.per_example, expected, atol=1e-3, rtol=1e-4)
    assert expected.abs().max() > 1.0  # the edges do something on this model
    ci = 1.96 * expected.std(-1) / 2**0.5
    torch.testing.assert_close(res.ci95, ci, atol=1e-3, rtol=1e-3)
    frame = res.to_frame()
    assert len(frame) == 6 * L and {"edge", "layer", "value", "ci95"} <= set(frame.columns)


def test_paper_edges_on_llava_next_equal_the_published_definition_by_hand():
    from mm_lens import HookedVLM
    from mm_lens.testing import tiny_llava_next
    from tests.methods.test_groups import hand_masks

    hf, proc = tiny_llava_next(seed=5)
    model = HookedVLM.from_hf(hf, proc, device="cpu")
    q, box, (h, w) = "what is the color of the circle ?", (5, 12, 29, 30), (40, 70)
    x = model.to_inputs(random_image(1, size=(h, w)), PROMPT)
    x.meta.update(question=q, box=box)
    res = knockout_edges(model, x, PAPER_EDGES, window=1, progress=False)
    masks = hand_masks(proc, (w, h), box)
    feats = torch.stack([masks.float(), torch.ones_like(masks, dtype=torch.float)], dim=-1)
    (packed,), _ = hf.model.pack_image_features([feats], torch.tensor([[h, w]]), "default", torch.zeros(2))
    image = x.positions.image
    g = dict(image=image, last=torch.tensor([x.positions.last]), question=x.positions.span(q),
             object=image[packed[:, 0] > 0.5], non_object=image[(packed[:, 0] < 0.5) & (packed[:, 1] > 0.5)])
    clean = model(x)[0, -1].softmax(-1)
    answer = clean.argmax()
    for e, (src, tgt) in enumerate(PAPER_EDGES):
        for l in range(model.cfg.n_layers):
            p = published_knockout_probs(model, x, [(g[tgt], g[src])], [l])[0, answer]
            assert float(res.values[e, l]) == pytest.approx(float(100 * (p - clean[answer]) / clean[answer]), abs=1e-3)
    assert res.values[res.labels["edge"].index("object->question")].abs().max() > 1e-3


def test_answers_keep_only_the_rows_answered_correctly(model):
    x = model.to_inputs([random_image(0), random_image(2)], [PROMPT, PROMPT])
    answer = model(x)[torch.arange(2), x.positions.last_positions].argmax(-1)
    wrong = (answer[1] + 1) % model.cfg.d_vocab
    res = attention_knockout(model, x, "image", "last", window=1, answers=[int(answer[0]), int(wrong)],
                             progress=False)
    everyone = attention_knockout(model, x, "image", "last", window=1, progress=False)
    assert res.meta["kept"] == [0] and everyone.meta["kept"] == [0, 1]
    torch.testing.assert_close(res.per_example[..., 0], everyone.per_example[..., 0])
    torch.testing.assert_close(res.values, everyone.per_example[..., 0])
    with pytest.raises(ValueError, match="answers no example"):
        attention_knockout(model, x, "image", "last", window=1, answers=[int(wrong), int(wrong)], progress=False)


@pytest.mark.parametrize("empty_rows", ["self", "uniform"])
def test_rows_with_every_key_blocked(model, pair, empty_rows):
    """Every position blocked into the last row (and into question rows): ``"self"`` leaves each such row
    on itself alone, ``"uniform"`` spreads it over every column as the published code does."""
    clean, _ = pair
    n = clean.shape[1]
    everything = groups.at(range(n))
    target = groups.at([n - 5, n - 1])
    hooks = knockout_hooks(model, clean, everything, target, layers=[0, 2], empty_rows=empty_rows)
    knocked = model.run_with_hooks(clean, fwd_hooks=hooks)[0, -1].softmax(-1)
    rows = torch.tensor([n - 5, n - 1])
    if empty_rows == "uniform":
        expected = published_knockout_probs(model, clean, [(rows, torch.arange(n))], [0, 2])[0]
    else:
        own = torch.zeros(1, 1, n, n, dtype=torch.bool)
        own[0, 0, rows[:, None], torch.arange(n)[None]] = True
        own[0, 0, rows, rows] = False

        def keep_self(scores, hook):
            return scores.masked_fill(own, float("-inf"))

        expected = model.run_with_hooks(clean, fwd_hooks=[(f"blocks.{l}.attn.hook_attn_scores", keep_self)
                                                          for l in (0, 2)])[0, -1].softmax(-1)
    torch.testing.assert_close(knocked, expected, atol=1e-6, rtol=1e-5)
    other = "self" if empty_rows == "uniform" else "uniform"
    different = model.run_with_hooks(clean, fwd_hooks=knockout_hooks(model, clean, everything, target, layers=[0, 2],
                                                                     empty_rows=other))[0, -1].softmax(-1)
    assert (different - knocked).abs().max() > 1e-3
    with pytest.raises(ValueError, match="empty_rows"):
        knockout_hooks(model, clean, everything, target, empty_rows="zero")
