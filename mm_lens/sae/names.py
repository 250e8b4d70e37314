"""Hook names: mm_lens' (HookedTransformer's) and the ones SAEs trained elsewhere carry.

mm_lens names its hooks as TransformerLens' ``HookedTransformer`` (``blocks.3.hook_resid_post``), so SAEs
trained with SAE-Lens on a HookedTransformer splice in as they are. TransformerLens 3's
``TransformerBridge`` (which SAE-Lens' ``SAETransformerBridge`` uses) accepts those names as aliases of its
own (``blocks.3.hook_out``); Hugging Face module paths (SAE-Lens' ``HookedProxyLM``, nnsight) name the
module whose output is read (``model.layers.3``). :data:`TRANSLATIONS` maps both onto mm_lens' names.
"""

from __future__ import annotations

import difflib
import re
from typing import Optional

_BLOCK = r"blocks\.(\d+)\."
_VISION = r"vision_encoder\.encoder_layers\.(\d+)\."
_HF_LM = r"(?:model\.language_model\.|language_model\.model\.|model\.|language_model\.)layers\.(\d+)"
_HF_VISION = r"(?:model\.)?vision_tower\.vision_model\.encoder\.layers\.(\d+)"

# (TransformerBridge or Hugging Face name, mm_lens name): whole-name patterns, {g} the layer, first match wins.
TRANSLATIONS: list[tuple[str, str]] = [
    (_BLOCK + r"hook_in", "blocks.{g}.hook_resid_pre"),
    (_BLOCK + r"hook_out", "blocks.{g}.hook_resid_post"),
    (_BLOCK + r"ln2\.hook_in", "blocks.{g}.hook_resid_mid"),
    (_BLOCK + r"attn\.hook_out", "blocks.{g}.hook_attn_out"),
    (_BLOCK + r"attn\.q\.hook_out", "blocks.{g}.attn.hook_q"),
    (_BLOCK + r"attn\.k\.hook_out", "blocks.{g}.attn.hook_k"),
    (_BLOCK + r"attn\.v\.hook_out", "blocks.{g}.attn.hook_v"),
    (_BLOCK + r"attn\.o\.hook_in", "blocks.{g}.attn.hook_z"),
    (_BLOCK + r"mlp\.hook_out", "blocks.{g}.hook_mlp_out"),
    (_BLOCK + r"mlp\.out\.hook_in", "blocks.{g}.mlp.hook_post"),
    (_BLOCK + r"mlp\.gate\.hook_out", "blocks.{g}.mlp.hook_pre"),
    (_BLOCK + r"mlp\.in\.hook_out", "blocks.{g}.mlp.hook_pre_linear|blocks.{g}.mlp.hook_pre"),  # gated | not
    (_VISION + r"hook_(?:in|resid_pre)", "vision_encoder.blocks.{g}.hook_resid_pre"),
    (_VISION + r"hook_(?:out|resid_post)", "vision_encoder.blocks.{g}.hook_resid_post"),
    (_VISION + r"(?:attn\.hook_out|hook_attn_out)", "vision_encoder.blocks.{g}.hook_attn_out"),
    (_VISION + r"(?:mlp\.hook_out|hook_mlp_out)", "vision_encoder.blocks.{g}.hook_mlp_out"),
    (r"embed\.hook_out", "hook_embed"),
    (_HF_LM, "blocks.{g}.hook_resid_post"),
    (_HF_LM + r"\.self_attn", "blocks.{g}.hook_attn_out"),
    (_HF_LM + r"\.mlp", "blocks.{g}.hook_mlp_out"),
    (_HF_VISION, "vision_encoder.blocks.{g}.hook_resid_post"),
]


def translate(name: str, gated_mlp: bool = True) -> Optional[str]:
    """The mm_lens name of a TransformerBridge or Hugging Face hook name (None if it has none)."""
    for pattern, target in TRANSLATIONS:
        m = re.fullmatch(pattern, name)
        if m:
            choices = target.format(g=m.group(1) if m.groups() else "").split("|")
            return choices[0] if gated_mlp or len(choices) == 1 else choices[1]
    return None


def resolve_hook_name(model, name: Optional[str]) -> str:
    """``name`` if it is a hook point of ``model`` (or an SAE splice), else its translation; a ValueError naming
    the nearest hook points otherwise."""
    if not name:
        raise ValueError("the SAE has no hook name (sae.cfg.metadata.hook_name); set it to the hook it reads")
    if name in model.hook_dict or name in getattr(model, "_splices", {}) or _is_splice(model, name):
        return name
    translated = translate(name, model.cfg.gated_mlp)
    if translated is not None and (translated in model.hook_dict or _is_splice(model, translated)):
        return translated
    near = difflib.get_close_matches(translated or name, list(model.hook_dict), n=3, cutoff=0.4)
    raise ValueError(f"{name!r} is not a hook point of this model{f' (read as {translated!r})' if translated else ''}; "
                     f"nearest: {near}. model.hook_dict lists them all; mm_lens.sae.rename_hook(sae, name) renames one")


def _is_splice(model, name: str) -> bool:
    from mm_lens.sae.splice import SAESplice

    try:
        return isinstance(model.get_submodule(name), SAESplice)
    except AttributeError:
        return False


def block_of(name: str) -> Optional[tuple[str, int]]:
    """``("blocks", 3)`` for a hook inside a language-model block, ``("vision", 3)`` in the vision tower, else None."""
    m = re.match(r"(vision_encoder\.)?blocks\.(\d+)\.", name)
    return None if m is None else ("vision" if m.group(1) else "blocks", int(m.group(2)))


def expected_width(model, name: str) -> Optional[int]:
    """Numbers per position at a hook (``hook_z``/``q``/``k``/``v`` flattened over heads, as SAE-Lens reads them);
    None where it is not fixed by the config."""
    cfg = model.cfg
    vision = name.startswith("vision_encoder.")
    d_model = cfg.vision.d_model if vision and cfg.vision else cfg.d_model
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "hook_mlp_in",
                "hook_embed") or name in ("vision_projector.hook_out",):
        return d_model
    if leaf in ("hook_pre", "hook_post", "hook_pre_linear"):
        return (cfg.vision.d_mlp if vision and cfg.vision else cfg.d_mlp)
    if leaf in ("hook_z", "hook_q"):
        return (cfg.vision.n_heads * cfg.vision.d_head) if vision and cfg.vision else cfg.n_heads * cfg.d_head
    return None


def rename_hook(sae, hook_name: str, hook_name_out: Optional[str] = None):
    """``sae`` set to read at ``hook_name`` (and, for a transcoder, write at ``hook_name_out``): for an SAE trained
    on the text tower under other names. Changes ``sae.cfg.metadata`` in place and returns the SAE."""
    sae.cfg.metadata.hook_name = hook_name
    if hook_name_out is not None:
        sae.cfg.metadata.hook_name_out = hook_name_out
    return sae
