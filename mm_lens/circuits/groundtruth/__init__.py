"""Models whose mechanism is known by design, each with its true edge set (see :mod:`.models`)."""

from mm_lens.circuits.groundtruth.models import SUITE, GroundTruth, load

__all__ = ["SUITE", "GroundTruth", "load"]
