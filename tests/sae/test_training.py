"""Activations for SAE training: the right positions, SAE-Lens' trainer and cache format, SAE-Lens' own
activation store and evals streaming text through HookedVLM."""

import warnings

import pytest
import torch

from mm_lens.sae import activations, collect, write_cached_activations
from mm_lens.toy import data
from tests.sae.conftest import HOOK, make_sae


@pytest.fixture(scope="module")
def examples():
    return data.make_examples(12, seed=7)


def by_hand(model, examples, hook, pick):
    """Activations at the positions ``pick(inputs)`` chooses, one example at a time, from plain caches."""
    rows = []
    for ex in examples:
        inputs = ex.to_inputs(model)
        _, cache = model.run_with_cache(inputs, names_filter=[hook])
        rows.append(cache[hook][0, pick(inputs)])
    return torch.cat(rows)


@pytest.mark.parametrize("positions, pick", [
    ("image", lambda x: x.positions.image),
    ("text", lambda x: x.positions.text),
    ("question", lambda x: x.positions.span(x.meta["question"])),
    ("object", lambda x: torch.tensor([x.positions.patch(*divmod(_cell(x), 3))])),
])
def test_activations_are_those_of_the_chosen_positions(toy, examples, positions, pick):
    chosen = [ex for ex in examples if positions != "object" or ex.box is not None]
    expected = by_hand(toy, chosen, HOOK, pick)
    got = torch.cat(list(activations(toy, chosen, HOOK, positions, batch_size=7, repeat=False, shuffle=False,
                                     examples_per_forward=5)))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)  # padded batches of 5 give each example's own


