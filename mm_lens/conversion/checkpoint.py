"""Reading original-format checkpoints without executing anything from them.

Only safetensors files (single or sharded with ``model.safetensors.index.json``) and JSON
are read: no pickle, no ``trust_remote_code``. Key renaming is a declarative prefix table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from torch import Tensor


def read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{str(path)!r} does not exist: expected a JSON file there")
    return json.loads(path.read_text())


def read_safetensors(folder) -> dict[str, Tensor]:
    """Every tensor of a checkpoint folder (``*.safetensors``, sharded or not), as float tensors on CPU."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(read_json(index)["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = (f"; it has {pickled}, which would need unpickling: convert them to safetensors in a trusted "
                "environment first") if pickled else ""
        raise ValueError(f"no safetensors weights in {str(folder)!r}{hint}")
    state: dict[str, Tensor] = {}
    for name in files:
        state.update(load_file(str(folder / name)))
    return state


def rename_keys(source: Mapping[str, Tensor], table: Sequence[tuple[str, str]], skip: Iterable[str] = (),
                what: str = "checkpoint") -> dict[str, Tensor]:
    """Rename by the first matching ``(source_prefix, target_prefix)``; ``skip`` prefixes are dropped.

    A key no prefix matches is an error that lists every such key.
    """
    skip = tuple(skip)
    out, unknown = {}, []
    for key, value in source.items():
        if skip and key.startswith(skip):
            continue
        for old, new in table:
            if key.startswith(old):
                out[new + key[len(old):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected keys in this {what} (no rule for them): {sorted(unknown)}")
    return out


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
