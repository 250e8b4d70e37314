"""Writes the Colab-ready notebooks of this folder from the cells below: ``python notebooks/build_notebooks.py``.

Every notebook runs end to end on the bundled ``mm-lens/shapes`` model (the test suite executes
them and checks that every cell tagged ``figure`` displays an image); set ``USE_LLAVA = True`` in
the setup cell to run the same cells on LLaVA-1.5-7B.
"""

from pathlib import Path

import nbformat

# The project's git repository: the notebooks' install cell installs mm_lens from it on Colab.
# Set it once here (and rebuild) or in the notebook's first code cell; a wheel's path works too.
REPO_URL = "https://github.com/OWNER/mm_lens"

INTRO = """Runs on Colab or locally, on the bundled `mm-lens/shapes` model by default (a 1 MB LLaVA trained on
synthetic shapes; every cell takes seconds on a CPU).

**Install.** On Colab the first code cell installs mm_lens with pip from the source in `MM_LENS_SOURCE`:
the project's git repository (`git+URL`, the default) or the path of a wheel you uploaded
(`pip wheel --no-deps .` in a clone makes one). Locally, install it yourself (`pip install -e .` in a clone)
and the cell does nothing.

**`USE_LLAVA = True`** runs the same cells on `llava-hf/llava-1.5-7b-hf` with your own image. It needs a GPU:
the weights alone are ~14 GB in bfloat16 (7.1 B parameters x 2 bytes), and caching activations adds to that
(a full cache of one ~600-token prompt holds every hook of 32 layers: pass `names_filter` to `run_with_cache`
to keep only the hooks you read) — a 24 GB GPU (L4, A10, A100) is comfortable, a 16 GB T4 is not enough for
the sweeps. The first run downloads the ~14 GB checkpoint (several minutes at typical Colab bandwidth) and loading
takes a minute or two. These are estimates, not measurements: the sweeps scale with layers x positions (32 x ~600
for a full activation-patching sweep, so minutes rather than seconds)."""

