"""Greedy generation: HookedVLM.generate (key/value cache) against Hugging Face's cached generate, in one run.

The forward benchmark's model: LLaVA-1.5's sequence shape (576 image tokens + ~40 text tokens) at a
CPU-friendly width. Both generate ``--new-tokens`` tokens greedily from the same prompt and image;
the tokens are checked equal. Times are medians over ``--repeats`` runs taken in turns.

    python benchmarks/bench_generate.py [--new-tokens 32] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from bench_forward import PROMPT, measure

from mm_lens import HookedVLM
from mm_lens.testing import random_image, tiny_llava


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    hf, processor = tiny_llava(seed=0, image_size=336, patch_size=14, d_vision=128, vision_layers=args.layers,
                               d_model=args.d_model, d_mlp=4 * args.d_model, text_layers=args.layers, n_heads=8,
                               n_kv_heads=8)
    hf.set_attn_implementation("sdpa")
    model = HookedVLM.from_hf(hf, processor, device="cpu", fold_ln=False, center_writing_weights=False,
                              center_unembed=False, fold_value_biases=False)
    image = random_image(0, size=(400, 360))
    inputs = model.to_inputs(image, PROMPT)
    enc = processor(images=image, text=PROMPT, return_tensors="pt")
    n, new = inputs.shape[1], args.new_tokens
    print(f"prompt: {n} positions ({len(inputs.positions.image)} image); {new} new tokens; d_model {args.d_model}, "
          f"{args.layers}+{args.layers} layers; torch threads {torch.get_num_threads()}")

    def hf_generate():
        return hf.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                           pad_token_id=processor.tokenizer.pad_token_id)

    def ours(cache: bool):
        return model.generate(inputs, max_new_tokens=new, stop_at_eos=False, use_past_kv_cache=cache)

    same = ours(True).tolist() == hf_generate().tolist() == ours(False).tolist()
    times = measure({"HF generate (sdpa, cache)": hf_generate, "HookedVLM.generate (cache)": lambda: ours(True),
                     "HookedVLM.generate (no cache)": lambda: ours(False)}, args.repeats)
    base = times["HF generate (sdpa, cache)"]
    print(f"\n{'':34s} {'s':>8s} {'x HF':>7s}")
    for name, t in times.items():
        print(f"{name:34s} {t:8.3f} {t / base:7.2f}")
    print(f"\ntokens equal Hugging Face's: {same}")
    print(f"HookedVLM.generate (cache) / HF generate: {times['HookedVLM.generate (cache)'] / base:.2f}x "
          "(target <= 1.2x)")
    if not same:
        raise SystemExit("generated tokens differ from Hugging Face's")


if __name__ == "__main__":
    main()
