"""Full resid_pre sweep (every layer x every position) on a LLaVA-1.5-shaped model:
mm_lens.activation_patch (fast engine) vs transformer_lens.patching.get_act_patch_resid_pre.

576 image tokens + ~40 text tokens, CPU-friendly widths. Run: ``python benchmarks/bench_patching.py``.
"""

from __future__ import annotations

import argparse
import time

import torch

from mm_lens import HookedVLM
from mm_lens.analysis.patching import activation_patch
from mm_lens.testing import random_image, tiny_llava

PROMPT = ("USER: <image>\nwhat is the color of the circle in the picture on the left of the image ? "
          "answer in a few words . which shape is there , a square or a triangle ? ASSISTANT:")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    hf, proc = tiny_llava(seed=0, image_size=336, patch_size=14, d_model=args.d_model, text_layers=args.layers,
                          vision_layers=1, d_vision=32, n_heads=4, n_kv_heads=4)
    model = HookedVLM.from_hf(hf, proc, fold_ln=False, center_writing_weights=False, center_unembed=False,
                              fold_value_biases=False).eval()
    clean = model.to_inputs(random_image(0, (336, 336)), PROMPT)
    corrupted = model.to_inputs(random_image(1, (336, 336)), PROMPT)
    n_image = len(clean.positions.image)
    print(f"model: d_model={args.d_model}, layers={args.layers}; sequence {clean.shape[1]} positions "
          f"({n_image} image, {clean.shape[1] - n_image} text); {args.layers * clean.shape[1]} patches")
    answer = int(model(clean)[0, -1].argmax())
    other = int(model(corrupted)[0, -1].argmax())
    other = other if other != answer else (answer + 1) % model.cfg.d_vocab

    def metric(logits):
        return logits[0, -1, answer] - logits[0, -1, other]

    from transformer_lens import patching as tl_patching

    t0 = time.perf_counter()
    _, clean_cache = model.run_with_cache(clean)
    expected = tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric)
    t_tl = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = activation_patch(model, clean, corrupted, metric, hook="resid_pre", positions="each")
    t_ours = time.perf_counter() - t0
    diff = float((result.values - expected.float()).abs().max())
    print(f"transformer_lens get_act_patch_resid_pre: {t_tl:.1f} s")
    print(f"mm_lens activation_patch (fast engine):   {t_ours:.1f} s")
    print(f"max |difference| = {diff:.2e} (metric range {float(expected.abs().max()):.3f})")
    print(f"speed-up: {t_tl / t_ours:.1f}x")
    if diff > 1e-5:
        raise SystemExit("values differ by more than 1e-5")


if __name__ == "__main__":
    main()
