"""mm_lens: TransformerLens-style interpretability for vision-language models."""

from mm_lens.components import KVCache
from mm_lens.config import ProjectorConfig, VisionConfig, VLMConfig
from mm_lens.conversion import supported_architectures
from mm_lens.hooks import positionwise
from mm_lens.inputs import MultimodalInput, PositionMap, RowPositions
from mm_lens.model import HookedVLM
from mm_lens.toy import load_toy

__all__ = [
    "HookedVLM", "VLMConfig", "VisionConfig", "ProjectorConfig", "MultimodalInput", "PositionMap",
    "RowPositions", "supported_architectures", "load_toy", "KVCache", "positionwise",
]
__version__ = "0.1.0"
