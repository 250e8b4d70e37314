"""The main job: a fixed set of analyses on a few examples, written as one HTML report.

``make demo`` / ``mm-lens demo`` run it on the bundled ``mm-lens/shapes`` model; ``mm-lens run``
runs the same analyses on any supported model, image and prompt.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

ANALYSES = ("summary", "lens", "attention", "knockout", "patching", "trace")


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
    """A few held-out shapes examples with a single-object box each (colour questions)."""
    from mm_lens.toy import data

    examples = data.make_examples(4 * n, seed, kinds=("color",))[:n]
    return [Case(e.image, e.prompt, e.question, e.answer, e.box,
                 title=f"{e.question} (truth: {e.answer})") for e in examples]


def run_analyses(model, cases: Sequence[Case], out: Path, analyses: Sequence[str] = ANALYSES,
                 title: str = "mm_lens report") -> Path:
    """Run ``analyses`` on every case, write ``out/index.html`` and return its path."""
    from mm_lens.viz.report import Report

    unknown = sorted(set(analyses) - set(ANALYSES))
    if unknown:
        raise ValueError(f"unknown analyses {unknown}; choose from {list(ANALYSES)}")
    report = Report(title)
    report.text(f"model: {model.cfg.model_name} — {model.cfg.n_layers} language-model layers, d_model "
                f"{model.cfg.d_model}, {model.cfg.vision.n_layers} vision layers, {model.cfg.n_image_tokens} "
                f"image tokens per image")
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
    return report.write(out)


def _context(model, case: Case) -> dict:
    from mm_lens.viz.tracing import input_image

    inputs = model.to_inputs(case.image, case.prompt)
    if case.question:
        inputs.meta["question"] = case.question
    if case.box is not None:
        inputs.meta["box"] = case.box
    logits, cache = model.run_with_cache(inputs)
    last = logits[0, inputs.positions.last]
    if case.answer is not None:
        answer = model.to_single_token(case.answer)
    else:
        answer = int(last.argmax())
    return dict(inputs=inputs, logits=logits, cache=cache, answer=answer,
                answer_str=model.tokenizer.decode([answer]), picture=input_image(model, inputs))


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

        layer = model.cfg.n_layers - 1
        report.raw_html(attention_view(model.to_str_tokens(inputs), cache[f"blocks.{layer}.attn.hook_pattern"][0]))
        report.text(f"attention patterns of layer {layer} (circuitsvis; hover a token)")


def _lens(model, case, ctx, report) -> None:
    from matplotlib.figure import Figure

    from mm_lens.analysis import logit_lens
    from mm_lens.viz.interaction import plot_logit_lens_grid

    inputs = ctx["inputs"]
    lens = logit_lens(model, ctx["cache"], positions="last", inputs=inputs, words=[ctx["answer_str"]])
    fig = Figure(figsize=(4.5, 3), layout="constrained")
    ax = fig.subplots()
    ax.plot(lens.layers, lens.word_probs[:, 0, 0].numpy(), marker="o")
    ax.set_xlabel("layer (residual before block; last = final)")
    ax.set_ylabel(f"p({ctx['answer_str']!r})")
    ax.set_title("logit lens at the last position")
    report.figure(fig, "the answer's probability read off the residual stream at the last position, per layer")
    image_lens = logit_lens(model, ctx["cache"], positions="image", inputs=inputs)
    report.figure(plot_logit_lens_grid(image_lens, image=ctx["picture"]),
                  "logit lens on the visual tokens: top-1 token of each patch per layer")


def _attention(model, case, ctx, report) -> None:
    from mm_lens.analysis import attention_to_image
    from mm_lens.viz.interaction import plot_attention_to_image

    att = attention_to_image(model, ctx["inputs"], queries="last")
    report.figure(plot_attention_to_image(att, image=ctx["picture"]),
                  "attention from the last position to the image, per layer and head, and per patch")


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
    from mm_lens.analysis import activation_patch, corruptions
    from mm_lens.viz import image_heatmap, layer_position_heatmap

    clean = ctx["inputs"]
    if case.box is not None:
        corrupted = corruptions.mask_region(model, clean, case.box, mode="mean")
        how = "the asked object's box blanked"
    else:
        corrupted = corruptions.pixel_noise(clean, std=1.0)
        how = "Gaussian pixel noise"
    answer = ctx["answer"]

    def metric(logits):
        return logits[:, -1].log_softmax(-1)[:, answer].mean()

    result = activation_patch(model, clean, corrupted, metric, hook="resid_pre", progress=False)
    report.figure(layer_position_heatmap(result, clean, model, title="resid_pre patching (clean into corrupted)"),
                  f"activation patching: log p(answer) when one residual-stream position is restored; corruption: {how}")
    report.figure(image_heatmap(result, clean, image=ctx["picture"], layers="maxabs",
                                title="patching effect per patch"),
                  "the same, per image patch (largest effect over layers), over the image")


def _trace(model, case, ctx, report) -> None:
    from mm_lens.analysis import causal_trace
    from mm_lens.viz.tracing import plot_causal_trace

    corrupt = "image" if not case.question else _subject(case.question)
    how = "noise" if corrupt == "image" else "replace"
    trace = causal_trace(model, ctx["inputs"], corrupt=corrupt, how=how, target=ctx["answer"], progress=False,
                         positions="text")
    report.figure(plot_causal_trace(trace),
                  f"causal trace: p(answer) when one module's clean output is restored at one position; "
                  f"corrupted: {corrupt!r} ({how})")


def _subject(question: str) -> str:
    """The word a shapes question is about (the shape or colour), to corrupt in the causal trace."""
    from mm_lens.toy import data

    words = question.replace("?", " ").split()
    named = [w for w in words if w in data.SHAPES or w in data.COLORS]
    return named[-1] if named else words[-1]


SECTIONS = dict(summary=_summary, lens=_lens, attention=_attention, knockout=_knockout, patching=_patching,
                trace=_trace)


def demo(out: Path = Path("mm_lens_report"), n_examples: int = 3) -> Path:
    """The main job on the bundled model."""
    from mm_lens import load_toy

    model = load_toy(device="cpu")
    return run_analyses(model, toy_cases(n_examples), out, title="mm_lens demo: the bundled shapes model")
