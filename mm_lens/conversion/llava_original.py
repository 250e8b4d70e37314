"""The original LLaVA repository layout (``LlavaLlamaForCausalLM`` and its siblings).

Facts used (from the LLaVA repository and its published configs): ``config.json`` holds the
text model's fields flat plus ``mm_vision_tower`` (a CLIP checkpoint name),
``mm_hidden_size``, ``mm_projector_type`` (``mlp2x_gelu``), ``mm_vision_select_layer``
(-2) and ``mm_vision_select_feature`` (``patch`` drops the class token, ``cls_patch`` keeps it).
Weights: the text model under ``model.`` (Hugging Face names of its family), ``lm_head.weight``
and the projector as ``model.mm_projector.{0,2}``; the vision tower weights stay in the separate
CLIP checkpoint (when a release does include them, they sit under
``model.vision_tower.vision_tower.vision_model.``). The image placeholder id -200 becomes the
special token ``<image>`` (same chunked tokenisation).

The layout maps onto Hugging Face ``LlavaForConditionalGeneration``: :func:`to_llava` renames
keys by prefix tables and builds the ``LlavaConfig``. Text towers: ``LlavaLlamaForCausalLM``
(llama), ``LlavaMistralForCausalLM`` (mistral), ``LlavaQwenForCausalLM`` (qwen2) and
``LlavaPhiForCausalLM`` in Hugging Face Phi naming (phi); the older ``phi-msft`` naming is refused.

LLaVA-Phi (the llava-phi repository) differs in three facts: its ``config.json`` nests the CLIP
config and the feature selection in ``vision_config.vision_tower`` and the projector type in
``vision_config.mm_projector``; the tower weights are in the checkpoint under
``model.vision_tower.vision_model.``; and ``lm_head`` has a bias.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mm_lens.conversion.bunny import IMAGE_TOKEN, padded, tokenizer_with_image_token
from mm_lens.conversion.checkpoint import load_tokenizer, merged, read_json, read_safetensors, rename_keys

TEXT_KINDS = {
    "LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral", "LlavaQwenForCausalLM": "qwen2",
    "LlavaPhiForCausalLM": "phi",
}
ARCHITECTURES = tuple(TEXT_KINDS)
IN_CHECKPOINT_VISION = "model.vision_tower.vision_tower.vision_model."
TEXT_TABLE = [
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    (IN_CHECKPOINT_VISION, "model.vision_tower."),
    ("model.vision_tower.vision_model.", "model.vision_tower."),  # LLaVA-Phi: the tower is a CLIPVisionTransformer
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
]
# a separate CLIP checkpoint: CLIPVisionModel ("vision_model.") or a whole CLIPModel (text half skipped)
VISION_TABLE = [("vision_model.", "model.vision_tower.")]
VISION_SKIP = ("text_model.", "text_projection.", "visual_projection.", "logit_scale", "vision_model.head.")
NOT_TEXT_FIELDS = ("architectures", "model_type", "auto_map", "_name_or_path", "torch_dtype", "transformers_version",
                   "vision_config")


def text_kind(raw: dict) -> Optional[str]:
    return next((TEXT_KINDS[a] for a in raw.get("architectures") or [] if a in TEXT_KINDS), None)


def is_original_folder(path) -> bool:
    config = Path(str(path)) / "config.json"
    return config.is_file() and text_kind(read_json(config)) is not None


def text_config(raw: dict, kind: str):
    import transformers

    if kind == "phi" and "n_embd" in raw:
        raise ValueError("this LLaVA-Phi checkpoint uses the old phi-msft naming (n_embd, Wqkv); convert its text "
                         "model to Hugging Face Phi naming first (PhiForCausalLM)")
    classes = dict(llama="LlamaConfig", mistral="MistralConfig", qwen2="Qwen2Config", phi="PhiConfig")
    fields = {k: v for k, v in raw.items() if k not in NOT_TEXT_FIELDS and not k.startswith("mm_")}
    return getattr(transformers, classes[kind])(**fields)


def nested_vision(raw: dict) -> dict:
    """LLaVA-Phi's ``vision_config.vision_tower`` (CLIP fields and feature selection), or {}."""
    nested = raw.get("vision_config")
    return dict(nested.get("vision_tower", {})) if isinstance(nested, dict) else {}


