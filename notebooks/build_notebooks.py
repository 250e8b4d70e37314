"""Writes the Colab-ready notebooks of this folder from the cells below: ``python notebooks/build_notebooks.py``.

Every notebook runs end to end on the bundled ``mm-lens/shapes`` model (the test suite executes
them); set ``USE_LLAVA = True`` in the setup cell to run the same cells on LLaVA-1.5-7B.
"""

from pathlib import Path

import nbformat

SETUP = [
    ("md", "Run on Colab or locally. The first cell installs mm_lens on Colab; the next picks the device and the "
           "model: the bundled `mm-lens/shapes` testbed by default, or `llava-hf/llava-1.5-7b-hf` with "
           "`USE_LLAVA = True` (a GPU with ~16 GB; pass your own image)."),
    ("code", """import sys
if "google.colab" in sys.modules:  # install on Colab
    %pip install -q mm-lens"""),
    ("code", """import torch
from mm_lens import HookedVLM, load_toy

USE_LLAVA = False  # True: llava-hf/llava-1.5-7b-hf
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.set_grad_enabled(False)

if USE_LLAVA:
    from PIL import Image
    model = HookedVLM.from_pretrained("llava-hf/llava-1.5-7b-hf", device=device, dtype=torch.float16)
    image = Image.open("your_image.jpg")  # your picture
    question, answer, box = "What color is the car?", "Red", None
    prompt = f"USER: <image>\\n{question} ASSISTANT:"
else:
    from mm_lens.toy import data
    model = load_toy(device=device)
    example = data.make_examples(4, seed=3, kinds=("color",))[0]
    image, prompt, question, answer, box = example.image, example.prompt, example.question, example.answer, example.box
inputs = model.to_inputs(image, prompt)
inputs.meta.update(question=question, box=box)
print(prompt, "->", answer)"""),
]

