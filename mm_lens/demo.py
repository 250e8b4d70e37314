"""The main job: every analysis of the library on a few examples, written as one HTML report.

``make demo`` / ``mm-lens demo`` run it on the bundled ``mm-lens/shapes`` model; ``mm-lens run``
runs the chosen analyses on any supported model, image and prompt. Each section says what it
shows and why (which layer, which corruption); a corruption that does not change the answer is
reported as such instead of being drawn.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

# every analysis, in report order (mm_lens.analysis has one function per entry; "summary" is the
# prediction, the positions and the circuitsvis attention view)
ANALYSES = ("summary", "lens", "attention", "similarity", "knockout", "patching", "attribution", "path", "circuit",
            "trace", "contribution", "edit", "budget")
DESCRIPTIONS = {
    "summary": "top predictions, positions, interactive attention patterns (circuitsvis)",
    "lens": "logit lens at the last position and on every image patch (logit_lens)",
    "attention": "attention from the last position to the image (attention_to_image)",
    "similarity": "visual-token similarity to text embeddings and text states (modality_similarity)",
    "knockout": "attention knockout between image, question and last positions (knockout_edges)",
    "patching": "activation patching of the residual stream, normalised effect (activation_patch)",
    "attribution": "attribution patching, the first-order estimate of the same (attribution_patch)",
    "path": "path patching of every head into the logits, as a circuit diagram (path_patch)",
    "circuit": "a circuit across image and text found by EAP-IG and verified by exact patching (circuits.discover)",
    "trace": "causal tracing of the question's subject word (causal_trace)",
    "contribution": "attention contribution of each image patch to the question (attention_contribution)",
    "edit": "a rank-one MLP edit (multedit) at the layer where it can act, before and after",
    "budget": "loss against the number of visual tokens kept, and single-patch ablation (visual_token_budget)",
}


@dataclass
class Case:
    """One image and prompt to analyse; ``answer``/``question``/``box`` when known."""

    image: object
    prompt: str
    question: Optional[str] = None
    answer: Optional[str] = None
    box: Optional[tuple] = None
    title: str = ""
    meta: dict = field(default_factory=dict)


def toy_cases(n: int = 3, seed: int = 7) -> list[Case]:
    """A few held-out shapes examples with a single-object box each (colour questions); ``meta["other"]``
    is the colour of another object in the image (a target the edit section can move the answer to)."""
    from mm_lens.toy import data

    examples = data.make_examples(4 * n, seed, kinds=("color",))[:n]
    return [Case(e.image, e.prompt, e.question, e.answer, e.box, title=f"{e.question} (truth: {e.answer})",
                 meta={"other": next((o.color for o in e.objects if o.color != e.answer), None)})
            for e in examples]


def model_name(model) -> str:
    """The name the model was loaded by (a bundled model's name rather than its folder)."""
    from mm_lens.bundled import BUNDLED

    name = str(model.cfg.model_name)
    folders = {str(Path(folder).resolve()): bundled for bundled, folder in BUNDLED.items()}
    return folders.get(str(Path(name).resolve()), name) if name else "custom"


def run_analyses(model, cases: Sequence[Case], out: Path, analyses: Sequence[str] = ANALYSES,
                 title: str = "mm_lens report"):
    """Run ``analyses`` on every case, write ``out/index.html`` and return its path (:func:`build_report`
    gives the report itself, with its figures)."""
    return build_report(model, cases, analyses, title).write(out)


def build_report(model, cases: Sequence[Case], analyses: Sequence[str] = ANALYSES, title: str = "mm_lens report"):
    """The report of ``analyses`` on every case (a :class:`~mm_lens.viz.report.Report`, not yet written)."""
    import torch
    from tqdm.auto import tqdm

    from mm_lens.viz.report import Report

    unknown = sorted(set(analyses) - set(ANALYSES))
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; choose from {list(ANALYSES)}")
    report = Report(title)
    c = model.cfg
    report.text(f"model: {model_name(model)} — {c.n_layers} language-model layers, d_model {c.d_model}, "
                f"{c.vision.n_layers} vision layers, {c.n_image_tokens} image tokens per image")
    report.table([[a, DESCRIPTIONS[a]] for a in analyses], header=["section", "what it shows"])
    steps = [(i, a) for i in range(len(cases)) for a in analyses]
    started = time.time()
    with torch.no_grad(), tqdm(total=len(steps), desc="analyses") as bar:
        for i, case in enumerate(cases):
            report.heading(case.title or f"example {i + 1}: {case.prompt}")
            ctx = _context(model, case)
            ctx["index"] = i
            report.image(ctx["picture"], caption=f"input ({case.image.size[0]}x{case.image.size[1]} px)")
            for name in analyses:
                bar.set_postfix_str(f"example {i + 1}: {name}")
                SECTIONS[name](model, case, ctx, report)
                bar.update(1)
    report.text(f"generated in {time.time() - started:.1f} s")
    return report


def _context(model, case: Case) -> dict:
    from mm_lens.viz.tracing import input_image

    inputs = model.to_inputs(case.image, case.prompt)
    if case.question:
        inputs.meta["question"] = case.question
    if case.box is not None:
        inputs.meta["box"] = case.box
    logits, cache = model.run_with_cache(inputs)
    last = logits[0, inputs.positions.last]
    answer = model.to_single_token(case.answer) if case.answer is not None else int(last.argmax())

    def metric(logits):  # log p(answer) at the last position
        return logits[:, -1].log_softmax(-1)[:, answer].mean()

    return dict(inputs=inputs, logits=logits, cache=cache, answer=answer, metric=metric,
                answer_str=model.tokenizer.decode([answer]), picture=input_image(model, inputs))


def _corruption(model, case, ctx):
    """The corrupted run of the patching sections (the asked object blanked, or the whole image) and its name."""
    from mm_lens.analysis import corruptions

    if "corrupted" not in ctx:
        clean = ctx["inputs"]
        if case.box is not None:
            ctx["corrupted"] = corruptions.mask_region(model, clean, case.box, mode="mean")
            ctx["how"] = "the asked object's patches blanked"
        else:
            ctx["corrupted"] = corruptions.blank_image(clean)
            ctx["how"] = "the whole image blanked"
    return ctx["corrupted"], ctx["how"]


def _corrupts(result, report, ctx, what: str) -> bool:
    """False (and a warning in the report instead of a heatmap of noise) when the corruption barely
    changes the metric."""
    from mm_lens.viz.heatmaps import weak_corruption

    note = weak_corruption(result)
    if note:
        report.warning(f"{what}: not drawn. Corruption ({ctx['how']}): {note}")
    return not note


# ---------------------------------------------------------------- sections
def _summary(model, case, ctx, report) -> None:
    inputs, logits, cache = ctx["inputs"], ctx["logits"], ctx["cache"]
    probs = logits[0, inputs.positions.last].softmax(-1)
    top = probs.topk(5)
    report.table(
        [[model.tokenizer.decode([int(t)]), f"{float(p):.3f}"] for p, t in zip(top.values, top.indices)],
        header=["next token", "probability"])
    pos = inputs.positions
    report.text(f"{inputs.shape[1]} positions: {len(pos.image)} image positions on a {pos.grid_shape[0]}x"
                f"{pos.grid_shape[1]} patch grid, {len(pos.text)} text positions; the cache holds {len(cache)} "
                f"activations ({sum(v.numel() for v in cache.values()) * 4 / 1e6:.1f} MB).")
    if ctx["index"] == 0:  # one interactive view: each carries its own copy of the circuitsvis script
        from mm_lens.viz.report import attention_view

        to_image = [float(cache[f"blocks.{l}.attn.hook_pattern"][0, :, -1, pos.image].sum(-1).mean())
                    for l in range(model.cfg.n_layers)]
        layer = max(range(len(to_image)), key=to_image.__getitem__)
        report.text(f"attention patterns of layer {layer}, the layer whose last position attends most to the image "
                    f"({to_image[layer]:.2f} of its attention, mean over heads). circuitsvis: hover a token.")
        report.raw_html(attention_view(model.to_str_tokens(inputs), cache[f"blocks.{layer}.attn.hook_pattern"][0]))


def _lens(model, case, ctx, report) -> None:
    from mm_lens.analysis import logit_lens
    from mm_lens.viz.common import figure, integer_ticks
    from mm_lens.viz.interaction import plot_logit_lens_grid

    inputs = ctx["inputs"]
    lens = logit_lens(model, ctx["cache"], positions="last", inputs=inputs, words=[ctx["answer_str"]])
    fig = figure(4.5, 3)
    ax = fig.subplots()
    ax.plot(lens.layers, lens.word_probs[:, 0, 0].numpy(), marker="o")
    ax.set_ylim(0, 1.02)
    integer_ticks(ax)
    ax.set_xlabel(f"layer (residual before the block; {model.cfg.n_layers} = final)")
    ax.set_ylabel(f"p({ctx['answer_str']!r})")
    ax.set_title("logit lens at the last position")
    report.figure(fig, "the answer's probability read off the residual stream at the last position, per layer")
    image_lens = logit_lens(model, ctx["cache"], positions="image", inputs=inputs)
    report.figure(plot_logit_lens_grid(image_lens, image=ctx["picture"]),
                  "logit lens on the visual tokens: top-1 token of each patch per layer (shade: its probability)")


def _attention(model, case, ctx, report) -> None:
    from mm_lens.analysis import attention_to_image
    from mm_lens.viz.interaction import plot_attention_to_image

    att = attention_to_image(model, ctx["inputs"], queries="last")
    report.figure(plot_attention_to_image(att, image=ctx["picture"]),
                  "attention from the last position to the image, per layer and head, and per patch at the layer "
                  "with the most")


def _similarity(model, case, ctx, report) -> None:
    from mm_lens.analysis import modality_similarity
    from mm_lens.viz.interaction import plot_modality_similarity

    sim = modality_similarity(model, ctx["inputs"], anisotropy=True)
    report.figure(plot_modality_similarity(sim, labels=["this example"]),
                  "cosine of the visual tokens to the text embeddings and to the prompt's text states, per layer "
                  "(minus the cosine of random pairs)")


def _knockout(model, case, ctx, report) -> None:
    from mm_lens.analysis import knockout_edges
    from mm_lens.viz import knockout_curves

    edges = [("question", "last"), ("image", "last"), ("image", "question"), ("last", "last")]
    if case.box is not None:
        edges += [("object", "question"), ("non_object", "question"), ("object", "last"), ("non_object", "last")]
    if not case.question:
        edges = [e for e in edges if "question" not in e]
    window = min(9, model.cfg.n_layers)
    result = knockout_edges(model, ctx["inputs"], edges, window=window, progress=False)
    report.figure(knockout_curves(result, title=f"attention knockout (window {window})"),
                  "attention knockout: relative change of the answer probability when the edge is blocked in a "
                  "window of layers")


def _patching(model, case, ctx, report) -> None:
    from mm_lens.analysis import activation_patch
    from mm_lens.viz import image_heatmap, layer_position_heatmap

    clean = ctx["inputs"]
    corrupted, how = _corruption(model, case, ctx)
    result = activation_patch(model, clean, corrupted, ctx["metric"], hook="resid_pre", progress=False)
    ctx["patching"] = result
    if not _corrupts(result, report, ctx, "activation patching"):
        return
    report.text(f"corrupted run: {how}; log p({ctx['answer_str']!r}) clean {float(result.clean_metric.mean()):.3f}, "
                f"corrupted {float(result.corrupted_metric.mean()):.3f}.")
    report.figure(layer_position_heatmap(result, clean, model, title="resid_pre activation patching (clean into "
                                                                      "corrupted)"),
                  "activation patching: the share of the clean-corrupted difference in log p(answer) restored when "
                  "one residual-stream position is patched from the clean run (1 = fully restored, 0 = no effect)")
    report.figure(image_heatmap(result, clean, image=ctx["picture"], title="patching effect per patch"),
                  "the same per image patch, over the image, at the layer where the image matters most")


def _attribution(model, case, ctx, report) -> None:
    import numpy as np

    from mm_lens.analysis import activation_patch, attribution_patch
    from mm_lens.viz import layer_position_heatmap

    clean = ctx["inputs"]
    corrupted, how = _corruption(model, case, ctx)
    result = attribution_patch(model, clean, corrupted, ctx["metric"], hook="resid_pre")
    if not _corrupts(result, report, ctx, "attribution patching"):
        return
    exact = ctx.get("patching") or activation_patch(model, clean, corrupted, ctx["metric"], hook="resid_pre",
                                                    progress=False)
    a, b = result.normalized().values.flatten().numpy(), exact.normalized().values.flatten().numpy()
    corr = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    report.figure(layer_position_heatmap(result, clean, model, title="attribution patching of resid_pre "
                                                                      "(first-order estimate)"),
                  f"attribution patching: the linear estimate of the same patches from one backward pass, as a share "
                  f"of the clean-corrupted difference; correlation with exact patching {corr:.2f}")


def _path(model, case, ctx, report) -> None:
    from mm_lens.analysis import path_patch
    from mm_lens.viz import circuit_diagram

    clean = ctx["inputs"]
    corrupted, how = _corruption(model, case, ctx)
    result = path_patch(model, clean, corrupted, ctx["metric"], senders="heads", receivers="logits", progress=False)
    if not _corrupts(result, report, ctx, "path patching"):
        return
    effect = result.normalized()
    top = sorted(zip(effect.label("sender"), effect.values.tolist()), key=lambda x: -abs(x[1]))[:5]
    report.table([[s, f"{v:+.3f}"] for s, v in top], header=["head -> logits (direct path)", "normalised effect"])
    diagram = circuit_diagram(result, n_layers=model.cfg.n_layers, title="path patching: each head's direct effect "
                              "on log p(answer) (edge width: effect)", top_k=12)
    report.raw_html(diagram.to_html(width=820, height=320), css="circuit")


def _circuit(model, case, ctx, report) -> None:
    from mm_lens.analysis.results import corruption_warning
    from mm_lens.circuits import discover
    from mm_lens.circuits.groups import MAX_PATCH_GROUPS

    clean, metric = ctx["inputs"], ctx["metric"]
    corrupted, how = _corruption(model, case, ctx)
    full, corrupt = float(metric(model(clean))), float(metric(model(corrupted)))
    if abs(full - corrupt) < max(1e-2, 5e-2 * abs(full)):
        report.warning(f"circuit: not drawn. Corruption ({how}): {corruption_warning(full, corrupt)}")
        return
    rows, cols = clean.positions[0].grid_shape
    circuit = discover(model, clean, corrupted, metric, patches=rows * cols <= MAX_PATCH_GROUPS, progress=False)
    report.text(f"circuit (corrupted run: {how}): {len(circuit.edges)} of {circuit.n_graph_edges} edges between "
                f"(component x position group) nodes, chosen by EAP-IG; with every other edge patched from the corrupted "
                f"run it keeps {circuit.faithfulness:.0%} of the difference in log p({ctx['answer_str']!r}) "
                f"(faithfulness, exact patching). Lanes are position groups, edges run from sender to receiver; slider: "
                f"hide weak edges; hover: an edge's score, where an image node is.")
    report.raw_html(circuit.diagram(width=820).to_html(), css="circuit")
    report.figure(circuit.curve.plot(), "faithfulness of the top edges by EAP-IG score over circuit size (MIB's "
                                        "measures: CPR, the area under the curve; CMD, the area between it and 1)")


def _trace(model, case, ctx, report) -> None:
    from mm_lens.analysis import causal_trace
    from mm_lens.viz.tracing import plot_causal_trace

    corrupt = "image" if not case.question else _subject(case.question)
    how = "noise" if corrupt == "image" else "replace"
    trace = causal_trace(model, ctx["inputs"], corrupt=corrupt, how=how, target=ctx["answer"], progress=False,
                         positions="text")
    if trace.p_clean - trace.p_corrupt < 0.05:
        report.warning(f"causal trace: not drawn. Corrupting {corrupt!r} ({how}) barely changes p(answer) (clean "
                       f"{trace.p_clean:.3f}, corrupted {trace.p_corrupt:.3f}): there is nothing to restore.")
        return
    report.figure(plot_causal_trace(trace),
                  f"causal trace: p(answer) when one module's clean output is restored at one position; "
                  f"corrupted: {corrupt!r} ({how})")


def _contribution(model, case, ctx, report) -> None:
    from mm_lens.analysis import attention_contribution
    from mm_lens.viz.tracing import plot_contribution

    target = "question" if case.question else "last"
    contribution = attention_contribution(model, ctx["inputs"], source="image", target=target)
    report.figure(plot_contribution(contribution, image=ctx["picture"]),
                  f"attention contribution: norm of what attention moves from each image patch to the {target} "
                  "positions, per layer, and per patch at the layer where it is largest")


def _edit(model, case, ctx, report) -> None:
    from mm_lens.analysis import groups, multedit
    from mm_lens.analysis.edit_layers import mlp_out_gradient_norms
    from mm_lens.viz.tracing import plot_edit

    inputs = ctx["inputs"]
    if not case.question:
        report.text("MultEdit: skipped (it edits at the question's subject word: pass --question).")
        return
    # the target: another object's colour (bundled examples), else the model's runner-up answer
    runner_up = model.tokenizer.decode([int(ctx["logits"][0, -1].topk(2).indices[1])]).strip()
    target = case.meta.get("other") or runner_up
    subject = _subject(case.question)
    position = int(groups.resolve(model, inputs, groups.question(subject))[-1])
    norms = mlp_out_gradient_norms(model, inputs, model.to_single_token(target), position)
    layer = int(norms.argmax())
    edit = multedit(model, inputs, target=target, layer=layer, constraint=subject, steps=50, lr=0.5)
    before = model.tokenizer.decode([int(model(inputs)[0, -1].argmax())])
    with edit.applied():
        after = model.tokenizer.decode([int(model(inputs)[0, -1].argmax())])
    report.text(f"MultEdit at {subject!r}, target {target!r}: layer {layer}, where the gradient of -log p(target) at "
                f"the MLP output is largest (norms per layer: {', '.join(f'{float(g):.3g}' for g in norms)}). "
                f"Answer before the edit {before!r}, after {after!r}.")
    report.figure(plot_edit(edit), "p(target) and p(original answer) before and after the rank-one edit")


def _budget(model, case, ctx, report) -> None:
    from mm_lens.analysis import patch_ablation_map, visual_token_budget
    from mm_lens.viz.interaction import plot_patch_ablation, plot_token_budget

    answer = ctx["answer_str"].strip()
    inputs = model.to_inputs(case.image, f"{case.prompt} {answer}")
    inputs.meta["answer"] = answer
    n = model.cfg.n_image_tokens
    keep = sorted({n, n // 2, n // 4, max(1, n // 8), 0}, reverse=True)
    mode = "remove" if model.rotary is not None else "mask"
    budget = visual_token_budget(model, inputs, keep=keep, strategy=["random", "stride", "attention"], mode=mode,
                                 progress=False)
    report.figure(plot_token_budget(budget), f"loss on the answer when only k of the {n} visual tokens are kept "
                                             f"({mode}d), per strategy")
    report.figure(plot_patch_ablation(patch_ablation_map(model, inputs, mode=mode, progress=False), image=ctx["picture"]),
                  "loss increase on the answer when one image patch alone is dropped")


def _subject(question: str) -> str:
    """The word a shapes question is about (the shape or colour), to corrupt in the causal trace."""
    from mm_lens.toy import data

    words = question.replace("?", " ").split()
    named = [w for w in words if w in data.SHAPES or w in data.COLORS]
    return named[-1] if named else words[-1]


SECTIONS = dict(summary=_summary, lens=_lens, attention=_attention, similarity=_similarity, knockout=_knockout,
                patching=_patching, attribution=_attribution, path=_path, circuit=_circuit, trace=_trace,
                contribution=_contribution,
                edit=_edit, budget=_budget)


def demo(out: Path = Path("mm_lens_report"), n_examples: int = 3) -> Path:
    """The main job on the bundled model."""
    from mm_lens import load_toy

    model = load_toy(device="cpu")
    return run_analyses(model, toy_cases(n_examples), out, title="mm_lens demo: the bundled shapes model")
