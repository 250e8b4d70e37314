"""The bundled model: it loads like a real checkpoint, answers, and its known mechanism is recovered."""

import torch

from mm_lens import HookedVLM
from mm_lens.analysis import (
    activation_patch,
    attention_contribution,
    attention_to_image,
    causal_trace,
    corruptions,
    groups,
    knockout_hooks,
    logit_lens,
)
from mm_lens.toy import WEIGHTS, data
from mm_lens.toy.evaluate import evaluate


def test_loads_by_name_like_a_checkpoint(toy):
    assert (WEIGHTS / "config.json").exists() and any(WEIGHTS.glob("*.safetensors"))
    same = HookedVLM.from_pretrained("mm-lens/shapes", device="cpu")
    assert same.cfg == toy.cfg and toy.cfg.normalization_type == "RMSPre"  # processed, as TransformerLens
    ours, theirs = toy.state_dict(keep_vars=False), same.state_dict(keep_vars=False)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    kept = dict(toy.named_buffers())
    assert kept.keys() == dict(same.named_buffers()).keys() and "unembed.folded_norm_w" in kept
    e = data.make_examples(1, seed=5)[0]
    inputs = toy.to_inputs(e.image, e.prompt)
    assert torch.equal(same(inputs), toy(inputs))
    assert toy.cfg.model_name.endswith("weights")


def test_held_out_accuracy(toy):
    result = evaluate(toy, n=200)
    assert result.accuracy >= 0.95, result.summary()


def _inputs(model, e):
    inputs = model.to_inputs(e.image, e.prompt)
    inputs.meta.update(question=e.question, box=e.box)
    return inputs


def test_answer_emerges_in_later_layers_under_the_logit_lens(toy, color_examples):
    curves = []
    for e in color_examples:
        inputs = _inputs(toy, e)
        lens = logit_lens(toy, inputs, positions="last", words=[e.answer])
        curves.append(lens.word_probs[:, 0, 0])
    mean = torch.stack(curves).mean(0)  # [lens layer]: 0 = embeddings ... n_layers = final residual
    n = toy.cfg.n_layers
    assert float(mean[-1]) > 0.8
    assert float(mean[: n // 2].max()) < 0.3, mean  # nothing in the first half of the layers
    assert int(mean.argmax()) >= n // 2 + 1


def test_patching_the_asked_object_restores_the_answer(toy, color_examples):
    inside, outside = [], []
    for e in color_examples:
        clean = _inputs(toy, e)
        corrupted = corruptions.mask_region(toy, clean, e.box, mode="mean")
        answer = toy.to_single_token(e.answer)

        def metric(logits, answer=answer):
            return logits[:, -1].softmax(-1)[:, answer].mean()

        result = activation_patch(toy, clean, corrupted, metric, hook="resid_pre", layers=[0],
                                  positions=["object", "non_object"], progress=False)
        inside.append(float(result.values[0, 0]))
        outside.append(float(result.values[0, 1]))
    inside, outside = torch.tensor(inside), torch.tensor(outside)
    assert float(inside.mean()) > 0.8 and float(outside.mean()) < 0.3, (inside, outside)
    assert bool((inside > outside).all())


def test_knocking_out_the_object_hurts_more_than_the_rest_of_the_image(toy, color_examples):
    drops = {"object": [], "non_object": []}
    for e in color_examples:
        inputs = _inputs(toy, e)
        answer = toy.to_single_token(e.answer)
        clean = float(toy(inputs)[0, -1].softmax(-1)[answer])
        for source in drops:
            hooks = knockout_hooks(toy, inputs, source, groups.question() | "last")
            knocked = float(toy.run_with_hooks(inputs, fwd_hooks=hooks)[0, -1].softmax(-1)[answer])
            drops[source].append(clean - knocked)
    obj, rest = torch.tensor(drops["object"]), torch.tensor(drops["non_object"])
    assert float(obj.mean()) > 0.5 and float(obj.mean()) > 3 * float(rest.mean()), (obj, rest)


def test_causal_trace_restores_the_answer_at_the_object_patch(toy, color_examples):
    """The asked object blanked out; restoring the residual at its patch (first layer) restores the
    answer, restoring any other patch does not. (When the blanked image still gets the same answer,
    e.g. the model's default colour, the example carries no signal and is left out.)"""
    used = 0
    for e in color_examples:
        inputs = _inputs(toy, e)
        obj = set(groups.resolve(toy, inputs, "object").tolist())
        corrupted = corruptions.mask_region(toy, inputs, e.box, mode="mean")
        trace = causal_trace(toy, inputs, corrupt=corrupted, modules=("resid",), positions="image", layers=[0],
                             target=e.answer, progress=False)
        if trace.relative_drop < 0.5:
            continue
        used += 1
        nie = trace.normalized_indirect_effect[0, 0]
        inside = [float(nie[i]) for i, p in enumerate(trace.positions.tolist()) if p in obj]
        outside = [float(nie[i]) for i, p in enumerate(trace.positions.tolist()) if p not in obj]
        assert max(inside) > 0.5 and max(outside) < 0.2, (inside, outside)
    assert used >= 4, f"only {used} of {len(color_examples)} examples lost their answer when the object was blanked"


def test_attention_carries_the_object_patch_to_the_last_position(toy, color_examples):
    """Text-to-image attention and attention contribution both single out the asked object's patch."""
    for e in color_examples[:4]:
        inputs = _inputs(toy, e)
        obj = groups.resolve(toy, inputs, "object").tolist()
        attention = attention_to_image(toy, inputs, queries="last")
        per_patch = attention.per_patch.mean(1).max(0).values  # [image_pos]: strongest layer, mean over heads
        assert int(attention.image_positions[int(per_patch.argmax())]) in obj
        contribution = attention_contribution(toy, inputs, source="image", target="last")
        assert contribution.top_sources(k=1)[0][0] in obj
