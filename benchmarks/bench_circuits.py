"""Circuit discovery on a LLaVA-1.5-shaped model (576 image tokens + ~40 text tokens, the patching
benchmarks' model): EAP and EAP-IG as multiples of one forward+backward, exact verification of a circuit
as a multiple of one forward.

Position groups: last, image, question, other (4 query groups, so the edge runs copy the batch 4 times).
Run: ``python benchmarks/bench_circuits.py [--steps 5] [--d-model 64] [--layers 4]``.
"""

from __future__ import annotations

import argparse

import torch
from bench_forward import measure
from common import add_model_options, patching_setup

from mm_lens.circuits.attribution import edge_attribution
from mm_lens.circuits.faithfulness import top_edges
from mm_lens.circuits.runs import prepare

QUESTION = "what is the color of the circle in the picture on the left of the image ?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser)
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG steps (default 5, as Hanna et al.)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model, clean, corrupted, answer, other = patching_setup(args)
    model.to(args.device)
    clean, corrupted = clean.to(args.device), corrupted.to(args.device)
    clean.meta["question"] = QUESTION

    def metric(logits):
        return (logits[:, -1, answer] - logits[:, -1, other]).mean()

    def forward():
        with torch.no_grad():
            model(clean)

    def forward_backward():
        with torch.enable_grad():
            embed = {}

            def keep(x, hook):
                embed["x"] = x.detach().requires_grad_(True)
                return embed["x"]

            out = metric(model.run_with_hooks(clean, fwd_hooks=[("hook_embed", keep)]))
            torch.autograd.grad(out, embed["x"])

    runs = prepare(model, clean, corrupted, metric)
    scores = edge_attribution(runs, "eap")
    keep = top_edges(runs.graph, scores, max(1, runs.graph.n_edges // 100))
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def timed(fn):
        def run():
            fn()
            sync()
        return run

    times = measure({
        "forward": timed(forward),
        "forward + backward (to the input embedding)": timed(forward_backward),
        "EAP (both runs + scores)": timed(lambda: edge_attribution(prepare(model, clean, corrupted, metric), "eap")),
        f"EAP-IG, {args.steps} steps (both runs + scores)": timed(lambda: edge_attribution(
            prepare(model, clean, corrupted, metric), "eap-ig", steps=args.steps)),
        "exact verification of the top 1% circuit": timed(lambda: runs.evaluate(keep)),
        "exact verification, every edge patched": timed(lambda: runs.evaluate(torch.zeros_like(keep))),
    }, args.repeats)
    n_image = len(clean.positions.image)
    print(f"model: d_model={args.d_model}, {args.layers}+{args.vision_layers} layers, {model.cfg.n_heads} heads; sequence "
          f"{clean.shape[1]} positions ({n_image} image); groups {runs.graph.groups.names}; {runs.graph.n_edges} edges; "
          f"circuit {int(keep.sum())} edges; device {args.device}; torch threads {torch.get_num_threads()}\n")
    fwd, fwd_bwd = times["forward"], times["forward + backward (to the input embedding)"]
    print(f"{'':48s} {'ms':>9s} {'x forward':>10s} {'x fwd+bwd':>10s}")
    for name, t in times.items():
        print(f"{name:48s} {1000 * t:9.1f} {t / fwd:10.2f} {t / fwd_bwd:10.2f}")


if __name__ == "__main__":
    main()
