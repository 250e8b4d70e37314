"""Embedding noise: k x the std of the checkpoint's embedding matrix, at the chosen positions only."""

import pytest
import torch

from mm_lens import HookedVLM
from mm_lens.analysis import groups
from mm_lens.analysis.corruptions import embedding_noise_hook, embedding_std
from mm_lens.testing import random_image, tiny_llava_towers
from tests.conftest import PROMPT


@pytest.fixture(scope="module")
def phi():
    """A LayerNorm tower loaded with the default processing: W_E's rows are centred."""
    hf, proc = tiny_llava_towers("phi", "clip", seed=2, n_kv_heads=4)
    return hf, HookedVLM.from_hf(hf, proc, device="cpu")


def test_std_is_the_checkpoints_whatever_the_processing(phi):
    hf, model = phi
    reference = float(hf.get_input_embeddings().weight.std())
    assert float(model.W_E.std()) < reference - 1e-4  # centring shrank the processed matrix
    assert embedding_std(model) == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("k", [1.0, 3.0, 0.5])
def test_noise_is_k_times_the_std_at_the_group_only(phi, k):
    _, model = phi
    x = model.to_inputs(random_image(0), PROMPT)
    name, hook = embedding_noise_hook(model, x, "image", k=k, seed=4)
    assert name == "hook_embed"
    noise = hook(torch.zeros(*x.shape, model.cfg.d_model), None)[0]  # [pos, d_model]
    image = x.positions.image
    others = torch.ones(x.shape[1], dtype=torch.bool)
    others[image] = False
    assert torch.equal(noise[others], torch.zeros_like(noise[others]))
    # a draw of 16 x 48 normal values: its std is within 10% of k * std(W_E)
    assert float(noise[image].std()) == pytest.approx(k * embedding_std(model), rel=0.1)
    # the same draw whatever k: only the scale changes
    _, unit = embedding_noise_hook(model, x, "image", k=1.0, seed=4)
    torch.testing.assert_close(noise, k * unit(torch.zeros(*x.shape, model.cfg.d_model), None)[0])
    _, explicit = embedding_noise_hook(model, x, groups.at([3]), k=k, seed=4, std=2.0)
    assert float(explicit(torch.zeros(*x.shape, model.cfg.d_model), None)[0, 3].std()) == pytest.approx(2 * k, rel=0.4)
