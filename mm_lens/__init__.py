"""mm_lens: TransformerLens-style interpretability for vision-language models.

The names below are imported on first use, so ``import mm_lens`` (and ``mm-lens --help``) does not
load torch or transformers.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    "HookedVLM": "mm_lens.model", "VLMConfig": "mm_lens.config", "VisionConfig": "mm_lens.config",
    "ProjectorConfig": "mm_lens.config", "MultimodalInput": "mm_lens.inputs", "PositionMap": "mm_lens.inputs",
    "RowPositions": "mm_lens.inputs", "supported_architectures": "mm_lens.conversion", "load_toy": "mm_lens.toy",
    "KVCache": "mm_lens.components", "positionwise": "mm_lens.hooks",
}
__all__ = ["HookedVLM", "VLMConfig", "VisionConfig", "ProjectorConfig", "MultimodalInput", "PositionMap", "RowPositions",
           "supported_architectures", "load_toy", "KVCache", "positionwise"]

if TYPE_CHECKING:
    from mm_lens.components import KVCache
    from mm_lens.config import ProjectorConfig, VisionConfig, VLMConfig
    from mm_lens.conversion import supported_architectures
    from mm_lens.hooks import positionwise
    from mm_lens.inputs import MultimodalInput, PositionMap, RowPositions
    from mm_lens.model import HookedVLM
    from mm_lens.toy import load_toy


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mm_lens' has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
