"""The Ray engine: one actor per worker, each loading the model once; the driver writes every result.

``address=None`` uses the running Ray session, or starts a local cluster (and stops it at the end);
``"auto"`` joins the cluster this machine belongs to (``ray start --head`` / ``ray start
--address=...``); ``"ray://host:10001"`` connects through Ray Client. Each actor gets
``resources`` (default one GPU when the cluster has GPUs, else one CPU core): give ``num_gpus=2`` for
a model spread over two GPUs by its device map.

Each actor keeps ``depth`` examples queued so it never waits on the driver. When an actor dies (its
process crashes, runs out of memory, or is killed with ``ray.kill``), a new one replaces it and the
examples it held go back to the queue; an example whose worker dies ``max_retries + 1`` times becomes
an error row. The driver hands each example's rows to the sink exactly once.
"""

from __future__ import annotations

import uuid
from collections import deque
from typing import Callable, Optional, Sequence

from mm_lens.data import Example
from mm_lens.study.worker import Worker, WorkerSpec, error_rows

INSTALL = "the Ray engine needs Ray: pip install 'mm-lens[ray]' (or pip install 'ray[client]')"


def require_ray():
    try:
        import ray
    except ImportError:
        raise ImportError(INSTALL) from None
    return ray


def connect(ray, address: Optional[str]) -> bool:
    """Connect to Ray; True when this call started a local cluster (to be shut down at the end)."""
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)
    return True


def default_resources(ray) -> dict:
    return {"num_gpus": 1, "num_cpus": 1} if ray.cluster_resources().get("GPU", 0) > 0 else {"num_cpus": 1}


def check_capacity(ray, workers: int, resources: dict) -> None:
    total = ray.cluster_resources()
    for key, name in (("num_gpus", "GPU"), ("num_cpus", "CPU")):
        need = workers * resources.get(key, 0)
        if need > total.get(name, 0):
            raise ValueError(f"{workers} workers x {resources.get(key)} {name} need {need:g} {name}s but the Ray cluster "
                             f"has {total.get(name, 0):g}: use fewer workers or pass worker_resources=...")


class _Slot:
    """One worker position: its current actor and how many times it has been replaced."""

    def __init__(self, index: int):
        self.index, self.generation, self.actor, self.done_since_start = index, -1, None, 0


def execute(spec: WorkerSpec, examples: Sequence[Example], sink: Callable, workers: int = 1,
            address: Optional[str] = None, resources: Optional[dict] = None, max_retries: int = 2,
            depth: int = 2, expected_versions: Optional[dict] = None) -> dict:
    """Process ``examples`` on ``workers`` actors; ``sink(example_id, rows)`` once per example. Returns stats."""
    ray = require_ray()
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if not examples:
        return {"restarts": 0, "retried": 0}
    started = connect(ray, address)
    token = uuid.uuid4().hex[:8]
    slots = [_Slot(i) for i in range(workers)]
    try:
        resources = dict(resources) if resources else default_resources(ray)
        check_capacity(ray, workers, resources)
        actor_cls = ray.remote(Worker)
        spec_ref = ray.put(spec)

        def start(slot: _Slot, wait: bool = True) -> None:
            slot.generation += 1
            slot.done_since_start = 0
            name = f"mm-lens-study/{token}/worker-{slot.index}.{slot.generation}"
            slot.actor = actor_cls.options(name=name, max_restarts=0, **resources).remote(spec_ref)
            if wait:
                _check_versions(ray, slot.actor, expected_versions)

        for slot in slots:  # every replica loads its model at the same time
            start(slot, wait=False)
        for slot in slots:
            _check_versions(ray, slot.actor, expected_versions)
        return _loop(ray, slots, deque(examples), sink, start, max_retries, depth)
    finally:
        for slot in slots:
            if slot.actor is not None:
                ray.kill(slot.actor, no_restart=True)
        if started:
            ray.shutdown()


def _check_versions(ray, actor, expected: Optional[dict]) -> None:
    """Waits for the actor's model to load; refuses a worker whose library versions differ from the study's."""
    try:
        got = ray.get(actor.versions.remote())
    except ray.exceptions.RayActorError as e:
        raise RuntimeError(f"a study worker failed to start (loading the model): {_cause(e)}") from None
    if expected:
        diff = {k: (expected.get(k), got.get(k)) for k in expected if k != "python" and expected.get(k) != got.get(k)}
        if diff:
            raise ValueError(f"a Ray worker runs other library versions than the study records (study, worker): {diff}; "
                             "install the same versions on every node")


def _loop(ray, slots: list, queue: deque, sink: Callable, start: Callable, max_retries: int, depth: int) -> dict:
    inflight: dict = {}  # ref -> (slot, generation, example)
    attempts: dict[str, int] = {}
    restarts = retried = 0
    while queue or inflight:
        for slot in slots:
            held = sum(1 for s, g, _ in inflight.values() if s is slot and g == slot.generation)
            while queue and held < depth:
                example = queue.popleft()
                inflight[slot.actor.process.remote(example)] = (slot, slot.generation, example)
                held += 1
        ready, _ = ray.wait(list(inflight), num_returns=1)
        for ref in ready:
            slot, generation, example = inflight.pop(ref)
            try:
                rows = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                if slot.generation == generation:  # first news of this actor's death: replace it
                    if slot.done_since_start == 0 and generation > 0:
                        raise RuntimeError(f"study worker {slot.index} died twice without finishing an example: "
                                           f"{_cause(e)}") from None
                    restarts += 1
                    start(slot)
                attempts[example.id] = attempts.get(example.id, 0) + 1
                if attempts[example.id] <= max_retries:
                    queue.appendleft(example)
                    retried += 1
                    continue
                rows = error_rows(example.id, RuntimeError(f"the worker died {attempts[example.id]} times while "
                                                           f"processing this example: {_cause(e)}"))
            except ray.exceptions.RayError as e:  # an error outside the method (e.g. the result did not serialise)
                rows = error_rows(example.id, e)
            else:
                if slot.generation == generation:
                    slot.done_since_start += 1
            sink(example.id, rows)
    return {"restarts": restarts, "retried": retried}


def _cause(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
