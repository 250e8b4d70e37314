"""What a study is: the configuration recorded beside its results (``study.json``).

Everything that changes the numbers is recorded and compared when a study is resumed: the model
(name, and its revision or the SHA-256 of its files), the method and its keyword arguments (with the
method's defaults filled in), the model's keyword arguments (placement excluded), the prompt template,
the filter, and the versions of mm_lens and the libraries that compute. The dataset, the engine and
the number of workers are recorded too, but may change between runs (a study may grow, or move to a
cluster).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Optional

STUDY_FILE = "study.json"
PLACEMENT = ("device", "device_map", "max_memory", "offload_folder")  # where the model runs: not compared
NOT_COMPARED = ("created", "dataset", "engine", "files_checked")
LIBRARIES = ("torch", "transformers", "transformer-lens")


@dataclass
class StudyConfig:
    model: str
    model_id: dict  # {"revision": commit} for a hub id, {"sha256": {file: digest}} for files, {"state_sha256": ...}
    method: str
    method_kwargs: dict
    model_kwargs: dict
    template: str
    filter: str
    columns: list
    versions: dict
    created: str = ""
    dataset: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)
    files_checked: dict = field(default_factory=dict)  # {file: [size, mtime_ns]}: reuse a digest when unchanged

    def compared(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if k not in NOT_COMPARED}

    def differences(self, other: "StudyConfig") -> list[str]:
        """``"key: old -> new"`` for every compared field that differs (``self`` is the recorded one)."""
        a, b = self.compared(), other.compared()
        out = []
        for key in a:
            if a[key] != b.get(key):
                if isinstance(a[key], dict) and isinstance(b.get(key), dict):
                    sub = sorted(k for k in set(a[key]) | set(b[key]) if a[key].get(k) != b[key].get(k))
                    out += [f"{key}.{k}: {a[key].get(k)!r} -> {b[key].get(k)!r}" for k in sub]
                else:
                    out.append(f"{key}: {a[key]!r} -> {b.get(key)!r}")
        return out

    def save(self, folder: str) -> None:
        write_atomic(os.path.join(folder, STUDY_FILE), json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True))

    @classmethod
    def load(cls, folder: str) -> Optional["StudyConfig"]:
        path = os.path.join(folder, STUDY_FILE)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def check_same(recorded: Optional[StudyConfig], new: StudyConfig, folder: str) -> None:
    """Refuse to append to results made with a different configuration."""
    if recorded is None:
        return
    diff = recorded.differences(new)
    if diff:
        raise ValueError(f"{folder} holds results of a different study configuration; differences (recorded -> now):\n  "
                         + "\n  ".join(diff) + "\nwrite to another out folder, or delete the old results to start over")


def versions() -> dict:
    """mm_lens's version and those of the libraries that compute the numbers."""
    import mm_lens

    out = {"mm_lens": mm_lens.__version__, "python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            out[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            out[lib] = None
    return out


def jsonable(value: Any) -> Any:
    """A JSON form of a keyword argument that compares equal exactly when the argument does."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if callable(value):
        return f"<callable {getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', repr(value))}>"
    if hasattr(value, "tolist"):  # tensors, arrays
        return jsonable(value.tolist())
    return repr(value)


def placement_free(model_kwargs: dict) -> dict:
    return {k: jsonable(v) for k, v in sorted(model_kwargs.items()) if k not in PLACEMENT}


# ---------------------------------------------------------------- the model's identity
def model_identity(model: Any, recorded: Optional[StudyConfig] = None) -> tuple[str, dict, dict]:
    """``(name, model_id, files_checked)`` for a model name, a folder, or a model object.

    A folder (bundled models included): the SHA-256 of each file (reused from ``recorded`` when the
    file's size and modification time are unchanged). A hub id: the commit of the snapshot in the local
    Hugging Face cache (``{"revision": None}`` when it is not cached). A model object: the SHA-256 of
    its state dict.
    """
    from mm_lens import bundled

    if not isinstance(model, (str, os.PathLike)):
        return getattr(getattr(model, "cfg", None), "model_name", type(model).__name__), \
            {"state_sha256": state_digest(model)}, {}
    name = str(model)
    folder = bundled.resolve(name)
    if os.path.isdir(folder):
        old = (recorded.model_id.get("sha256", {}), recorded.files_checked) if recorded else ({}, {})
        digests, checked = folder_digests(folder, *old)
        return name, {"sha256": digests}, checked
    return name, {"revision": hub_revision(name)}, {}


def folder_digests(folder: str, old_digests: dict, old_checked: dict) -> tuple[dict, dict]:
    digests, checked = {}, {}
    for root, _, files in os.walk(folder):
        for f in sorted(files):
            path = os.path.join(root, f)
            rel = os.path.relpath(path, folder)
            if rel.startswith(".") or "/." in rel:
                continue
            st = os.stat(path)
            stamp = [st.st_size, st.st_mtime_ns]
            digests[rel] = old_digests[rel] if old_checked.get(rel) == stamp and rel in old_digests else file_sha256(path)
            checked[rel] = stamp
    return dict(sorted(digests.items())), dict(sorted(checked.items()))


def file_sha256(path: str, chunk: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_digest(model) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of a model's parameters and buffers, one tensor at a time."""
    import torch

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def hub_revision(repo_id: str) -> Optional[str]:
    """The commit of the cached snapshot of a hub model (what ``from_pretrained`` loads offline), or None."""
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, local_files_only=True)
    except Exception:  # not cached, not a hub id, or no huggingface_hub: nothing to pin
        return None
    return os.path.basename(os.path.normpath(path))


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place (never a half-written file)."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