def _cell(inputs) -> int:
    x0, y0, x1, y1 = inputs.meta["box"]
    return int((y0 + y1) / 2 // data.CELL * data.CELLS + (x0 + x1) / 2 // data.CELL)


def test_vision_tower_text_only_and_special_tokens(toy, examples):
    vision = "vision_encoder.blocks.0.hook_resid_post"
    inputs = examples[0].to_inputs(toy)
    _, cache = toy.run_with_cache(inputs, names_filter=[vision])
    acts, ids = next(collect(toy, examples[:1], vision, "image"))
    torch.testing.assert_close(acts, cache[vision][0, 1:])  # the patches, not the class token
    assert len(next(collect(toy, examples[:1], vision, "all"))[0]) == toy.cfg.vision.n_ctx
    assert (ids == toy.cfg.image_token_id).all()
    texts = ["USER: what color is the circle ? ASSISTANT:", "USER: where is the cross ? ASSISTANT:"]
    acts, ids = next(collect(toy, texts, HOOK, "all"))
    assert len(acts) == 9 + 8 and (ids == toy.tokenizer.bos_token_id).sum() == 2
    kept, kept_ids = next(collect(toy, texts, HOOK, "all", exclude_special_tokens=True))
    assert len(kept) == 15 and not (kept_ids == toy.tokenizer.bos_token_id).any()
    torch.testing.assert_close(kept, acts[ids != toy.tokenizer.bos_token_id])
    with pytest.raises(ValueError, match="inside the vision tower"):
        next(collect(toy, examples[:1], vision, "question"))
    with pytest.raises(ValueError, match="pass a list"):
        next(activations(toy, iter(examples), HOOK))


def test_batches_are_shuffled_and_repeat(toy, examples):
    once = torch.cat(list(activations(toy, examples, HOOK, batch_size=16, repeat=False, shuffle=False)))
    stream = activations(toy, examples, HOOK, batch_size=16, seed=1, in_memory=True)
    batches = [next(stream) for _ in range(20)]  # 320 activations from 108: the dataset comes round again
    assert all(b.shape == (16, 64) for b in batches)
    got = torch.cat(batches)
    # every activation handed out is one of the dataset's, and the order is not the dataset's
    assert torch.cdist(got, once, compute_mode="donot_use_mm_for_euclid_dist").min(1).values.max() < 1e-4
    assert not torch.allclose(got[:16], once[:16])


def test_trains_a_topk_sae_on_image_positions_with_sae_lens(toy):
    """SAE-Lens' SAETrainer fed by mm_lens.sae.training; explained variance (SAE-Lens' definition) on held-out
    examples' image positions."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.evals import ExplainedVarianceCalculator
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    cfg = TopKTrainingSAEConfig(d_in=64, d_sae=64, k=8)
    cfg.metadata.hook_name = HOOK
    sae = TopKTrainingSAE(cfg)
    stream = activations(toy, data.make_examples(200, seed=0), HOOK, positions="image", batch_size=128,
                         examples_per_forward=32, in_memory=True)
    trainer_cfg = SAETrainerConfig(total_training_samples=128 * 600, train_batch_size_samples=128, lr=3e-3,
                                   lr_end=3e-3, device="cpu")
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SAETrainer(trainer_cfg, sae, stream).fit()
    calc = ExplainedVarianceCalculator()
    for acts, _ in collect(toy, data.make_examples(50, seed=99), HOOK, positions="image"):
        calc.add_batch(sae_output=sae.decode(sae.encode(acts)), hidden_acts=acts)
    assert calc.compute() >= 0.9
    toy.add_sae(sae)  # and the trained SAE splices back in
    toy.reset_saes()


def test_cached_activations_train_with_sae_lens(toy, examples, tmp_path):
    """SAE-Lens reads the cache format back (its ActivationsStore, its training runner), token ids included so its
    exclude_special_tokens filter works."""
    from sae_lens import LanguageModelSAETrainingRunner, LoggingConfig, TopKTrainingSAEConfig
    from sae_lens.config import LanguageModelSAERunnerConfig
    from sae_lens.training.activations_store import ActivationsStore

    path = tmp_path / "image_acts"
    table = write_cached_activations(toy, examples, HOOK, str(path), positions="image", shuffle=False)
    assert table.num_rows == len(examples) and table.features[HOOK].shape == (9, 64)
    expected = by_hand(toy, examples, HOOK, lambda x: x.positions.image)
    store = ActivationsStore(model=toy, dataset=None, streaming=False, hook_name=HOOK, hook_head_index=None,
                             context_size=9, d_in=64, n_batches_in_buffer=2, total_training_tokens=108,
                             store_batch_size_prompts=12, train_batch_size_tokens=16, prepend_bos=False,
                             normalize_activations="none", device=torch.device("cpu"), dtype="float32",
                             cached_activations_path=str(path))
    acts, ids = store.get_raw_llm_batch()
    torch.testing.assert_close(acts, expected)
    assert (ids == toy.cfg.image_token_id).all()

    texts = ["USER: what color is the circle ? ASSISTANT: red"] * 6  # 10 tokens each, the first a BOS
    text_path = tmp_path / "text_acts"
    with pytest.warns(UserWarning, match="4 activation.*not written"):  # 60 = 8 rows of 7, and 4
        write_cached_activations(toy, texts, HOOK, str(text_path), positions="all", context_size=7, shuffle=False)
    from datasets import Dataset

    for exclude, n_kept in ((False, 28), (True, 25)):  # 4 rows of 7 hold 3 BOS
        cfg = LanguageModelSAERunnerConfig(
            sae=TopKTrainingSAEConfig(d_in=64, d_sae=32, k=4), model_name="mm-lens/shapes", hook_name=HOOK,
            dataset_path="unused", use_cached_activations=True, cached_activations_path=str(text_path),
            context_size=7, training_tokens=56, train_batch_size_tokens=8, store_batch_size_prompts=4,
            n_batches_in_buffer=2, device="cpu", logger=LoggingConfig(log_to_wandb=False),
            exclude_special_tokens=exclude, output_path=str(tmp_path / "sae"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runner = LanguageModelSAETrainingRunner(cfg, override_model=toy,
                                                    override_dataset=Dataset.from_dict({"tokens": [[0] * 7] * 4}))
            assert len(runner.activations_store.get_filtered_llm_batch()) == n_kept
            with torch.enable_grad():
                assert runner.run().cfg.d_sae == 32


def test_sae_lens_activation_store_and_evals_run_text_through_hookedvlm(toy):
    """SAE-Lens' own text pipeline (to_tokens(truncate=False, move_to_device=False, prepend_bos=False), run_with_cache
    with stop_at_layer and prepend_bos, run_with_hooks with return_type='both') reads HookedVLM as a
    HookedTransformer."""
    from datasets import Dataset
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.training.activations_store import ActivationsStore

    sae = make_sae()
    sae.cfg.metadata.context_size, sae.cfg.metadata.prepend_bos = 8, True
    texts = [ex.prompt.replace("<image>\n", "") + " " + ex.answer for ex in data.make_examples(30, seed=1)]
    store = ActivationsStore.from_sae(toy, sae, Dataset.from_dict({"text": texts}), streaming=False,
                                      store_batch_size_prompts=4, train_batch_size_tokens=16, n_batches_in_buffer=2)
    tokens = store.get_batch_tokens()
    assert tokens.shape == (4, 8) and (tokens[:, 0] == toy.tokenizer.bos_token_id).all()
    _, cache = toy.run_with_cache(tokens, names_filter=[HOOK])
    torch.testing.assert_close(store.get_activations(tokens), cache[HOOK])
    # an SAE that reconstructs exactly (x = relu(x) - relu(-x)): SAE-Lens' evals must find nothing lost
    exact = make_sae(d_sae=128)
    eye = torch.eye(64)
    exact.W_enc.copy_(torch.cat([eye, -eye], 1))
    exact.W_dec.copy_(torch.cat([eye, -eye], 0))
    exact.b_enc.zero_()
    exact.b_dec.zero_()
    metrics, _ = run_evals(exact, store, toy, ActivationScaler(), EvalConfig(
        batch_size_prompts=4, n_eval_reconstruction_batches=2, n_eval_sparsity_variance_batches=2, compute_kl=True,
        compute_ce_loss=True), exclude_special_tokens=True)
    ce, kl = metrics["model_performance_preservation"], metrics["model_behavior_preservation"]
    assert ce["ce_loss_with_sae"] == pytest.approx(ce["ce_loss_without_sae"], abs=1e-4)
    assert ce["ce_loss_with_ablation"] != pytest.approx(ce["ce_loss_without_sae"], abs=0.1)
    assert kl["kl_div_with_sae"] == pytest.approx(0, abs=1e-4) and kl["kl_div_with_ablation"] > 0.1
