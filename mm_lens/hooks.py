"""Hooks already on a model, and which of them a run on a suffix of positions honours exactly.

The fast patching engine resumes a run at layer L for positions ``>= start`` only, with the
base run's keys and values of the earlier positions. Every hook on a module it runs (blocks L
and later, the final norm, the unembedding, rotary) fires there on that suffix, on a batch
repeated once per patch. That gives the full forward's answer only for hooks that treat every
position and every batch row alike (a scale, a steering vector, an SAE applied per position) or
that read their position from the shape they get, as :func:`~mm_lens.analysis.knockout.knockout_hooks`
does. Such hooks carry a mark (:func:`positionwise`); any other hook that would fire sends the
engine back to full forwards (or is an error with ``fast=True``).
"""

from __future__ import annotations

from typing import Callable, TypeVar

import torch
from torch import nn
from transformer_lens.hook_points import HookPoint

F = TypeVar("F")
_MARK = "mm_lens_suffix_exact"


def positionwise(fn: F) -> F:
    """Mark a hook (function or module spliced in place of a HookPoint) as exact on any subset of positions.

    The promise: it acts on every position and every batch row alike, independently of the others
    (e.g. ``x * 0.5``, ``x + steering``, an SAE encode/decode per position), so the fast patching engine
    may keep it on while it recomputes only the positions a patch changes. Returns ``fn``.
    """
    setattr(fn, _MARK, True)
    return fn


def suffix_exact(fn) -> bool:
    """Whether ``fn`` (or the function inside a ``functools.partial``) carries the :func:`positionwise` mark."""
    return bool(getattr(fn, _MARK, False) or getattr(getattr(fn, "func", None), _MARK, False))


def _user_hook(module: nn.Module, hook_id: int, fn: Callable) -> Callable:
    """The function a user gave ``HookPoint.add_hook`` for the torch hook ``hook_id`` (else ``fn`` itself)."""
    for handle in getattr(module, "fwd_hooks", []):
        if getattr(handle.hook, "id", None) == hook_id:
            user = getattr(handle, "user_hook", None)
            if user is not None:
                return user
            cells = dict(zip(fn.__code__.co_freevars, fn.__closure__ or ()))  # older TransformerLens
            return cells["hook"].cell_contents if "hook" in cells else fn
    return fn


def _describe(name: str, fn: Callable, kind: str) -> str:
    label = getattr(fn, "__qualname__", None) or getattr(getattr(fn, "func", None), "__qualname__", None) or repr(fn)
    return f"{name or '<model>'}: {kind} {label}"


def module_hooks(name: str, module: nn.Module) -> list[tuple[str, Callable]]:
    """``(description, function)`` of every forward hook and pre-hook on ``module`` itself."""
    out = []
    for hook_id, fn in module._forward_hooks.items():
        user = _user_hook(module, hook_id, fn)
        out.append((_describe(name, user, "hook" if isinstance(module, HookPoint) else "forward hook"), user))
    for fn in module._forward_pre_hooks.values():
        out.append((_describe(name, fn, "forward pre-hook"), fn))
    return out


def _replaced(name: str, module: nn.Module) -> bool:
    """A module standing where a HookPoint was (e.g. an SAE spliced in at ``blocks.3.hook_resid_post``)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf.startswith("hook_") and (not isinstance(module, HookPoint) or type(module).forward is not HookPoint.forward)


def inexact_hooks(model, first_layer: int) -> list[str]:
    """Hooks a run resumed at ``first_layer`` on a suffix of positions would not honour exactly.

    Looks at the modules such a run calls (blocks ``first_layer..``, ``ln_final``, ``unembed``, the rotary tables)
    and at the model itself (the resumed run never calls its ``forward``), and at global module hooks.
    """
    found = []
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        found.append("global module hooks (torch.nn.modules.module.register_module_forward_hook)")
    found += [d for d, _ in module_hooks("", model)]
    parts = [(f"blocks.{l}", model.blocks[l]) for l in range(first_layer, len(model.blocks))]
    parts += [(n, getattr(model, n)) for n in ("ln_final", "unembed", "rotary", "rotary_local")
              if getattr(model, n, None) is not None]
    for prefix, part in parts:
        skip = ()
        for sub, module in part.named_modules(prefix=prefix):
            if sub.startswith(skip):
                continue
            if _replaced(sub, module) and not suffix_exact(module):
                found.append(f"{sub}: replaced by {type(module).__name__}")
                skip = (sub + ".",)  # what is inside an unmarked splice is the splice's business
                continue
            # a marked splice (e.g. an SAE: mm_lens.sae) is exact; hooks on it and inside it still count
            found += [d for d, fn in module_hooks(sub, module) if not suffix_exact(fn)]
    return found
