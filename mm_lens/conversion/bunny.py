"""Multimodal Phi-2 in the Bunny layout (``BunnyPhiForCausalLM``, model_type ``bunny-phi``).

The published checkpoint is remote code; nothing of it is executed here. Facts used
(from the Bunny repository and its published configs):

- ``config.json``: Phi-2 fields flat (``hidden_size``, ``partial_rotary_factor``, ``rope_theta``,
  ``layer_norm_eps``, ...) plus ``mm_vision_tower`` (a SigLIP checkpoint name),
  ``mm_hidden_size``, ``mm_projector_type`` (``mlp2x_gelu`` supported).
- weights: the Phi-2 model under ``model.`` (``model.layers.{l}.self_attn.{q,k,v}_proj``,
  ``dense``, ``mlp.fc1/fc2``, ``input_layernorm``, ``model.final_layernorm``), ``lm_head.weight``
  (a bias only in some variants), the SigLIP tower under
  ``model.vision_tower.vision_tower.vision_model.``, the projector as
  ``model.mm_projector.{0,2}`` (an ``nn.Sequential`` of Linear, GELU, Linear).
- features: SigLIP ``hidden_states[-2]``, every patch (no class token). The Hugging Face
  remote-code release deletes the tower's last layer and takes ``hidden_states[-1]``
  instead; both are recognised by counting the layers present.
- the image placeholder is the id -200, inserted between separately tokenized chunks and
  expanded to the image features at run time. Here ``<image>`` becomes a special token of the
  tokenizer (same chunking), expanded by :class:`mm_lens.inputs.MultimodalInput` as for LLaVA.

The layout maps one-to-one onto Hugging Face ``LlavaForConditionalGeneration`` (Phi text
tower, SigLIP vision tower, strategy ``full``): :func:`to_llava` renames the keys by a prefix
table and writes the matching ``LlavaConfig``; the LLaVA key tables do the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from mm_lens.conversion.checkpoint import layer_count, load_tokenizer, read_json, read_safetensors, rename_keys

ARCHITECTURE = "BunnyPhiForCausalLM"
MODEL_TYPE = "bunny-phi"
IMAGE_TOKEN = "<image>"
VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."

# source prefix -> Hugging Face LLaVA prefix (first match wins: most specific first)
KEY_TABLE = [
    (VISION_PREFIX, "model.vision_tower."),
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.", "model.language_model."),
    ("lm_head.", "lm_head."),
]
SKIPPED = (VISION_PREFIX + "head.",)  # SigLIP's attention-pooling head (replaced by Identity in Bunny)

# google/siglip-so400m-patch14-384, the tower every published Bunny-Phi uses (its remote code hard-codes it)
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
PHI_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "hidden_act", "max_position_embeddings", "layer_norm_eps", "rope_theta",
              "partial_rotary_factor", "qk_layernorm", "tie_word_embeddings", "bos_token_id", "eos_token_id",
              "pad_token_id", "rope_parameters")


def is_bunny(raw: dict) -> bool:
    return ARCHITECTURE in (raw.get("architectures") or []) or raw.get("model_type") == MODEL_TYPE


def is_bunny_folder(path) -> bool:
    config = Path(str(path)) / "config.json"
    return config.is_file() and is_bunny(read_json(config))


def vision_config(vision_tower: Optional[str], n_layers_in_checkpoint: int):
    """SigLIP config of the tower (``vision_tower``: a folder or config.json of the SigLIP checkpoint;
    None: so400m-patch14-384) and the hidden-state index Bunny reads from the layers present."""
    from transformers import SiglipVisionConfig

    fields = dict(SO400M)
    if vision_tower is not None:
        path = Path(vision_tower)
        raw = read_json(path / "config.json" if path.is_dir() else path)
        raw = raw.get("vision_config", raw)
        fields.update({k: raw[k] for k in (*SO400M, "num_channels") if k in raw})
    full = fields["num_hidden_layers"]
    if n_layers_in_checkpoint == full:
        layer = -2  # Bunny repository: whole tower, hidden_states[-2]
    elif n_layers_in_checkpoint == full - 1:
        layer = -1  # remote-code release: last layer deleted, hidden_states[-1]
    else:
        raise ValueError(
            f"the checkpoint has {n_layers_in_checkpoint} vision layers but the SigLIP config says {full}; "
            "pass the matching tower with vision_tower=PATH (its config.json)"
        )
    fields["num_hidden_layers"] = n_layers_in_checkpoint
    return SiglipVisionConfig(**fields, vision_use_head=False), layer


def text_config(raw: dict):
    from transformers import PhiConfig

    if raw.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"Bunny projector {raw['mm_projector_type']!r} is not supported; supported: mlp2x_gelu")
    return PhiConfig(**{k: raw[k] for k in PHI_FIELDS if k in raw})


def tokenizer_with_image_token(tokenizer):
    """Add ``<image>`` as a special token (Bunny splits prompts there and tokenizes each chunk alone)."""
    from tokenizers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    return tokenizer


def to_llava(folder, vision_tower: Optional[str] = None, tokenizer=None):
    """``(LlavaConfig, renamed state dict, tokenizer)`` for a Bunny-Phi checkpoint folder."""
    from transformers import LlavaConfig

    raw = read_json(Path(folder) / "config.json")
    if not is_bunny(raw):
        raise ValueError(f"{str(folder)!r} is not a Bunny-Phi checkpoint (architectures {raw.get('architectures')})")
    source = read_safetensors(folder)
    n_vision = layer_count(source, VISION_PREFIX + "encoder.layers.")
    vc, layer = vision_config(vision_tower, n_vision)
    tc = text_config(raw)
    if tokenizer is None:
        tokenizer = load_tokenizer(folder)  # tokenizer files only: no code runs, config.json's auto_map unread
    tokenizer = tokenizer_with_image_token(tokenizer)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if raw.get("mm_hidden_size", vc.hidden_size) != vc.hidden_size:
        raise ValueError(f"mm_hidden_size {raw['mm_hidden_size']} != vision width {vc.hidden_size}: wrong vision_tower?")
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=image_token_id, vision_feature_layer=layer,
                      vision_feature_select_strategy="full", projector_hidden_act="gelu",
                      multimodal_projector_bias=True, tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)))
    cfg.architectures = ["LlavaForConditionalGeneration"]
    cfg.image_aspect_ratio = raw.get("image_aspect_ratio")
    state = rename_keys(source, KEY_TABLE, SKIPPED, what="Bunny-Phi checkpoint")
    return cfg, state, tokenizer


def processor_for(cfg, tokenizer, vision_tower: Optional[str] = None, pad: Optional[bool] = None):
    """A ``LlavaProcessor`` (SigLIP image processing, every patch an image token); with ``pad`` (default:
    the checkpoint's ``image_aspect_ratio == "pad"``) images are first padded to a square as Bunny does."""
    pad = getattr(cfg, "image_aspect_ratio", None) == "pad" if pad is None else pad
    from transformers import LlavaProcessor, SiglipImageProcessor

    vc = cfg.vision_config
    path = Path(vision_tower) if vision_tower is not None else None
    if path is not None and (path / "preprocessor_config.json").is_file():
        image_processor = SiglipImageProcessor.from_pretrained(str(path))
    else:
        image_processor = SiglipImageProcessor(size={"height": vc.image_size, "width": vc.image_size})
    return LlavaProcessor(image_processor=padded(image_processor) if pad else image_processor, tokenizer=tokenizer,
                          patch_size=vc.patch_size, vision_feature_select_strategy="full",
                          num_additional_image_tokens=0, image_token=IMAGE_TOKEN)


def padded(image_processor):
    """The same image processing after Bunny's / LLaVA-1.5's ``image_aspect_ratio: pad`` (each image centred
    on a square of the processor's mean colour first). Saved processors drop the padding (plain class)."""
    base = type(image_processor)

    class PadToSquare(base):
        def preprocess(self, images, *args, **kwargs):
            single = not isinstance(images, (list, tuple))
            images = [pad_to_square(im, self.image_mean) for im in ([images] if single else images)]
            return super().preprocess(images, *args, **kwargs)

        def to_dict(self):
            out = super().to_dict()
            out["image_processor_type"] = base.__name__
            return out

    PadToSquare.__name__ = f"PadToSquare{base.__name__}"
    out = PadToSquare.from_dict(image_processor.to_dict())
    return out


def pad_to_square(image, mean=(0.5, 0.5, 0.5)):
    """Bunny's ``image_aspect_ratio: pad``: centre the image on a square of the mean colour."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        return image  # pixel tensors / arrays are taken as already prepared
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new(image.mode, (side, side), tuple(int(m * 255) for m in mean))
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out