NOTEBOOKS = {
    "01_quickstart.ipynb": ("Quickstart: caching, hooks and positions across image and text", [
        ("code", """logits, cache = model.run_with_cache(inputs)
top = logits[0, -1].softmax(-1).topk(3)
print([(model.tokenizer.decode([int(i)]), round(float(p), 3)) for p, i in zip(top.values, top.indices)])
print(len(cache), "activations cached;", inputs.shape[1], "positions")"""),
        ("md", "Positions by role: image patches on their grid, the question, the last position."),
        ("code", """pos = inputs.positions
print("grid", pos.grid_shape, "image positions", pos.image[:5].tolist(), "...")
print("patch (0, 1) is at position", pos.patch(0, 1))
print("question tokens at", pos.span(question).tolist(), "last at", pos.last)
print(model.to_str_tokens(inputs)[:12])"""),
        ("md", "Hook names are TransformerLens' own; the vision tower has the same under `vision_encoder`."),
        ("code", """print([k for k in cache.keys() if k.startswith("blocks.0.")][:8])
print(cache["vision_encoder.blocks.0.hook_resid_post"].shape, cache["blocks.0.attn.hook_pattern"].shape)"""),
        ("md", "The residual stream decomposes exactly, at image positions too (`hook_embed` is the merged embedding)."),
        ("code", """parts, labels = cache.decompose_resid(layer=-1, pos_slice=pos.image, return_labels=True)
final = cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, pos.image]
print(labels[:4], float((parts.sum(0) - final).abs().max()))"""),
        ("md", "A hook: zero the image features and see the answer change."),
        ("code", """def no_image(embed, hook):
    embed = embed.clone()
    embed[:, pos.image] = 0
    return embed

ablated = model.run_with_hooks(inputs, fwd_hooks=[("hook_embed", no_image)])
a = model.to_single_token(answer)
print("p(answer)", float(logits[0, -1].softmax(-1)[a]), "->", float(ablated[0, -1].softmax(-1)[a]))"""),
    ]),
    "02_patching.ipynb": ("Activation and path patching across image and text", [
        ("code", """from mm_lens.analysis import activation_patch, path_patch, corruptions
from mm_lens.viz import layer_position_heatmap, image_heatmap

corrupted = corruptions.mask_region(model, inputs, box, mode="mean") if box else corruptions.pixel_noise(inputs)
a = model.to_single_token(answer)
metric = lambda logits: logits[:, -1].log_softmax(-1)[:, a].mean()
result = activation_patch(model, inputs, corrupted, metric, hook="resid_pre")
result.to_frame().head()"""),
        ("code", "layer_position_heatmap(result, inputs, model)"),
        ("code", "image_heatmap(result, inputs, image=None, layers='maxabs')"),
        ("md", "Path patching: which heads carry the image to the answer directly?"),
        ("code", """paths = path_patch(model, inputs, corrupted, metric, senders="heads", receivers="logits",
                   sender_positions="last", receiver_positions="last")
paths.to_frame().sort_values("value").head()"""),
    ]),
    "03_knockout.ipynb": ("Attention knockout: cross-modal information flow", [
        ("code", """from mm_lens.analysis import knockout_edges
from mm_lens.viz import knockout_curves

edges = [("question", "last"), ("image", "last"), ("image", "question"), ("last", "last")]
if box is not None:
    edges += [("object", "last"), ("non_object", "last")]
window = min(9, model.cfg.n_layers)
result = knockout_edges(model, inputs, edges, window=window)
knockout_curves(result)"""),
        ("code", "result.to_frame().head()"),
    ]),
    "04_causal_tracing_and_multedit.ipynb": ("Causal tracing and MultEdit", [
        ("code", """from mm_lens.analysis import causal_trace, multedit
from mm_lens.viz import plot_causal_trace

subject = question.replace("?", "").split()[-1]  # the word the question is about
trace = causal_trace(model, inputs, corrupt=subject, modules=("mlp", "attn", "resid"))
print("p clean", trace.p_clean, "p corrupted", trace.p_corrupt)
plot_causal_trace(trace)"""),
        ("md", "A rank-one edit of an early MLP makes the model give another answer; it is reversible."),
        ("code", """new_answer = "blue" if answer != "blue" else "red"
if USE_LLAVA:
    new_answer = "Blue"
edit = multedit(model, inputs, target=new_answer, layer=min(2, model.cfg.n_layers - 1), constraint=subject)
with edit.applied():
    edited = model(inputs)[0, -1].softmax(-1)[model.to_single_token(new_answer)]
print("p(new answer) after the edit:", float(edited))
print(edit.summary())"""),
    ]),
    "05_logit_lens_and_similarity.ipynb": ("Logit lens on visual tokens, modality similarity, attention to the image", [
        ("code", """from mm_lens.analysis import logit_lens, modality_similarity, attention_to_image
from mm_lens.viz import plot_logit_lens_grid, plot_modality_similarity, plot_attention_to_image

lens = logit_lens(model, inputs, positions="image")
plot_logit_lens_grid(lens)"""),
        ("code", """last = logit_lens(model, inputs, positions="last", words=[answer])
print("p(answer) per layer at the last position:", [round(float(p), 3) for p in last.word_probs[:, 0, 0]])"""),
        ("code", """similarity = modality_similarity(model, inputs, anisotropy=True)
plot_modality_similarity(similarity)"""),
        ("code", """attention = attention_to_image(model, inputs, queries="last")
plot_attention_to_image(attention)"""),
    ]),
}


def build(folder: Path = Path(__file__).parent) -> list[Path]:
    paths = []
    for name, (title, cells) in NOTEBOOKS.items():
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["colab"] = {"provenance": []}
        nb.cells.append(nbformat.v4.new_markdown_cell(f"# {title}"))
        for kind, text in SETUP + cells:
            cell = nbformat.v4.new_markdown_cell(text) if kind == "md" else nbformat.v4.new_code_cell(text)
            nb.cells.append(cell)
        path = folder / name
        nbformat.write(nb, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in build():
        print("wrote", p)
