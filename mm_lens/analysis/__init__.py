"""Analysis methods, one per file; free functions returning data (plots live in mm_lens.viz)."""

from mm_lens.analysis import groups
from mm_lens.analysis.attention import ImageAttention, attention_to_image
from mm_lens.analysis.attribution import attribution_patch
from mm_lens.analysis.causal_trace import CausalTrace, causal_trace
from mm_lens.analysis.contribution import Contribution, attention_contribution
from mm_lens.analysis.editing import Edit, multedit
from mm_lens.analysis.knockout import PAPER_EDGES, attention_knockout, knockout_edges, knockout_hooks
from mm_lens.analysis.lens import LogitLensResult, logit_lens
from mm_lens.analysis.patching import activation_patch
from mm_lens.analysis.path_patching import path_patch
from mm_lens.analysis.results import PatchResult
from mm_lens.analysis.similarity import ModalitySimilarity, modality_similarity
from mm_lens.analysis.token_budget import TokenBudget, patch_ablation_map, visual_token_budget

__all__ = ["groups", "logit_lens", "LogitLensResult", "attention_to_image", "ImageAttention", "attention_contribution",
           "Contribution", "causal_trace", "CausalTrace", "multedit", "Edit", "modality_similarity", "ModalitySimilarity",
           "visual_token_budget", "patch_ablation_map", "TokenBudget"]
__all__ += ["PatchResult", "activation_patch", "path_patch", "attribution_patch", "attention_knockout",
            "knockout_edges", "knockout_hooks", "PAPER_EDGES"]
