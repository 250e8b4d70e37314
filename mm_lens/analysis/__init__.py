"""Analysis methods, one per file; free functions returning data (plots live in mm_lens.viz)."""

from mm_lens.analysis import groups

__all__ = ["groups"]
