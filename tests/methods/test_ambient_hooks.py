"""Hooks already on the model when patching starts: results equal full forwards under the same hooks.

References: ``transformer_lens.patching.get_act_patch_resid_pre`` run under the same hooks, and
Wang et al.'s path patching written below as plain hooked forwards.
"""

from contextlib import contextmanager

import pytest
import torch
from transformer_lens import patching as tl_patching
from transformer_lens.hook_points import HookPoint

import mm_lens
from mm_lens.analysis.knockout import knockout_hooks
from mm_lens.analysis.patching import activation_patch
from mm_lens.analysis.path_patching import path_patch
from tests.methods.conftest import padded_pair
from tests.methods.test_path_patching import ioi_reference

TOK_A, TOK_B = 7, 11


def logit_diff(logits):
    return logits[:, -1, TOK_A] - logits[:, -1, TOK_B]


class TinyAutoencoder(torch.nn.Module):
    """A random linear autoencoder, ReLU code: what an SAE spliced into the residual stream does."""

    def __init__(self, d_model: int, d_sae: int = 24, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.nn.Parameter(torch.randn(d_model, d_sae, generator=g) / d_model**0.5)
        self.W_dec = torch.nn.Parameter(torch.randn(d_sae, d_model, generator=g) / d_sae**0.5)

    def forward(self, x):
        return torch.relu(x @ self.W_enc) @ self.W_dec


@contextmanager
def ambient(model, pair, case: str, marked: bool = False):
    """The model with one kind of hook on it, removed afterwards whatever happens."""
    mark = mm_lens.positionwise if marked else (lambda f: f)
    handles, restore = [], None

    def halve(x, hook):  # a fresh function each time: marking one must not mark the next
        return x * 0.5

    try:
        if case == "permanent":
            model.blocks[1].hook_resid_post.add_hook(mark(halve), is_permanent=True)
            yield
        elif case == "context":
            with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", mark(halve))]):
                yield
        elif case == "knockout":
            with model.hooks(fwd_hooks=knockout_hooks(model, pair[0], "image", "last")):
                yield
        elif case == "sae_hook":
            sae = TinyAutoencoder(model.cfg.d_model)
            model.blocks[1].hook_resid_post.add_hook(mark(lambda x, hook: sae(x)))
            yield
        elif case == "pre_hook":
            handles.append(model.blocks[2].mlp.register_forward_pre_hook(mark(lambda m, args: (args[0] * 1.5,))))
            yield
        elif case == "block_pre_hook":  # on a whole block: what the block receives
            handles.append(model.blocks[2].register_forward_pre_hook(mark(lambda m, args: (args[0] * 1.5,) + args[1:])))
            yield
        elif case == "splice":
            restore = model.blocks[1].hook_resid_post
            model.blocks[1].hook_resid_post = mark(TinyAutoencoder(model.cfg.d_model, seed=1).eval())
            yield
        else:
            raise ValueError(case)
    finally:
        for handle in handles:
            handle.remove()
        if restore is not None:
            model.blocks[1].hook_resid_post = restore
        model.reset_hooks(including_permanent=True)


CASES = ["permanent", "context", "knockout", "sae_hook", "pre_hook", "block_pre_hook", "splice"]


def tl_resid_pre(model, clean, corrupted):
    _, clean_cache = model.run_with_cache(clean)
    return tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache, lambda lg: logit_diff(lg)[0]).float()


@pytest.mark.parametrize("case", CASES)
def test_activation_patch_under_ambient_hooks_equals_transformer_lens(model, pair, case):
    clean, corrupted = pair
    plain = activation_patch(model, clean, corrupted, logit_diff, progress=False).values
    with ambient(model, pair, case):
        expected = tl_resid_pre(model, clean, corrupted)
        result = activation_patch(model, clean, corrupted, logit_diff, progress=False)
        torch.testing.assert_close(result.values, expected, atol=1e-5, rtol=0)
        assert (expected - plain).abs().max() > 1e-3  # the hook matters
        if case == "knockout":  # mm_lens' own knockout hooks are exact on a suffix: the engine keeps them on
            assert result.meta["fast"]
            fast = activation_patch(model, clean, corrupted, logit_diff, fast=True, progress=False)
            torch.testing.assert_close(fast.values, expected, atol=1e-5, rtol=0)
        else:
            assert not result.meta["fast"]
            with pytest.raises(ValueError, match="blocks.[12].*(hook|replaced)"):
                activation_patch(model, clean, corrupted, logit_diff, fast=True, progress=False)


