"""Forward and caching cost of HookedVLM against Hugging Face, measured in one run.

A model with LLaVA-1.5's sequence shape (336 px images in 14 px patches: 576 image tokens,
plus ~40 text tokens) at a CPU-friendly width. Every time is the median of several runs
and is printed as a ratio to Hugging Face's SDPA forward. Then one row block per further family,
each measured against its own Hugging Face model in the same run:

* Gemma 3: 448 px images in 14 px patches (1024 patches pooled to 256 soft tokens), two images in the
  prompt, local layers with a 128-key window (the prompt is longer), bidirectional image groups;
* LLaVA-OneVision: 224 px crops (256 patches each), one 2x2-tiled image (five crops, ~1300 positions);
* Qwen2-VL / Qwen2.5-VL: a 448 px image in 14 px patches (1024 vision patches merged 2x2 into 256 image
  tokens, M-RoPE positions); Qwen2.5-VL with 112 px windows and full attention in the last vision layer;
* Qwen3-VL: a 448 px image in 16 px patches (784 vision patches merged 2x2 into 196 image tokens, interleaved
  M-RoPE, learned positions from a 48x48 table), DeepStack features from the last three vision layers added
  after the first three language-model blocks;
* Idefics3 / SmolVLM: SmolVLM-256M's shapes (512 px crops in 16 px patches, 4x4 pixel shuffle: 64 tokens per
  crop), one image split into 2x2 tiles plus the global image (five crops);
* InternVL: 448 px crops in 14 px patches (1025 positions in the tower, 2x2 pixel shuffle: 256 tokens per crop),
  one image cut into 2 tiles plus the thumbnail.

    python benchmarks/bench_forward.py [--repeats 7] [--d-model 256] [--layers 4]
        [--families llava,gemma3,onevision,qwen2-vl,qwen2.5-vl,qwen3-vl,idefics3,smolvlm,internvl]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from mm_lens import HookedVLM
from mm_lens.testing import random_image, tiny_llava

PROMPT = ("USER: <image>\nwhat is the color of the shape in the center of this picture ? "
          "answer in a few words . is there a red circle on the left or a blue square on the right ? ASSISTANT:")


def timed(fn, repeats: int) -> float:
    return measure({"fn": fn}, repeats)["fn"]


def measure(fns: dict, repeats: int) -> dict:
    """Median seconds of each function; the functions take turns (in a rotating order) so that
    any drift in machine load falls on all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def transformer_bridge_row(hf, processor, enc, repeats):
    """TransformerLens' TransformerBridge wrapped around the same Hugging Face model."""
    import tempfile

    try:
        from transformer_lens.model_bridge import TransformerBridge
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover
        return None, f"not installed ({e})"
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        processor.tokenizer.save_pretrained(folder)
        try:
            bridge = TransformerBridge.boot_transformers(folder, hf_model=hf, device="cpu",
                                                         tokenizer=AutoTokenizer.from_pretrained(folder))
        except Exception as e:
            return None, f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    return timed(lambda: bridge.run_with_cache(enc["input_ids"], pixel_values=enc["pixel_values"]), repeats), ""


def llava15_shaped(parser: argparse.ArgumentParser):
    """Parse the shared options; ``(args, hf, processor, model, inputs, enc)`` for this benchmark's model and prompt
    (also used by bench_generate.py)."""
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
    model = HookedVLM.from_hf(hf, processor, device="cpu", fold_ln=False, center_writing_weights=False,
                              center_unembed=False, fold_value_biases=False)
    image = random_image(0, size=(400, 360))
    inputs = model.to_inputs(image, PROMPT)
    enc = processor(images=image, text=PROMPT, return_tensors="pt")
    return args, hf, processor, model, inputs, enc


