"""Where each part of a HookedVLM lives: one device, or several as Hugging Face's ``device_map`` places them.

A device map is keyed by module names at or above a part (:func:`mm_lens.weights.weight_parts`):
``""`` (everything), ``"vision_encoder"`` (the whole tower; it stays on one device), ``"vision_projector"``,
``"embed"``, ``"blocks"`` or ``"blocks.{l}"``, ``"unembed"`` (``ln_final`` follows it) and so on; the
longest matching key wins. ``"auto"`` / ``"balanced"`` / ``"balanced_low_0"`` / ``"sequential"`` infer one with
accelerate from ``max_memory`` (as Hugging Face does), never splitting the vision tower, the projector or a
block. Parts on different devices run where their weights are; the forward moves the residual stream between
them. ``"cpu"`` entries therefore compute on the CPU (no weight streaming to a GPU); ``"disk"`` is refused.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch

from mm_lens.weights import weight_parts

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
NO_SPLIT = ["VisionEncoder", "Block", "Projector", "PooledProjector", "QwenVisionEncoder", "PatchMerger"]
FOLLOWS = {"head": "unembed"}  # parts that sit with another module (and an image pipeline's modules: the projector)
NO_WEIGHTS = ("rotary", "hook_embed")  # modules accelerate may name that hold no weights
EXAMPLES = "'', 'vision_encoder', 'vision_projector', 'embed', 'blocks', 'blocks.{l}', 'unembed'"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def as_device(value) -> torch.device:
    """A device-map value (an int is a CUDA index, as in Hugging Face) as a ``torch.device``."""
    if isinstance(value, bool) or value in ("disk", "meta"):
        raise ValueError(f"device {value!r} is not supported in a device map: HookedVLM keeps every weight on a "
                         "GPU or on the CPU (give the CPU more max_memory instead of offloading to disk)")
    if isinstance(value, int):
        return torch.device("cuda", value)
    return torch.device(value)


def place(model, device=None, device_map: Union[None, str, Mapping] = None, max_memory: Optional[Mapping] = None,
          dtype: torch.dtype = torch.float32) -> dict[str, torch.device]:
    """``{part: device}`` for every part of ``model`` (a skeleton on the meta device is enough)."""
    if device_map is None:
        if max_memory is not None:
            raise ValueError("max_memory only applies with device_map='auto' (or 'balanced', 'sequential')")
        device = torch.device(device or default_device())
        return {part: device for part in weight_parts(model)}
    if device is not None:
        raise ValueError("pass either device=... or device_map=..., not both")
    if isinstance(device_map, str) and device_map in STRATEGIES:
        device_map = infer_device_map(model, device_map, max_memory, dtype)
    elif max_memory is not None:
        raise ValueError(f"max_memory only applies with device_map in {STRATEGIES}, not with an explicit map")
    elif isinstance(device_map, (str, int, torch.device)):
        device_map = {"": device_map}
    return resolve_device_map(model, device_map)


def resolve_device_map(model, device_map: Mapping) -> dict[str, torch.device]:
    """Each part's device by the longest key of ``device_map`` that names it or a module above it."""
    entries = {str(k): as_device(v) for k, v in device_map.items()}
    parts = weight_parts(model)
    follows = {**FOLLOWS, **{name: "vision_projector" for name in getattr(model, "image_modules", ())}}
    names = {part: follows.get(part, part) for part in parts}
    problems = [f"{key!r} names no module (or one finer than a block): use keys such as {EXAMPLES}"
                for key in entries if key not in NO_WEIGHTS and not any(_covers(key, n) for n in names.values())]
    out, uncovered = {}, []
    for part, name in names.items():
        keys = [k for k in entries if _covers(k, name)]
        if keys:
            out[part] = entries[max(keys, key=len)]
        else:
            uncovered.append(part)
    if uncovered:
        problems.append(f"no device for {uncovered}")
    tower = sorted({str(d) for p, d in out.items() if p.startswith("vision_encoder")})
    if len(tower) > 1:
        problems.append(f"the vision tower must sit on one device, the map spreads it over {tower}")
    if problems:
        raise ValueError("invalid device_map:\n  - " + "\n  - ".join(problems))
    return out


def _covers(key: str, name: str) -> bool:
    return key == "" or name == key or name.startswith(key + ".")


def infer_device_map(model, strategy: str, max_memory: Optional[Mapping], dtype: torch.dtype) -> dict:
    """accelerate's device-map inference over the model's skeleton (no part split below a block)."""
    try:
        from accelerate import infer_auto_device_map
        from accelerate.utils import compute_module_sizes, get_balanced_memory, get_max_memory
    except ImportError as err:
        raise ValueError(f"device_map={strategy!r} needs accelerate: pip install accelerate") from err
    limits = get_max_memory(dict(max_memory) if max_memory is not None else None)
    if strategy != "sequential":
        limits = get_balanced_memory(model, max_memory=limits, no_split_module_classes=NO_SPLIT, dtype=dtype,
                                     low_zero=strategy == "balanced_low_0")
    inferred = infer_auto_device_map(model, max_memory=limits, no_split_module_classes=NO_SPLIT, dtype=dtype)
    left_out = [name or "the whole model" for name, device in inferred.items() if device == "disk"]
    if left_out:
        need = compute_module_sizes(model, dtype=dtype)[""]
        allowed = sum(limits.values())
        raise ValueError(
            f"the model does not fit in max_memory: it needs {need / 2**30:.2f} GiB of weights in {dtype} "
            f"({need} bytes) but max_memory allows {allowed / 2**30:.2f} GiB ({_describe(limits)}); "
            f"{left_out} would have to go to disk, which HookedVLM does not do. Raise max_memory (a 'cpu' entry "
            "holds what the GPUs cannot) or load in a smaller dtype"
        )
    return inferred


def _describe(limits: Mapping) -> str:
    return ", ".join(f"{k}: {v / 2**30:.2f} GiB" for k, v in limits.items())
