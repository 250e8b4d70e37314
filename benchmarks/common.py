"""What the patching benchmarks share: the LLaVA-1.5-shaped model, its options and the clean/corrupted pair."""

from __future__ import annotations

import argparse

import torch

from mm_lens import HookedVLM
from mm_lens.testing import random_image, tiny_llava

PROMPT = ("USER: <image>\nwhat is the color of the circle in the picture on the left of the image ? "
          "answer in a few words . which shape is there , a square or a triangle ? ASSISTANT:")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vision-layers", type=int, default=4,
                        help="vision tower layers (default 4, as the forward benchmark's model)")
    parser.add_argument("--d-vision", type=int, default=128, help="vision tower width (default 128)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")


def patching_setup(args: argparse.Namespace):
    """``(model, clean, corrupted, answer, other)``: 336 px images in 14 px patches (576 image tokens),
    no weight processing, gradients off; ``answer``/``other`` are the clean and corrupted top tokens."""
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
    return model, clean, corrupted, answer, other
