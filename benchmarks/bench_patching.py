"""Full resid_pre sweep (every layer x every position) on a LLaVA-1.5-shaped model:
mm_lens.activation_patch (fast engine) vs transformer_lens.patching.get_act_patch_resid_pre.

576 image tokens + ~40 text tokens, CPU-friendly widths. Run: ``python benchmarks/bench_patching.py``.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch
from common import add_model_options, patching_setup

from mm_lens.analysis.patching import activation_patch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_model_options(parser)
    args = parser.parse_args()
    model, clean, corrupted, answer, other = patching_setup(args)
    n_image = len(clean.positions.image)
    print(f"model: d_model={args.d_model}, layers={args.layers}; sequence {clean.shape[1]} positions "
          f"({n_image} image, {clean.shape[1] - n_image} text); {args.layers * clean.shape[1]} patches")

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