@pytest.mark.parametrize("case", ["permanent", "context", "sae_hook", "pre_hook", "block_pre_hook", "splice"])
def test_positionwise_marked_hooks_stay_on_the_engine(model, pair, case):
    clean, corrupted = pair
    with ambient(model, pair, case, marked=True):
        expected = tl_resid_pre(model, clean, corrupted)
        result = activation_patch(model, clean, corrupted, logit_diff, fast=True, progress=False)
        assert result.meta["fast"]
        torch.testing.assert_close(result.values, expected, atol=1e-5, rtol=0)


def test_engine_runs_the_layers_after_an_unmarked_hook(model, pair):
    """A hook at block 1 never fires when a run resumes at layer 2: those layers stay on the engine."""
    clean, corrupted = pair
    with ambient(model, pair, "permanent"):
        expected = tl_resid_pre(model, clean, corrupted)
        result = activation_patch(model, clean, corrupted, logit_diff, progress=False)
        assert result.meta["fast_layers"] == [2]
        torch.testing.assert_close(result.values, expected, atol=1e-5, rtol=0)
        assert activation_patch(model, clean, corrupted, logit_diff, layers=[2], fast=True, progress=False).meta["fast"]


@pytest.mark.parametrize("side", ["left", "right"])
def test_knockout_on_a_padded_batch_stays_on_the_engine(model, side):
    """Each row blocks its own image -> last edge; the engine repeats the batch, the hook repeats its rows."""
    clean, corrupted = padded_pair(model, side)
    last = corrupted.positions.last_positions
    with model.hooks(fwd_hooks=knockout_hooks(model, clean, "image", "last", layers=[1, 2])):
        _, clean_cache = model.run_with_cache(clean)
        res = activation_patch(model, clean, corrupted, lambda lg: lg[:, -1, TOK_A], positions="each", fast=True,
                               batch_patches=5, progress=False)
        for r in range(2):
            expected = tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache,
                                                           lambda lg, r=r: lg[r, last[r], TOK_A]).float()
            torch.testing.assert_close(res.per_example[..., r], expected, atol=1e-5, rtol=0)
    plain = activation_patch(model, clean, corrupted, lambda lg: lg[:, -1, TOK_A], progress=False)
    assert (plain.per_example - res.per_example).abs().max() > 1e-3


def test_hooks_on_the_model_itself_are_reported(model, pair):
    clean, corrupted = pair
    plain = logit_diff(model(corrupted))
    handle = model.register_forward_hook(lambda m, args, out: out * 2)
    try:
        with pytest.raises(ValueError, match="<model>"):
            activation_patch(model, clean, corrupted, logit_diff, layers=[2], fast=True, progress=False)
        res = activation_patch(model, clean, corrupted, logit_diff, layers=[2], progress=False)
        assert not res.meta["fast"]
        torch.testing.assert_close(res.baseline, 2 * plain)
    finally:
        handle.remove()


@pytest.mark.parametrize("case", CASES)
def test_path_patch_under_ambient_hooks_equals_the_ioi_loop(model, pair, case):
    clean, corrupted = pair
    senders = ["L0H1", "mlp0", "L1H2"]
    receivers = ["L2H1.q", "L2H2.v"]
    with ambient(model, pair, case):
        for receiver in (receivers, "logits"):
            res = path_patch(model, clean, corrupted, logit_diff, senders=senders, receivers=receiver,
                             sender_positions="image", progress=False)
            expected = torch.stack([ioi_reference(model, clean, corrupted, logit_diff, s, receiver, "image")
                                    for s in senders])[:, 0]
            torch.testing.assert_close(res.values, expected, atol=1e-5, rtol=0)
            assert res.meta["fast"] == (case == "knockout")
        if case != "knockout":
            with pytest.raises(ValueError, match="fast=True"):
                path_patch(model, clean, corrupted, logit_diff, senders=senders, fast=True, progress=False)


def test_splice_module_is_named_when_patching_its_site(model, pair):
    """Patching at a site a module stands in for: the error says so (issue: "never run in this forward")."""
    clean, corrupted = pair
    with ambient(model, pair, "splice"):
        assert not isinstance(model.blocks[1].hook_resid_post, HookPoint)
        with pytest.raises(ValueError, match="TinyAutoencoder stands in its place"):
            activation_patch(model, clean, corrupted, logit_diff, hook="resid_post", layers=[1], progress=False)
