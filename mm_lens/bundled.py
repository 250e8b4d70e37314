"""Names of models that ship inside the package, resolved to their folders."""

from __future__ import annotations

from pathlib import Path

BUNDLED: dict[str, Path] = {
    "mm-lens/shapes": Path(__file__).parent / "toy" / "weights",
}


def resolve(name_or_path: str) -> str:
    """A bundled model's folder for its name; anything else unchanged."""
    path = BUNDLED.get(str(name_or_path))
    return str(path) if path is not None else str(name_or_path)
