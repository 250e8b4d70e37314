"""SAE-Lens SAEs spliced into HookedVLM at their hook point, as SAE-Lens' ``HookedSAETransformer`` does it.

``model.add_sae(sae)`` puts a :class:`SAESplice` where the HookPoint named by ``sae.cfg.metadata.hook_name``
stood (a transcoder reads at that hook and writes at ``hook_name_out``). The splice encodes and decodes
the activation at every position; with ``use_error_term`` it adds back the SAE's error (the input minus the
reconstruction computed with the SAE's hooks off), so the model computes what it did without the SAE while
hooks on the SAE's features still act. The SAE's own hook points sit under the splice, so the cache has
``blocks.1.hook_resid_post.hook_sae_acts_post`` etc., as with SAE-Lens. The SAE is not a submodule of the
model (its parameters stay out of ``model.parameters()`` and ``state_dict()``, as in SAE-Lens).

An SAE acts on each position alone, so a splice is marked :func:`mm_lens.positionwise` and the fast patching
engine keeps it on; architectures that look across positions or rows (:data:`PER_POSITION` lists the others),
``exclude_special_tokens`` (which reads the token ids of the whole input) and transcoders reading in one
block and writing in another are not, and patching falls back to full forwards.
No SAE-Lens import here: any object with SAE-Lens' ``encode``/``decode``/``cfg.metadata``/``hook_dict`` works.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from mm_lens.hooks import positionwise
from mm_lens.sae.names import block_of, expected_width, resolve_hook_name

Exclude = Union[bool, Sequence[int]]
OWN_HOOKS = ("hook_sae_error", "hook_sae_output")  # the splice's own: it computes the error term and the output
# SAE-Lens architectures whose encode and decode act on each position alone (TemporalSAE attends over earlier
# positions; BatchTopK's training form picks its top activations across the whole batch)
PER_POSITION = ("standard", "topk", "abstopk", "jumprelu", "gated", "matching_pursuit", "transcoder", "skip_transcoder",
                "jumprelu_transcoder", "jumprelu_skip_transcoder")


class SAESplice(nn.Module):
    """An SAE (or transcoder) in place of a HookPoint: ``x -> decode(encode(x))`` (+ the error term)."""

    def __init__(self, sae, use_error_term: bool, exclude_special_tokens: Exclude, replaced: nn.Module, input_hook: str,
                 output_hook: str):
        super().__init__()
        self.__dict__["sae"] = sae  # not a submodule: cache paths read <hook>.hook_sae_acts_post, as in SAE-Lens
        self.__dict__["replaced"] = replaced  # what stood at the output hook, put back by reset_saes
        for name, hook in sae.hook_dict.items():
            if name not in OWN_HOOKS:
                setattr(self, name, hook)  # the SAE's hook points (input, acts_pre, acts_post, recons, ...)
        self.hook_sae_error = HookPoint()  # [..., d_out]: input minus the hook-free reconstruction (use_error_term)
        self.hook_sae_output = HookPoint()  # [..., d_out]: what flows on into the model
        self.use_error_term = use_error_term
        self.exclude_special_tokens = exclude_special_tokens
        self.input_hook, self.output_hook = input_hook, output_hook
        self.token_mask: Optional[Tensor] = None  # [batch, pos]: True where the SAE is bypassed
        self.captured: Optional[Tensor] = None  # a transcoder's input, read at its input hook
        if per_position(sae) and exclude_special_tokens is False and block_of(input_hook) == block_of(output_hook):
            positionwise(self)

    def forward(self, x: Float[Tensor, "... d_out"]) -> Float[Tensor, "... d_out"]:
        sae = self.sae
        source = x if self.input_hook == self.output_hook else self._take_captured()
        sae_in = source.to(sae.W_dec.device)
        out = sae.decode(sae.encode(sae_in))
        if self.use_error_term:
            with torch.no_grad():
                error = x.to(out.device) - _without_hooks(sae, sae_in)
                error = self.hook_sae_error(self._masked(error, torch.zeros_like(error)))
            out = out + error
        out = self._masked(out.to(x.device, x.dtype), x)
        return self.hook_sae_output(out)

    def _take_captured(self) -> Tensor:
        if self.captured is None:
            raise ValueError(f"the transcoder at {self.output_hook} did not see its input hook {self.input_hook} fire "
                             "in this forward; run the model from before it")
        x, self.captured = self.captured, None
        return x

    def _masked(self, out: Tensor, original: Tensor) -> Tensor:
        """``out`` with ``original`` at the excluded (special-token) positions."""
        if self.exclude_special_tokens is False:
            return out
        mask = self.token_mask
        if mask is None or tuple(mask.shape) != tuple(out.shape[:2]):
            raise ValueError(f"exclude_special_tokens needs the token ids of the positions the SAE at {self.output_hook} "
                             f"sees ({tuple(out.shape[:2])}); it applies to language-model hooks run by model(...)")
        mask = mask.to(out.device).reshape(*mask.shape, *([1] * (out.ndim - 2)))
        return torch.where(mask, original.to(out.dtype), out)


def per_position(sae) -> bool:
    """Whether the SAE's architecture encodes and decodes each position alone (see :data:`PER_POSITION`)."""
    architecture = getattr(sae.cfg, "architecture", None)
    return (architecture() if callable(architecture) else architecture) in PER_POSITION