def family_models(name: str, args):
    """``(hf, processor, model, inputs, enc)`` for one further family at the benchmark's width."""
    from mm_lens.testing import tiny_gemma3, tiny_llava_onevision
    from mm_lens.testing_qwen import tiny_qwen_vl
    from mm_lens.testing_tiled import tiny_idefics3, tiny_internvl

    width = dict(d_model=args.d_model, n_heads=8, n_kv_heads=4)
    if name == "gemma3":
        hf, processor = tiny_gemma3(seed=0, image_size=448, patch_size=14, tokens_per_image=256, sliding_window=128,
                                    text_layers=args.layers, vision_layers=args.layers, d_vision=128,
                                    head_dim=args.d_model // 8, d_mlp=4 * args.d_model, **width)
        images = [[random_image(0, size=(400, 360)), random_image(1, size=(300, 420))]]
        prompts = [PROMPT.replace("<image>", "<start_of_image> <start_of_image>")]
    elif name == "onevision":
        pinpoints = [[224 * r, 224 * c] for r in (1, 2, 3) for c in (1, 2, 3)]
        hf, processor = tiny_llava_onevision(seed=0, image_size=224, patch_size=14, pinpoints=pinpoints, anyres_max=9,
                                             text_layers=args.layers, vision_layers=args.layers, d_vision=128,
                                             d_mlp=4 * args.d_model, **width)
        images, prompts = [random_image(0, size=(400, 360))], [PROMPT]
    elif name in ("qwen2-vl", "qwen2.5-vl"):
        half = args.d_model // 8 // 2  # rotary bands of a head: M-RoPE's 16, 24, 24 of 64, scaled
        section = (half - 2 * (3 * half // 8), 3 * half // 8, 3 * half // 8)
        hf, processor = tiny_qwen_vl("2" if name == "qwen2-vl" else "2.5", seed=0, d_vision=128,
                                     vision_layers=args.layers, d_model=args.d_model, d_mlp=4 * args.d_model,
                                     text_layers=args.layers, n_heads=8, n_kv_heads=8, patch_size=14,
                                     mrope_section=section, window_size=112, full_attention=(args.layers - 1,),
                                     min_pixels=56 * 56, max_pixels=448 * 448)
        images = [random_image(0, size=(448, 448))]
        prompts = ["<|im_start|> user <|vision_start|><|image_pad|><|vision_end|> " + PROMPT[len("USER: <image>\n"):]]
    elif name == "qwen3-vl":
        half = args.d_model // 8 // 2  # interleaved M-RoPE's 24, 20, 20 of 64 bands, scaled
        section = (half - 2 * (5 * half // 16), 5 * half // 16, 5 * half // 16)
        hf, processor = tiny_qwen_vl("3", seed=0, d_vision=128, vision_layers=args.layers, d_model=args.d_model,
                                     d_mlp=4 * args.d_model, text_layers=args.layers, n_heads=8, n_kv_heads=8,
                                     d_head=args.d_model // 8, patch_size=16, mrope_section=section,
                                     deepstack=tuple(range(max(0, args.layers - 3), args.layers)), position_side=48,
                                     min_pixels=64 * 64, max_pixels=448 * 448)
        images = [random_image(0, size=(448, 448))]
        prompts = ["<|im_start|> user <|vision_start|><|image_pad|><|vision_end|> " + PROMPT[len("USER: <image>\n"):]]
    elif name in ("idefics3", "smolvlm"):
        hf, processor = tiny_idefics3(name, seed=0, image_size=512, patch_size=16, scale_factor=4, longest_edge=1024,
                                      vision_layers=args.layers, text_layers=args.layers, d_vision=128,
                                      d_mlp=4 * args.d_model, **width)
        images, prompts = [[random_image(0, size=(400, 360))]], [PROMPT]
    elif name == "internvl":
        hf, processor = tiny_internvl(seed=0, image_size=448, patch_size=14, max_patches=2, vision_layers=args.layers,
                                      text_layers=args.layers, d_vision=128, d_mlp=4 * args.d_model, **width)
        images, prompts = [random_image(0, size=(400, 640))], [PROMPT.replace("<image>", "<IMG_CONTEXT>")]
    else:
        raise ValueError(f"unknown family {name!r}")
    model = HookedVLM.from_hf(hf, processor, device="cpu", fold_ln=False, center_writing_weights=False,
                              center_unembed=False, fold_value_biases=False)
    return hf, processor, model, model.to_inputs(images, prompts), processor(images=images, text=prompts,
                                                                              return_tensors="pt")


def family_block(name: str, args) -> tuple[float, float]:
    """Time one family against its Hugging Face model; print its rows; ``(forward ratio, cache ratio)``."""
    hf, processor, model, inputs, enc = family_models(name, args)
    hf.set_attn_implementation("sdpa")
    hf_eager = copy.deepcopy(hf)
    hf_eager.set_attn_implementation("eager")
    times = measure({
        "HF forward (sdpa)": lambda: hf(**enc),
        "HF forward (eager, hidden states + attentions)":
            lambda: hf_eager(**enc, output_hidden_states=True, output_attentions=True),
        "HookedVLM forward": lambda: model(inputs),
        "HookedVLM run_with_cache (all hooks)": lambda: model.run_with_cache(inputs),
    }, args.repeats)
    n_img, n = len(inputs.positions.image), inputs.shape[1]
    print(f"\n{name}: {n} positions ({n_img} image), pixel_values {tuple(inputs.pixel_values.shape)}")
    base = times["HF forward (sdpa)"]
    for row, t in times.items():
        print(f"  {row:50s} {1000 * t:9.1f} {t / base:10.2f}")
    fwd = times["HookedVLM forward"] / base
    cache = times["HookedVLM run_with_cache (all hooks)"] / times["HF forward (eager, hidden states + attentions)"]
    print(f"  forward / HF sdpa: {fwd:.2f}x (target <= 1.10x); run_with_cache / HF eager with hidden states and "
          f"attentions: {cache:.2f}x (target <= 1.3x)")
    return fwd, cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--families",
                        default="llava,gemma3,onevision,qwen2-vl,qwen2.5-vl,qwen3-vl,idefics3,smolvlm,internvl",
                        help="comma-separated: llava (the LLaVA-1.5-shaped model), gemma3, onevision, qwen2-vl, "
                             "qwen2.5-vl, qwen3-vl, idefics3, smolvlm, internvl")
    args, hf, processor, model, inputs, enc = llava15_shaped(parser)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    if "llava" in families:
        llava_block(args, hf, processor, model, inputs, enc)
    for name in families:
        if name != "llava":
            family_block(name, args)


def llava_block(args, hf, processor, model, inputs, enc) -> None:
    """The LLaVA-1.5-shaped model: its rows, TransformerLens' TransformerBridge included."""
    n_img, n = len(inputs.positions.image), inputs.shape[1]
    print(f"sequence: {n} positions ({n_img} image + {n - n_img} text); d_model {args.d_model}, {args.layers} layers; "
          f"torch threads {torch.get_num_threads()}")

    hf.set_attn_implementation("sdpa")
    hf_eager = copy.deepcopy(hf)
    hf_eager.set_attn_implementation("eager")

    fns = {
        "HF forward (sdpa)": lambda: hf(**enc),
        "HF forward (eager, hidden states + attentions)":
            lambda: hf_eager(**enc, output_hidden_states=True, output_attentions=True),
        "HookedVLM forward": lambda: model(inputs),
        "HookedVLM run_with_cache (all hooks)": lambda: model.run_with_cache(inputs),
        "HookedVLM run_with_cache (resid_pre only)":
            lambda: model.run_with_cache(inputs, names_filter=lambda name: name.endswith("hook_resid_pre")),
    }
    rows = [(name, t, "") for name, t in measure(fns, args.repeats).items()]
    t, note = transformer_bridge_row(hf, processor, enc, args.repeats)
    rows.append(("TransformerLens TransformerBridge run_with_cache", t, note))

    base, eager = rows[0][1], rows[1][1]
    print(f"\n{'':52s} {'ms':>9s} {'x HF sdpa':>10s}")
    for name, t, note in rows:
        if t is None:
            print(f"{name:52s} {'-':>9s} {'-':>10s}  {note}")
        else:
            print(f"{name:52s} {1000 * t:9.1f} {t / base:10.2f}")
    fwd = rows[2][1] / base
    print(f"\nHookedVLM forward / HF sdpa forward: {fwd:.2f}x (target <= 1.10x)")
    print("run_with_cache (all hooks) / HF eager with hidden states + attentions: "
          f"{rows[3][1] / eager:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
    main()
