"""Checkpoint conversion: one module per source family (config translation + key table).

``load_pretrained`` and ``convert_hf_model`` dispatch on the checkpoint's architecture;
an unsupported one gets an error that lists the supported ones.
"""

from __future__ import annotations

import torch

from mm_lens.conversion import bunny, llava, llava_next, llava_original
from mm_lens.conversion.common import load_strict

FAMILIES = {llava.ARCHITECTURE: llava, llava_next.ARCHITECTURE: llava_next}
MODEL_TYPES = {"llava": llava.ARCHITECTURE, "llava_next": llava_next.ARCHITECTURE}


def supported_architectures() -> list[dict]:
    """Every supported checkpoint family with its towers and the test that proves parity."""
    return [
        dict(architecture=llava.ARCHITECTURE, text_towers=["llama"],
             vision_towers=["clip_vision_model"], projectors=["mlp2x_gelu", "linear"],
             parity_test="tests/parity/test_llava_parity.py"),
        dict(architecture=llava.ARCHITECTURE, text_towers=["phi", "mistral", "qwen2", "phi3", "gemma", "llama"],
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
    ]


def architecture_of(hf_cfg) -> str:
    archs = list(getattr(hf_cfg, "architectures", None) or [])
    arch = next((a for a in archs if a in FAMILIES), None) or MODEL_TYPES.get(getattr(hf_cfg, "model_type", None))
    if arch is None:
        have = archs or [getattr(hf_cfg, "model_type", "?")]
        raise ValueError(f"unsupported architecture {have}; supported: {sorted(FAMILIES)}")
    return arch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def convert_hf_model(cls, hf_model, processor=None, device=None, dtype=None, fold_ln=True,
                     center_writing_weights=True, center_unembed=True, fold_value_biases=True,
                     attn_implementation="auto", model_name=None):
    """Build a ``cls`` (HookedVLM) from a Hugging Face model in memory. Weight processing as in
    TransformerLens' ``from_pretrained`` (all on by default; all off gives Hugging Face's exact activations)."""
    return convert_state_dict(
        cls, hf_model.config, hf_model.state_dict(), processor, rotary_from=hf_model, device=device, dtype=dtype,
        fold_ln=fold_ln, center_writing_weights=center_writing_weights, center_unembed=center_unembed,
        fold_value_biases=fold_value_biases, attn_implementation=attn_implementation, model_name=model_name,
    )


def convert_state_dict(cls, hf_cfg, source, processor=None, rotary_from=None, device=None, dtype=None, fold_ln=True,
                       center_writing_weights=True, center_unembed=True, fold_value_biases=True,
                       attn_implementation="auto", model_name=None):
    """Build a ``cls`` (HookedVLM) from a Hugging Face config and a state dict in its key names (no model
    object needed). ``rotary_from``: a Hugging Face model whose rotary ``inv_freq`` is copied (any rope type);
    without it the default rope is computed from the config."""
    family = FAMILIES[architecture_of(hf_cfg)]
    name = model_name or getattr(hf_cfg, "_name_or_path", None) or "custom"
    cfg = family.translate_config(hf_cfg, model_name=name)
    dtype = dtype or torch.float32
    device = torch.device(device or default_device())
    processing = fold_ln or center_writing_weights or center_unembed or fold_value_biases
    # weights are processed in float32 (as TransformerLens does), then cast
    build_dtype = dtype if dtype in (torch.float32, torch.float64) or not processing else torch.float32
    model = _build_empty(cls, cfg, processor, device, build_dtype)
    rules, ignore = family.conversion_rules(cfg, source, bool(getattr(hf_cfg, "tie_word_embeddings", False)))
    load_strict(model, source, rules, ignore, family=family.ARCHITECTURE)
    if rotary_from is not None:
        _copy_rotary(model, rotary_from)
    model.process_weights(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                          center_unembed=center_unembed, fold_value_biases=fold_value_biases)
    model.set_attn_implementation(attn_implementation)
    model = model.to(device).to(dtype)
    return model.eval()


def _build_empty(cls, cfg, processor, device, dtype):
    """The model with uninitialised weights straight on ``device`` in ``dtype`` (no CPU float32 detour);
    the strict loader then fills every parameter."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = cls(cfg, tokenizer=_tokenizer_of(processor), processor=processor)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device=device)
    model.cfg = model.cfg.replace(device=device, dtype=dtype)
    return model


def _copy_rotary(model, hf_model) -> None:
    """Take ``inv_freq`` and its scaling from the checkpoint's own rotary module (any rope type)."""
    for module in hf_model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "attention_scaling"):
            if module.inv_freq.shape == model.rotary.inv_freq.shape:
                model.rotary.inv_freq = module.inv_freq.detach().float().to(model.rotary.inv_freq.device)
                model.rotary.attention_scaling = float(module.attention_scaling)
            return


def _tokenizer_of(processor):
    if processor is None:
        return None
    return getattr(processor, "tokenizer", processor)


def load_pretrained(cls, name_or_path: str, device=None, dtype=None, trust_remote_code: bool = False, **kwargs):
    """Load a checkpoint with Hugging Face's own loaders (safetensors), then convert it."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    from mm_lens import bundled

    name_or_path = bundled.resolve(name_or_path)
    if bunny.is_bunny_folder(name_or_path):
        return load_bunny(cls, name_or_path, device=device, dtype=dtype, **kwargs)
    if llava_original.is_original_folder(name_or_path):
        return load_llava_original(cls, name_or_path, device=device, dtype=dtype, **kwargs)
    hf_cfg = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    arch = architecture_of(hf_cfg)
    import transformers

    hf_cls = getattr(transformers, arch)
    # Hugging Face's loader reads safetensors (or, for old checkpoints, its own weights-only loading)
    hf_model = hf_cls.from_pretrained(name_or_path, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code,
                                      use_safetensors=None)
    try:
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        processor = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    model = convert_hf_model(cls, hf_model, processor, device=device, dtype=dtype, model_name=str(name_or_path), **kwargs)
    del hf_model
    return model


def load_bunny(cls, folder, vision_tower=None, device=None, dtype=None, tokenizer=None, **kwargs):
    """A Bunny-Phi checkpoint folder (``BunnyPhiForCausalLM`` layout, safetensors) -> HookedVLM.

    ``vision_tower``: the SigLIP checkpoint folder (for its config and image processing); None
    means siglip-so400m-patch14-384, the tower of every published Bunny-Phi. No code from the
    checkpoint runs (``trust_remote_code`` is not needed).
    """
    kwargs.pop("trust_remote_code", None)
    hf_cfg, state, tok = bunny.to_llava(folder, vision_tower, tokenizer)
    processor = bunny.processor_for(hf_cfg, tok, vision_tower)
    return convert_state_dict(cls, hf_cfg, state, processor, device=device, dtype=dtype, model_name=str(folder),
                              **kwargs)


def load_llava_original(cls, folder, vision_tower=None, device=None, dtype=None, tokenizer=None, **kwargs):
    """An original-layout LLaVA folder (``LlavaLlamaForCausalLM``, safetensors) plus its separate CLIP
    checkpoint folder ``vision_tower`` -> HookedVLM. No code from the checkpoint runs."""
    kwargs.pop("trust_remote_code", None)
    hf_cfg, state, tok = llava_original.to_llava(folder, vision_tower, tokenizer)
    processor = llava_original.processor_for(hf_cfg, tok, vision_tower)
    return convert_state_dict(cls, hf_cfg, state, processor, device=device, dtype=dtype, model_name=str(folder),
                              **kwargs)
