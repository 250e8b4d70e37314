"""Convert an original-format checkpoint folder into a Hugging Face ``LlavaForConditionalGeneration``
folder (safetensors + config + processor files) that ``HookedVLM.from_pretrained`` and Hugging Face
load; optionally verify the result. Used by ``weights_conversion/convert.py``.

Formats: ``bunny`` (BunnyPhiForCausalLM), ``llava-original`` (LlavaLlamaForCausalLM and siblings),
``llava-phi`` (LlavaPhiForCausalLM in Hugging Face Phi naming). Nothing from the source runs.
The output's processor does not pad images to a square (Hugging Face LLaVA processors cannot); for
checkpoints trained with ``image_aspect_ratio: pad`` pad them first (:func:`bunny.pad_to_square`) or
load the source folder directly, which does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from mm_lens.conversion import bunny, llava_original

FORMATS = ("bunny", "llava-original", "llava-phi")


def to_llava(source, fmt: str, vision_tower: Optional[str] = None):
    """``(LlavaConfig, state dict in LLaVA key names, processor)`` for ``source`` in format ``fmt``."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "bunny":
        cfg, state, tok = bunny.to_llava(source, vision_tower)
        return cfg, state, bunny.processor_for(cfg, tok, vision_tower, pad=False)
    cfg, state, tok = llava_original.to_llava(source, vision_tower)
    if fmt == "llava-phi" and cfg.text_config.model_type != "phi":
        raise ValueError(f"--format llava-phi needs a LlavaPhiForCausalLM checkpoint; this one has a "
                         f"{cfg.text_config.model_type} text model: use --format llava-original")
    return cfg, state, llava_original.processor_for(cfg, tok, vision_tower, pad=False)


def build_llava(cfg, state):
    """A Hugging Face ``LlavaForConditionalGeneration`` holding ``state`` (a :class:`checkpoint.Checkpoint`;
    strict: every key, every shape)."""
    from transformers import LlavaForConditionalGeneration

    if "lm_head.bias" in state:
        raise ValueError("this checkpoint's lm_head has a bias, for which LlavaForConditionalGeneration has no slot; "
                         "load the source folder directly with HookedVLM.from_pretrained(SOURCE) instead")
    model = LlavaForConditionalGeneration(cfg).eval()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != state.shape(k))
    if missing or unexpected or wrong:
        raise ValueError(f"cannot build the LLaVA model: missing {missing}, unexpected {unexpected}, "
                         f"wrong shapes {wrong}")
    model.load_state_dict(dict(state.items()), strict=True)
    return model


def convert_folder(source, fmt: str, out, vision_tower: Optional[str] = None) -> Path:
    """Write the converted folder ``out``; returns its path."""
    cfg, state, processor = to_llava(source, fmt, vision_tower)
    model = build_llava(cfg, state)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    return out


@torch.no_grad()
def verify(source, fmt: str, out, vision_tower: Optional[str] = None, prompt: Optional[str] = None) -> dict:
    """Max absolute differences, on a random image: the converted folder through HookedVLM and through
    Hugging Face, and HookedVLM on the source folder read directly."""
    from transformers import LlavaForConditionalGeneration

    from mm_lens import HookedVLM
    from mm_lens.testing import random_image

    exact = dict(fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False)
    converted = HookedVLM.from_pretrained(str(out), device="cpu", **exact)
    size = converted.cfg.vision.image_size
    image = random_image(0, size=(size, size))
    prompt = prompt or f"{converted.image_token}\nDescribe the image."
    inputs = converted.to_inputs(image, prompt)
    ours = converted(inputs)
    hf = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    reference = hf(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                   pixel_values=inputs.pixel_values).logits
    load = HookedVLM.from_pretrained
    direct = load(str(source), vision_tower=vision_tower, device="cpu", **exact)(inputs)
    return {"hooked_vs_hf": float((ours - reference).abs().max()),
            "converted_vs_source": float((ours - direct).abs().max())}
