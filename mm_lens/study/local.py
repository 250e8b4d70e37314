"""The local engine: one in-process worker, the same code path as each Ray actor."""

from __future__ import annotations

from typing import Callable, Sequence

from mm_lens.data import Example
from mm_lens.study.worker import Worker, WorkerSpec


def execute(spec: WorkerSpec, examples: Sequence[Example], sink: Callable, workers: int = 1) -> dict:
    """Process ``examples`` in order, handing each one's rows to ``sink(example_id, rows)``."""
    if workers != 1:
        raise ValueError(f"the local engine runs one worker in this process, not {workers}: use engine='ray' "
                         "(one model replica per worker)")
    if not examples:
        return {"restarts": 0}
    worker = Worker(spec)
    for example in examples:
        sink(example.id, worker.process(example))
    return {"restarts": 0}
