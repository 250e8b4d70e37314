"""Sparse autoencoders (SAE-Lens) on HookedVLM: spliced at their hook, trained on chosen positions, read on the image.

* ``model.add_sae(sae)``, ``with model.saes([...])``, ``model.reset_saes()``, ``model.run_with_saes(...)``,
  ``model.run_with_cache_with_saes(...)``: SAE-Lens' ``HookedSAETransformer`` interface (:mod:`.splice`).
* :func:`activations` (batches for SAE-Lens' ``SAETrainer``) and :func:`write_cached_activations` (SAE-Lens'
  cached-activation format) at image, text or any group's positions (:mod:`.training`).
* :func:`feature_acts` / :func:`top_patches`: a feature over the image grid and its top image patches over a
  dataset (:mod:`.features`; figures in :mod:`mm_lens.viz.sae`).
* :func:`resolve_hook_name`, :func:`translate`, :func:`rename_hook`: TransformerBridge / Hugging Face hook
  names onto mm_lens' (:mod:`.names`).

Nothing here imports SAE-Lens: it reads SAE-Lens' SAE objects (``encode``, ``decode``, ``cfg``).
"""

from __future__ import annotations

from importlib import import_module

_EXPORTS = {
    "SAESplice": "splice", "SAEMixin": "splice", "special_token_ids": "splice",
    "activations": "training", "collect": "training", "write_cached_activations": "training",
    "feature_acts": "features", "top_patches": "features", "FeatureMap": "features", "TopPatches": "features",
    "resolve_hook_name": "names", "translate": "names", "rename_hook": "names", "TRANSLATIONS": "names",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mm_lens.sae' has no attribute {name!r}")
    value = getattr(import_module(f"mm_lens.sae.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
