"""The patching toolkit in one place: activation, path and attribution patching, attention knockout."""

from mm_lens.analysis.attribution import attribution_patch
from mm_lens.analysis.knockout import PAPER_EDGES, attention_knockout, knockout_edges, knockout_hooks
from mm_lens.analysis.path_patching import path_patch
from mm_lens.analysis.patching import activation_patch
from mm_lens.analysis.results import PatchResult

__all__ = ["activation_patch", "path_patch", "attribution_patch", "attention_knockout", "knockout_edges",
           "knockout_hooks", "PAPER_EDGES", "PatchResult"]