@contextmanager
def _hooks_off(sae):
    """The SAE with every hook point swapped for an identity (what SAE-Lens' error term is computed without)."""
    hooks = dict(sae.hook_dict)
    try:
        for name in hooks:
            setattr(sae, name, nn.Identity())
        yield
    finally:
        for name, hook in hooks.items():
            setattr(sae, name, hook)


def _without_hooks(sae, x: Tensor) -> Tensor:
    with _hooks_off(sae):
        return sae.decode(sae.encode(x))


def special_token_ids(tokenizer) -> list[int]:
    """BOS, EOS, padding, separator, class and decoder-start ids of a tokenizer: what SAE-Lens'
    ``exclude_special_tokens=True`` leaves alone (not the image token, not chat-template tokens)."""
    names = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "cls_token_id", "decoder_start_token_id")
    ids = {getattr(tokenizer, n, None) for n in names}
    return sorted(i for i in ids if isinstance(i, int))


class SAEMixin:
    """``add_sae``, ``saes``, ``reset_saes``, ``run_with_saes``, ``run_with_cache_with_saes``,
    ``run_with_hooks_with_saes``: SAE-Lens' ``HookedSAETransformer`` interface on HookedVLM."""

    @property
    def _splices(self) -> dict[str, SAESplice]:
        if "_sae_splices" not in self.__dict__:
            self.__dict__["_sae_splices"] = {}
        return self.__dict__["_sae_splices"]

    @property
    def acts_to_saes(self) -> dict[str, Any]:
        """``{hook name: SAE}`` of the SAEs spliced in."""
        return {name: s.sae for name, s in self._splices.items()}

    def add_sae(self, sae, use_error_term: Optional[bool] = None, exclude_special_tokens: Exclude = False) -> None:
        """Splice ``sae`` in at its hook (``sae.cfg.metadata.hook_name``; TransformerBridge and Hugging Face names
        are translated, see :func:`mm_lens.sae.resolve_hook_name`), replacing an SAE already there.

        ``use_error_term``: None keeps ``sae.use_error_term`` (as SAE-Lens). ``exclude_special_tokens``: True
        bypasses the SAE at BOS/EOS/padding positions (:func:`special_token_ids`), a list at those token ids.
        A name that is no hook point, a width that does not match the activation, or hooks already on the
        replaced hook point are errors (SAE-Lens logs a warning and skips the SAE).
        """
        meta = sae.cfg.metadata
        input_hook = resolve_hook_name(self, meta.hook_name)
        output_hook = resolve_hook_name(self, getattr(meta, "hook_name_out", None) or meta.hook_name)
        _check_width(self, sae, input_hook, output_hook)
        if input_hook in self._splices:
            self._remove_splice(input_hook)
        replaced = self.get_submodule(output_hook)
        if not isinstance(replaced, HookPoint):
            raise ValueError(f"{output_hook} holds a {type(replaced).__name__}, not a HookPoint: another SAE writes there "
                             "(reset_saes() first)")
        if replaced.fwd_hooks or replaced._forward_hooks or replaced._forward_pre_hooks:
            raise ValueError(f"{output_hook} has hooks on it, which the SAE spliced in its place would drop: remove "
                             f"them, or put them on {output_hook}.hook_sae_output / .hook_sae_input")
        error = sae.use_error_term if use_error_term is None else use_error_term
        splice = SAESplice(sae, bool(error), exclude_special_tokens, replaced, input_hook, output_hook)
        if input_hook != output_hook:  # a transcoder: read at the input hook, write at the output hook
            def capture(module, args, output):  # keeps what the transcoder reads, changes nothing
                splice.captured = output

            if splice.__dict__.get("mm_lens_suffix_exact"):
                positionwise(capture)
            splice.__dict__["capture_handle"] = self.get_submodule(input_hook).register_forward_hook(capture)
        _set_submodule(self, output_hook, splice)
        self._splices[input_hook] = splice
        self.setup()

    def _remove_splice(self, name: str) -> SAESplice:
        splice = self._splices.pop(name)
        _set_submodule(self, splice.output_hook, splice.replaced)
        if "capture_handle" in splice.__dict__:
            splice.__dict__.pop("capture_handle").remove()
        self.setup()
        return splice

    def reset_saes(self, act_names: Union[str, Sequence[str], None] = None) -> None:
        """Take out the SAEs at ``act_names`` (all by default), putting the original hook points back."""
        names = list(self._splices) if act_names is None else [act_names] if isinstance(act_names, str) else act_names
        for name in names:
            key = resolve_hook_name(self, name) if name not in self._splices else name
            if key not in self._splices:
                raise ValueError(f"no SAE is spliced in at {name!r}; spliced: {list(self._splices)}")
            self._remove_splice(key)
        self.setup()

    @contextmanager
    def saes(self, saes=(), reset_saes_end: bool = True, use_error_term: Optional[bool] = None,
             exclude_special_tokens: Exclude = False):
        """SAEs spliced in for the block; on leaving, the SAEs that were at those hooks before are back."""
        saes = [saes] if hasattr(saes, "cfg") else list(saes)
        before = []
        try:
            for sae in saes:
                name = resolve_hook_name(self, sae.cfg.metadata.hook_name)
                before.append((name, self._splices.get(name)))
                self.add_sae(sae, use_error_term, exclude_special_tokens)
            yield self
        finally:
            if reset_saes_end:
                for name, previous in reversed(before):
                    if name in self._splices:
                        self._remove_splice(name)
                    if previous is not None:
                        self.add_sae(previous.sae, previous.use_error_term, previous.exclude_special_tokens)
                self.setup()

    def run_with_saes(self, *model_args, saes=(), reset_saes_end: bool = True, use_error_term: Optional[bool] = None,
                      exclude_special_tokens: Exclude = False, **model_kwargs):
        """The forward with ``saes`` spliced in for this run."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(self, *model_args, saes=(), reset_saes_end: bool = True,
                                 use_error_term: Optional[bool] = None, exclude_special_tokens: Exclude = False,
                                 **kwargs):
        """``run_with_cache`` with ``saes`` spliced in: the cache holds their hooks (``<hook>.hook_sae_acts_post``)."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            return self.run_with_cache(*model_args, **kwargs)

    def run_with_hooks_with_saes(self, *model_args, saes=(), reset_saes_end: bool = True,
                                 use_error_term: Optional[bool] = None, exclude_special_tokens: Exclude = False,
                                 **kwargs):
        """``run_with_hooks`` with ``saes`` spliced in."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            return self.run_with_hooks(*model_args, **kwargs)

    def sae_hook_shapes(self, shapes: dict) -> dict:
        """``shapes`` (hook name -> activation shape, :func:`mm_lens.memory.hook_shapes`) with each spliced hook
        replaced by its SAE's hooks, counted in elements of the model's dtype (a wider SAE dtype counts more)."""
        out = dict(shapes)
        size = torch.empty(0, dtype=self.cfg.dtype).element_size()
        for splice in self._splices.values():
            replaced = out.pop(splice.output_hook, None)
            if replaced is None:
                continue
            sae, rows = splice.sae, tuple(replaced[:2])
            wider = max(1, torch.empty(0, dtype=sae.dtype).element_size() // size)
            d_out = getattr(sae.cfg, "d_out", sae.cfg.d_in)
            own = {"hook_sae_input": sae.cfg.d_in, "hook_sae_acts_pre": sae.cfg.d_sae, "hook_sae_acts_post": sae.cfg.d_sae,
                   "hook_sae_recons": d_out, **({"hook_sae_error": d_out} if splice.use_error_term else {})}
            out.update({f"{splice.output_hook}.{name}": rows + (width * wider,) for name, width in own.items()})
            out[f"{splice.output_hook}.hook_sae_output"] = tuple(replaced)
        return out

    def _set_sae_token_masks(self, inputs) -> None:
        """Before a forward: each splice that leaves special tokens alone learns where they are in ``inputs``."""
        for splice in self._splices.values():
            if splice.exclude_special_tokens is False:
                continue
            ids = splice.exclude_special_tokens
            ids = special_token_ids(self.tokenizer) if ids is True else list(ids)
            tokens = inputs.input_ids
            splice.token_mask = torch.isin(tokens, torch.tensor(ids, dtype=tokens.dtype, device=tokens.device))


def _set_submodule(model, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _check_width(model, sae, input_hook: str, output_hook: str) -> None:
    d_out = getattr(sae.cfg, "d_out", sae.cfg.d_in)
    for name, width, what in ((input_hook, sae.cfg.d_in, "d_in"), (output_hook, d_out, "d_out")):
        expected = expected_width(model, name)
        if expected is not None and width != expected:
            raise ValueError(f"the SAE's {what} is {width} but {name} carries {expected} numbers per position: an SAE "
                             "for another model or another hook (its hook_name, or mm_lens.sae.rename_hook)")
