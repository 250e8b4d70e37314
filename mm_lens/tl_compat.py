"""The rest of HookedTransformer's token interface, as TransformerLens code calls it.

:class:`TransformerLensMixin` gives :class:`~mm_lens.HookedVLM` ``to_tokens``, ``to_string``, ``to_str_tokens``,
``to_single_token``, ``tokens_to_residual_directions``, ``to_single_str_token``, ``get_token_position``,
``all_head_labels`` and :meth:`~TransformerLensMixin.with_images`, under which
TransformerLens functions that only pass text (``transformer_lens.utils.test_prompt``, ...) run with an image.
:func:`tokenize` is what ``to_tokens`` does: TransformerLens' ``prepend_bos`` / ``padding_side`` /
``truncate`` semantics on top of the checkpoint's own tokenizer.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from mm_lens.inputs import MultimodalInput, PositionMap, RowPositions, check_vocabulary


def tokenizer_fields(cfg, tokenizer):
    """``cfg`` with ``tokenizer_prepends_bos`` read from the tokenizer (does it put a BOS before ``""``?) and
    ``default_prepend_bos`` following it unless set: a VLM reads text the way its processor tokenizes it."""
    if tokenizer is None:
        return cfg
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    prepends = bos is not None and len(ids) > 0 and ids[0] == bos
    default = prepends if cfg.default_prepend_bos is None else cfg.default_prepend_bos
    return cfg.replace(tokenizer_prepends_bos=prepends, default_prepend_bos=default)


def wants_bos(model, prepend_bos: Optional[bool]) -> bool:
    if prepend_bos is not None and not isinstance(prepend_bos, bool):
        raise TypeError(f"prepend_bos must be True, False or None (cfg.default_prepend_bos), got {prepend_bos!r}")
    return bool(model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos)


def resolve_padding_side(model, explicit: Optional[str] = None) -> str:
    """The side text batches are padded on, resolved as TransformerLens 3 and 4 do: the one asked for, else
    ``cfg.default_padding_side``, else the tokenizer's (LLaVA's: left), else ``"right"``."""
    side = explicit or model.cfg.default_padding_side or getattr(model.tokenizer, "padding_side", None) or "right"
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    return side


def inferred_mask(model, tokens: Tensor) -> Tensor:
    """The attention mask of token ids given without one, as TransformerLens' forward infers it: leading padding
    tokens masked when text is padded on the left, every position real otherwise (right padding needs no mask
    for the real positions)."""
    if model.tokenizer is None or resolve_padding_side(model) != "left" or model.tokenizer.pad_token_id is None:
        return torch.ones_like(tokens)
    from transformer_lens.utilities import get_attention_mask

    return get_attention_mask(model.tokenizer, tokens, bool(model.cfg.default_prepend_bos), padding_side="left")


def tokenize(model, texts: Union[str, Sequence[str]], prepend_bos: Optional[bool] = None,
             padding_side: Optional[str] = None, truncate: bool = True
             ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """``(token ids, attention mask)`` of texts, padded, as TransformerLens' ``to_tokens``.

    The tokenizer adds its special tokens; ``prepend_bos=True`` then puts a BOS in front where it added
    none, ``False`` removes the one it added (None: ``cfg.default_prepend_bos``). ``padding_side``: see
    :func:`resolve_padding_side`. ``truncate``: rows longer than ``cfg.n_ctx`` are cut to it, with a warning.
    """
    model._require_tokenizer()
    tok, side = model.tokenizer, resolve_padding_side(model, padding_side)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("to_tokens takes a string or a non-empty list of strings (images: model.to_inputs)")
    want, adds, bos = wants_bos(model, prepend_bos), bool(model.cfg.tokenizer_prepends_bos), tok.bos_token_id
    if want and not adds and bos is None:
        raise ValueError("prepend_bos=True, but this tokenizer has no BOS token; pass prepend_bos=False")
    rows = []
    for text in texts:
        ids = list(tok(text, add_special_tokens=True)["input_ids"])
        if want and not adds:
            ids = [bos] + ids
        elif adds and not want and ids and ids[0] == bos:
            ids = ids[1:]
        rows.append(ids)
    n_ctx = model.cfg.n_ctx
    if truncate and max(len(r) for r in rows) > n_ctx:
        warnings.warn(f"{sum(len(r) > n_ctx for r in rows)} text(s) truncated to the context window "
                      f"(cfg.n_ctx = {n_ctx} tokens); pass truncate=False to keep every token", stacklevel=3)
        rows = [r[:n_ctx] for r in rows]
    return pad_rows(model, rows, side)


def pad_rows(model, rows: Sequence[Sequence[int]], side: str) -> tuple[Tensor, Tensor]:
    """Token rows of different lengths padded into ``(ids, mask)`` on ``side``."""
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    pad = model.tokenizer.pad_token_id
    pad = pad if pad is not None else (model.cfg.pad_token_id if model.cfg.pad_token_id is not None else 0)
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    for i, r in enumerate(rows):
        at = slice(n - len(r), n) if side == "left" else slice(0, len(r))
        ids[i, at] = torch.tensor(list(r), dtype=torch.long)
        mask[i, at] = 1
    return ids, mask


def token_rows(tokens) -> list[list[int]]:
    """Token ids given as a list of ints, a ``[pos]``/``[batch, pos]`` tensor or array -> one list per row."""
    if isinstance(tokens, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in tokens):
        return [[int(t) for t in tokens]]
    t = torch.as_tensor(np.asarray(tokens) if isinstance(tokens, np.ndarray) else tokens)
    if t.dtype.is_floating_point or t.ndim > 2:
        raise TypeError(f"token ids must be integers of shape [pos] or [batch, pos], got {t.dtype} {tuple(t.shape)}")
    t = t.reshape(1, -1) if t.ndim < 2 else t
    return [row.tolist() for row in t]


class TransformerLensMixin:
    """HookedTransformer's token interface, and text-only TransformerLens functions run with an image."""

    _bound_images = None

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: build it with from_pretrained/from_hf and a processor")

    def to_tokens(self, input: Union[str, Sequence[str]], prepend_bos: Optional[bool] = None,
                  padding_side: Optional[str] = None, move_to_device: bool = True, truncate: bool = True
                  ) -> Int[Tensor, "batch pos"]:
        """Text token ids ``[batch, pos]``, as TransformerLens' ``to_tokens``.

        Image placeholders are not expanded (use :meth:`to_inputs`, or :meth:`with_images`). ``prepend_bos``:
        None follows ``cfg.default_prepend_bos``, which is the tokenizer's own convention (LLaVA's Llama tokenizer
        adds a BOS, Phi-2's does not: the checkpoint was trained that way; TransformerLens' default is True);
        True puts a BOS in front where the tokenizer adds none, False removes the one it adds. Several texts are
        padded on ``padding_side``, by default as TransformerLens 3 and 4 resolve it: ``cfg.default_padding_side``
        if set, else the tokenizer's side (LLaVA's tokenizers pad on the left), else ``"right"``; the forward then
        reads such token ids as TransformerLens does (leading padding masked when the side is left; right padding
        needs no mask for the real positions). :meth:`to_inputs` pads on the tokenizer's side with an attention
        mask, :meth:`generate` on the left.
        ``truncate``: texts longer than ``cfg.n_ctx`` are cut to it (with a warning); ``move_to_device``: onto
        ``cfg.device``.
        """
        texts = [input] if isinstance(input, str) else list(input)
        bound = self._bound_text_inputs(texts, prepend_bos, padding_side)
        if bound is not None:
            ids, _ = pad_rows(self, [b.input_ids[0].tolist() for b in bound], resolve_padding_side(self, padding_side))
        else:
            ids, _ = tokenize(self, texts, prepend_bos, padding_side, truncate)
        return ids.to(self.cfg.device) if move_to_device else ids

    def to_string(self, tokens) -> Union[str, list[str]]:
        self._require_tokenizer()
        if isinstance(tokens, Tensor) and tokens.ndim == 2:
            return [self.to_string(t) for t in tokens]
        return self.tokenizer.decode(tokens if not isinstance(tokens, Tensor) else tokens.tolist())

    def to_str_tokens(self, input, prepend_bos: Optional[bool] = None, padding_side: Optional[str] = None,
                      prompts=None) -> Union[list[str], list[list[str]]]:
        """Token strings, as TransformerLens: of a text (``prepend_bos`` as in :meth:`to_tokens`), a list of texts
        (a list per text), token ids (a list of ints, ``[pos]``/``[1, pos]`` tensor or array; ``[batch, pos]``
        gives a list per row), or a :class:`MultimodalInput` / ``(images, prompts)``, whose image positions read
        ``<img row,col>`` (``<img i:row,col>`` past the first image)."""
        self._require_tokenizer()
        if isinstance(prepend_bos, str) or (isinstance(prepend_bos, (list, tuple)) and not isinstance(input, str)):
            prompts, prepend_bos = prepend_bos, None  # to_str_tokens(images, prompts)
        if prompts is None and isinstance(input, (str, list, tuple)) and input and \
                all(isinstance(t, str) for t in ([input] if isinstance(input, str) else input)):
            if not isinstance(input, str):
                return [self.to_str_tokens(t, prepend_bos, padding_side) for t in input]
            bound = self._bound_text_inputs([input], prepend_bos, padding_side)
            if bound is None:
                return [self.tokenizer.decode([t]) for t in self.to_tokens(input, prepend_bos, padding_side)[0].tolist()]
            input = bound[0]
        if prompts is None and not isinstance(input, MultimodalInput):
            rows = [[self.tokenizer.decode([t]) for t in row] for row in token_rows(input)]
            return rows[0] if len(rows) == 1 else rows
        inputs = self._as_inputs(input, prompts)
        out = []
        for b, row in enumerate(inputs.positions):
            labels = []
            for p, t in enumerate(inputs.input_ids[b].tolist()):
                coord = row.grid_coordinate(p) if t == self.cfg.image_token_id else None
                if coord is not None and hasattr(row, "image_label"):  # LLaVA-NeXT: tiles and newlines too
                    labels.append(row.image_label(p))
                elif coord is None:
                    labels.append(self.tokenizer.decode([t]))
                else:
                    i, r, c = coord
                    prefix = f"{i}:" if i else ""
                    labels.append(f"<img {prefix}cls>" if r < 0 else f"<img {prefix}{r},{c}>")
            out.append(labels)
        return out[0] if len(out) == 1 else out

    def to_single_token(self, string: str) -> int:
        """The id of ``string`` as one token; a ``ValueError`` if it is several tokens or not in the vocabulary."""
        self._require_tokenizer()
        ids = self.tokenizer(string, add_special_tokens=False)["input_ids"]
        check_vocabulary(self.tokenizer, string, ids)
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens ({ids}), not a single token")
        return int(ids[0])

    def tokens_to_residual_directions(self, tokens) -> Float[Tensor, "... d_model"]:
        """The unembedding direction(s) of token(s): ``W_U[:, token]``."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        if isinstance(tokens, int):
            return self.W_U[:, tokens]
        tokens = torch.as_tensor(tokens, device=self.W_U.device)
        return self.W_U[:, tokens].movedim(0, -1)

    def to_single_str_token(self, int_token: int) -> str:
        """The string of one token id."""
        if not isinstance(int_token, (int, np.integer)) or isinstance(int_token, bool):
            raise TypeError(f"to_single_str_token takes one token id (an int), got {int_token!r}")
        return self.to_str_tokens([int(int_token)])[0]

    def get_token_position(self, single_token: Union[str, int, Tensor], input, mode: str = "first",
                           prepend_bos: Optional[bool] = None, padding_side: Optional[str] = None) -> int:
        """Position of ``single_token`` (a string of one token or an id) in ``input`` (text, ``[pos]`` or
        ``[1, pos]`` token ids, or a one-row :class:`MultimodalInput`), its ``"first"`` or ``"last"`` match."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        if isinstance(input, MultimodalInput):
            tokens = input.input_ids
        elif isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        else:
            tokens = torch.as_tensor(input)
        rows = token_rows(tokens)
        if len(rows) != 1:
            raise ValueError(f"get_token_position searches one row; got {len(rows)} rows")
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        hits = [p for p, t in enumerate(rows[0]) if t == token]
        if not hits:
            raise ValueError(f"token {token} ({self.to_str_tokens([token])[0]!r}) does not occur in the input")
        return hits[0] if mode == "first" else hits[-1]

    def all_head_labels(self) -> list[str]:
        """``["L0H0", "L0H1", ...]``: every attention head of the language model."""
        return [f"L{l}H{h}" for l in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]

    @contextmanager
    def with_images(self, images):
        """Inside, text that holds the image placeholder is read with ``images`` (each placeholder takes the
        next image; every text the same images): ``to_tokens`` expands the placeholders, ``to_str_tokens``
        labels image positions, and token ids holding image positions run with the images' pixels. So
        TransformerLens functions that pass only text and token ids run on a picture::

            with model.with_images(image):
                transformer_lens.utils.test_prompt("USER: <image>\\nwhat color is the circle ? ASSISTANT:", "red",
                                                   model)
        """
        if self.image_pipeline is not None and not self.image_pipeline.binds_images:
            raise ValueError(f"with_images needs a fixed number of image positions per image; "
                             f"{self.cfg.original_architecture}'s crops vary: build inputs with "
                             "model.to_inputs(images, prompts)")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        previous = self._bound_images
        self._bound_images = images
        try:
            yield self
        finally:
            self._bound_images = previous

    def _bound_text_inputs(self, texts: Sequence[str], prepend_bos, padding_side) -> Optional[list[MultimodalInput]]:
        """One-row inputs for texts holding the placeholder while images are bound (else None)."""
        if self._bound_images is None or not any(self.image_token in t for t in texts):
            return None
        want, adds = wants_bos(self, prepend_bos), bool(self.cfg.tokenizer_prepends_bos)
        if want and not adds:
            raise ValueError("prepend_bos=True, but this model's tokenizer adds no BOS: image prompts are read as the "
                             "checkpoint's processor reads them")
        return [self.to_inputs(self._bound_images, t, add_special_tokens=want or not adds) for t in texts]

    def _bound_token_inputs(self, tokens: Tensor, mask: Tensor) -> MultimodalInput:
        """Token ids holding image positions, with the bound images' pixels for each row."""
        if self._bound_images is None:
            raise ValueError(
                "these token ids contain image placeholders but no pixel values: pass a MultimodalInput "
                "(model.to_inputs(images, prompts)) so the images are not dropped, or run inside "
                "`with model.with_images(images):`")
        one = self.to_inputs(self._bound_images, self.image_token * len(self._bound_images), add_special_tokens=False)
        n_tokens = self.cfg.n_image_tokens
        rows = []
        for b in range(tokens.shape[0]):
            is_image = tokens[b] == self.cfg.image_token_id
            image = is_image.nonzero().flatten().cpu()
            if len(image) != n_tokens * len(self._bound_images):
                raise ValueError(f"row {b} has {len(image)} image positions; the {len(self._bound_images)} bound "
                                 f"image(s) take {n_tokens} each")
            real = mask[b].bool().cpu()
            rows.append(RowPositions(image, (~is_image.cpu() & real).nonzero().flatten(), int(real.nonzero().max()),
                                     list(image.split(n_tokens)), one.positions[0].grid_shape, "", []))
        pixels = one.pixel_values.repeat(tokens.shape[0], *([1] * (one.pixel_values.ndim - 1)))
        return MultimodalInput(tokens, mask.to(tokens.device), pixels.to(tokens.device),
                               PositionMap(rows, tokens == self.cfg.image_token_id), self.cfg.image_token_id,
                               image_sizes=one.image_sizes * tokens.shape[0])
