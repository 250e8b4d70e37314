"""LayerNorm and RMSNorm with TransformerLens hooks (``hook_scale``, ``hook_normalized``).

``center`` subtracts the mean (LayerNorm); without ``weight`` the norm is the
folded ``*Pre`` form that :func:`mm_lens.weights.fold_layer_norm` leaves behind.
Half-precision inputs are normalised in float32 (as Hugging Face and TransformerLens do), so
``hook_scale`` is float32 there; the output is cast back to the input's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint


class Norm(nn.Module):
    def __init__(self, d_model: int, eps: float, center: bool, bias: bool, weight: bool = True):
        super().__init__()
        self.eps = eps
        self.center = center
        self.w: Optional[nn.Parameter] = nn.Parameter(torch.ones(d_model)) if weight else None
        self.b: Optional[nn.Parameter] = nn.Parameter(torch.zeros(d_model)) if bias else None
        self.hook_scale = HookPoint()  # [batch, pos, 1]
        self.hook_normalized = HookPoint()  # [batch, pos, d_model]

    @property
    def kind(self) -> str:
        base = "LN" if self.center else "RMS"
        return base if self.w is not None else base + "Pre"

    def fold(self) -> None:
        """Drop weight and bias (after they were folded into the next layer's weights)."""
        self.w, self.b = None, None

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        dtype = x.dtype
        x = self._centered(x)
        scale = self.hook_scale(self._scale(x))  # float32 for half inputs
        return self.hook_normalized(self._affine(x / scale, bias=True).to(dtype))

    def at_scale_of(self, x: Float[Tensor, "... pos d_model"], part: Float[Tensor, "... pos d_model"]
                    ) -> Float[Tensor, "... pos d_model"]:
        """``part`` through this norm with the scale held at the one it computes for ``x`` (weight, no bias):
        linear in ``part``, so parts that sum to ``x`` map to parts that sum to ``self(x)`` minus the bias (e.g.
        each head's share of a sandwich norm's output)."""
        return self._affine(self._centered(part) / self._scale(self._centered(x)), bias=False).to(part.dtype)

    def _centered(self, x: Tensor) -> Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):  # normalised in float32, as Hugging Face and TransformerLens do
            x = x.float()
        return x - x.mean(-1, keepdim=True) if self.center else x

    def _scale(self, x: Tensor) -> Tensor:
        return (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def _affine(self, x: Tensor, bias: bool) -> Tensor:
        if self.w is not None:
            x = x * self.w.to(x.dtype)
        if bias and self.b is not None:
            x = x + self.b.to(x.dtype)
        return x


def make_norm(kind: str, d_model: int, eps: float) -> Norm:
    """``kind`` is TransformerLens' normalization_type: LN, LNPre, RMS or RMSPre."""
    table = {
        "LN": dict(center=True, bias=True, weight=True),
        "LNPre": dict(center=True, bias=False, weight=False),
        "RMS": dict(center=False, bias=False, weight=True),
        "RMSPre": dict(center=False, bias=False, weight=False),
    }
    if kind not in table:
        raise ValueError(f"normalization_type must be one of {sorted(table)}, got {kind!r}")
    return Norm(d_model, eps, **table[kind])
