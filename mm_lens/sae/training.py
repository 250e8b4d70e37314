"""Activations at chosen positions for training SAEs with SAE-Lens: streamed batches, or SAE-Lens' cache format.

:func:`activations` is what SAE-Lens' ``SAETrainer`` reads as its ``data_provider``: an iterator of
``[batch_size, d_in]`` tensors (SAE-Lens' ``ActivationsStore`` gives the same), here taken from a dataset of
images and questions at image, text or any group's positions, so an SAE can be trained on visual tokens only.
:func:`write_cached_activations` writes them as SAE-Lens' ``CacheActivationsRunner`` does (a Hugging Face
dataset saved to disk, one column named after the hook holding ``[context_size, d_in]`` rows and a
``token_ids`` column), which ``LanguageModelSAERunnerConfig(use_cached_activations=True,
cached_activations_path=...)`` trains from.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import warnings
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mm_lens.data import LLAVA_TEMPLATE
from mm_lens.inputs import MultimodalInput
from mm_lens.sae.names import block_of
from mm_lens.sae.splice import special_token_ids

Exclude = Union[bool, Sequence[int]]


def activations(model, dataset: Iterable, hook_name: str, positions: Any = "image", batch_size: int = 4096,
                examples_per_forward: int = 8, template: str = LLAVA_TEMPLATE, shuffle: bool = True,
                buffer_size: Optional[int] = None, seed: int = 0, repeat: bool = True, in_memory: bool = False,
                exclude_special_tokens: Exclude = False, device=None, dtype: torch.dtype = torch.float32,
                progress: bool = False) -> Iterator[Float[Tensor, "batch_size d_in"]]:
    """Batches of activations at ``hook_name``, ``positions`` of each example only, for SAE-Lens' ``SAETrainer``.

    ``dataset``: examples with an image and a question (:class:`mm_lens.data.Example`, the bundled model's
    examples; the prompt is ``template``), ``(image, prompt)`` pairs, prompts (text only) or
    :class:`~mm_lens.MultimodalInput` rows; ``examples_per_forward`` of them run as one padded batch.
    ``positions``: ``"image"``, ``"text"``, ``"all"`` (real positions, no padding) or any position group
    (:mod:`mm_lens.analysis.groups`: ``"question"``, ``"object"``, ``"last"``, ...); vision-tower hooks take
    ``"image"`` (the patch tokens) or ``"all"`` (the class token too). Activations with a head axis
    (``hook_z``) are flattened to ``n_heads * d_head``, as SAE-Lens does. ``exclude_special_tokens``: True
    drops BOS/EOS/padding positions, a list drops those token ids (SAE-Lens' option of the same name).
    The model runs only up to the hook's block.

    Batches are ``[batch_size, d_in]`` on ``device`` (default the model's) in ``dtype``, shuffled through a
    buffer of ``buffer_size`` activations (default 8 batches) seeded by ``seed``. ``repeat``: start the
    dataset over when it ends (the trainer asks for as many as it trains on; needs a sequence), else stop
    after one pass (the last batch may be smaller). ``in_memory``: keep the first pass and serve later passes
    from memory instead of running the model again (for datasets that fit).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if repeat and not isinstance(dataset, (Sequence, MultimodalInput)):
        raise ValueError("repeat=True reads the dataset again after each pass: pass a list (or repeat=False)")
    buffer_size = max(buffer_size or 8 * batch_size, 2 * batch_size)
    generator = torch.Generator().manual_seed(seed)
    kept: list[Tensor] = []  # the first pass, with in_memory
    buffer: list[Tensor] = []
    epoch = 0
    while epoch == 0 or repeat:
        fresh = not (in_memory and epoch > 0)
        chunks = (a for a, _ in collect(model, dataset, hook_name, positions, examples_per_forward, template,
                                        exclude_special_tokens, device, dtype, progress)) if fresh else iter(kept)
        seen = 0
        for acts in chunks:
            kept += [acts] if in_memory and fresh else []
            seen += len(acts)
            buffer.append(acts)
            if sum(len(b) for b in buffer) >= buffer_size:  # mix, hand out half, keep half for mixing
                mixed = _shuffled(torch.cat(buffer), generator, shuffle)
                n_out = len(mixed) // 2 // batch_size * batch_size
                yield from mixed[:n_out].split(batch_size)
                buffer = [mixed[n_out:]]
        if seen == 0:
            raise ValueError(f"the dataset gave no activations at {hook_name} for positions={positions!r}")
        epoch += 1
    if buffer:  # one pass only: the rest, the last batch smaller
        yield from _shuffled(torch.cat(buffer), generator, shuffle).split(batch_size)


def _shuffled(x: Tensor, generator: torch.Generator, shuffle: bool) -> Tensor:
    return x[torch.randperm(len(x), generator=generator).to(x.device)] if shuffle else x


def collect(model, dataset: Iterable, hook_name: str, positions: Any = "image", examples_per_forward: int = 8,
            template: str = LLAVA_TEMPLATE, exclude_special_tokens: Exclude = False, device=None,
            dtype: torch.dtype = torch.float32, progress: bool = False
            ) -> Iterator[tuple[Float[Tensor, "n d_in"], Int[Tensor, " n"]]]:
    """``(activations, token ids)`` at the chosen positions, one forward (``examples_per_forward`` examples) at a
    time, in dataset order (see :func:`activations` for the arguments)."""
    if hook_name not in model.hook_dict:
        from mm_lens.sae.names import resolve_hook_name

        hook_name = resolve_hook_name(model, hook_name)
    device = device if device is not None else model.cfg.device
    stop = _stop_layer(model, hook_name)
    total = len(dataset) if hasattr(dataset, "__len__") else None
    bar = tqdm(total=total, desc=f"activations at {hook_name}", disable=not progress)
    try:
        for inputs, count in _forward_batches(model, dataset, examples_per_forward, template):
            with torch.no_grad():
                _, cache = model.run_with_cache(inputs, names_filter=[hook_name], stop_at_layer=stop,
                                                return_cache_object=False)
                acts, ids = select(model, inputs, cache[hook_name], hook_name, positions, exclude_special_tokens)
            bar.update(count)
            yield acts.to(device, dtype), ids.to(device)
    finally:
        bar.close()


def _stop_layer(model, hook_name: str) -> Optional[int]:
    """The model runs up to the hook: blocks 0..l for a hook in block l, none for the vision tower and projector."""
    where = block_of(hook_name)
    if hook_name.startswith(("vision_encoder.", "vision_projector.")) or hook_name == "hook_embed":
        return 0
    if where is not None and where[0] == "blocks":
        return where[1] + 1 if where[1] + 1 < model.cfg.n_layers else None
    return None


def _forward_batches(model, dataset: Iterable, size: int, template: str) -> Iterator[tuple[MultimodalInput, int]]:
    """``(inputs, number of examples)`` for each forward: up to ``size`` examples padded into one batch."""
    if isinstance(dataset, MultimodalInput):
        yield dataset, dataset.shape[0]
        return
    pending: list = []
    for item in dataset:
        if isinstance(item, MultimodalInput):
            yield from _flush(model, pending, template)
            pending = []
            yield item, 1
            continue
        pending.append(item)
        if len(pending) >= size:
            yield from _flush(model, pending, template)
            pending = []
    yield from _flush(model, pending, template)


def _flush(model, items: list, template: str) -> Iterator[tuple[MultimodalInput, int]]:
    """Items of one kind (texts, (image, prompt) pairs or examples) as one batch of inputs."""
    if not items:
        return
    if all(isinstance(i, str) for i in items):
        yield model.to_inputs(None, items), len(items)
        return
    images, prompts, meta = [], [], {"question": [], "box": []}
    for item in items:
        if isinstance(item, (tuple, list)) and len(item) == 2:
            images.append(item[0])
            prompts.append(item[1])
            meta["question"].append(None)
            meta["box"].append(None)
        elif hasattr(item, "image") and hasattr(item, "question"):
            from mm_lens.data import Example

            ex = Example(item.image, item.question, getattr(item, "answer", ""), box=getattr(item, "box", None))
            images.append(ex.load_image())
            prompts.append(ex.prompt(template, model.image_token))
            meta["question"].append(item.question)
            meta["box"].append(None if ex.box is None else list(ex.box))
        else:
            raise TypeError(f"a dataset item must be an example (.image, .question), an (image, prompt) pair, a prompt "
                            f"or a MultimodalInput, got {type(item).__name__}")
    inputs = model.to_inputs(images, prompts)
    inputs.meta.update({k: v for k, v in meta.items() if any(x is not None for x in v)})
    yield inputs, len(items)


def select(model, inputs: MultimodalInput, acts: Tensor, hook_name: str, positions: Any = "image",
           exclude_special_tokens: Exclude = False) -> tuple[Float[Tensor, "n d_in"], Int[Tensor, " n"]]:
    """``(activations, token ids)`` of the chosen positions of a cached activation, rows in position order."""
    flat = acts.flatten(2) if acts.ndim > 3 else acts  # heads flattened, as SAE-Lens reads hook_z
    if hook_name.startswith(("vision_encoder.", "vision_projector.")):
        return _image_tower_rows(model, flat, hook_name, positions)
    if flat.shape[:2] != inputs.shape:
        raise ValueError(f"{hook_name} has shape {tuple(acts.shape)}, not [batch, pos, ...] over the input's "
                         f"{tuple(inputs.shape)} positions: choose a hook with one value per position")
    mask = position_mask(model, inputs, positions)
    if exclude_special_tokens is not False:
        ids = special_token_ids(model.tokenizer) if exclude_special_tokens is True else list(exclude_special_tokens)
        tokens = inputs.input_ids
        mask = mask & ~torch.isin(tokens, torch.tensor(ids, dtype=tokens.dtype, device=tokens.device))
    mask = mask.to(flat.device)
    return flat[mask], inputs.input_ids.to(flat.device)[mask]


def position_mask(model, inputs: MultimodalInput, positions: Any) -> Tensor:
    """Bool ``[batch, pos]``: the real positions of each row in ``positions`` (a group name or object, or ``"all"``)."""
    from mm_lens.analysis.groups import resolve_batch

    real = inputs.attention_mask.bool()
    if isinstance(positions, str) and positions == "all":
        return real
    if isinstance(positions, str) and positions == "image" and not bool(inputs.positions.image_mask.any()):
        raise ValueError("positions='image', but the inputs have no image positions")
    mask = torch.zeros_like(real)
    for row, pos in enumerate(resolve_batch(model, inputs, positions)):
        mask[row, pos.to(mask.device)] = True
    return mask & real


def _image_tower_rows(model, acts: Tensor, hook_name: str, positions: Any) -> tuple[Tensor, Tensor]:
    """Vision-tower and projector activations ``[n_images, tokens, d]``: every image's patches (``"image"``), or
    every token, class token included (``"all"``)."""
    if positions not in ("image", "all"):
        raise ValueError(f"{hook_name} is inside the vision tower: positions must be 'image' (its patches) or 'all', "
                         f"not {positions!r}")
    vision = model.cfg.vision
    has_cls = hook_name.startswith("vision_encoder.") and vision.has_cls_token and acts.shape[1] == vision.n_ctx
    rows = acts[:, 1:] if (has_cls and positions == "image") else acts
    rows = rows.reshape(-1, rows.shape[-1])
    return rows, torch.full((len(rows),), model.cfg.image_token_id, dtype=torch.long, device=rows.device)


def write_cached_activations(model, dataset: Iterable, hook_name: str, path: str, positions: Any = "image",
                             context_size: Optional[int] = None, dtype: str = "float32", shuffle: bool = True,
                             seed: int = 42, examples_per_forward: int = 8, template: str = LLAVA_TEMPLATE,
                             exclude_special_tokens: Exclude = False, progress: bool = False,
                             shard_rows: int = 1024):
    """Write the activations :func:`activations` streams in SAE-Lens' cached-activation format; returns the
    ``datasets.Dataset``.

    As SAE-Lens' ``CacheActivationsRunner``: a Hugging Face dataset saved to ``path`` (which must be empty or
    absent) with a column named ``hook_name`` of ``[context_size, d_in]`` rows and ``token_ids``
    ``[context_size]`` (int32), shuffled with ``seed``. The selected positions are laid end to end and cut
    into rows of ``context_size`` (default: the first forward's positions per example, e.g. the image tokens
    of one image); a remainder shorter than a row is not written, with a warning. ``shard_rows`` rows are
    held in memory at a time (then written to a temporary shard). Train with
    ``LanguageModelSAERunnerConfig(hook_name=hook_name, context_size=context_size, use_cached_activations=True,
    cached_activations_path=path, ...)``. ``path/mm_lens_activations.json`` records how they were made.
    """
    import datasets
    from datasets import Array2D, Dataset, Features, Sequence, Value

    exclude_special_tokens = list(exclude_special_tokens) if isinstance(exclude_special_tokens, (list, tuple)) \
        else bool(exclude_special_tokens)
    if os.path.isdir(path) and os.listdir(path):
        raise ValueError(f"{path} is not empty: SAE-Lens' cache format needs a fresh folder")
    stream = collect(model, dataset, hook_name, positions, examples_per_forward, template, exclude_special_tokens,
                     "cpu", torch.float32, progress)
    first = next(stream, None)
    if first is None or len(first[0]) == 0:
        raise ValueError(f"the dataset gave no activations at {hook_name} for positions={positions!r}")
    n_examples = len(dataset) if hasattr(dataset, "__len__") else None
    size = context_size or _per_example(first, examples_per_forward, n_examples)
    d_in = first[0].shape[-1]
    features = Features({hook_name: Array2D(shape=(size, d_in), dtype=dtype),
                         "token_ids": Sequence(Value("int32"), length=size)})
    with tempfile.TemporaryDirectory() as scratch:  # shards on disk, so memory holds one shard at a time
        shards, pending, n_rows = [], [first], 0
        for chunk in itertools.chain(stream, [None]):
            pending += [chunk] if chunk is not None else []
            if chunk is None or sum(len(a) for a, _ in pending) >= shard_rows * size:
                acts, ids = torch.cat([a for a, _ in pending]), torch.cat([t for _, t in pending])
                n = len(acts) // size * size
                if n:
                    shard = Dataset.from_dict({hook_name: acts[:n].reshape(-1, size, d_in).numpy(),
                                               "token_ids": ids[:n].reshape(-1, size).to(torch.int32).numpy()},
                                              features=features)
                    shard.save_to_disk(os.path.join(scratch, f"shard_{len(shards):05d}"))
                    shards.append(datasets.load_from_disk(os.path.join(scratch, f"shard_{len(shards):05d}")))
                    n_rows += n // size
                pending = [(acts[n:], ids[n:])]
        if not shards:
            raise ValueError(f"{len(pending[0][0])} activation(s) make no full row of context_size={size}")
        table = datasets.concatenate_datasets(shards)
        if shuffle:
            table = table.shuffle(seed=seed)
        table.save_to_disk(path)
    dropped = len(pending[0][0])
    if dropped:
        warnings.warn(f"{dropped} activation(s) after the last full row of context_size={size} were not written",
                      stacklevel=2)
    with open(os.path.join(path, "mm_lens_activations.json"), "w") as f:
        json.dump({"hook_name": hook_name, "positions": str(positions), "context_size": size, "d_in": d_in,
                   "rows": n_rows, "template": template, "model": model.cfg.model_name,
                   "exclude_special_tokens": exclude_special_tokens}, f)
    return datasets.load_from_disk(path)


def _per_example(first: tuple[Tensor, Tensor], per_forward: int, n_examples: Optional[int]) -> int:
    examples = min(per_forward, n_examples) if n_examples else per_forward
    return max(1, len(first[0]) // max(1, examples))
