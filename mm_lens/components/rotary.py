"""Rotary position embedding (the half-split convention of Llama/GPT-NeoX in Hugging Face).

Three ways to turn positions into angles, one set of frequencies (:func:`inverse_frequencies`):

* 1-D: ``position_ids [batch, pos]``, one position per token (Llama, Mistral, ...);
* M-RoPE (Qwen2-VL, Qwen2.5-VL): ``position_ids [3, batch, pos]`` (temporal, height, width). The
  frequency bands are cut into ``mrope_section`` (e.g. 16, 24, 24 of the 64 bands of a 128-dim head);
  band section ``i`` turns with axis ``i % 3``. Text tokens carry the same position on all three axes,
  so on text M-RoPE is the 1-D rotary. 1-D ids on an M-RoPE model mean that (as in Hugging Face).
  Interleaved M-RoPE (``mrope_interleaved``, Qwen3-VL): band ``j`` turns with the height axis when
  ``j % 3 == 1`` and ``j < 3 * mrope_section[1]``, with the width axis when ``j % 3 == 2`` and
  ``j < 3 * mrope_section[2]``, and with the temporal axis otherwise (Hugging Face's
  ``Qwen3VLTextRotaryEmbedding``), so every axis spans low and high frequencies.
* axial 2-D (the Qwen-VL vision towers): :func:`axial_angles`, each patch's (row, col) on half of
  the bands each.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn


def inverse_frequencies(rotary_dim: int, base: float, device=None) -> Float[Tensor, " half"]:
    """``1 / base ** (2i / rotary_dim)`` for ``i < rotary_dim / 2`` (float32)."""
    dims = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device)
    return 1.0 / (base ** (dims / rotary_dim))


class Rotary(nn.Module):
    """Holds ``inv_freq`` and turns position ids into ``(cos, sin)`` shared by every layer.

    ``mrope_section``: the M-RoPE split of the frequency bands over (temporal, height, width); with it,
    ``position_ids`` may be ``[3, batch, pos]``. ``mrope_interleaved``: the bands of the three axes alternate
    (Qwen3-VL) instead of following each other in sections (Qwen2-VL); see the module docstring.
    """

    def __init__(self, rotary_dim: int, base: float, attention_scaling: float = 1.0,
                 mrope_section: Optional[Sequence[int]] = None, mrope_interleaved: bool = False):
        super().__init__()
        self.rotary_dim = rotary_dim
        self.base = base
        self.attention_scaling = attention_scaling
        self.mrope_section = tuple(mrope_section) if mrope_section else None
        self.mrope_interleaved = mrope_interleaved
        if self.mrope_section and sum(self.mrope_section) != rotary_dim // 2:
            raise ValueError(f"mrope_section {list(self.mrope_section)} must sum to rotary_dim / 2 = {rotary_dim // 2}")
        if mrope_interleaved and (self.mrope_section is None or len(self.mrope_section) != 3):
            raise ValueError("interleaved M-RoPE needs an mrope_section of three lengths (temporal, height, width), "
                             f"got {mrope_section}")
        self.register_buffer("inv_freq", self.default_inv_freq(), persistent=False)

    def default_inv_freq(self, device=None) -> Tensor:
        return inverse_frequencies(self.rotary_dim, self.base, device)

    def _apply(self, fn, recurse=True):
        """Moves follow the model; ``inv_freq`` stays float32 whatever dtype the model is cast to."""
        keep = self.inv_freq
        super()._apply(fn, recurse)
        if keep.is_meta or self.inv_freq.is_meta:  # materialised from meta: recompute
            self.inv_freq = self.default_inv_freq(device=self.inv_freq.device)
        else:
            self.inv_freq = keep.to(device=self.inv_freq.device, dtype=torch.float32)
        return self

    def forward(
        self, position_ids: Int[Tensor, "*axes batch pos"], dtype: torch.dtype
    ) -> tuple[Float[Tensor, "batch pos 1 rot"], Float[Tensor, "batch pos 1 rot"]]:
        """``position_ids``: ``[batch, pos]``, or ``[3, batch, pos]`` on an M-RoPE model."""
        freqs = position_ids[..., None].float() * self.inv_freq.float()
        if position_ids.ndim == 3:
            freqs = self.multimodal(freqs)
        return _cos_sin(freqs, self.attention_scaling, dtype)

    def multimodal(self, freqs: Float[Tensor, "3 batch pos half"]) -> Float[Tensor, "batch pos half"]:
        """M-RoPE: each frequency band takes the angles of its axis (:meth:`band_axes`)."""
        if self.mrope_section is None:
            raise ValueError(f"position ids of shape {tuple(freqs.shape[:-1])} (M-RoPE: temporal, height, width) "
                             "need a model with multimodal rotary (mrope_section); this one takes [batch, pos]")
        if freqs.shape[0] != 3:
            raise ValueError(f"M-RoPE position ids must be [3, batch, pos], got {tuple(freqs.shape[:-1])}")
        axes = self.band_axes().to(freqs.device)
        return freqs.gather(0, axes.expand(1, *freqs.shape[1:]))[0]

    def band_axes(self) -> Int[Tensor, " half"]:
        """The axis (0 temporal, 1 height, 2 width) each frequency band turns with: band section ``i`` with axis
        ``i % 3``, or interleaved (module docstring)."""
        half = self.rotary_dim // 2
        if not self.mrope_interleaved:
            sections = torch.arange(len(self.mrope_section)) % 3
            return sections.repeat_interleave(torch.tensor(self.mrope_section))
        axes = torch.zeros(half, dtype=torch.long)
        for axis in (1, 2):
            axes[axis:3 * self.mrope_section[axis]:3] = axis
        return axes


def axial_angles(rows: Int[Tensor, "*shape"], cols: Int[Tensor, "*shape"], d_head: int, base: float
                 ) -> Float[Tensor, "*shape half"]:
    """2-D rotary of a vision tower: the first half of the bands turn with the row, the second with the column
    (frequencies of a ``d_head / 2`` rotary, as Qwen-VL's vision towers)."""
    inv_freq = inverse_frequencies(d_head // 2, base, rows.device)
    return torch.cat([rows[..., None].float() * inv_freq, cols[..., None].float() * inv_freq], dim=-1)


def axial_rotary(rows: Int[Tensor, "batch pos"], cols: Int[Tensor, "batch pos"], d_head: int, base: float,
                 dtype: torch.dtype) -> tuple[Float[Tensor, "batch pos 1 d_head"], Float[Tensor, "batch pos 1 d_head"]]:
    """``(cos, sin)`` of the 2-D rotary for patches at ``(rows, cols)``."""
    return _cos_sin(axial_angles(rows, cols, d_head, base), 1.0, dtype)


def _cos_sin(freqs: Tensor, scaling: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * scaling).to(dtype)
    sin = (emb.sin() * scaling).to(dtype)
    return cos[:, :, None, :], sin[:, :, None, :]


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"], cos: Tensor, sin: Tensor
) -> Float[Tensor, "batch pos head d_head"]:
    """Rotate the first ``cos.shape[-1]`` dims of every head; the rest pass through."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
    out = x_rot * cos + rotated * sin
    return out if x_pass.shape[-1] == 0 else torch.cat((out, x_pass), dim=-1)
