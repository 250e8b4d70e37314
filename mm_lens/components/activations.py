"""Activation functions by the names Hugging Face configs use."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# Each takes ``out=``: the result is written there when given (same kernels, same values).
Activation = Callable[..., Tensor]


def _silu(x: Tensor, out: Optional[Tensor] = None) -> Tensor:
    return F.silu(x) if out is None else torch.ops.aten.silu.out(x, out=out)


def _relu(x: Tensor, out: Optional[Tensor] = None) -> Tensor:
    return F.relu(x) if out is None else torch.clamp(x, min=0, out=out)


def _gelu(x: Tensor, out: Optional[Tensor] = None, approximate: str = "none") -> Tensor:
    if out is None:
        return F.gelu(x, approximate=approximate)
    return torch.ops.aten.gelu.out(x, approximate=approximate, out=out)


def _gelu_tanh(x: Tensor, out: Optional[Tensor] = None) -> Tensor:
    return _gelu(x, out, approximate="tanh")


def _gelu_new(x: Tensor, out: Optional[Tensor] = None) -> Tensor:
    return torch.mul(0.5 * x, 1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))), out=out)


def _quick_gelu(x: Tensor, out: Optional[Tensor] = None) -> Tensor:
    return torch.mul(x, torch.sigmoid(1.702 * x), out=out)


ACTIVATIONS: dict[str, Activation] = {
    "silu": _silu,
    "swish": _silu,
    "relu": _relu,
    "gelu": _gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_new,
    "gelu_fast": _gelu_new,
    "quick_gelu": _quick_gelu,
}


def get_activation(name: str) -> Activation:
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
