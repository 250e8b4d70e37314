"""Full resid_pre sweep (every layer x every position) on a LLaVA-1.5-shaped model:
mm_lens.activation_patch (fast engine) vs transformer_lens.patching.get_act_patch_resid_pre.

576 image tokens + ~40 text tokens, CPU-friendly widths. Run: ``python benchmarks/bench_patching.py``.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
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
    parser.add_argument("--vision-layers", type=int, default=4,
                        help="vision tower layers (default 4, as the forward benchmark's model)")
    parser.add_argument("--d-vision", type=int, default=128, help="vision tower width (default 128)")
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
    n_image = len(clean.positions.image)
    print(f"model: d_model={args.d_model}, layers={args.layers}; sequence {clean.shape[1]} positions "
          f"({n_image} image, {clean.shape[1] - n_image} text); {args.layers * clean.shape[1]} patches")
    answer = int(model(clean)[0, -1].argmax())
    other = int(model(corrupted)[0, -1].argmax())
    other = other if other != answer else (answer + 1) % model.cfg.d_vocab

    def metric(logits):
        return logits[0, -1, answer] - logits[0, -1, other]

    from transformer_lens import patching as tl_patching

    # Interleaved layer by layer, so both sides see the same load on a shared machine;
    # wall-clock and CPU time are both reported.
    n_pos = clean.shape[1]
    expected = torch.zeros(args.layers, n_pos)
    ours = torch.zeros(args.layers, n_pos)
    t_tl = t_ours = c_tl = c_ours = 0.0
    for layer in range(args.layers):
        w0, c0 = time.perf_counter(), time.process_time()
        _, clean_cache = model.run_with_cache(clean)
        index_df = pd.DataFrame({"layer": [layer] * n_pos, "pos": list(range(n_pos))})
        expected[layer] = tl_patching.get_act_patch_resid_pre(model, corrupted, clean_cache, metric, index_df=index_df,
                                                                  index_axis_names=None)
        w1, c1 = time.perf_counter(), time.process_time()
        result = activation_patch(model, clean, corrupted, metric, hook="resid_pre", positions="each", layers=[layer])
        ours[layer] = result.values[0]
        w2, c2 = time.perf_counter(), time.process_time()
        t_tl, c_tl = t_tl + w1 - w0, c_tl + c1 - c0
        t_ours, c_ours = t_ours + w2 - w1, c_ours + c2 - c1
    diff = float((ours - expected.float()).abs().max())
    print(f"transformer_lens get_act_patch_resid_pre: {t_tl:.1f} s wall, {c_tl:.1f} s CPU")
    print(f"mm_lens activation_patch (fast engine):   {t_ours:.1f} s wall, {c_ours:.1f} s CPU")
    print(f"max |difference| = {diff:.2e} (metric range {float(expected.abs().max()):.3f})")
    print(f"speed-up: {t_tl / t_ours:.1f}x wall-clock, {c_tl / c_ours:.1f}x CPU time")
    if diff > 1e-5:
        raise SystemExit("values differ by more than 1e-5")


if __name__ == "__main__":
    main()
