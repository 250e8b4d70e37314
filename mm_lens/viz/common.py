"""Shared plotting helpers."""

from __future__ import annotations


def figure(width: float, height: float):
    """A matplotlib Figure not attached to any GUI backend (safe in scripts, tests and notebooks)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")
