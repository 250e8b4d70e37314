"""Reading checkpoints tensor by tensor, without executing anything from them.

Only safetensors files (single or sharded with ``model.safetensors.index.json``) and JSON
are read: no pickle, no ``trust_remote_code``. A checkpoint is a lazy mapping: its keys and
shapes come from the files' headers, and ``source[key]`` reads that one tensor (a view on the
memory-mapped file, released as soon as the caller drops it), so a conversion never holds the
whole checkpoint. Key renaming is a declarative prefix table over such a mapping.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor

SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist: expected a JSON file there")
    return json.loads(path.read_text())


class Checkpoint(Mapping):
    """A read-only ``{key: tensor}`` view whose ``shape``/``dtype`` need no tensor data."""

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self[key].dtype


class InMemory(Checkpoint):
    """A state dict already in memory (e.g. a Hugging Face model's ``state_dict()``)."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        self.tensors = tensors

    def __getitem__(self, key: str) -> Tensor:
        return self.tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def as_checkpoint(source: Mapping[str, Tensor]) -> Checkpoint:
    return source if isinstance(source, Checkpoint) else InMemory(source)


class SafetensorsFolder(Checkpoint):
    """Every tensor of a checkpoint folder (``*.safetensors``, sharded or not), read one at a time.

    Headers are read once; each ``folder[key]`` opens its shard, maps the file and returns that
    tensor (a view on the mapping: nothing is copied until the caller converts it, and the mapping
    goes when the tensor does).
    """

    def __init__(self, folder):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.files = safetensors_files(self.folder)
        self.file_of: dict[str, Path] = {}
        self.headers: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for name in self.files:
            path = self.folder / name
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    self.file_of[key] = path
                    self.headers[key] = (tuple(piece.get_shape()), SAFETENSORS_DTYPES.get(piece.get_dtype(), torch.float32))

    def __getitem__(self, key: str) -> Tensor:
        from safetensors import safe_open

        if key not in self.file_of:
            raise KeyError(key)
        with safe_open(str(self.file_of[key]), framework="pt") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.file_of)

    def __len__(self) -> int:
        return len(self.file_of)

    def __contains__(self, key) -> bool:
        return key in self.file_of

    def shape(self, key: str) -> tuple[int, ...]:
        return self.headers[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self.headers[key][1]


def safetensors_files(folder: Path) -> list[str]:
    """The weight files of a folder (from its index when sharded); pickled weights are refused by name."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index)["weight_map"].values()))
        absent = [f for f in files if not (folder / f).is_file()]
        if absent:
            raise ValueError(f"{str(index)!r} names shards that are not in the folder: {absent}")
        return files
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = (f"; it has {pickled}, which would need unpickling: convert them to safetensors in a trusted "
                "environment first") if pickled else ""
        raise ValueError(f"no safetensors weights in {str(folder)!r}{hint}")
    return files


def read_safetensors(folder) -> SafetensorsFolder:
    """The checkpoint in ``folder`` as a lazy mapping (tensors are read when indexed)."""
    return SafetensorsFolder(folder)


class View(Checkpoint):
    """Tensors of one or more checkpoints under new names (``names``: new key -> (source index, its key))."""

    def __init__(self, sources: Sequence[Mapping[str, Tensor]], names: dict[str, tuple[int, str]]):
        self.sources, self.names = [as_checkpoint(s) for s in sources], names

    def _where(self, key: str) -> tuple[Checkpoint, str]:
        i, name = self.names[key]
        return self.sources[i], name

    def __getitem__(self, key: str) -> Tensor:
        source, name = self._where(key)
        return source[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, key) -> bool:
        return key in self.names

    def shape(self, key: str) -> tuple[int, ...]:
        source, name = self._where(key)
        return source.shape(name)

    def dtype(self, key: str) -> torch.dtype:
        source, name = self._where(key)
        return source.dtype(name)


def merged(*sources: Mapping[str, Tensor]) -> Checkpoint:
    """One mapping over several (e.g. a LLaVA folder and its separate CLIP folder); a key in two is an error."""
    names: dict[str, tuple[int, str]] = {}
    clashes = []
    for i, source in enumerate(sources):
        for key in source:
            if key in names:
                clashes.append(key)
            names[key] = (i, key)
    if clashes:
        raise ValueError(f"the same weights come from two checkpoints: {sorted(clashes)}")
    return View(sources, names)


def rename_keys(source: Mapping[str, Tensor], table: Sequence[tuple[str, str]], skip: Iterable[str] = (),
                what: str = "checkpoint") -> Checkpoint:
    """Rename by the first matching ``(source_prefix, target_prefix)``; ``skip`` prefixes are dropped.

    A key no prefix matches is an error that lists every such key. Nothing is read: the result is
    a lazy mapping over ``source``.
    """
    skip = tuple(skip)
    names, unknown = {}, []
    for key in source:
        if skip and key.startswith(skip):
            continue
        for old, new in table:
            if key.startswith(old):
                names[new + key[len(old):]] = (0, key)
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected keys in this {what} (no rule for them): {sorted(unknown)}")
    return View([source], names)


def layer_count(source: Mapping[str, Tensor], prefix: str) -> int:
    """Number of ``{prefix}{i}.`` layer indices present."""
    indices = {int(k[len(prefix):].split(".")[0]) for k in source if k.startswith(prefix)}
    if indices and indices != set(range(len(indices))):
        raise ValueError(f"layers under {prefix!r} are not numbered 0..n-1: {sorted(indices)}")
    return len(indices)


def load_tokenizer(folder):
    """The folder's tokenizer by the class its ``tokenizer_config.json`` names (or the fast tokenizer of its
    ``tokenizer.json``), without reading ``config.json``: a remote-code ``auto_map`` there is never consulted."""
    import transformers

    folder = Path(folder)
    config = folder / "tokenizer_config.json"
    name = read_json(config).get("tokenizer_class") if config.is_file() else None
    cls = getattr(transformers, name, None) if name else None
    if cls is None and (folder / "tokenizer.json").is_file():
        cls = transformers.PreTrainedTokenizerFast
    if cls is None:
        raise ValueError(f"no tokenizer that can be loaded without running code in {str(folder)!r} (tokenizer_class "
                         f"{name!r}); pass tokenizer=... yourself")
    return cls.from_pretrained(str(folder))
