"""Path patching and per-head activation patching on a LLaVA-1.5-shaped model: the fast path
(mm_lens' default) against the same computation as full hooked forwards (``fast=False``), in
one run, with the values checked equal.

576 image tokens + ~40 text tokens, CPU-friendly widths. Run: ``python benchmarks/bench_path_patching.py``.
"""

from __future__ import annotations

import argparse
import time

import torch

from mm_lens import HookedVLM
from mm_lens.analysis.patching import activation_patch
from mm_lens.analysis.path_patching import path_patch
from mm_lens.testing import random_image, tiny_llava

PROMPT = ("USER: <image>\nwhat is the color of the circle in the picture on the left of the image ? "
          "answer in a few words . which shape is there , a square or a triangle ? ASSISTANT:")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vision-layers", type=int, default=4)
    parser.add_argument("--d-vision", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    hf, proc = tiny_llava(seed=0, image_size=336, patch_size=14, d_model=args.d_model, text_layers=args.layers,
                          vision_layers=args.vision_layers, d_vision=args.d_vision, n_heads=4, n_kv_heads=4)
    model = HookedVLM.from_hf(hf, proc, fold_ln=False, center_writing_weights=False, center_unembed=False,
                              fold_value_biases=False).eval()
    clean = model.to_inputs(random_image(0, (336, 336)), PROMPT)
    corrupted = model.to_inputs(random_image(1, (336, 336)), PROMPT)
    answer = int(model(clean)[0, -1].argmax())
    other = int(model(corrupted)[0, -1].argmax())
    other = other if other != answer else (answer + 1) % model.cfg.d_vocab

    def metric(logits):
        return logits[:, -1, answer] - logits[:, -1, other]

    last = args.layers - 1
    jobs = {
        "path_patch heads -> logits": lambda fast: path_patch(
            model, clean, corrupted, metric, senders="heads", receivers="logits", fast=fast, progress=False),
        f"path_patch heads (image) -> L{last}H0.k/v (image)": lambda fast: path_patch(
            model, clean, corrupted, metric, senders="heads", receivers=[f"L{last}H0.k", f"L{last}H0.v"],
            sender_positions="image", receiver_positions="image", fast=fast, progress=False),
        "path_patch all -> L{l}H1.q (last), resid_pre1 (text)".format(l=last): lambda fast: path_patch(
            model, clean, corrupted, metric, senders="all", receivers=[f"L{last}H1.q", "resid_pre1"],
            receiver_positions="text", fast=fast, progress=False),
        "activation_patch q per head x [image, text, last]": lambda fast: activation_patch(
            model, clean, corrupted, metric, hook="q", heads=True, positions=["image", "text", "last"], fast=fast,
            progress=False),
        "activation_patch pattern per head x [image, text, last]": lambda fast: activation_patch(
            model, clean, corrupted, metric, hook="pattern", positions=["image", "text", "last"], fast=fast,
            progress=False),
    }
    n_image = len(clean.positions.image)
    print(f"model: d_model={args.d_model}, {args.layers}+{args.vision_layers} layers; sequence {clean.shape[1]} "
          f"positions ({n_image} image); torch threads {torch.get_num_threads()}\n")
    print(f"{'':58s} {'full fwd s':>10s} {'fast s':>8s} {'speed-up':>9s} {'max |diff|':>11s}")
    worst = 0.0
    for name, job in jobs.items():
        start = time.perf_counter()
        slow = job(False)
        mid = time.perf_counter()
        fast = job(True)
        end = time.perf_counter()
        diff = float((fast.values - slow.values).abs().max())
        worst = max(worst, diff)
        print(f"{name:58s} {mid - start:10.2f} {end - mid:8.2f} {(mid - start) / (end - mid):8.1f}x {diff:11.1e}")
    if worst > 1e-4:
        raise SystemExit(f"fast and full-forward values differ by {worst:.1e}")


if __name__ == "__main__":
    main()
