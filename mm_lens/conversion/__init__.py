"""Checkpoint conversion: one module per source family (config translation + key table).

``load_pretrained`` and ``convert_hf_model`` dispatch on the checkpoint's architecture;
an unsupported one gets an error that lists the supported ones. Both stream: the key
table is checked against the checkpoint first, then the model is filled one part at a
time (:mod:`mm_lens.conversion.build`), so loading needs the converted model's memory
plus one part, never a Hugging Face model or a float32 copy.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mm_lens.config import as_dtype
from mm_lens.conversion import (
    bunny,
    gemma3,
    idefics3,
    internvl,
    llava,
    llava_next,
    llava_onevision,
    llava_original,
    qwen2_5_vl,
    qwen2_vl,
    qwen3_vl,
    smolvlm,
)
from mm_lens.conversion.build import build_model
from mm_lens.conversion.checkpoint import as_checkpoint, read_safetensors
from mm_lens.conversion.placement import place
from mm_lens.weights import Processing

FAMILIES = {family.ARCHITECTURE: family for family in (llava, llava_next, llava_onevision, gemma3, qwen2_vl,
                                                        qwen2_5_vl, qwen3_vl, idefics3, smolvlm, internvl)}
MODEL_TYPES = {"llava": llava.ARCHITECTURE, "llava_next": llava_next.ARCHITECTURE,
               llava_onevision.MODEL_TYPE: llava_onevision.ARCHITECTURE, gemma3.MODEL_TYPE: gemma3.ARCHITECTURE,
               qwen2_vl.MODEL_TYPE: qwen2_vl.ARCHITECTURE, qwen2_5_vl.MODEL_TYPE: qwen2_5_vl.ARCHITECTURE,
               idefics3.MODEL_TYPE: idefics3.ARCHITECTURE, smolvlm.MODEL_TYPE: smolvlm.ARCHITECTURE,
               internvl.MODEL_TYPE: internvl.ARCHITECTURE, qwen3_vl.MODEL_TYPE: qwen3_vl.ARCHITECTURE}


def supported_architectures() -> list[dict]:
    """Every supported checkpoint family with its towers and the test that proves parity."""
    return [
        dict(architecture=llava.ARCHITECTURE, text_towers=["llama"],
             vision_towers=["clip_vision_model"], projectors=["mlp2x_gelu", "linear"],
             parity_test="tests/parity/test_llava_parity.py"),
        dict(architecture=llava.ARCHITECTURE, text_towers=["phi", "mistral", "qwen2", "qwen3", "phi3", "gemma", "llama"],
             vision_towers=["clip_vision_model", "siglip_vision_model"], projectors=["mlp2x_gelu"],
             parity_test="tests/parity/test_towers_parity.py"),
        dict(architecture=llava_next.ARCHITECTURE, text_towers=list(llava.TEXT_MODEL_TYPES),
             vision_towers=list(llava.VISION_MODEL_TYPES), projectors=["mlp2x_gelu"],
             parity_test="tests/parity/test_llava_next_parity.py"),
        dict(architecture="LlavaLlamaForCausalLM / LlavaPhiForCausalLM (original LLaVA and LLaVA-Phi layouts)",
             text_towers=["llama", "mistral", "qwen2", "phi"], vision_towers=["clip_vision_model"],
             projectors=["mlp2x_gelu"], parity_test="tests/parity/test_llava_original_parity.py"),
        dict(architecture="open_clip VisionTransformer (vision tower; mm_lens.conversion.open_clip_vit)",
             text_towers=[], vision_towers=["open_clip_vit"], projectors=[],
             parity_test="tests/parity/test_open_clip_parity.py"),
        dict(architecture=bunny.ARCHITECTURE, text_towers=["phi"], vision_towers=["siglip_vision_model"],
             projectors=["mlp2x_gelu"], parity_test="tests/parity/test_bunny_parity.py"),
        dict(architecture=gemma3.ARCHITECTURE, text_towers=[gemma3.TEXT_MODEL_TYPE],
             vision_towers=["siglip_vision_model"], projectors=["pooled"],
             parity_test="tests/parity/test_gemma3_parity.py"),
        dict(architecture=llava_onevision.ARCHITECTURE, text_towers=list(llava.TEXT_MODEL_TYPES),
             vision_towers=list(llava.VISION_MODEL_TYPES), projectors=["mlp2x_gelu"],
             parity_test="tests/parity/test_llava_onevision_parity.py"),
        dict(architecture=qwen2_vl.ARCHITECTURE, text_towers=["qwen2 (M-RoPE)"], vision_towers=["qwen2_vl_vision"],
             projectors=["patch_merger"], parity_test="tests/parity/test_qwen_vl_parity.py"),
        dict(architecture=qwen2_5_vl.ARCHITECTURE, text_towers=["qwen2 (M-RoPE)"],
             vision_towers=["qwen2_5_vl_vision (windowed attention)"], projectors=["patch_merger"],
             parity_test="tests/parity/test_qwen_vl_parity.py"),
        dict(architecture=qwen3_vl.ARCHITECTURE, text_towers=["qwen3 (q/k norm, interleaved M-RoPE, DeepStack)"],
             vision_towers=["qwen3_vl_vision (learned positions)"], projectors=["patch_merger", "deepstack mergers"],
             parity_test="tests/parity/test_qwen3_vl_parity.py"),
        dict(architecture=idefics3.ARCHITECTURE, text_towers=list(llava.TEXT_MODEL_TYPES),
             vision_towers=["idefics3_vision (SigLIP, NaViT-style positions)"], projectors=["pixel_shuffle_linear"],
             parity_test="tests/parity/test_idefics3_parity.py"),
        dict(architecture=smolvlm.ARCHITECTURE, text_towers=list(llava.TEXT_MODEL_TYPES),
             vision_towers=["smolvlm_vision (SigLIP, NaViT-style positions)"], projectors=["pixel_shuffle_linear"],
             parity_test="tests/parity/test_idefics3_parity.py"),
        dict(architecture=internvl.ARCHITECTURE, text_towers=list(llava.TEXT_MODEL_TYPES),
             vision_towers=["internvl_vision (InternViT 300M / 6B)"], projectors=["pixel_shuffle_mlp"],
             parity_test="tests/parity/test_internvl_parity.py"),
    ]


def architecture_of(hf_cfg) -> str:
    archs = list(getattr(hf_cfg, "architectures", None) or [])
    arch = next((a for a in archs if a in FAMILIES), None) or MODEL_TYPES.get(getattr(hf_cfg, "model_type", None))
    if arch is None:
        have = archs or [getattr(hf_cfg, "model_type", "?")]
        raise ValueError(f"unsupported architecture {have}; supported: {sorted(FAMILIES)}")
    return arch


def convert_hf_model(cls, hf_model, processor=None, **kwargs):
    """Build a ``cls`` (HookedVLM) from a Hugging Face model in memory, part by part as from a checkpoint
    (keyword arguments as :func:`convert_state_dict`)."""
    return convert_state_dict(cls, hf_model.config, hf_model.state_dict(), processor, **kwargs)


def convert_state_dict(cls, hf_cfg, source, processor=None, device=None, dtype=None, device_map=None,
                       max_memory=None, fold_ln=True, center_writing_weights=True, center_unembed=True,
                       fold_value_biases=True, attn_implementation="auto", model_name=None, progress=True):
    """Build a ``cls`` (HookedVLM) from a Hugging Face config and tensors in its key names: a state dict or a
    lazy checkpoint (:mod:`checkpoint`), read one tensor at a time (:mod:`build`).

    Weight processing as TransformerLens' ``from_pretrained`` (all on by default; all off gives Hugging Face's
    exact activations), done in float32 one part at a time. ``dtype``: a torch dtype, its name, or ``"auto"``
    (the checkpoint's); float32 by default. ``device`` or ``device_map``/``max_memory``: :mod:`placement`.
    The rotary frequencies come from the config (transformers' rope initialisation, any rope type).
    """
    family = FAMILIES[architecture_of(hf_cfg)]
    name = model_name or getattr(hf_cfg, "_name_or_path", None) or "custom"
    cfg = family.translate_config(hf_cfg, model_name=name)
    dtype = checkpoint_dtype(hf_cfg) if dtype == "auto" else as_dtype(dtype)
    processing = Processing.resolve(cfg, fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                                    center_unembed=center_unembed, fold_value_biases=fold_value_biases)
    source = as_checkpoint(source)
    rules, ignore = family.conversion_rules(cfg, source, bool(getattr(hf_cfg, "tie_word_embeddings", False)))
    text_cfg = getattr(hf_cfg, "text_config", hf_cfg)
    model = build_model(cls, cfg, processor, source, rules, ignore, family.ARCHITECTURE, dtype=dtype,
                  processing=processing, rotary=getattr(family, "rotary_frequencies", llava.rotary_frequencies)(text_cfg),
                  progress=progress,
                  placement_fn=lambda m: place(m, device, device_map, max_memory, dtype))
    model.set_attn_implementation(attn_implementation)
    return model.eval()


def checkpoint_dtype(hf_cfg) -> torch.dtype:
    """The dtype a Hugging Face config says its weights are in (float32 when it says nothing)."""
    value = getattr(hf_cfg, "dtype", None) or getattr(hf_cfg, "torch_dtype", None)
    text = getattr(hf_cfg, "text_config", None)
    if value is None and text is not None:
        value = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None)
    return as_dtype(value)


def local_folder(name_or_path: str) -> str:
    """A local checkpoint folder: the path itself, or the hub snapshot of a repository id (config, processor
    and safetensors files only)."""
    if Path(name_or_path).is_dir():
        return name_or_path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                "*.tiktoken", "*.jinja"])
    except Exception as err:  # no such repository, no network, ...
        raise ValueError(f"{name_or_path!r} is neither a local folder nor a Hugging Face hub repository that "
                         f"could be fetched ({type(err).__name__}: {err})") from err


def load_processor(folder, trust_remote_code: bool = False):
    from transformers import AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)


def load_pretrained(cls, name_or_path: str, device=None, dtype=None, trust_remote_code: bool = False, **kwargs):
    """Load a checkpoint folder (or hub id) by streaming its safetensors files into the converted model: the
    Hugging Face model is never built, only its config is read."""
    from transformers import AutoConfig

    from mm_lens import bundled

    name_or_path = bundled.resolve(name_or_path)
    folder = local_folder(name_or_path)
    kwargs.setdefault("model_name", str(name_or_path))
    if bunny.is_bunny_folder(folder):
        return load_bunny(cls, folder, device=device, dtype=dtype, **kwargs)
    if llava_original.is_original_folder(folder):
        return load_llava_original(cls, folder, device=device, dtype=dtype, **kwargs)
    hf_cfg = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    architecture_of(hf_cfg)  # an unsupported architecture is refused before anything is read
    source = read_safetensors(folder)
    processor = load_processor(folder, trust_remote_code)
    return convert_state_dict(cls, hf_cfg, source, processor, device=device, dtype=dtype, **kwargs)


def load_bunny(cls, folder, vision_tower=None, device=None, dtype=None, tokenizer=None, **kwargs):
    """A Bunny-Phi checkpoint folder (``BunnyPhiForCausalLM`` layout, safetensors) -> HookedVLM.

    ``vision_tower``: the SigLIP checkpoint folder (for its config and image processing); None
    means siglip-so400m-patch14-384, the tower of every published Bunny-Phi. No code from the
    checkpoint runs (``trust_remote_code`` is not needed).
    """
    kwargs.pop("trust_remote_code", None)
    hf_cfg, state, tok = bunny.to_llava(folder, vision_tower, tokenizer)
    processor = bunny.processor_for(hf_cfg, tok, vision_tower)
    kwargs.setdefault("model_name", str(folder))
    return convert_state_dict(cls, hf_cfg, state, processor, device=device, dtype=dtype, **kwargs)


def load_llava_original(cls, folder, vision_tower=None, device=None, dtype=None, tokenizer=None, **kwargs):
    """An original-layout LLaVA folder (``LlavaLlamaForCausalLM``, safetensors) plus its separate CLIP
    checkpoint folder ``vision_tower`` -> HookedVLM. No code from the checkpoint runs."""
    kwargs.pop("trust_remote_code", None)
    hf_cfg, state, tok = llava_original.to_llava(folder, vision_tower, tokenizer)
    processor = llava_original.processor_for(hf_cfg, tok, vision_tower)
    kwargs.setdefault("model_name", str(folder))
    return convert_state_dict(cls, hf_cfg, state, processor, device=device, dtype=dtype, **kwargs)
