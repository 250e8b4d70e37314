"""Path patching (both definitions: IOI, MLPs recomputing, and the direct path, MLPs frozen) and
per-head activation patching on a LLaVA-1.5-shaped model: the fast path (mm_lens' default) against
the same computation as full hooked forwards (``fast=False``), in one run, with the values checked equal.

576 image tokens + ~40 text tokens, CPU-friendly widths. Run: ``python benchmarks/bench_path_patching.py``.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import add_model_options, patching_setup

from mm_lens.analysis.patching import activation_patch
from mm_lens.analysis.path_patching import path_patch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser)
    args = parser.parse_args()
    model, clean, corrupted, answer, other = patching_setup(args)

    def metric(logits):
        return logits[:, -1, answer] - logits[:, -1, other]

    last = args.layers - 1
    jobs = {}
    for freeze in ("heads", "heads+mlps"):  # IOI (Wang et al.: MLPs recompute) and the direct path only
        jobs.update({
            f"path_patch [{freeze}] heads -> logits": lambda fast, f=freeze: path_patch(
                model, clean, corrupted, metric, senders="heads", receivers="logits", freeze=f, fast=fast,
                progress=False),
            f"path_patch [{freeze}] heads (image) -> L{last}H0.k/v (image)": lambda fast, f=freeze: path_patch(
                model, clean, corrupted, metric, senders="heads", receivers=[f"L{last}H0.k", f"L{last}H0.v"],
                sender_positions="image", receiver_positions="image", freeze=f, fast=fast, progress=False),
            f"path_patch [{freeze}] all -> L{last}H1.q, resid_pre1 (text)": lambda fast, f=freeze: path_patch(
                model, clean, corrupted, metric, senders="all", receivers=[f"L{last}H1.q", "resid_pre1"],
                receiver_positions="text", freeze=f, fast=fast, progress=False),
        })
    jobs.update({
        "activation_patch q per head x [image, text, last]": lambda fast: activation_patch(
            model, clean, corrupted, metric, hook="q", heads=True, positions=["image", "text", "last"], fast=fast,
            progress=False),
        "activation_patch pattern per head x [image, text, last]": lambda fast: activation_patch(
            model, clean, corrupted, metric, hook="pattern", positions=["image", "text", "last"], fast=fast,
            progress=False),
    })
    n_image = len(clean.positions.image)
    print(f"model: d_model={args.d_model}, {args.layers}+{args.vision_layers} layers; sequence {clean.shape[1]} "
          f"positions ({n_image} image); torch threads {torch.get_num_threads()}\n")
    print(f"{'':64s} {'full fwd s':>10s} {'fast s':>8s} {'speed-up':>9s} {'max |diff|':>11s}")
    worst = 0.0
    for name, job in jobs.items():
        start = time.perf_counter()
        slow = job(False)
        mid = time.perf_counter()
        fast = job(True)
        end = time.perf_counter()
        diff = float((fast.values - slow.values).abs().max())
        worst = max(worst, diff)
        print(f"{name:64s} {mid - start:10.2f} {end - mid:8.2f} {(mid - start) / (end - mid):8.1f}x {diff:11.1e}")
    if worst > 1e-4:
        raise SystemExit(f"fast and full-forward values differ by {worst:.1e}")


if __name__ == "__main__":
    main()
