"""Plots. Analysis functions return data; these turn it into figures (returned, never shown)."""

from mm_lens.viz.circuit import CircuitDiagram, circuit_diagram, edges_from_path_patching
from mm_lens.viz.heatmaps import image_heatmap, layer_position_heatmap, patch_grid
from mm_lens.viz.knockout import knockout_curves

__all__ = ["layer_position_heatmap", "image_heatmap", "patch_grid", "knockout_curves", "circuit_diagram",
           "CircuitDiagram", "edges_from_path_patching"]
