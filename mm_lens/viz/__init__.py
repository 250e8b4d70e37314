"""Plots. Analysis functions return data; these turn it into figures (returned, never shown by the
library; a figure that is a notebook cell's value displays as a PNG)."""

from mm_lens.viz.circuit import CircuitDiagram, circuit_diagram, edges_from_path_patching
from mm_lens.viz.heatmaps import image_heatmap, layer_position_heatmap, patch_grid
from mm_lens.viz.interaction import (
                                     plot_attention_to_image,
                                     plot_logit_lens_grid,
                                     plot_modality_similarity,
                                     plot_patch_ablation,
                                     plot_token_budget,
)
from mm_lens.viz.knockout import knockout_curves
from mm_lens.viz.sae import feature_dashboard, feature_image_map
from mm_lens.viz.tracing import input_image, plot_causal_trace, plot_contribution, plot_edit, plot_patch_grid

__all__ = ["layer_position_heatmap", "image_heatmap", "patch_grid", "knockout_curves", "circuit_diagram",
           "CircuitDiagram", "edges_from_path_patching", "plot_causal_trace", "plot_contribution", "plot_edit",
           "plot_patch_grid", "input_image", "plot_logit_lens_grid", "plot_modality_similarity",
           "plot_attention_to_image", "plot_token_budget", "plot_patch_ablation", "feature_image_map", "feature_dashboard"]
