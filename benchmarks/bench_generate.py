"""Greedy generation: HookedVLM.generate (key/value cache) against Hugging Face's cached generate, in one run.

The forward benchmark's model: LLaVA-1.5's sequence shape (576 image tokens + ~40 text tokens) at a
CPU-friendly width. Both generate ``--new-tokens`` tokens greedily from the same prompt and image;
the tokens are checked equal. Times are medians over ``--repeats`` runs taken in turns.

    python benchmarks/bench_generate.py [--new-tokens 32] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse

import torch
from bench_forward import llava15_shaped, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args, hf, processor, model, inputs, enc = llava15_shaped(parser)
    hf.set_attn_implementation("sdpa")
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
