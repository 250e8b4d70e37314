"""TransformerLens' ``ActivationCache`` with the residual-stream writes TransformerLens does not know of.

Qwen3-VL's DeepStack blocks add vision features after their ``hook_resid_post`` (``blocks.{l}.hook_visual_in``,
zero at text positions; :class:`mm_lens.components.Block`). TransformerLens' decompositions stack the embeddings
and every ``attn_out`` / ``mlp_out`` only, so their sum would miss those features; here they are components of
their own, labelled ``{l}_visual_in``, and every decomposition sums to the residual stream again.
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens import ActivationCache
from transformer_lens.utilities.slice import Slice  # transformer-lens 3.x and 4.x


class VLMActivationCache(ActivationCache):
    """An ``ActivationCache`` whose :meth:`decompose_resid` and :meth:`get_full_resid_decomposition` include the
    DeepStack additions (``{l}_visual_in``) of the blocks before ``layer``; otherwise TransformerLens' own."""

    def visual_in(self, layer: int, pos_slice=None) -> tuple[Optional[Float[Tensor, "k *batch_pos d_model"]], list[str]]:
        """The ``hook_visual_in`` activations of the blocks before ``layer`` (None if there are none)."""
        pos_slice = pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
        names = [(l, f"blocks.{l}.hook_visual_in") for l in range(layer)]
        found = [(l, n) for l, n in names if n in self.cache_dict]
        if len(found) < sum(getattr(self.model.blocks[l], "hook_visual_in", None) is not None for l in range(layer)):
            raise ValueError("this cache lacks some blocks.{l}.hook_visual_in (DeepStack) activations, without which "
                             "the decomposition is not the residual stream: cache them too")
        if not found:
            return None, []
        parts = [pos_slice.apply(self.cache_dict[n], dim=-2) for _, n in found]
        return torch.stack(parts), [f"{l}_visual_in" for l, _ in found]

    def decompose_resid(self, layer: Optional[int] = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice=None, incl_embeds: bool = True, return_labels: bool = False):
        """As TransformerLens, with ``{l}_visual_in`` after ``{l}_mlp_out`` (``mode="all"``)."""
        layer = self.model.cfg.n_layers if layer is None or layer == -1 else layer
        stack, labels = super().decompose_resid(layer, mlp_input, mode, False, pos_slice, incl_embeds, True)
        visual, visual_labels = self.visual_in(layer, pos_slice) if mode == "all" else (None, [])
        if visual is not None:
            parts, names = list(stack), list(labels)
            for v, label in zip(visual, visual_labels):
                at = names.index(label.replace("visual_in", "mlp_out")) + 1
                parts.insert(at, v)
                names.insert(at, label)
            stack, labels = torch.stack(parts), names
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, mlp_input=mlp_input)
        return (stack, labels) if return_labels else stack

    def get_full_resid_decomposition(self, layer: Optional[int] = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False, pos_slice=None,
                                     return_labels: bool = False, project_output_onto: Optional[Tensor] = None):
        """As TransformerLens, with the ``{l}_visual_in`` components appended (normalised and projected alike)."""
        layer = self.model.cfg.n_layers if layer is None or layer == -1 else layer
        stack, labels = super().get_full_resid_decomposition(layer, mlp_input, expand_neurons, apply_ln, pos_slice,
                                                             True, project_output_onto)
        visual, visual_labels = self.visual_in(layer, pos_slice)
        if visual is not None:
            if apply_ln:
                visual = self.apply_ln_to_stack(visual, layer, pos_slice=pos_slice, mlp_input=mlp_input)
            if project_output_onto is not None:
                visual = visual @ project_output_onto.to(visual)
            stack, labels = torch.cat([stack, visual.to(stack.dtype)]), labels + visual_labels
        return (stack, labels) if return_labels else stack
