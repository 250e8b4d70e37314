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


def test_paper_edges_batch_mean_and_ci(model):
    q = "what is the color of the circle ?"
    x = model.to_inputs([random_image(0), random_image(2)], [PROMPT, PROMPT])
    x.meta["question"] = [q, q]
    x.meta["box"] = [(0, 0, 20, 20), (10, 10, 40, 30)]
    res = knockout_edges(model, x, PAPER_EDGES, window=3, progress=False)
    assert res.axes == ("edge", "layer")
    assert res.values.shape == (6, model.cfg.n_layers)
    assert res.per_example.shape == (6, model.cfg.n_layers, 2)
    assert torch.isfinite(res.values).all() and res.ci95 is not None
    torch.testing.assert_close(res.values, res.per_example.mean(-1))
    assert res.labels["edge"][0] == "question->last"
    frame = res.to_frame()
    assert len(frame) == 6 * model.cfg.n_layers and {"edge", "layer", "value", "ci95"} <= set(frame.columns)
