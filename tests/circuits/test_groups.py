"""Position groups of a circuit: a partition of the real positions; the graph's edges follow from it."""

import pytest
import torch

from mm_lens.analysis import groups
from mm_lens.circuits.graph import Edge, Graph
from mm_lens.circuits.groups import position_groups
from mm_lens.testing import random_image

from .conftest import PROMPT


def test_default_groups_partition_the_prompt(model, pair):
    clean, _ = pair
    g = position_groups(model, clean)
    assert g.names == ["last", "image", "question", "other"]
    index = g.index[0]
    rp = clean.positions[0]
    assert (index[rp.image] == 1).all() and int(index[rp.last]) == 0
    assert index[rp.span("what is the color")].eq(2).all() and int(index[0]) == 3  # BOS is "other"
    assert g.info[1].kind == "image" and g.info[1].patches[5] == (1, 1) and g.info[2].tokens[0] == "what"
    assert bool(g.reach[1, 0]) and not bool(g.reach[0, 1])  # image -> last, never last -> image


def test_named_groups_take_positions_in_order(model, pair):
    clean, _ = pair
    g = position_groups(model, clean, [("subject", groups.question("circle")), "question", "image"])
    assert g.names == ["last", "subject", "question", "image", "other"]
    subject = clean.positions.span("circle")
    assert g.index[0, subject].eq(1).all() and int((g.index[0] == 2).sum()) == len(clean.positions.span(
        "what is the color of the circle ?")) - len(subject)
    with pytest.raises(ValueError, match="unique"):
        position_groups(model, clean, ["image", "image"])
    with pytest.raises(ValueError, match="no positions left"):
        position_groups(model, clean, ["image", ("again", "image")])


def test_patches_and_padding(model):
    x = model.to_inputs([random_image(0), random_image(1)], [PROMPT, "USER: <image>\nwhat ? ASSISTANT:"])
    g = position_groups(model, x, ["image"], patches=False)
    assert int(g.index[1, 0]) == len(g.names)  # left padding belongs to no group
    p = position_groups(model, x, patches=True)
    rows, cols = x.positions[0].grid_shape
    assert len([n for n in p.names if n.startswith("img ")]) == rows * cols
    assert int(p.index[0, x.positions[0].patch(2, 3)]) == p.names.index("img 2,3")
    assert int(p.index[1, x.positions[1].patch(2, 3)]) == p.names.index("img 2,3")


def test_graph_edges_and_names(model, pair):
    g = Graph(model.cfg, position_groups(model, pair[0]))
    names = [e.name for e in g.edges]
    assert len(names) == len(set(names)) == g.n_edges
    assert "input@image->L0H1@last.k" in g.edge_index and "input@last->L0H1@image.k" not in g.edge_index
    assert "L2H0@last->mlp2@last" in g.edge_index and "mlp2@last->L2H0@last.q" not in g.edge_index
    assert "mlp2@last->logits@last" in g.edge_index and "mlp2@image->logits@image" not in g.edge_index
    flat = torch.arange(g.n_edges, dtype=torch.float32)
    assert torch.equal(g.flatten(g.unflatten(flat)), flat)
    e = Edge.parse("input@image->L0H1@last.k")
    assert (e.sender, e.receiver, e.slot) == ("input@image", "L0H1@last", "k") and e.name == "input@image->L0H1@last.k"
    assert Edge.parse("L0H1@last->mlp1@last").slot == "mlp" and Edge.parse("mlp1@last->logits@last").slot == "logits"