def projector_type(raw: dict) -> str:
    nested = raw.get("vision_config")
    if isinstance(nested, dict) and "mm_projector" in nested:
        return nested["mm_projector"].get("mm_projector_type", "linear")
    return raw.get("mm_projector_type", "linear")


def vision_config(vision_tower, raw: Optional[dict] = None):
    """CLIP vision config: nested in LLaVA-Phi's config, else from the tower's folder (``CLIPVisionConfig``
    or a ``CLIPConfig``)."""
    from transformers import CLIPVisionConfig

    nested = nested_vision(raw or {})
    if nested:
        return CLIPVisionConfig(**{k: v for k, v in nested.items()
                                   if k not in NOT_TEXT_FIELDS and not k.startswith("mm_")})
    if vision_tower is None:
        raise ValueError("the original LLaVA layout keeps the vision tower in a separate CLIP checkpoint: pass "
                         "vision_tower=PATH (a local folder of e.g. openai/clip-vit-large-patch14-336)")
    raw = read_json(Path(vision_tower) / "config.json")
    raw = raw.get("vision_config", raw)
    return CLIPVisionConfig(**{k: v for k, v in raw.items() if k not in NOT_TEXT_FIELDS})


def vision_weights(vision_tower):
    """The separate CLIP checkpoint's tower weights in LLaVA names (a lazy mapping: nothing is read yet)."""
    source = read_safetensors(vision_tower)
    table = VISION_TABLE
    if not any(k.startswith("vision_model.") for k in source):  # a tower saved without the vision_model. level
        table = [("", VISION_TABLE[0][1])]
    return rename_keys(source, table, VISION_SKIP, what="CLIP vision checkpoint")


def to_llava(folder, vision_tower=None, tokenizer=None):
    """``(LlavaConfig, renamed state dict, tokenizer)`` for an original-layout LLaVA folder."""
    from transformers import LlavaConfig

    raw = read_json(Path(folder) / "config.json")
    kind = text_kind(raw)
    if kind is None:
        raise ValueError(f"{str(folder)!r} is not an original-layout LLaVA checkpoint; architectures "
                         f"{raw.get('architectures')}, supported: {list(ARCHITECTURES)}")
    if projector_type(raw) != "mlp2x_gelu":
        raise ValueError(f"projector {projector_type(raw)!r} is not supported; supported: mlp2x_gelu")
    if raw.get("mm_use_im_start_end", False):
        raise ValueError("mm_use_im_start_end=True (image start/end tokens) is not supported")
    state = rename_keys(read_safetensors(folder), TEXT_TABLE, what="LLaVA checkpoint")
    if not any(k.startswith("model.vision_tower.") for k in state):
        vision_config(vision_tower)  # says where the tower is to be found when it is missing
        state = merged(state, vision_weights(vision_tower))
    tokenizer = tokenizer_with_image_token(tokenizer or load_tokenizer(folder))
    selection = {**raw, **{k: v for k, v in nested_vision(raw).items() if k.startswith("mm_vision_select")}}
    select = selection.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ValueError(f"mm_vision_select_feature {select!r} is not supported; supported: patch, cls_patch")
    cfg = LlavaConfig(
        vision_config=vision_config(vision_tower, raw), text_config=text_config(raw, kind),
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=selection.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select == "patch" else "full", projector_hidden_act="gelu",
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.image_aspect_ratio = raw.get("image_aspect_ratio")
    return cfg, state, tokenizer


def processor_for(cfg, tokenizer, vision_tower=None, pad: Optional[bool] = None):
    """``LlavaProcessor`` with the tower's CLIP image processing; with ``pad`` (default: the checkpoint's
    ``image_aspect_ratio == "pad"``, as LLaVA-1.5) images are first padded to a square of the mean colour."""
    pad = getattr(cfg, "image_aspect_ratio", None) == "pad" if pad is None else pad
    from transformers import CLIPImageProcessor, LlavaProcessor

    vc = cfg.vision_config
    path = Path(vision_tower) if vision_tower is not None else None
    if path is not None and (path / "preprocessor_config.json").is_file():
        image_processor = CLIPImageProcessor.from_pretrained(str(path))
    else:
        image_processor = CLIPImageProcessor(size={"shortest_edge": vc.image_size},
                                             crop_size={"height": vc.image_size, "width": vc.image_size})
    image_processor = padded(image_processor) if pad else image_processor
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vc.patch_size,
                          vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                          num_additional_image_tokens=1, image_token=IMAGE_TOKEN)
