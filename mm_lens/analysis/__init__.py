"""Analysis methods, one per file; free functions returning data (plots live in mm_lens.viz)."""

from mm_lens.analysis import groups
from mm_lens.analysis.lens import LogitLensResult, logit_lens

__all__ = ["groups", "logit_lens", "LogitLensResult"]
