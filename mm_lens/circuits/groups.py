"""The position groups of a circuit: a partition of every real position into named, disjoint groups.

A circuit's nodes are (component, group) pairs, so every position must belong to exactly one group.
Groups are taken in order and each keeps the positions no earlier group took; ``"last"`` always
comes first (the logits read it), and whatever no group claims becomes ``"other"`` (BOS, the chat
template, ...). Padding belongs to no group. ``patches=True`` splits the image positions no earlier
group took into one group per patch (``"img r,c"``), for small patch grids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mm_lens.analysis.groups import GroupLike, as_group, resolve_batch
from mm_lens.inputs import MultimodalInput

MAX_PATCH_GROUPS = 64
PositionsSpec = Union[None, Sequence[Union[GroupLike, tuple]], Mapping[str, GroupLike]]


@dataclass
class GroupInfo:
    """What a group covers in batch row 0: its positions, token strings and image patches ``(row, col)``."""

    name: str
    positions: list[int]
    tokens: list[str]
    patches: list[tuple[int, int]] = field(default_factory=list)

    @property
    def kind(self) -> str:
        if self.patches and len(self.patches) == len(self.positions):
            return "image"
        return "mixed" if self.patches else "text"


@dataclass
class PositionGroups:
    """``index[b, p]``: the group of position ``p`` in row ``b`` (``len(names)`` for padding).

    ``reach[K, Q]``: some position of group K is at or before some position of group Q in the same
    row, so a head at Q can read K through its keys and values. ``image[g]``: group g holds an image position in
    some row (DeepStack's vision features reach only those).
    """

    names: list[str]
    index: Int[Tensor, "batch pos"]
    reach: Bool[Tensor, "key_group query_group"]
    info: list[GroupInfo]
    image: Optional[Bool[Tensor, " group"]] = None

    def __len__(self) -> int:
        return len(self.names)

    @property
    def last(self) -> int:
        return self.names.index("last")

    def one_hot(self, dtype=torch.float32) -> Tensor:
        """``[batch, pos, group]`` membership (padding in no group)."""
        return torch.nn.functional.one_hot(self.index, len(self.names) + 1)[..., :-1].to(dtype)

    def __repr__(self) -> str:
        return f"PositionGroups({self.names})"


def default_spec(inputs: MultimodalInput, patches: bool = False) -> list[str]:
    """``last``, then ``object``/``non_object`` (with ``meta['box']``) or ``image`` (none with ``patches``: every
    patch is a group), then ``question`` (with ``meta['question']``)."""
    spec = ["last"]
    if not patches:
        spec += ["object", "non_object"] if "box" in inputs.meta else (["image"] if inputs.pixel_values is not None
                                                                        else [])
    if "question" in inputs.meta:
        spec.append("question")
    return spec


def _named(spec: PositionsSpec, inputs: MultimodalInput, patches: bool) -> list[tuple[str, GroupLike]]:
    if spec is None:
        spec = default_spec(inputs, patches)
    if isinstance(spec, (str, int)) or hasattr(spec, "fn"):
        spec = [spec]
    items = list(spec.items()) if isinstance(spec, Mapping) else [
        s if isinstance(s, tuple) and len(s) == 2 and isinstance(s[0], str) else (as_group(s).name, s) for s in spec]
    names = [n for n, _ in items]
    if "last" not in names:
        items.insert(0, ("last", "last"))
    else:
        items.insert(0, items.pop(names.index("last")))
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"position group names must be unique, got {dupes} twice: name them, e.g. "
                         "positions={'subject': groups.question('circle'), ...}")
    return items


def position_groups(model, inputs: MultimodalInput, positions: PositionsSpec = None, patches: bool = False
                    ) -> PositionGroups:
    """Partition every real position of ``inputs`` into the named groups of ``positions`` (module docstring).

    ``positions``: a list of group names / Groups / ``(name, group)`` pairs, or a ``{name: group}`` dict;
    default :func:`default_spec`.
    """
    B, P = inputs.shape
    real = inputs.attention_mask.bool().cpu()
    taken = ~real
    names, columns = [], []
    for name, group in _named(positions, inputs, patches):
        rows = resolve_batch(model, inputs, group)
        mask = torch.zeros(B, P, dtype=torch.bool)
        for r, pos in enumerate(rows):
            mask[r, pos.cpu()] = True
        mask &= ~taken
        if not bool(mask.any()):
            raise ValueError(f"position group {name!r} has no positions left: earlier groups ({names}) took them all")
        taken |= mask
        names.append(name)
        columns.append(mask)
    if patches:
        names, columns, taken = _patch_groups(inputs, names, columns, taken)
    if bool((~taken).any()):
        names.append("other")
        columns.append(~taken)
    index = torch.full((B, P), len(names), dtype=torch.long)
    for g, mask in enumerate(columns):
        index[mask] = g
    is_image = inputs.positions.image_mask.cpu().bool()
    image = torch.tensor([bool((is_image & (index == g)).any()) for g in range(len(names))])
    return PositionGroups(names, index, _reach(index, len(names)), _info(model, inputs, names, index), image)


def _patch_groups(inputs, names, columns, taken):
    rp = inputs.positions[0]
    if len(rp.images) != 1 or any(len(r.images) != 1 for r in inputs.positions):
        raise ValueError("patches=True needs exactly one image per row")
    rows, cols = rp.grid_shape
    if rows * cols > MAX_PATCH_GROUPS:
        raise ValueError(f"patches=True makes one group per patch: {rows}x{cols} patches is too many (at most "
                         f"{MAX_PATCH_GROUPS}); use groups such as 'object'/'non_object' instead")
    for r in range(rows):
        for c in range(cols):
            mask = torch.zeros_like(taken)
            for b, row in enumerate(inputs.positions):
                mask[b, row.patch(r, c)] = True
            mask &= ~taken
            if bool(mask.any()):
                taken = taken | mask
                names.append(f"img {r},{c}")
                columns.append(mask)
    return names, columns, taken


def _reach(index: Tensor, n: int) -> Tensor:
    """``reach[K, Q]``: in some row, a position of K is at or before a position of Q."""
    reach = torch.zeros(n, n, dtype=torch.bool)
    for row in index:
        first = torch.full((n,), row.shape[0], dtype=torch.long)
        last = torch.full((n,), -1, dtype=torch.long)
        for p, g in enumerate(row.tolist()):
            if g < n:
                first[g] = min(int(first[g]), p)
                last[g] = max(int(last[g]), p)
        reach |= (first[:, None] <= last[None, :]) & (last[:, None] >= 0) & (last[None, :] >= 0)
    return reach


def _info(model, inputs, names, index) -> list[GroupInfo]:
    tokens = model.to_str_tokens(inputs)
    tokens = tokens[0] if tokens and isinstance(tokens[0], list) else tokens
    rp = inputs.positions[0]
    out = []
    for g, name in enumerate(names):
        pos = (index[0] == g).nonzero().flatten().tolist()
        coords = [rp.grid_coordinate(p) for p in pos]
        out.append(GroupInfo(name, pos, [tokens[p] for p in pos],
                             [(c[1], c[2]) for c in coords if c is not None and c[1] >= 0]))
    return out