SETUP = [
    ("code", f"""# Where mm_lens is installed from on Colab: the project's repository (git+URL) or a wheel's path.
MM_LENS_SOURCE = "git+{REPO_URL}.git"

import sys
if "google.colab" in sys.modules:
    if "OWNER" in MM_LENS_SOURCE:
        raise ValueError("set MM_LENS_SOURCE to the mm_lens repository (git+https://...) or an uploaded wheel")
    %pip install -q {{MM_LENS_SOURCE}}"""),
    ("code", """import torch
from mm_lens import HookedVLM, load_toy

USE_LLAVA = False  # True: llava-hf/llava-1.5-7b-hf on a GPU (see above)
device = "cuda" if torch.cuda.is_available() else "cpu"
torch.set_grad_enabled(False)

if USE_LLAVA:
    from PIL import Image
    model = HookedVLM.from_pretrained("llava-hf/llava-1.5-7b-hf", device=device, dtype=torch.bfloat16)
    image = Image.open("your_image.jpg")  # your picture
    question, answer, box = "What color is the car?", "Red", None  # box: (x0, y0, x1, y1) of the object, if known
    prompt = f"USER: <image>\\n{question} ASSISTANT:"
    other_answer = "Blue"  # an answer the edit of notebook 04 moves to
else:
    from mm_lens.toy import data
    model = load_toy(device=device)
    example = data.make_examples(4, seed=3, kinds=("color",))[1]  # "what color is the circle ?"
    image, prompt, question, answer, box = example.image, example.prompt, example.question, example.answer, example.box
    other_answer = next(o.color for o in example.objects if o.color != answer)  # another object's colour
inputs = model.to_inputs(image, prompt)
inputs.meta.update(question=question, box=box)  # what the "question" and "object" position groups read
subject = question.replace("?", "").split()[-1]  # the word the question is about
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
        ("md", "Hook names are TransformerLens' own; the vision tower has the same under `vision_encoder`. "
               "`names_filter` keeps only what you need (on LLaVA-7B a full cache is large)."),
        ("code", """print([k for k in cache.keys() if k.startswith("blocks.0.")][:8])
keep = ["blocks.0.attn.hook_pattern", "vision_encoder.blocks.0.hook_resid_post"]
_, small = model.run_with_cache(inputs, names_filter=keep)
print(small["vision_encoder.blocks.0.hook_resid_post"].shape, small["blocks.0.attn.hook_pattern"].shape)"""),
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
        ("md", "A corruption must change the metric, or every patching effect is noise: check it first."),
        ("code", """from mm_lens.analysis import activation_patch, path_patch, corruptions
from mm_lens.viz import layer_position_heatmap, image_heatmap, circuit_diagram, input_image

corrupted = corruptions.mask_region(model, inputs, box) if box else corruptions.blank_image(inputs)
a = model.to_single_token(answer)
metric = lambda logits: logits[:, -1].log_softmax(-1)[:, a].mean()
print(f"log p(answer): clean {float(metric(model(inputs))):.3f}, corrupted {float(metric(model(corrupted))):.3f}")"""),
        ("md", "Patch each residual-stream position from the clean run into the corrupted one. The heatmaps show the "
               "normalised effect of TransformerLens/ARENA, `(metric - corrupted) / (clean - corrupted)`: "
               "1 (red) = the answer fully restored, 0 (white) = no effect (`result.normalized()` gives the numbers)."),
        ("code", """result = activation_patch(model, inputs, corrupted, metric, hook="resid_pre")
result.normalized().to_frame().sort_values("value").tail()"""),
        ("code", "layer_position_heatmap(result, inputs, model)", "figure"),
        ("code", "image_heatmap(result, inputs, image=input_image(model, inputs))  # the image as the model sees it",
         "figure"),
        ("md", "Path patching: which heads carry the answer to the logits directly?"),
        ("code", """paths = path_patch(model, inputs, corrupted, metric, senders="heads", receivers="logits",
                   sender_positions="last", receiver_positions="last")
paths.normalized().to_frame().sort_values("value").tail()"""),
        ("code", "circuit_diagram(paths, n_layers=model.cfg.n_layers, title='direct effect on log p(answer)', top_k=12)",
         "figure"),
    ]),
    "03_knockout.ipynb": ("Attention knockout: cross-modal information flow", [
        ("code", """from mm_lens.analysis import knockout_edges
from mm_lens.viz import knockout_curves

edges = [("question", "last"), ("image", "last"), ("image", "question"), ("last", "last")]
if box is not None:
    edges += [("object", "last"), ("non_object", "last")]
window = min(9, model.cfg.n_layers)
result = knockout_edges(model, inputs, edges, window=window)
knockout_curves(result, title=f"attention knockout (window {window})")""", "figure"),
        ("code", "result.to_frame().head()"),
    ]),
    "04_causal_tracing_and_multedit.ipynb": ("Causal tracing and MultEdit", [
        ("code", """from mm_lens.analysis import causal_trace, multedit
from mm_lens.viz import plot_causal_trace

trace = causal_trace(model, inputs, corrupt=subject, modules=("mlp", "attn", "resid"))
print("p clean", round(trace.p_clean, 3), "p corrupted", round(trace.p_corrupt, 3))
plot_causal_trace(trace)""", "figure"),
        ("md", "MultEdit adds a rank-one update to one layer's MLP output matrix so that its output at the subject's "
               "last token moves the answer. That only works at a layer whose MLP output there reaches the answer: "
               "check the gradient of `-log p(target)` first (the last block's is exactly zero: nothing reads a "
               "non-final position after it) and edit the layer where it is largest."),
        ("code", """from mm_lens.analysis.edit_layers import mlp_out_gradient_norms

target = model.to_single_token(other_answer)
position = int(inputs.positions.span(subject)[-1])
norms = mlp_out_gradient_norms(model, inputs, target, position)
layer = int(norms.argmax())
print("gradient norm per layer:", [round(float(g), 4) for g in norms], "-> editing layer", layer)"""),
        ("code", """from mm_lens.viz import plot_edit

def top_answer():
    return model.tokenizer.decode([int(model(inputs)[0, -1].argmax())]).strip()

edit = multedit(model, inputs, target=other_answer, layer=layer, constraint=subject, steps=50, lr=0.5)
before = top_answer()
with edit.applied():  # the edit is reversible
    after = top_answer()
print(f"edit: {before!r} -> {after!r} (target {other_answer!r}); after undo: {top_answer()!r}")
plot_edit(edit)""", "figure"),
    ]),
    "05_logit_lens_and_similarity.ipynb": ("Logit lens on visual tokens, modality similarity, attention to the image", [
        ("code", """from mm_lens.analysis import logit_lens, modality_similarity, attention_to_image
from mm_lens.viz import plot_logit_lens_grid, plot_modality_similarity, plot_attention_to_image, input_image

picture = input_image(model, inputs)  # the image as the model sees it (resized, cropped)
lens = logit_lens(model, inputs, positions="image")
plot_logit_lens_grid(lens, image=picture)""", "figure"),
        ("code", """last = logit_lens(model, inputs, positions="last", words=[answer])
print("p(answer) per layer at the last position:", [round(float(p), 3) for p in last.word_probs[:, 0, 0]])"""),
        ("code", """similarity = modality_similarity(model, inputs, anisotropy=True)
plot_modality_similarity(similarity)""", "figure"),
        ("code", """attention = attention_to_image(model, inputs, queries="last")
plot_attention_to_image(attention, image=picture)""", "figure"),
    ]),
    "06_finding_a_circuit.ipynb": ("Finding a circuit across image and text", [
        ("md", "A circuit here is a set of edges between (component x position group) nodes: the input (token "
               "embeddings and image features), every attention head and MLP, and the logits, at the image patches, the "
               "question and the last position. An edge is what a sender writes to the residual stream at a group and a "
               "receiver reads there: a head's query, its keys/values (what the head moves from that group to another), "
               "an MLP's input, the logits. `discover` scores every edge with EAP-IG, keeps the smallest set of edges "
               "that reproduces the model, and verifies it by exact patching."),
        ("code", """from mm_lens.analysis import corruptions
from mm_lens.circuits import discover

corrupted = corruptions.mask_region(model, inputs, box) if box else corruptions.blank_image(inputs)
a = model.to_single_token(answer)
metric = lambda logits: logits[:, -1].log_softmax(-1)[:, a].mean()
print(f"log p(answer): clean {float(metric(model(inputs))):.3f}, corrupted {float(metric(model(corrupted))):.3f}")"""),
        ("md", "On the bundled model every image patch is a group of its own (`patches=True`: a 3x3 grid); on LLaVA "
               "(576 patches) the groups are the asked object, the rest of the image, the question, the last position "
               "and the rest. The diagram: one lane per group (image regions with their thumbnail), components by "
               "layer, red edges carry the answer; drag the slider to hide weak edges, hover an edge for its score and "
               "an image node to see where it is."),
        ("code", """circuit = discover(model, inputs, corrupted, metric, method="eap-ig", patches=not USE_LLAVA)
circuit""", "figure"),
        ("code", "circuit.to_frame().head(10)"),
        ("md", "Verification: faithfulness is (metric with only the circuit's edges - metric with none) / (full model - "
               "none), by exact patching of every other edge from the corrupted run. The curve takes the top edges by "
               "score for MIB's circuit sizes; CPR is the area under it, CMD the area between it and 1."),
        ("code", """print(f"faithfulness {circuit.faithfulness:.3f}, {len(circuit.edges)} of {circuit.n_graph_edges} edges")
circuit.curve.plot()""", "figure"),
        ("md", "ACDC-style pruning on top of the scores: try removing each edge (from the logits backwards) and keep "
               "it out if faithfulness moves by less than `tau`."),
        ("code", """pruned = discover(model, inputs, corrupted, metric, prune="acdc", patches=not USE_LLAVA, curve=False)
print(len(pruned.edges), "edges after pruning, faithfulness", round(pruned.faithfulness, 3))
pruned""", "figure"),
        ("md", "Export: JSON (read back with `Circuit.from_json`), networkx, a self-contained HTML page (here in a "
               "temporary folder; on Colab, `google.colab.files.download(path)` fetches a file)."),
        ("code", """import tempfile
from pathlib import Path

folder = Path(tempfile.mkdtemp())
circuit.to_json(folder / "circuit.json")
circuit.diagram().save(folder / "circuit.html")
graph = circuit.to_networkx()
print(graph.number_of_nodes(), "nodes,", graph.number_of_edges(), "edges; files in", folder)"""),
        ("md", "How good is each localisation method? On small VLMs whose mechanism is built in (the true edges are "
               "known), every method of the library is scored by how well it recovers the true edges: AUROC / "
               "precision at the true circuit's size (`mm-lens bench-methods` prints the same)."),
        ("code", """from mm_lens.circuits.bench import bench, table

print(table(bench()))"""),
    ]),
}


def build(folder: Path = Path(__file__).parent) -> list[Path]:
    paths = []
    for name, (title, cells) in NOTEBOOKS.items():
        nb = nbformat.v4.new_notebook()
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["colab"] = {"provenance": []}
        nb.cells.append(nbformat.v4.new_markdown_cell(f"# {title}\n\n{INTRO}", id="intro"))
        for i, (kind, text, *tags) in enumerate(SETUP + cells):
            new = nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell
            cell = new(text, id=f"cell-{i}")  # fixed ids: rebuilding changes nothing
            if tags:
                cell.metadata["tags"] = list(tags)  # "figure": the test checks it displays an image
            nb.cells.append(cell)
        path = folder / name
        nbformat.write(nb, path)
        paths.append(path)
    return paths


if __name__ == "__main__":
    for p in build():
        print("wrote", p)
