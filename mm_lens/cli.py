"""The ``mm-lens`` command."""

from __future__ import annotations

import argparse
import sys


def demo(args) -> int:
    """Build a small random LLaVA, run it with a cache on a generated image, print a summary."""
    import torch

    from mm_lens import HookedVLM
    from mm_lens.testing import random_image, tiny_llava

    hf, processor = tiny_llava(seed=0)
    model = HookedVLM.from_hf(hf, processor, device="cpu")
    image = random_image(seed=1)
    prompt = "USER: <image>\nwhat is the color of the circle ? ASSISTANT:"
    inputs = model.to_inputs(image, prompt)
    logits, cache = model.run_with_cache(inputs)
    probs = logits[0, -1].softmax(-1)
    top = probs.topk(5)
    print(f"model: random LLaVA ({model.cfg.n_layers} LM layers, d_model {model.cfg.d_model}, "
          f"{model.cfg.vision.n_layers} vision layers)")
    print(f"sequence: {inputs.shape[1]} positions = {len(inputs.positions.image)} image "
          f"(grid {inputs.positions.grid_shape}) + {len(inputs.positions.text)} text; last = {inputs.positions.last}")
    print(f"cache: {len(cache)} activations, {sum(v.numel() for v in cache.values()) * 4 / 1e6:.1f} MB")
    print("top next tokens:", ", ".join(f"{model.tokenizer.decode([int(i)])!r} {float(p):.3f}"
                                         for p, i in zip(top.values, top.indices)))
    resid = cache.decompose_resid(layer=-1, pos_slice=inputs.positions.image, return_labels=True)[0]
    err = (resid.sum(0) - cache["ln_final.hook_scale"].new_zeros(1) - cache[f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"][:, inputs.positions.image]).abs().max()
    print(f"decompose_resid at image positions sums to the residual (max error {float(err):.1e})")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mm-lens", description="Interpretability for vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="run the main job on the bundled model and print a summary")
    p.set_defaults(fn=demo)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
